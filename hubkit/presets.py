"""Named model presets: the seed architectures at full size, and small variants that run on a laptop CPU.

Full-size presets reproduce the published architectures of the Korean models hubkit's users start from
(Polyglot-Ko / GPT-NeoX-Ko, KoGPT, KEByT5). They are only ever built on the ``meta`` device here: their
parameter counts are checked against the published figures without allocating gigabytes of weights.
The small presets share each family's shape (RoPE on half of every 64-dim head, untied embeddings) so
code written against them runs unchanged on the big ones.

``import hubkit.presets`` is light; torch and transformers are imported by the functions that build.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from hubkit.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel

Family = Literal["gpt_neox", "gptj", "t5"]


@dataclass(frozen=True)
class Preset:
    """One named architecture.

    Attributes:
        name: the preset name used on the command line (``--preset``).
        family: ``gpt_neox``, ``gptj`` (decoders) or ``t5`` (byte-level encoder-decoder).
        hyperparameters: keyword arguments of the family's transformers config class.
        seed_model: the published model whose architecture this reproduces, if any.
        published_parameters: the parameter count its model card publishes, if any.
        description: one line for listings and cards.
    """

    name: str
    family: Family
    hyperparameters: Mapping[str, Any] = field(hash=False)
    seed_model: str | None = None
    published_parameters: int | None = None
    description: str = ""

    @property
    def full_size(self) -> bool:
        """True for presets of published billion-parameter models (build those with ``meta=True``)."""
        return self.published_parameters is not None


def _neox(**hp: Any) -> Mapping[str, Any]:
    # Polyglot-Ko / GPT-NeoX-Ko conventions: RoPE on half of each head, parallel residual, untied head.
    base = {
        "rotary_pct": 0.5,
        "tie_word_embeddings": False,
        "use_parallel_residual": True,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "rotary_emb_base": 10000,
        "initializer_range": 0.02,
    }
    return types.MappingProxyType(base | hp)


def _gptj(**hp: Any) -> Mapping[str, Any]:
    base = {
        "tie_word_embeddings": False,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
    }
    return types.MappingProxyType(base | hp)


def _t5(**hp: Any) -> Mapping[str, Any]:
    # ByT5 conventions: 384 ids = 3 specials (pad 0, eos 1, unk 2) + 256 bytes (id = byte + 3) + 125 extra
    # ids; gated-GELU feed-forward; untied LM head; the encoder is deeper than the decoder.
    base = {
        "vocab_size": 384,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dropout_rate": 0.1,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
    }
    return types.MappingProxyType(base | hp)


_ALL = [
    # --- full size (meta device only) ---------------------------------------------------------------
    # Matches EleutherAI/polyglot-ko-3.8b's config.json (vocab_size 30080, tie_word_embeddings false).
    # The card's n_vocab "30,003 / 30,080" is tokenizer size / embedding rows: the 30,003-token vocabulary
    # is padded to 30,080 rows (a multiple of 128 for tensor-parallel sharding), and the published
    # 3,809,974,272 counts the padded rows. With HF's GPTNeoX classes the count comes out exact: each of
    # the 32 layers holds 12*d^2 + 13*d parameters (d = 3072; 13*d = four LayerNorm vectors, the 3*d QKV
    # bias, the 4*d up-projection bias and two d-sized output biases), plus 2 * 30,080 * d untied
    # embedding/head rows and the final LayerNorm's 2*d. A hand count that drops one d-sized bias per
    # layer lands 32 * 3,072 = 98,304 short, which looks like "16 missing vocab rows" but is not.
    Preset(
        "polyglot-ko-3.8b",
        "gpt_neox",
        _neox(
            vocab_size=30080,
            hidden_size=3072,
            num_hidden_layers=32,
            num_attention_heads=24,
            intermediate_size=12288,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=2,
        ),
        seed_model="EleutherAI/polyglot-ko-3.8b",
        published_parameters=3_809_974_272,
        description="Polyglot-Ko 3.8B: 32 layers, d 3072, 24 heads of 128, RoPE on 64 dims",
    ),
    Preset(
        "gpt-neox-ko-1.3b",
        "gpt_neox",
        _neox(
            vocab_size=30080,
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=8192,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=0,
        ),
        seed_model="EleutherAI/gpt-neox-ko-1.3b",
        published_parameters=1_331_810_304,
        description="GPT-NeoX-Ko / Polyglot-Ko 1.3B: 24 layers, d 2048, 16 heads of 128, RoPE on 64 dims",
    ),
    # KoGPT6B-ryan1.5b: GPT-J with RoPE on 64 of each 256-dim head, 64,512-row vocabulary.
    Preset(
        "kogpt-6b",
        "gptj",
        _gptj(
            vocab_size=64512,
            n_embd=4096,
            n_layer=28,
            n_head=16,
            n_inner=16384,
            rotary_dim=64,
            n_positions=2048,
        ),
        seed_model="kakaobrain/kogpt (KoGPT6B-ryan1.5b)",
        published_parameters=6_166_502_400,
        description="KoGPT 6B: GPT-J, 28 layers, d 4096, 16 heads of 256, RoPE on 64 dims",
    ),
    # GBST-KEByT5-large adds a GBST (gradient-based subword tokenization, CharFormer) layer that pools
    # byte embeddings 3:1 before the encoder; it needs the gbswt5 package's custom code, which hubkit does
    # not ship. This preset is the plain ByT5-large shape underneath (36 encoder / 12 decoder layers,
    # d 1536, gated-GELU d_ff 3840, 16 heads of 64) with ByT5's byte vocabulary, so its count is close to,
    # not equal to, the published 1.23B: the GBST block and KEByT5's Korean-specific vocabulary are absent.
    Preset(
        "kebyt5-large",
        "t5",
        _t5(d_model=1536, d_kv=64, d_ff=3840, num_layers=36, num_decoder_layers=12, num_heads=16),
        seed_model="etri-lirs/gbst-kebyt5-large-preview (without GBST)",
        published_parameters=1_230_000_000,
        description="KEByT5-large shape as plain ByT5-large (no GBST): byte-level T5, 36+12 layers, d 1536",
    ),
    # --- small variants that run here ---------------------------------------------------------------
    Preset(
        "neox-tiny",
        "gpt_neox",
        _neox(
            vocab_size=1000,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=256,
            max_position_embeddings=512,
        ),
        description="~0.5M-parameter GPT-NeoX for tests",
    ),
    # The default embedded model's architecture. 4 layers of d 256 with a 8,000-token vocabulary is ~7.3M
    # parameters: ~15 MB in bf16, and small enough to see the whole NSMC review set in ~30 min on 2 cores.
    Preset(
        "neox-small",
        "gpt_neox",
        _neox(
            vocab_size=8000,
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            max_position_embeddings=512,
        ),
        description="~7M-parameter GPT-NeoX: the default Korean model (hubkit/ko-nsmc-neox)",
    ),
    Preset(
        "neox-25m",
        "gpt_neox",
        _neox(
            vocab_size=8000,
            hidden_size=512,
            num_hidden_layers=5,
            num_attention_heads=8,
            intermediate_size=2048,
            max_position_embeddings=1024,
        ),
        description="~24M-parameter GPT-NeoX for benchmarks",
    ),
    Preset(
        "gptj-tiny",
        "gptj",
        _gptj(
            vocab_size=1000,
            n_embd=128,
            n_layer=2,
            n_head=2,
            n_inner=256,
            rotary_dim=32,
            n_positions=512,
            bos_token_id=0,
            eos_token_id=0,
        ),
        description="~0.5M-parameter GPT-J (RoPE on half of each 64-dim head) for tests",
    ),
    Preset(
        "t5-byte-tiny",
        "t5",
        _t5(d_model=128, d_kv=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=2),
        description="~0.6M-parameter byte-level T5 (ByT5 tokenizer) for tests",
    ),
    # The shipped byte-level model's architecture (hubkit/ko-nsmc-byt5). ByT5's 3:1 encoder:decoder depth
    # (bytes need a deep encoder; the decoder only writes short spans), 3 heads of 64 so that d_model =
    # heads x d_kv as in ByT5. ~3.9M parameters: ~7.8 MB in bf16, under the 10 MB asset budget, and
    # ~3,000 input bytes/s of training on one busy CPU core.
    Preset(
        "t5-byte-small",
        "t5",
        _t5(d_model=192, d_kv=64, d_ff=512, num_layers=6, num_decoder_layers=2, num_heads=3),
        description="~3.9M-parameter byte-level T5 (6+2 layers): the shipped hubkit/ko-nsmc-byt5",
    ),
]

#: Every preset by name, in listing order (full-size first).
PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}


def get_preset(name: str) -> Preset:
    """Looks a preset up by name.

    Raises:
        InvalidRequestError: unknown name (the message lists the known ones).
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidRequestError(
            f"unknown preset {name!r}: choose one of {', '.join(PRESETS)} (see `hubkit presets`)"
        ) from None


def build_config(name: str, *, vocab_size: int | None = None, **overrides: Any) -> PretrainedConfig:
    """The transformers config of a preset.

    Args:
        name: preset name.
        vocab_size: embedding rows (e.g. the length of a freshly trained tokenizer); default the preset's.
        **overrides: any other config field (``bos_token_id``, ``max_position_embeddings``...).

    Returns:
        A ``GPTNeoXConfig``, ``GPTJConfig`` or ``T5Config``.
    """
    preset = get_preset(name)
    hp = dict(preset.hyperparameters)
    if vocab_size is not None:
        if vocab_size < 1:
            raise InvalidRequestError(f"vocab_size must be positive, got {vocab_size}")
        hp["vocab_size"] = vocab_size
    hp.update(overrides)
    if preset.family == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(**hp)
    if preset.family == "gptj":
        from transformers import GPTJConfig

        return GPTJConfig(**hp)
    from transformers import T5Config

    return T5Config(**hp)


def _model_class(family: Family) -> type[PreTrainedModel]:
    if family == "gpt_neox":
        from transformers import GPTNeoXForCausalLM

        return GPTNeoXForCausalLM
    if family == "gptj":
        from transformers import GPTJForCausalLM

        return GPTJForCausalLM
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration


def build_model(
    name: str, *, vocab_size: int | None = None, seed: int = 0, meta: bool = False, **overrides: Any
) -> PreTrainedModel:
    """A freshly initialised model of a preset.

    Args:
        name: preset name.
        vocab_size: embedding rows; default the preset's.
        seed: torch seed for the initial weights (ignored with ``meta``).
        meta: build on the ``meta`` device: shapes only, no memory. Use it for full-size presets.
        **overrides: other config fields, as in `build_config`.

    Returns:
        A float32 model in train mode (on ``meta`` if asked).
    """
    import torch

    config = build_config(name, vocab_size=vocab_size, **overrides)
    preset = get_preset(name)
    cls = _model_class(preset.family)
    untie = (
        preset.family == "t5"
        and overrides.get("tie_word_embeddings", preset.hyperparameters.get("tie_word_embeddings", True))
        is False
    )
    if meta:
        # Every parameter is created on the meta device: a 6B model costs no memory and builds in seconds.
        with torch.device("meta"):
            model = cls(config)
            return untie_t5_head(model) if untie else model
    torch.manual_seed(seed)
    model = cls(config)
    return untie_t5_head(model) if untie else model


def untie_t5_head(model: PreTrainedModel) -> PreTrainedModel:
    """Gives a T5 its own LM head, as ByT5 / T5 v1.1 (and KEByT5) checkpoints have.

    transformers 5 builds every T5 with the head tied to the input embedding (``tie_word_embeddings=False``
    only turns off the output scaling that tying needs), while those checkpoints load untied because they
    hold both matrices. The new head is drawn from N(0, d_model^-0.5), fan-in scaling: transformers' N(0, 1)
    for untied heads makes the first logits ~sqrt(d_model) wide (a first loss of 117 instead of ~6.4 on
    t5-byte-small).
    """
    import torch

    shared = model.get_input_embeddings().weight
    head = torch.empty_like(shared)
    if not head.is_meta:
        with torch.no_grad():
            head.normal_(0.0, model.config.d_model**-0.5)
    model.lm_head.weight = torch.nn.Parameter(head)
    model.config.tie_word_embeddings = False  # saved in config.json, so every loader keeps them apart
    getattr(model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)  # save_pretrained stores it
    return model


def count_parameters(name_or_model: str | torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once) of a preset or a model.

    A preset name is built on the meta device, so this is cheap even for ``kogpt-6b``.
    """
    if isinstance(name_or_model, str):
        return _count_preset(name_or_model)
    return sum(p.numel() for p in name_or_model.parameters())


@functools.cache
def _count_preset(name: str) -> int:
    # Presets are immutable, so their counts are too; `hubkit presets` and cards ask repeatedly.
    return count_parameters(build_model(name, meta=True))


@dataclass(frozen=True)
class ParameterRow:
    """One row of a parameter table.

    Attributes:
        name: dotted module name (``""`` for the whole model).
        depth: 0 for the model, 1 for its children, and so on.
        parameters: parameters held by the module and its submodules.
        ratio: ``parameters`` / the model's total.
        megabytes: their size in MiB at the parameters' current dtype.
    """

    name: str
    depth: int
    parameters: int
    ratio: float
    megabytes: float


def parameter_table(model: torch.nn.Module, *, max_depth: int = 2) -> list[ParameterRow]:
    """Per-module parameter counts, like the layer table of the ko-gpt-bot-sc model card.

    Args:
        model: any torch module (meta-device models work: only shapes and dtypes are read).
        max_depth: how deep to list submodules (2 shows e.g. ``gpt_neox.embed_in`` and ``gpt_neox.layers``).

    Returns:
        The model's total first, then its modules in definition order; modules without parameters are
        left out.
    """
    total = count_parameters(model) or 1
    rows: list[ParameterRow] = []
    for name, module in model.named_modules():
        depth = 0 if not name else name.count(".") + 1
        if depth > max_depth:
            continue
        params = list(module.parameters())
        n = sum(p.numel() for p in params)
        if n == 0:
            continue
        size = sum(p.numel() * p.element_size() for p in params) / 2**20
        rows.append(ParameterRow(name=name, depth=depth, parameters=n, ratio=n / total, megabytes=size))
    return rows


def format_parameter_table(rows: list[ParameterRow]) -> str:
    """Renders `parameter_table` rows as aligned text: ``LAYER NAME  #PARAMS  RATIO  MEM(MB)``."""
    lines = [f"{'LAYER NAME':<40} {'#PARAMS':>15} {'RATIO':>8} {'MEM(MB)':>10}"]
    for row in rows:
        label = "--" * row.depth + (row.name.rsplit(".", 1)[-1] if row.name else "model")
        lines.append(f"{label:<40} {row.parameters:>15,} {row.ratio:>8.2%} {row.megabytes:>10.2f}")
    return "\n".join(lines)
