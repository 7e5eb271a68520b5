"""Model cards: ``README.md`` for a model folder, in the form of the Korean models' own cards.

Everything on a card is computed from files, never from a live engine:

- ``config.json`` (or a preset): the hyperparameter table of Polyglot-Ko / GPT-NeoX-Ko's cards and, from a
  model built on the ``meta`` device (shapes only, so a 6B preset costs no memory), the All / Trainable /
  Frozen table and the per-module ``LAYER NAME #PARAMS RATIO MEM(MB)`` table of ko-gpt-bot-sc's card;
- run folders written by scoring (``hubkit.results``): the model-index metadata the Hub shows, per-run metric
  tables, the classification report, KOBEST-style n-shot tables, confusion matrices, score distributions and
  n-shot curves;
- ``train_log.jsonl`` / ``training.json`` written by ``hubkit train-lm``: the training table and loss plot.

The card is rendered through ``huggingface_hub.ModelCard.from_template`` from the Jinja template shipped in
the package (``hubkit/assets/card_templates/``, also reachable as ``model_cards/templates/`` in a source
checkout); plots are PNG files in ``plots/`` next to the card, linked by relative paths.
A missing input leaves its section out. torch, transformers and matplotlib are imported inside functions.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubkit import plots as draw  # `plots` is build_card's switch
from hubkit.errors import DataError, InvalidRequestError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

    from hubkit.results import RunMetrics, ShotResult

#: Folder of the card templates, package data (so a wheel install has them); ``HUBKIT_CARD_TEMPLATES``
#: overrides it. ``model_cards/templates`` in the source tree is a symlink to it.
TEMPLATES_DIR = Path(__file__).resolve().parent / "assets" / "card_templates"
MODEL_CARD_TEMPLATE = "model_card.md.j2"
CARD_FILE = "README.md"
PLOTS_DIR = "plots"
TRAIN_LOG_FILE = "train_log.jsonl"
TRAINING_FILE = "training.json"
DEFAULT_PROMPT = "이 영화 정말"

# Tokenizer sizes the seed cards publish next to the embedding rows ("30,003 / 30,080"): the tokenizer is not
# part of a preset, so the figure the seed card prints comes from here.
SEED_TOKENIZER_SIZES: dict[str, int] = {"polyglot-ko-3.8b": 30003, "gpt-neox-ko-1.3b": 30000}

_ROPE_LINK = "[Rotary Position Embedding (RoPE)](https://arxiv.org/abs/2104.09864)"
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I8": "int8"}
# Headline metric of a task: the first of these a run reports.
_HEADLINE = ("f1_macro", "acc", "acc_norm", "f1", "perplexity")
_METRIC_TYPES = {
    "acc": "accuracy",
    "acc_norm": "accuracy",
    "f1_macro": "f1",
    "f1": "f1",
    "perplexity": "perplexity",
}
_KNOWN_DATASETS: dict[str, dict[str, str]] = {
    "nsmc": {
        "line": "[NSMC](https://github.com/e9t/nsmc) (Naver Sentiment Movie Corpus v1.0, CC0 1.0): Korean movie "
        "reviews labelled 긍정 (positive, ratings 9-10) or 부정 (negative, ratings 1-4).",
        "bibtex": "@misc{park2016nsmc,\n  title        = {Naver Sentiment Movie Corpus},\n"
        "  author       = {Lucy Park},\n  year         = {2016},\n"
        "  howpublished = {\\url{https://github.com/e9t/nsmc}},\n}",
    },
}
_HUBKIT_BIBTEX = (
    "@software{hubkit,\n  title        = {hubkit: serve, score, demo and publish Korean decoder language models},\n"
    "  note         = {vLLM engines on Ray, Gradio Spaces, Hub cards},\n}"
)


# --------------------------------------------------------------------------------------------- config


def load_config(
    model_dir: str | os.PathLike[str] | None = None, *, preset: str | None = None
) -> PretrainedConfig:
    """The transformers config of a model folder or a preset.

    Raises:
        InvalidRequestError: neither or both given.
        DataError: the folder has no readable ``config.json``.
    """
    if (model_dir is None) == (preset is None):
        raise InvalidRequestError("pass a model folder or --preset NAME (one of them)")
    if preset is not None:
        from hubkit.presets import build_config

        return build_config(preset)
    path = Path(model_dir)  # type: ignore[arg-type]
    if not (path / "config.json").is_file():
        raise DataError(f"{path} has no config.json; pass a Hugging Face model folder")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read {path / 'config.json'}: {first}") from None


def meta_model(config: PretrainedConfig) -> torch.nn.Module:
    """The model of ``config`` on the meta device: every shape, no memory, seconds even for 6B."""
    import torch
    import transformers

    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        if cls is not None:
            model = cls(config)
        elif getattr(config, "is_encoder_decoder", False):
            model = transformers.AutoModelForSeq2SeqLM.from_config(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
        if _untied_t5(config):
            from hubkit.presets import untie_t5_head

            model = untie_t5_head(model)
    return model


def _untied_t5(config: PretrainedConfig) -> bool:
    # transformers 5 builds every T5 tied and records an untied checkpoint (ByT5, T5 v1.1, KEByT5,
    # hubkit's t5-byte) only as scale_decoder_outputs=False; 4.x keeps tie_word_embeddings=False.
    if getattr(config, "model_type", "") not in ("t5", "mt5", "umt5"):
        return False
    return getattr(config, "scale_decoder_outputs", None) is False or config.tie_word_embeddings is False


#: How the card names a ByT5-style tokenizer (token id = UTF-8 byte + 3).
BYTE_TOKENIZER = "byte-level (UTF-8 byte + 3)"
BYTE_SENTINELS = "<extra_id_0> = 258, <extra_id_1> = 257, ... (ByT5's)"
#: The usage snippets' prompt for a span-filling model.
SPAN_PROMPT = "배우들 <extra_id_0> 좋았다"


def tokenizer_kind(model_dir: str | os.PathLike[str]) -> str | None:
    """``BYTE_TOKENIZER`` for a folder whose tokenizer is ByT5's, else None (the table shows sizes only)."""
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (
        BYTE_TOKENIZER
        if isinstance(config, dict) and config.get("tokenizer_class") == "ByT5Tokenizer"
        else None
    )


# --------------------------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True, kw_only=True)
class Hyperparameters:
    """The seeds' hyperparameter table (Polyglot-Ko, GPT-NeoX-Ko, KoGPT).

    Attributes:
        n_parameters: distinct parameters (tied weights once).
        n_layers: decoder layers; ``encoder_layers`` is set too for encoder-decoders.
        d_model: hidden size.
        d_ff: feed-forward size.
        n_heads: attention heads.
        d_head: size of each head.
        n_ctx: positions (None for relative-position models).
        n_vocab: embedding rows.
        tokenizer_size: tokens the tokenizer knows, when it differs from ``n_vocab``.
        positional_encoding: e.g. "Rotary Position Embedding (RoPE)".
        rope_dimensions: dimensions of each head that RoPE rotates (None without RoPE).
        encoder_layers: encoder layers of an encoder-decoder.
        tokenizer: what kind of tokenizer, when the size alone would mislead (``BYTE_TOKENIZER``).
    """

    n_parameters: int
    n_layers: int
    d_model: int
    d_ff: int | None
    n_heads: int
    d_head: int
    n_ctx: int | None
    n_vocab: int
    tokenizer_size: int | None = None
    positional_encoding: str = ""
    rope_dimensions: int | None = None
    encoder_layers: int | None = None
    tokenizer: str | None = None

    def rows(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows as the seed cards print them; unknown values are left out."""
        layers = (
            f"{self.encoder_layers:,} + {self.n_layers:,} (encoder + decoder)"
            if self.encoder_layers is not None
            else f"{self.n_layers:,}"
        )
        vocab = (
            f"{self.tokenizer_size:,} / {self.n_vocab:,}"
            if self.tokenizer_size is not None and self.tokenizer_size != self.n_vocab
            else f"{self.n_vocab:,}"
        )
        positional = _ROPE_LINK if self.rope_dimensions is not None else self.positional_encoding
        rows: list[tuple[str, str | None]] = [
            (r"\\(n_{parameters}\\)", f"{self.n_parameters:,}"),
            (r"\\(n_{layers}\\)", layers),
            (r"\\(d_{model}\\)", f"{self.d_model:,}"),
            (r"\\(d_{ff}\\)", f"{self.d_ff:,}" if self.d_ff else None),
            (r"\\(n_{heads}\\)", f"{self.n_heads:,}"),
            (r"\\(d_{head}\\)", f"{self.d_head:,}"),
            (r"\\(n_{ctx}\\)", f"{self.n_ctx:,}" if self.n_ctx else None),
            (r"\\(n_{vocab}\\)", vocab),
            ("Positional Encoding", positional or None),
            ("RoPE Dimensions", f"{self.rope_dimensions:,}" if self.rope_dimensions is not None else None),
            ("Tokenizer", self.tokenizer),
        ]
        return [(k, v) for k, v in rows if v is not None]

    def sentence(self) -> str:
        """The seeds' prose under the table ("The model consists of 32 transformer layers ...")."""
        if self.encoder_layers is not None:
            head = (
                f"The model consists of {self.encoder_layers} encoder and {self.n_layers} decoder transformer "
                f"layers with a model dimension of {self.d_model}"
            )
        else:
            head = f"The model consists of {self.n_layers} transformer layers with a model dimension of {self.d_model}"
        parts = [head + (f", and a feedforward dimension of {self.d_ff}." if self.d_ff else ".")]
        parts.append(
            f"The model dimension is split into {self.n_heads} heads, each with a dimension of {self.d_head}."
        )
        if self.rope_dimensions is not None:
            parts.append(
                f"Rotary Position Embedding (RoPE) is applied to {self.rope_dimensions} dimensions of each head."
            )
        if self.tokenizer == BYTE_TOKENIZER:
            parts.append(
                "The model reads and writes raw UTF-8 bytes: token id = byte + 3, after pad (0), </s> (1) and "
                f"unk (2), so no vocabulary was learned; the embedding has {self.n_vocab} rows."
            )
        else:
            parts.append(
                f"The model is trained with a tokenization vocabulary of {self.tokenizer_size or self.n_vocab}."
            )
        return " ".join(parts)


def hyperparameters(
    config: PretrainedConfig,
    model: torch.nn.Module | None = None,
    *,
    tokenizer_size: int | None = None,
    tokenizer: str | None = None,
) -> Hyperparameters:
    """Computes the hyperparameter table from a config (and its meta model, for the parameter count)."""
    model = model if model is not None else meta_model(config)
    d_model = int(config.hidden_size)
    n_heads = int(config.num_attention_heads)
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    model_type = getattr(config, "model_type", "")
    d_ff = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "d_ff", None)
        or (getattr(config, "n_inner", None) if model_type == "gptj" else None)
        or (4 * d_model if model_type in ("gptj", "gpt2") else None)
    )
    encoder_layers = None
    n_layers = int(config.num_hidden_layers)
    if getattr(config, "is_encoder_decoder", False):
        encoder_layers = n_layers
        n_layers = int(getattr(config, "num_decoder_layers", None) or n_layers)
    n_ctx = None if model_type == "t5" else getattr(config, "max_position_embeddings", None)
    rope = _rope_dimensions(config, d_head)
    if rope is not None:
        positional = "Rotary Position Embedding (RoPE)"
    elif model_type in ("t5", "mt5", "umt5"):
        positional = "Relative position buckets (T5)"
    else:
        positional = "Learned absolute position embeddings"
    return Hyperparameters(
        n_parameters=count_distinct(model),
        n_layers=n_layers,
        d_model=d_model,
        d_ff=int(d_ff) if d_ff else None,
        n_heads=n_heads,
        d_head=d_head,
        n_ctx=int(n_ctx) if n_ctx else None,
        n_vocab=int(config.vocab_size),
        tokenizer_size=tokenizer_size,
        tokenizer=tokenizer,
        positional_encoding=positional,
        rope_dimensions=rope,
        encoder_layers=encoder_layers,
    )


def _rope_dimensions(config: PretrainedConfig, d_head: int) -> int | None:
    if getattr(config, "rotary_dim", None):  # GPT-J
        return int(config.rotary_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
        # transformers 5 keeps GPT-NeoX's rotary_pct as partial_rotary_factor.
        return int(d_head * float(rope.get("partial_rotary_factor", 1.0)))
    if getattr(config, "rotary_pct", None) is not None:
        return int(d_head * float(config.rotary_pct))
    return None


def tokenizer_size(model_dir: str | os.PathLike[str]) -> int | None:
    """Tokens the folder's ``tokenizer.json`` knows (added tokens included), or None without one."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def count_distinct(model: torch.nn.Module) -> int:
    """Parameters of ``model``, each tensor once (tied embeddings are not counted twice)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- parameter tables


@dataclass(frozen=True, kw_only=True)
class LayerRow:
    """One line of ko-gpt-bot-sc's ``LAYER NAME #PARAMS RATIO MEM(MB)`` table.

    Attributes:
        name: dotted path (``""`` for the model itself).
        depth: 0 for the model, 1 for its children, ...
        parameters: parameters reachable from it, each tensor once.
        ratio: ``parameters`` / the model's distinct parameters.
        megabytes: their size in MiB at the card's dtype.
        shared: ``""``, ``"shared"`` (every tensor also belongs to an earlier module) or
            ``"partially shared"``.
        is_parameter: True for a weight/bias line, False for a module.
    """

    name: str
    depth: int
    parameters: int
    ratio: float
    megabytes: float
    shared: str = ""
    is_parameter: bool = False

    @property
    def label(self) -> str:
        base = "model" if not self.name else self.name.rsplit(".", 1)[-1]
        return base + (f"({self.shared})" if self.shared else "")


def layer_table(
    model: torch.nn.Module, *, max_depth: int = 3, bytes_per_parameter: int = 4
) -> list[LayerRow]:
    """Modules (and their weights/biases) to ``max_depth``, in definition order.

    A tensor used by several modules (tied embeddings, shared attention) belongs to the first module that
    holds it; later holders are marked ``shared``, and the model total counts it once.
    """
    if max_depth < 0:
        raise InvalidRequestError(f"depth must be 0 or more, got {max_depth}")
    owner: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner.setdefault(id(param), name)
    total = count_distinct(model) or 1
    rows: list[LayerRow] = []

    def sizes(prefix: str, params: Iterable[torch.nn.Parameter]) -> tuple[int, str]:
        unique = {id(p): p for p in params}
        n = sum(p.numel() for p in unique.values())
        own = sum(
            p.numel()
            for i, p in unique.items()
            if not prefix or owner[i] == prefix or owner[i].startswith(prefix + ".")
        )
        shared = "" if own == n else ("shared" if own == 0 else "partially shared")
        return n, shared

    def walk(module: torch.nn.Module, prefix: str, depth: int) -> None:
        n, shared = sizes(prefix, module.parameters())
        if n == 0:
            return
        mb = n * bytes_per_parameter / 2**20
        rows.append(
            LayerRow(name=prefix, depth=depth, parameters=n, ratio=n / total, megabytes=mb, shared=shared)
        )
        if depth >= max_depth:
            return
        for child_name, child in module.named_children():
            walk(child, f"{prefix}.{child_name}" if prefix else child_name, depth + 1)
        for pname, param in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{prefix}.{pname}" if prefix else pname
            shared_p = "" if owner[id(param)] == full else "shared"
            rows.append(
                LayerRow(
                    name=full,
                    depth=depth + 1,
                    parameters=param.numel(),
                    ratio=param.numel() / total,
                    megabytes=param.numel() * bytes_per_parameter / 2**20,
                    shared=shared_p,
                    is_parameter=True,
                )
            )

    walk(model, "", 0)
    return rows


def format_layer_table(rows: Sequence[LayerRow]) -> str:
    """The rows as ko-gpt-bot-sc prints them: ``--name: 1,234 0.01% 0.00``, indented by depth."""
    labels = ["  " * r.depth + "--" + r.label + ":" for r in rows]
    width = max([len("LAYER NAME"), *map(len, labels)])
    counts = [f"{r.parameters:,}" for r in rows]
    cwidth = max([len("#PARAMS"), *map(len, counts)])
    lines = [f"{'LAYER NAME':<{width}} {'#PARAMS':>{cwidth}} {'RATIO':>8} {'MEM(MB)':>10}"]
    for label, count, row in zip(labels, counts, rows, strict=True):
        lines.append(f"{label:<{width}} {count:>{cwidth}} {row.ratio:>8.2%} {row.megabytes:>10.2f}")
    return "\n".join(lines)


def parameter_summary(total: int, trainable: int | None = None) -> list[tuple[str, str]]:
    """ko-gpt-bot-sc's All / Trainable / Frozen rows: ``("All", "6173039616 (100.0%)")``."""
    trainable = total if trainable is None else trainable
    if not 0 <= trainable <= total:
        raise DataError(f"trainable parameters {trainable} outside 0..{total}; check training.json")

    def cell(n: int) -> str:
        return f"{n} ({100 * n / total if total else 0.0:.1f}%)"

    return [("All", cell(total)), ("Trainable", cell(trainable)), ("Frozen", cell(total - trainable))]


# --------------------------------------------------------------------------------------------- training log


@dataclass(frozen=True, kw_only=True)
class TrainLog:
    """Rows of ``train_log.jsonl``: ``train`` rows (step, loss, lr, tokens, elapsed) and ``eval`` rows
    (step, perplexity, ...)."""

    train: tuple[dict[str, Any], ...]
    eval: tuple[dict[str, Any], ...]


def read_train_log(path: str | os.PathLike[str]) -> TrainLog:
    """Reads a ``train_log.jsonl``.

    Raises:
        DataError: missing file or a line that is not a JSON object.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(
            f"train log {p} does not exist; pass the train_log.jsonl that `hubkit train-lm` wrote"
        )
    train, evals = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{p}:{i} is not JSON; is this a hubkit train_log.jsonl?") from None
        if not isinstance(row, dict) or "step" not in row:
            raise DataError(f"{p}:{i} has no 'step'; is this a hubkit train_log.jsonl?")
        if row.get("type") == "eval" or ("perplexity" in row and "loss" not in row):
            evals.append(row)
        elif "loss" in row:
            train.append(row)
    # A resumed run may log a step twice; keep the last row of each step, in step order.
    dedup = lambda rows: tuple({r["step"]: r for r in rows}[s] for s in sorted({r["step"] for r in rows}))  # noqa: E731
    return TrainLog(train=dedup(train), eval=dedup(evals))


# --------------------------------------------------------------------------------------------- evaluation


def headline_metric(metrics: Mapping[str, float]) -> str | None:
    """The metric the n-shot tables show: macro F1, else accuracy, ..., else the first one."""
    for key in _HEADLINE:
        if key in metrics:
            return key
    return next(iter(sorted(metrics)), None)


def classification_report(shot: ShotResult) -> list[tuple[str, str, str, str, str]]:
    """sklearn-style rows: each class, accuracy, macro avg, weighted avg. Empty without per-class scores."""
    if not shot.per_class:
        return []
    order = [label for label in shot.labels if label in shot.per_class] or list(shot.per_class)
    order += [label for label in shot.per_class if label not in order]
    scores = [shot.per_class[label] for label in order]
    support = sum(s.support for s in scores)
    rows = [
        (label, _f(s.precision), _f(s.recall), _f(s.f1), str(s.support))
        for label, s in zip(order, scores, strict=True)
    ]
    acc = shot.metrics.get("acc")
    if acc is None and shot.confusion:
        n = sum(map(sum, shot.confusion))
        acc = sum(shot.confusion[i][i] for i in range(len(shot.confusion))) / n if n else None
    if acc is not None:
        rows.append(("accuracy", "", "", _f(acc), str(support)))
    k = len(scores)
    rows.append(
        (
            "macro avg",
            _f(sum(s.precision for s in scores) / k),
            _f(sum(s.recall for s in scores) / k),
            _f(sum(s.f1 for s in scores) / k),
            str(support),
        )
    )
    if support:
        rows.append(
            (
                "weighted avg",
                _f(sum(s.precision * s.support for s in scores) / support),
                _f(sum(s.recall * s.support for s in scores) / support),
                _f(sum(s.f1 * s.support for s in scores) / support),
                str(support),
            )
        )
    return rows


def eval_results(runs: Sequence[RunMetrics], *, splits: Sequence[str | None] | None = None) -> list[Any]:
    """Every metric of every shot setting of ``runs`` as ``huggingface_hub.EvalResult`` (the model-index)."""
    from huggingface_hub import EvalResult

    out = []
    for i, run in enumerate(runs):
        split = splits[i] if splits else _split(run)
        for shot in sorted(run.results, key=lambda r: r.shots):
            task_type = "text-classification" if shot.labels or shot.per_class else "text-generation"
            for key in sorted(shot.metrics):
                value = shot.metrics[key]
                if not isinstance(value, int | float) or not math.isfinite(value):
                    continue  # the Hub's model-index takes numbers only; NaN would fail validation
                out.append(
                    EvalResult(
                        task_type=task_type,
                        dataset_type=run.dataset or run.task,
                        dataset_name=run.task,
                        dataset_split=split,
                        metric_type=_METRIC_TYPES.get(key, key),
                        metric_value=round(float(value), 4),
                        metric_name=f"{key} ({shot.shots}-shot)",
                        metric_args={"num_fewshot": shot.shots},
                    )
                )
    return out


def _split(run: RunMetrics) -> str | None:
    split = run.config.get("split") if isinstance(run.config, Mapping) else None
    return split if isinstance(split, str) and split else None


# --------------------------------------------------------------------------------------------- plots


def plot_loss(log: TrainLog, path: Path) -> Path | None:
    """Training loss by step, with held-out perplexity on a second axis when the log has it."""
    if not log.train:
        return None
    fig = draw.figure()
    ax = fig.subplots()
    ax.plot(
        [r["step"] for r in log.train],
        [r["loss"] for r in log.train],
        color="tab:blue",
        label="training loss",
    )
    ax.set_xlabel("step")
    # train-lm logs held-out perplexity; `hubkit tune` logs eval accuracy (and a per-row classification loss).
    key, name = ("perplexity", "held-out perplexity")
    if log.eval and not all("perplexity" in r for r in log.eval) and all("acc" in r for r in log.eval):
        key, name = ("acc", "eval accuracy")
    ax.set_ylabel("loss (nats / token)" if key == "perplexity" else "loss (cross-entropy / row)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if log.eval:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in log.eval],
            [r[key] for r in log.eval],
            "o--",
            color="tab:orange",
            label=name,
        )
        ax2.set_ylabel(name)
        more = ax2.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right")
    ax.set_title("Training")
    return draw.save_png(fig, path)


def plot_confusion(shot: ShotResult, path: Path, *, title: str) -> Path | None:
    """The confusion matrix with counts (the run folder's picture, :func:`hubkit.plots.plot_confusion`)."""
    if not shot.confusion or not shot.labels:
        return None
    return draw.plot_confusion(shot.labels, shot.confusion, path, title=title)


def plot_scores(predictions: Path, shot: ShotResult, path: Path, *, title: str) -> Path | None:
    """Histogram of each row's log-likelihood margin (true choice minus the best other), by true class.

    A margin above 0 is a correct prediction; the spread shows how sure the model is.
    """
    if not predictions.is_file() or len(shot.labels) < 2:
        return None
    import pandas as pd

    frame = pd.read_parquet(predictions, columns=["shots", "label", "loglikelihoods", "error"])
    frame = frame[(frame["shots"] == shot.shots) & frame["error"].isna()]
    margins: dict[int, list[float]] = {i: [] for i in range(len(shot.labels))}
    for label, lls in zip(frame["label"], frame["loglikelihoods"], strict=True):
        index = _label_index(label, shot.labels)
        if index is None or lls is None or len(lls) != len(shot.labels):
            continue
        others = [v for j, v in enumerate(lls) if j != index]
        margins[index].append(float(lls[index]) - max(map(float, others)))
    if not any(margins.values()):
        return None
    # Class names as the run folder's plots draw them: Hangul when the system has a font for it, else the
    # index (the card prints the mapping "0 = 부정, 1 = 긍정" as text, which renders everywhere).
    ticks = draw.tick_labels(shot.labels)
    fig = draw.figure()
    ax = fig.subplots()
    for index, values in margins.items():
        if values:
            ax.hist(values, bins=40, alpha=0.55, label=f"true {ticks[index]} (n={len(values)})")
    ax.axvline(0.0, color="black", linewidth=1)
    ax.set_xlabel("log-likelihood margin of the true label (> 0: correct)")
    ax.set_ylabel("rows")
    draw.legend_outside(ax)
    ax.set_title(title, **draw.font_kwargs())
    return draw.save_png(fig, path)


def plot_nshot(
    series: Mapping[str, Mapping[int, float]], path: Path, *, title: str, metric: str
) -> Path | None:
    """One line per model: the headline metric against the number of few-shot examples."""
    if not any(len(points) >= 2 for points in series.values()):
        return None
    fig = draw.figure()
    ax = fig.subplots()
    for name, points in series.items():
        shots = sorted(points)
        ax.plot(shots, [points[s] for s in shots], "o-", label=name)
    ax.set_xlabel("few-shot examples (n)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return draw.save_png(fig, path)


def _label_index(label: Any, labels: Sequence[str]) -> int | None:
    if isinstance(label, str) and label in labels:
        return labels.index(label)
    try:
        index = int(label)
    except (TypeError, ValueError):
        return None
    return index if 0 <= index < len(labels) else None


# --------------------------------------------------------------------------------------------- the card


@dataclass(frozen=True, kw_only=True)
class CardResult:
    """What `build_card` produced.

    Attributes:
        text: the card (YAML header + markdown).
        path: where it was written (None when only rendered).
        plots: PNG files written next to it.
        hyperparameters: the table's values.
        eval_results: number of model-index entries.
    """

    text: str
    path: Path | None
    plots: tuple[Path, ...]
    hyperparameters: Hyperparameters
    eval_results: int


@dataclass(frozen=True, kw_only=True)
class _Run:
    metrics: RunMetrics
    folder: Path
    slug: str
    this: bool


def build_card(
    model_dir: str | os.PathLike[str] | None = None,
    *,
    preset: str | None = None,
    results: Sequence[str | os.PathLike[str]] = (),
    train_log: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    repo_id: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    dtype: str | None = None,
    license: str = "apache-2.0",
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
    tags: Sequence[str] = (),
    title: str | None = None,
    description: str | None = None,
    depth: int = 3,
    plots: bool = True,
    template: str | os.PathLike[str] | None = None,
) -> CardResult:
    """Builds a model card and, with ``out_dir``, writes ``README.md`` and ``plots/*.png`` there.

    Args:
        model_dir: Hugging Face model folder (config.json, tokenizer; ``train_log.jsonl`` and
            ``training.json`` are read from it when present).
        preset: build the card of a preset's architecture instead of a folder (no weights needed).
        results: run folders written by scoring (``metrics.json``, ``predictions.parquet``).
        train_log: a ``train_log.jsonl``; default the one in ``model_dir``.
        out_dir: where to write the card and plots; None only renders (no plots).
        repo_id: Hub id the card's usage snippets load (default: the folder name).
        revision: branch the snippets load (e.g. ``KoGPT6B-ryan1.5b-float16``); None for main.
        endpoint: Hub URL to mention in the usage section, for Hubs other than huggingface.co.
        dtype: dtype of the published weights (default: the folder's); sets the MEM(MB) column.
        license: SPDX-style license id for the metadata.
        datasets: dataset ids for the metadata; default ``["nsmc"]`` when the training data is NSMC.
        base_model: model this one was fine-tuned from, if any.
        tags: extra metadata tags.
        title: card title (default: the repo id or folder name).
        description: the summary paragraph (default: generated).
        depth: how deep the parameter table goes.
        plots: draw PNG plots (only with ``out_dir``).
        template: a Jinja template to use instead of the packaged ``model_card.md.j2``.

    Returns:
        The card text and what was written.

    Raises:
        InvalidRequestError, DataError: unusable inputs, with the fix.
    """
    from huggingface_hub import ModelCard, ModelCardData

    from hubkit.results import read_metrics

    folder = Path(model_dir).expanduser().resolve() if model_dir is not None else None
    if folder is not None and not folder.is_dir():
        raise DataError(
            f"model folder {folder} does not exist; pass a local model folder or 'default' "
            "(download a Hub model first: hf download ID --local-dir DIR), or --preset NAME for a card without weights"
        )
    tuned = read_tuned(folder)
    # A PEFT adapter folder has no config.json: its architecture, tokenizer and dtype are the base model's.
    config_dir = tuned.config_dir if tuned is not None else folder
    config = load_config(config_dir, preset=preset)
    template_path = _template_path(template)
    out = Path(out_dir).expanduser().resolve() if out_dir is not None else None
    name = repo_id or (folder.name if folder else preset) or "model"
    short_name = name.rsplit("/", 1)[-1]

    model = meta_model(config)
    tok_size = tokenizer_size(config_dir) if config_dir else SEED_TOKENIZER_SIZES.get(preset or "")
    tok_kind = tokenizer_kind(config_dir) if config_dir else None
    if preset and tok_kind is None and getattr(config, "model_type", "") == "t5":
        tok_kind = BYTE_TOKENIZER  # hubkit's t5 presets are ByT5-shaped
    hyper = hyperparameters(config, model, tokenizer_size=tok_size, tokenizer=tok_kind)
    weights_dtype = (
        dtype or (_weights_dtype(config_dir) if config_dir else None) or _config_dtype(config) or "float32"
    )
    if weights_dtype not in _BYTES:
        raise InvalidRequestError(f"dtype {weights_dtype!r} unknown; use float32, bfloat16 or float16")
    training = _read_json(folder / TRAINING_FILE) if folder else None
    log_path = Path(train_log) if train_log is not None else (folder / TRAIN_LOG_FILE if folder else None)
    log = (
        read_train_log(log_path)
        if log_path is not None and (train_log is not None or log_path.is_file())
        else None
    )

    if tuned is not None and not results:
        results = tuned.results  # its own eval predictions, unless runs were given
    runs = _load_runs(
        [Path(r) for r in results], read_metrics, identities=_identities(folder, repo_id, preset)
    )
    this_runs = [r for r in runs if r.this]
    draw = plots and out is not None
    written: list[Path] = []

    def plot_path(rel: str) -> Path | None:
        return out / rel if draw and out is not None else None

    # --- training
    training_rows, loss_plot = (_training_rows(training, log) if tuned is None else []), None
    if log is not None and (p := plot_path(f"{PLOTS_DIR}/loss.png")) is not None and plot_loss(log, p):
        written.append(p)
        loss_plot = f"{PLOTS_DIR}/loss.png"

    # --- evaluation
    nshot_tables, evaluations = [], []
    for task in dict.fromkeys(r.metrics.task for r in runs):
        task_runs = [r for r in runs if r.metrics.task == task]
        block = _nshot_table(task, task_runs, hyper.n_parameters)
        if block is None:
            continue
        rel = f"{PLOTS_DIR}/nshot_{_slug(task)}.png"
        if (p := plot_path(rel)) is not None and plot_nshot(
            block.pop("series"), p, title=f"{task}: {block['metric']} by n", metric=block["metric"]
        ):
            written.append(p)
            block["plot"] = rel
        block.pop("series", None)
        nshot_tables.append(block)
    for run in this_runs:
        if not run.metrics.results:
            continue  # a run that scored nothing would be a table without rows
        block, files = _run_block(run, plot_path)
        written += files
        evaluations.append(block)

    # --- metadata
    train_data = _training_data_name(training)
    datasets = list(datasets) if datasets is not None else (["nsmc"] if train_data == "nsmc" else [])
    results_meta = eval_results([r.metrics for r in this_runs])
    model_type = getattr(config, "model_type", "")
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    card_data = ModelCardData(
        language="ko",
        license=license,
        library_name="transformers",
        tags=["hubkit", "korean", model_type, "text2text-generation" if seq2seq else "causal-lm", *tags],
        datasets=datasets or None,
        base_model=base_model,
        pipeline_tag="text2text-generation" if seq2seq else "text-generation",
        # model_name only names the model-index; without results it would be a stray metadata key.
        model_name=name if results_meta else None,
        eval_results=results_meta or None,
    )

    layer_rows = layer_table(model, max_depth=depth, bytes_per_parameter=_BYTES[weights_dtype])
    trainable = training.get("trainable_parameters") if isinstance(training, Mapping) else None
    usage = (
        _usage(repo_id or (str(folder) if folder else None), revision, endpoint)
        if (folder or repo_id)
        else None
    )
    if usage is not None and seq2seq:
        usage |= {"seq2seq": True, "prompt": SPAN_PROMPT}
    kwargs = dict(
        title=title or name,
        name=short_name,
        summary=description or _summary(short_name, hyper, config, preset, training, train_data),
        details=_details(config, type(model).__name__, preset, weights_dtype, revision, base_model, license),
        hyper_rows=hyper.rows(),
        hyper_sentence=hyper.sentence(),
        param_summary=parameter_summary(hyper.n_parameters, trainable),
        layer_table=format_layer_table(layer_rows),
        layer_depth=depth,
        layer_dtype=weights_dtype,
        training_rows=training_rows,
        training_text=_training_text(training),
        training_command=(training or {}).get("command") if isinstance(training, Mapping) else None,
        loss_plot=loss_plot,
        evaluations=evaluations,
        nshot_tables=nshot_tables,
        evaluation_text=_evaluation_text(runs),
        usage=usage,
        training_data=_training_data_lines(training, datasets),
        small=hyper.n_parameters < 100_000_000,
        n_parameters_short=_short(hyper.n_parameters),
        privacy_note=_privacy_note(training),
        citations=_citations(datasets),
        seq2seq=seq2seq,
        span_corruption=isinstance(training, Mapping) and bool(training.get("objective")),
    )
    if tuned is not None:
        kwargs |= _tuned_fields(
            tuned,
            card_data,
            kwargs["details"],
            name=short_name,
            repo_id=repo_id,
            revision=revision,
            description=description,
            plot_path=plot_path,
            written=written,
            own_results=[Path(r) for r in results] == list(tuned.results),
        )
    card = ModelCard.from_template(card_data, template_path=str(template_path), **kwargs)
    text = _tidy(str(card))
    path = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / CARD_FILE
        path.write_text(text, encoding="utf-8")
    return CardResult(
        text=text, path=path, plots=tuple(written), hyperparameters=hyper, eval_results=len(results_meta)
    )


def _template_path(template: str | os.PathLike[str] | None) -> Path:
    if template is not None:
        path = Path(template)
    else:
        root = Path(os.environ.get("HUBKIT_CARD_TEMPLATES") or TEMPLATES_DIR)
        path = root / MODEL_CARD_TEMPLATE
    if not path.is_file():
        raise DataError(
            f"card template {path} not found; reinstall hubkit or set HUBKIT_CARD_TEMPLATES to a folder "
            "holding model_card.md.j2"
        )
    return path


def _tidy(text: str) -> str:
    # Jinja's conditional sections leave runs of blank lines and trailing spaces; markdown ignores them, diffs
    # and golden files do not.
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise DataError(f"{path} is not valid JSON") from None
    return data if isinstance(data, dict) else None


def _weights_dtype(folder: Path) -> str | None:
    """The dtype of the first floating tensor in the folder's safetensors (its header only)."""
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                continue
            header = json.loads(f.read(size))
        for key, info in header.items():
            if key != "__metadata__" and info.get("dtype") in _SAFETENSORS_DTYPES:
                return _SAFETENSORS_DTYPES[info["dtype"]]
    return None


def _config_dtype(config: PretrainedConfig) -> str | None:
    # vars(), not getattr: transformers 5 warns on every read of the deprecated `torch_dtype` attribute.
    fields = vars(config)
    value = fields.get("dtype") or fields.get("torch_dtype")
    text = str(value).replace("torch.", "") if value is not None else None
    return text if text in _BYTES else None


def _identities(folder: Path | None, repo_id: str | None, preset: str | None) -> set[str]:
    names = {n for n in (repo_id, preset) if n}
    if folder is not None:
        names |= {str(folder), folder.name}
        from hubkit.models import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_DIR

        if folder == DEFAULT_MODEL_DIR.resolve():
            names |= DEFAULT_MODEL_ALIASES
    if repo_id:
        names.add(repo_id.rsplit("/", 1)[-1])
    return names


def _load_runs(folders: Sequence[Path], read_metrics, *, identities: set[str]) -> list[_Run]:
    loaded = [(f, read_metrics(f)) for f in folders]
    matches = [m.model in identities or Path(m.model).name in identities for _, m in loaded]
    # Runs of this model are the ones naming it; when none does, every given run is taken as this model's.
    if not any(matches):
        matches = [True] * len(loaded)
    slugs: dict[str, int] = {}
    runs = []
    for (folder, metrics), this in zip(loaded, matches, strict=True):
        base = _slug(folder.name or metrics.task)
        slugs[base] = slugs.get(base, 0) + 1
        slug = base if slugs[base] == 1 else f"{base}-{slugs[base]}"
        runs.append(_Run(metrics=metrics, folder=folder, slug=slug, this=this))
    return runs


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "run"


def _f(value: float) -> str:
    return f"{value:.4f}"


def _short(n: int | None) -> str:
    if not n:
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _nshot_table(task: str, runs: Sequence[_Run], this_params: int) -> dict[str, Any] | None:
    metric = headline_metric(runs[0].metrics.results[0].metrics) if runs[0].metrics.results else None
    if metric is None:
        return None
    shots = sorted({s.shots for r in runs for s in r.metrics.results if metric in s.metrics})
    if not shots:
        return None
    rows, series = [], {}
    for run in runs:
        by = {s.shots: s.metrics[metric] for s in run.metrics.results if metric in s.metrics}
        if not by:
            continue
        label = (
            run.metrics.model
            if "/" in run.metrics.model and not os.path.isabs(run.metrics.model)
            else Path(run.metrics.model).name
        )
        params = run.metrics.model_parameters or (this_params if run.this else None)
        rows.append(
            [
                label + (" (this)" if run.this else ""),
                _short(params),
                *(_f(by[s]) if s in by else "" for s in shots),
            ]
        )
        series[label] = by
    return {
        "task": task,
        "metric": metric,
        "headers": ["Model", "params", *(f"{s}-shot" for s in shots)],
        "rows": rows,
        "series": series,
        "plot": None,
    }


def _run_block(run: _Run, plot_path) -> tuple[dict[str, Any], list[Path]]:
    m = run.metrics
    results = sorted(m.results, key=lambda r: r.shots)
    keys = sorted(
        {k for r in results for k in r.metrics},
        key=lambda k: (_HEADLINE.index(k) if k in _HEADLINE else 99, k),
    )
    rows = [
        [
            f"{r.shots}",
            *(_f(r.metrics[k]) if k in r.metrics else "" for k in keys),
            str(r.n_rows),
            str(r.n_errors),
        ]
        for r in results
    ]
    title = f"{m.task}" + (f" ({m.dataset})" if m.dataset and m.dataset != m.task else "")
    block: dict[str, Any] = {
        "title": title,
        "headers": ["shots", *keys, "rows", "errors"],
        "rows": rows,
        "report_rows": [],
        "classes": "",
        "plots": [],
    }
    files: list[Path] = []
    classified = [r for r in results if r.per_class]
    if classified:
        first = classified[0]
        block["report_rows"] = classification_report(first)
        block["report_shots"] = first.shots
        block["report_support"] = sum(s.support for s in first.per_class.values())
    labelled = next((r for r in results if r.labels), None)
    if labelled is not None and not all(label.isascii() for label in labelled.labels):
        block["classes"] = ", ".join(f"{i} = {label}" for i, label in enumerate(labelled.labels))
    from hubkit.results import PREDICTIONS_FILE

    for r in results:
        rel = f"{PLOTS_DIR}/{run.slug}_confusion_{r.shots}shot.png"
        if (p := plot_path(rel)) is not None and plot_confusion(r, p, title=f"{m.task}, {r.shots}-shot"):
            files.append(p)
            block["plots"].append({"alt": f"confusion matrix, {r.shots}-shot", "path": rel})
        rel = f"{PLOTS_DIR}/{run.slug}_scores_{r.shots}shot.png"
        if (p := plot_path(rel)) is not None and plot_scores(
            run.folder / PREDICTIONS_FILE, r, p, title=f"{m.task}, {r.shots}-shot: score distribution"
        ):
            files.append(p)
            block["plots"].append({"alt": f"score distribution, {r.shots}-shot", "path": rel})
    return block, files


def _evaluation_text(runs: Sequence[_Run]) -> str:
    if not runs:
        return ""
    backends = sorted({r.metrics.backend for r in runs if r.metrics.backend})
    return (
        "Scored by `hubkit score` with log-likelihoods of each answer choice"
        + (f" ({', '.join(backends)} backend)" if backends else "")
        + "; n is the number of few-shot examples in each prompt. The numbers come from the run folders' "
        "`metrics.json`."
    )


def _training_rows(training: Mapping[str, Any] | None, log: TrainLog | None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if isinstance(training, Mapping):
        if training.get("steps") is not None:
            rows.append(("steps", f"{int(training['steps']):,}"))
        if training.get("tokens_seen") is not None:
            rows.append(("tokens seen", f"{int(training['tokens_seen']):,}"))
        corpus = training.get("corpus") or {}
        if corpus.get("documents"):
            rows.append(("training documents", f"{int(corpus['documents']):,}"))
        if corpus.get("epochs"):
            rows.append(("epochs", f"{float(corpus['epochs']):.2f}"))
        if training.get("final_loss") is not None:
            rows.append(("final training loss", f"{float(training['final_loss']):.4f}"))
        held = training.get("heldout") or {}
        if held.get("perplexity") is not None:
            label = f"held-out {held.get('metric') or 'perplexity'}"
            rows.append((label, f"{float(held['perplexity']):.2f}"))
        if held.get("bits_per_byte") is not None:
            rows.append(("held-out bits per byte", f"{float(held['bits_per_byte']):.4f}"))
        if training.get("train_seconds") is not None:
            rows.append(("training time", f"{float(training['train_seconds']) / 60:.1f} min"))
        if training.get("tokens_per_second"):
            rows.append(("tokens per second", f"{float(training['tokens_per_second']):,.0f}"))
    elif log is not None and log.train:
        last = log.train[-1]
        rows.append(("steps", f"{int(last['step']):,}"))
        if last.get("tokens") is not None:
            rows.append(("tokens seen", f"{int(last['tokens']):,}"))
        rows.append(("final training loss", f"{float(last['loss']):.4f}"))
        if log.eval:
            rows.append(("held-out perplexity", f"{float(log.eval[-1]['perplexity']):.2f}"))
        if last.get("elapsed") is not None:
            rows.append(("training time", f"{float(last['elapsed']) / 60:.1f} min"))
    return rows


def _training_text(training: Mapping[str, Any] | None) -> str:
    if not isinstance(training, Mapping):
        return ""
    config = training.get("config") or {}
    tok = training.get("tokenizer") or {}
    bits = []
    if training.get("preset"):
        bits.append(f"preset `{training['preset']}`")
    if config.get("batch_size") and config.get("seq_len") and training.get("objective"):
        bits.append(f"batches of {config['batch_size']} documents of up to {config['seq_len']} input bytes")
    elif config.get("batch_size") and config.get("seq_len"):
        bits.append(f"batches of {config['batch_size']} x {config['seq_len']} tokens")
    if config.get("lr"):
        optimizer = training.get("optimizer") or "AdamW"
        bits.append(f"{optimizer} at peak learning rate {config['lr']:g} with warmup and cosine decay")
    if tok.get("vocab_size"):
        bits.append(f"a {tok.get('type', 'BPE')} tokenizer of {int(tok['vocab_size']):,} tokens")
    objective = training.get("objective") or {}
    if objective.get("noise_density") is not None:
        bits.append(
            f"T5 span corruption ({float(objective['noise_density']):.0%} of the bytes masked in spans of "
            f"{float(objective.get('mean_span_length', 0)):g} bytes on average; sentinels {BYTE_SENTINELS})"
        )
    return ("Trained from scratch with `hubkit train-lm`: " + ", ".join(bits) + ".") if bits else ""


def _training_data_name(training: Mapping[str, Any] | None) -> str | None:
    if not isinstance(training, Mapping):
        return None
    data = str((training.get("config") or {}).get("data") or "")
    return (
        "nsmc"
        if "nsmc" in data.lower() or Path(data).name in ("ratings_train.txt", "reviews_unlabeled.txt")
        else (Path(data).name or None)
    )


def _training_data_lines(training: Mapping[str, Any] | None, datasets: Sequence[str]) -> list[str]:
    lines = [f"- {_KNOWN_DATASETS[d]['line']}" for d in datasets if d in _KNOWN_DATASETS]
    lines += [f"- `{d}`" for d in datasets if d not in _KNOWN_DATASETS]
    if isinstance(training, Mapping):
        data = (training.get("config") or {}).get("data")
        corpus = training.get("corpus") or {}
        if data:
            text = f"- Training text: `{Path(str(data)).name}`"
            if corpus.get("documents") and corpus.get("tokens") and training.get("objective"):
                text += f", {int(corpus['documents']):,} documents, {int(corpus['tokens']):,} UTF-8 bytes"
            elif corpus.get("documents") and corpus.get("tokens"):
                text += f", {int(corpus['documents']):,} documents, {int(corpus['tokens']):,} tokens after packing"
            lines.append(text + ".")
        held = training.get("heldout") or {}
        if held.get("data"):
            lines.append(
                f"- Held-out text for {held.get('metric') or 'perplexity'}: `{Path(str(held['data'])).name}`."
            )
    return lines


def _privacy_note(training: Mapping[str, Any] | None) -> str:
    if _training_data_name(training) == "nsmc":
        return (
            "This model was trained on public movie reviews (NSMC), which can contain names and other details "
            "their authors wrote."
        )
    return ""


def _citations(datasets: Sequence[str]) -> list[str]:
    return [_HUBKIT_BIBTEX, *(_KNOWN_DATASETS[d]["bibtex"] for d in datasets if d in _KNOWN_DATASETS)]


def _summary(
    name: str,
    hyper: Hyperparameters,
    config: PretrainedConfig,
    preset: str | None,
    training: Mapping[str, Any] | None,
    train_data: str | None,
) -> str:
    arch = {"gpt_neox": "GPT-NeoX", "gptj": "GPT-J", "t5": "T5"}.get(getattr(config, "model_type", ""), "")
    kind = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "autoregressive"
    text = f"{name} is a Korean {kind} language model of {_short(hyper.n_parameters)} parameters"
    text += f" ({arch} architecture)." if arch else "."
    if preset:
        from hubkit.presets import get_preset

        p = get_preset(preset)
        text = f"This card describes the architecture of the hubkit preset `{preset}`"
        text += f", which reproduces {p.seed_model}" if p.seed_model else ""
        text += ". It has no trained weights: the figures are computed from the preset's config on the meta device."
    elif isinstance(training, Mapping):
        text += " It was trained from scratch with hubkit" + (
            " on Korean movie reviews (NSMC)." if train_data == "nsmc" else "."
        )
    return text


def _details(
    config: PretrainedConfig,
    arch: str,
    preset: str | None,
    dtype: str,
    revision: str | None,
    base_model: str | None,
    license: str,
) -> list[tuple[str, str]]:
    rows = [
        ("Model type", f"`{arch}` ({getattr(config, 'model_type', '')})"),
        ("Language", "Korean (ko)"),
        ("Weights", dtype + (f", on revision `{revision}`" if revision else "")),
        ("License", license),
    ]
    if preset:
        rows.append(("Preset", f"`{preset}`"))
    if base_model:
        rows.append(("Fine-tuned from", base_model))
    return rows


def _usage(repo_id: str | None, revision: str | None, endpoint: str | None) -> dict[str, Any] | None:
    if not repo_id:
        return None
    local = endpoint and not endpoint.rstrip("/").endswith("huggingface.co")
    return {
        "repo_id": repo_id,
        "revision": revision,
        "revision_arg": f', revision="{revision}"' if revision else "",
        "revision_flag": f" --revision {revision}" if revision else "",
        "local_dir": local_dir_name(repo_id, revision),
        "endpoint": endpoint.rstrip("/") if local else None,
        "prompt": DEFAULT_PROMPT,
    }


def local_dir_name(repo_id: str, revision: str | None) -> str:
    """Folder a download of ``repo_id@revision`` goes to: ``kogpt``, ``KoGPT6B-ryan1.5b-float16``,
    ``ko-nsmc-neox-v2``."""
    name = repo_id.rstrip("/").rsplit("/", 1)[-1]
    if not revision:
        return name
    return revision if name.lower() in revision.lower() else f"{name}-{revision}"


# --------------------------------------------------------------------------------------------- tuned models

TUNING_FILE = "tuning.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
#: Eval rows the labels-vs-predictions plot shows.
PREDICTION_PLOT_ROWS = 100


@dataclass(frozen=True, kw_only=True)
class TunedFolder:
    """A folder written by ``hubkit tune``: a PEFT prompt-tuning adapter or a fully fine-tuned model.

    Attributes:
        folder: the folder.
        tuning: its ``tuning.json``.
        adapter: its ``adapter_config.json`` (None for a fully fine-tuned model).
        config_dir: where the architecture comes from: the base model for an adapter, else the folder.
        results: its eval run folders (``eval/``), for the card's evaluation section.
    """

    folder: Path
    tuning: dict[str, Any]
    adapter: dict[str, Any] | None
    config_dir: Path
    results: tuple[Path, ...]


def read_tuned(folder: Path | None) -> TunedFolder | None:
    """The ``hubkit tune`` record of ``folder``, or None for any other folder.

    Raises:
        DataError: an adapter folder whose base model cannot be found locally.
    """
    if folder is None or not (folder / TUNING_FILE).is_file():
        return None
    tuning = _read_json(folder / TUNING_FILE) or {}
    adapter = _read_json(folder / ADAPTER_CONFIG_FILE) if (folder / ADAPTER_CONFIG_FILE).is_file() else None
    config_dir = folder
    if adapter is not None and not (folder / "config.json").is_file():
        from hubkit.errors import ModelNotFoundError
        from hubkit.models import resolve_model

        base = tuning.get("base_model_path") or adapter.get("base_model_name_or_path") or ""
        try:
            config_dir = Path(resolve_model(base))
        except ModelNotFoundError:
            config_dir = Path("/nonexistent")
        if not (config_dir / "config.json").is_file():
            raise DataError(
                f"the base model {base!r} of adapter {folder} is not a local folder; download it first, or set "
                f"base_model_path in {folder / TUNING_FILE}"
            )
    run = tuning.get("eval_run")
    results = (folder / run,) if run and (folder / run / "metrics.json").is_file() else ()
    return TunedFolder(folder=folder, tuning=tuning, adapter=adapter, config_dir=config_dir, results=results)


def _tuned_fields(
    tuned: TunedFolder,
    card_data: Any,
    details: Sequence[tuple[str, str]],
    *,
    name: str,
    repo_id: str | None,
    revision: str | None,
    description: str | None,
    plot_path,
    written: list[Path],
    own_results: bool = True,
) -> dict[str, Any]:
    """The card sections a tuned folder changes: summary, parameters, training, plots, usage."""
    t = tuned.tuning
    prompt = t.get("method") == "prompt"
    total = int(t.get("total_parameters") or 0)
    trainable = int(t.get("trainable_parameters") or 0)
    base = str(t.get("base_model") or (tuned.adapter or {}).get("base_model_name_or_path") or "")
    labels = ", ".join(t.get("labels") or [])
    task = str(t.get("task") or "")
    if prompt:
        summary = (
            f"{name} is a soft prompt of {t.get('num_virtual_tokens')} virtual tokens for `{base}`: "
            f"{trainable:,} trainable parameters ({trainable / total if total else 0:.2%} of {total:,}); the base "
            f"model stays frozen. It was trained with `hubkit tune` to answer the `{task}` task ({labels})."
        )
        card_data.library_name = "peft"
    else:
        summary = (
            f"{name} is `{base}` with all {total:,} parameters fine-tuned by `hubkit tune` for the `{task}` task "
            f"({labels})."
        )
    card_data.tags = [
        *(card_data.tags or []),
        "prompt-tuning" if prompt else "fine-tuned",
        "text-classification",
    ]
    rows: list[tuple[str, str]] = [("method", "prompt tuning (PEFT)" if prompt else "full fine-tuning")]
    if prompt:
        rows.append(("virtual tokens", f"{t.get('num_virtual_tokens')} (init: {t.get('init')})"))
    rows.append(("training rows", f"{int(t.get('train_rows') or 0):,}"))
    if t.get("steps") is not None:
        planned = t.get("planned_steps")
        rows.append(
            (
                "steps",
                f"{int(t['steps']):,}"
                + (f" of {int(planned):,}" if planned and planned != t["steps"] else ""),
            )
        )
    if t.get("epochs") is not None:
        rows.append(("epochs", f"{float(t['epochs']):.2f}"))
    if t.get("stopped_early"):
        rows.append(("early stopping", "yes (eval accuracy stopped improving)"))
    if t.get("final_loss") is not None:
        rows.append(("final training loss", f"{float(t['final_loss']):.4f}"))
    if t.get("best_eval_acc") is not None:
        rows.append(
            (
                "best periodic eval accuracy",
                f"{float(t['best_eval_acc']):.4f} at step {t.get('best_step')} ({t.get('eval_rows_periodic')} rows)",
            )
        )
    if isinstance(t.get("eval"), Mapping) and t["eval"].get("acc") is not None:
        rows.append(
            ("eval accuracy (saved weights)", f"{float(t['eval']['acc']):.4f} ({t.get('eval_rows')} rows)")
        )
    if t.get("train_seconds") is not None:
        rows.append(("training time", f"{float(t['train_seconds']) / 60:.1f} min"))
    config = t.get("config") or {}
    text = (
        f"Trained with `hubkit tune --method {t.get('method')}`. The task's prompt `{t.get('prompt', '')}` and its "
        f"choices ({labels}) make the classifier: a choice's score is the summed log-probability of "
        '`" " + choice` after the prompt, as the `loglikelihood` verb computes it, and training minimises the '
        f"cross-entropy of the gold choice over the scores (AdamW at peak learning rate {t.get('learning_rate')}, "
        f"linear warmup and decay, batches of {config.get('batch_size')} rows of similar length"
        + (", early stopping on eval accuracy)." if config.get("eval") else ").")
    )
    fields: dict[str, Any] = {
        "param_summary": parameter_summary(total, trainable) if total else None,
        "training_rows": rows,
        "training_text": text,
        "training_command": t.get("command"),
        "predictions_plot": _predictions_plot(tuned, plot_path, written),
        "training_data": [
            f"- Tuning data: `{Path(str(config.get('train', ''))).name}`, {int(t.get('train_rows') or 0):,} rows"
            + (
                f"; eval data: `{Path(str(config['eval'])).name}`, {t.get('eval_rows')} rows."
                if config.get("eval")
                else "."
            )
        ],
    }
    if not description:
        fields["summary"] = summary
    # `hubkit publish` builds the card with no dataset or base model given: tuning.json knows both.
    dataset = t.get("dataset")
    if dataset in _KNOWN_DATASETS and not card_data.datasets:
        card_data.datasets = [dataset]
        fields["citations"] = _citations([dataset])
    if base and not card_data.base_model:
        card_data.base_model = base
        fields["details"] = [*details, ("Fine-tuned from", base)]
    if own_results and tuned.results:
        fields["evaluation_text"] = (
            "Scored by `hubkit tune` on its eval data with transformers + peft in float32: each choice's score is "
            "its summed log-probability (what the `loglikelihood` verb returns), the prediction the best-scoring "
            f"choice. The numbers come from `{tuned.results[0].name}/metrics.json`; "
            f"`{tuned.results[0].name}/predictions.parquet` holds every row's prediction."
        )
    if t.get("dataset") == "nsmc":
        fields["privacy_note"] = (
            "It was tuned on public movie reviews (NSMC), which can contain names and other details their "
            "authors wrote."
        )
        fields["training_data"].insert(0, f"- {_KNOWN_DATASETS['nsmc']['line']}")
    if prompt:
        where = repo_id or str(tuned.folder)
        fields["usage"] = None
        fields["adapter_usage"] = {
            "base": base,
            "repo_id": where,
            "revision_arg": f', revision="{revision}"' if revision else "",
            "local_dir": local_dir_name(repo_id, revision) if repo_id else str(tuned.folder),
            "task": task,
        }
    return fields


def _predictions_plot(tuned: TunedFolder, plot_path, written: list[Path]) -> dict[str, Any] | None:
    """Labels vs predictions of the first eval rows (ko-gpt-bot-sc's plot), from the eval run's predictions."""
    if not tuned.results:
        return None
    predictions = tuned.results[0] / "predictions.parquet"
    rel = f"{PLOTS_DIR}/labels_vs_predictions.png"
    target = plot_path(rel)
    if target is None or not predictions.is_file():
        return None
    import pandas as pd

    frame = pd.read_parquet(predictions, columns=["label_index", "prediction_index", "error"])
    frame = frame[frame["error"].isna() & frame["label_index"].notna()]
    shown = frame.head(PREDICTION_PLOT_ROWS)
    labels = list(tuned.tuning.get("labels") or [])
    path = draw.plot_labels_predictions(
        labels,
        [int(v) for v in shown["label_index"]],
        [int(v) for v in shown["prediction_index"]],
        target,
        title=f"{tuned.tuning.get('task', '')}: labels and predictions"
        + (f" (first {len(shown)} of {len(frame)} eval rows)" if len(shown) < len(frame) else ""),
    )
    if path is None:
        return None
    written.append(path)
    return {"path": rel, "rows": len(frame)}
