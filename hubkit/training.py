"""``hubkit train-lm``: a byte-level BPE tokenizer and a small GPT-NeoX trained from scratch on Korean text,
or (``arch="t5-byte"``) a byte-level T5 (ByT5 / KEByT5 shape) trained with T5's span corruption.

The run is a folder. While it trains, ``out/train_log.jsonl`` grows (one JSON row per log interval, plus
eval rows) and ``out/checkpoints/step-N`` holds everything needed to continue exactly (weights, AdamW and
scheduler state, RNG state, data position). At the end ``out`` is a standard Hugging Face model folder
(config.json, model.safetensors, tokenizer files, generation_config.json) plus ``training.json``.

Byte-level T5 follows ByT5: token id = UTF-8 byte + 3 (pad 0, ``</s>`` 1, unk 2), and span-corruption
sentinels reuse the top byte ids counting down, ``<extra_id_0>`` = 258, ``<extra_id_1>`` = 257, ...
(bytes 0xFF, 0xFE, ... never occur in UTF-8 text, so a sentinel cannot be mistaken for text).

torch, transformers and tokenizers are imported inside the functions that use them.
"""

from __future__ import annotations

import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubkit.engine import cpu_has_native_bf16
from hubkit.errors import DataError, InvalidRequestError
from hubkit.runs import CHECKPOINTS, append_jsonl, command_line, library_versions, list_checkpoints

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
LOG_FILE = "train_log.jsonl"
TRAINING_FILE = "training.json"

#: Model families ``train-lm`` trains: decoders on next-token prediction, byte-level T5 on span corruption.
ARCHS = ("neox", "t5-byte")
_DEFAULT_PRESET = {"neox": "neox-small", "t5-byte": "t5-byte-small"}
_DEFAULT_VOCAB_SIZE = 8000  # the BPE vocabulary of --arch neox

#: ByT5's id layout: pad 0, ``</s>`` 1, unk 2, then byte b at id b + 3.
BYTE_OFFSET = 3
BYTE_EOS_ID = 1
BYTE_PAD_ID = 0
#: ``<extra_id_0>``: byte 0xFF + 3. Sentinel i is ``FIRST_SENTINEL_ID - i`` (ByT5's convention).
FIRST_SENTINEL_ID = 258
#: UTF-8 never uses bytes 0xF5-0xFF, so ids 258 down to 248 can be sentinels without ever meaning text.
#: An example may use at most this many (its spans plus the closing sentinel).
MAX_SENTINELS = 11
#: ByT5 pre-trained on 1,024-byte inputs; the shipped tokenizer reports it as its context.
BYTE_MODEL_MAX_LENGTH = 1024

# Settings a resumed run must share with the run it continues, or it would not continue it exactly.
_RESUME_MUST_MATCH = (
    "data",
    "preset",
    "vocab_size",
    "steps",
    "batch_size",
    "seq_len",
    "lr",
    "warmup",
    "max_docs",
    "seed",
    "weight_decay",
    "grad_clip",
    "min_lr_ratio",
    "arch",
    "noise_density",
    "mean_span_length",
)
# What runs saved before a setting existed used (so they still resume).
_RESUME_DEFAULTS = {"arch": "neox", "noise_density": 0.15, "mean_span_length": 20.0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        data: training text: one document per line, or an NSMC file (``id\\tdocument\\tlabel`` header).
        out: run folder; a Hugging Face model folder at the end.
        preset: preset from `hubkit.presets`: a ``gpt_neox`` / ``gptj`` decoder for ``arch="neox"``
            (default ``neox-small``), a ``t5`` preset for ``arch="t5-byte"`` (default ``t5-byte-small``).
        vocab_size: BPE vocabulary size (the model gets exactly the tokenizer's length); default 8,000.
            Byte-level T5 has a fixed vocabulary (the preset's 384 rows), so leave it unset there.
        steps: optimizer steps.
        batch_size: sequences per step.
        seq_len: tokens per sequence (documents are packed, joined by ``<|endoftext|>``). For
            ``t5-byte``: the most encoder input bytes of an example after corruption (each document is
            one example, longer ones are cut into pieces; see `document_examples` and `span_plan`).
        lr: peak learning rate: AdamW's for ``neox`` (default 1e-3); Adafactor's for ``t5-byte`` (default
            1e-2, T5's), whose steps are relative to each matrix's scale.
        warmup: linear warmup steps before the cosine decay.
        checkpoint_every: save a resumable checkpoint every N steps (0: only at the end).
        eval_data: held-out documents (same formats as ``data``) for perplexity.
        max_docs: use at most this many documents of ``data``.
        dtype: dtype of the saved weights: float32, bfloat16 or float16.
        seed: seed of weights init and data order.
        resume: continue from the newest checkpoint in ``out``.
        weight_decay: AdamW weight decay on matrices (not on biases and LayerNorms); ``neox`` only (T5
            pre-trains without it).
        grad_clip: clip the global gradient norm to this.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio``.
        log_every: steps per ``train_log.jsonl`` row (each row averages the loss over them).
        keep_checkpoints: how many of the newest checkpoints to keep on disk.
        eval_docs_during: held-out documents scored at each checkpoint (the final score uses all).
        threads: torch CPU threads (default: `default_threads`, the CPUs idle when the run starts).
        autocast: run the forward pass in bfloat16 (float32 master weights and optimizer) — about twice
            as fast on CPUs with native bf16 (AVX512-BF16/AMX); default: on exactly when the CPU has it.
        stop_after: end this invocation after this step without finishing, as an interruption would;
            continue later with ``resume=True`` (used to time-box runs and to test resuming).
        arch: ``"neox"`` (a decoder on next-token prediction) or ``"t5-byte"`` (a byte-level T5 on
            span corruption, ByT5's recipe).
        noise_density: ``t5-byte``: fraction of bytes masked (T5 and ByT5: 0.15).
        mean_span_length: ``t5-byte``: mean masked span in bytes. 20, as ByT5 chose for bytes: T5's
            3-token spans are ~3 words, while 3 bytes is one Hangul syllable (3 UTF-8 bytes), which the
            rest of its word nearly gives away; 20 bytes is ~6 syllables, one or two Korean words.
    """

    data: Path
    out: Path
    preset: str | None = None
    vocab_size: int | None = None
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128
    lr: float | None = None
    warmup: int = 100
    checkpoint_every: int = 500
    eval_data: Path | None = None
    max_docs: int | None = None
    dtype: str = "bfloat16"
    seed: int = 0
    resume: bool = False
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_lr_ratio: float = 0.1
    log_every: int = 10
    keep_checkpoints: int = 2
    eval_docs_during: int = 500
    threads: int | None = None
    autocast: bool | None = None
    stop_after: int | None = None
    arch: str = "neox"
    noise_density: float = 0.15
    mean_span_length: float = 20.0

    def __post_init__(self) -> None:
        # Defaults that depend on the architecture: filled here so the fields always hold real values.
        if self.preset is None:
            object.__setattr__(self, "preset", _DEFAULT_PRESET.get(self.arch, _DEFAULT_PRESET["neox"]))
        if self.lr is None:
            object.__setattr__(self, "lr", 1e-2 if self.arch == "t5-byte" else 1e-3)
        if self.vocab_size is None:
            vocab = _DEFAULT_VOCAB_SIZE
            if self.arch == "t5-byte":
                from hubkit.presets import PRESETS

                preset = PRESETS.get(self.preset)
                vocab = preset.hyperparameters.get("vocab_size", 384) if preset is not None else 384
            object.__setattr__(self, "vocab_size", vocab)

    def validate(self) -> TrainConfig:
        """Checks values a user can get wrong; returns self.

        Raises:
            InvalidRequestError: a value out of range, with the fix.
        """
        from hubkit.presets import get_preset

        if self.arch not in ARCHS:
            raise InvalidRequestError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.threads is not None and self.threads < 1:
            raise InvalidRequestError(f"--threads must be at least 1, got {self.threads}")
        preset = get_preset(self.preset)
        if self.arch == "t5-byte":
            return self._validate_t5(preset)
        if preset.family not in ("gpt_neox", "gptj"):
            raise InvalidRequestError(
                f"train-lm trains decoder presets with --arch neox; {self.preset!r} is {preset.family}: "
                "pick e.g. neox-small, or pass --arch t5-byte for a t5 preset"
            )
        for name in ("vocab_size", "steps", "batch_size", "seq_len", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.vocab_size < 300:
            raise InvalidRequestError(
                f"--vocab-size {self.vocab_size} is below the 256 byte tokens + specials; use at least 300"
            )
        if self.warmup < 0 or self.checkpoint_every < 0:
            raise InvalidRequestError("--warmup and --checkpoint-every must be 0 or more")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        max_pos = preset.hyperparameters.get("max_position_embeddings") or preset.hyperparameters.get(
            "n_positions"
        )
        if self.seq_len > max_pos:
            raise InvalidRequestError(f"--seq-len {self.seq_len} exceeds {self.preset}'s {max_pos} positions")
        if self.max_docs is not None and self.max_docs < 1:
            raise InvalidRequestError(f"--max-docs must be at least 1, got {self.max_docs}")
        return self

    def _validate_t5(self, preset: Any) -> TrainConfig:
        if preset.family != "t5":
            raise InvalidRequestError(
                f"--arch t5-byte trains t5 presets; {self.preset!r} is {preset.family}: pick e.g. t5-byte-small"
            )
        rows = preset.hyperparameters.get("vocab_size", 384)
        if self.vocab_size != rows:
            raise InvalidRequestError(
                f"byte-level T5 has a fixed vocabulary ({rows} ids: 3 specials + 256 bytes + spare rows); "
                f"drop --vocab-size {self.vocab_size}"
            )
        for name in ("steps", "batch_size", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.seq_len < 8:
            raise InvalidRequestError(
                f"--seq-len must be at least 8 bytes for span corruption, got {self.seq_len}"
            )
        if not 0 < self.noise_density < 1:
            raise InvalidRequestError(f"--noise-density must be in (0, 1), got {self.noise_density}")
        if not self.mean_span_length >= 1:
            raise InvalidRequestError(
                f"--mean-span-length must be at least 1 byte, got {self.mean_span_length}"
            )
        plan = span_plan(
            raw_length_for(
                self.seq_len, noise_density=self.noise_density, mean_span_length=self.mean_span_length
            ),
            noise_density=self.noise_density,
            mean_span_length=self.mean_span_length,
        )
        if plan.spans + 1 > MAX_SENTINELS:
            raise InvalidRequestError(
                f"--seq-len {self.seq_len} makes {plan.spans} masked spans per example but only "
                f"{MAX_SENTINELS - 1} sentinels (ids 258..248) are free; lower --seq-len or raise --mean-span-length"
            )
        if self.warmup < 0 or self.checkpoint_every < 0:
            raise InvalidRequestError("--warmup and --checkpoint-every must be 0 or more")
        if not self.lr > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.lr}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"--dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.max_docs is not None and self.max_docs < 1:
            raise InvalidRequestError(f"--max-docs must be at least 1, got {self.max_docs}")
        return self

    def to_json(self) -> dict[str, Any]:
        """The config as JSON values (paths as absolute strings)."""
        out = asdict(self)
        for key in ("data", "out", "eval_data"):
            if out[key] is not None:
                out[key] = str(Path(out[key]).expanduser().resolve())
        return out


@dataclass(frozen=True)
class Perplexity:
    """Held-out scores of a causal LM over documents.

    Attributes:
        perplexity: ``exp(nll / tokens)``: per-token perplexity.
        nll: summed negative log-likelihood in nats.
        tokens: predicted tokens (each document's tokens and its closing ``<|endoftext|>``).
        documents: documents scored.
        bits_per_byte: ``nll / ln 2`` over the documents' UTF-8 bytes plus one per document for its end,
            comparable across tokenizers.
    """

    perplexity: float
    nll: float
    tokens: int
    documents: int
    bits_per_byte: float


@dataclass(frozen=True)
class TrainResult:
    """What `train_lm` did.

    Attributes:
        out: the run folder (a model folder if ``finished``).
        finished: False when the run stopped at ``stop_after`` (resume it to finish).
        step: the last completed optimizer step.
        steps: the planned steps.
        final_loss: mean training loss over the last (up to) 50 steps.
        eval: held-out scores of the final model, if ``eval_data`` was given and the run finished.
        tokens_seen: training tokens consumed so far (all invocations).
        train_seconds: time spent in training steps so far (all invocations).
        parameters: model parameters.
        corpus_documents: training documents.
        corpus_tokens: training tokens after packing.
        eval_metric: what ``eval`` measures: ``"perplexity"`` (next-token, decoders) or
            ``"span-corruption perplexity"`` (per target byte of held-out masked spans, byte-level T5).
    """

    out: Path
    finished: bool
    step: int
    steps: int
    final_loss: float
    eval: Perplexity | None
    tokens_seen: int
    train_seconds: float
    parameters: int
    corpus_documents: int
    corpus_tokens: int
    eval_metric: str = "perplexity"

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / self.train_seconds if self.train_seconds > 0 else 0.0

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        state = (
            "model folder"
            if self.finished
            else f"stopped at step {self.step}/{self.steps}; resume with --resume"
        )
        lines = [
            f"{state}: {self.out}",
            f"  {self.parameters:,} parameters, {self.step} steps, {self.tokens_seen:,} tokens "
            f"({self.tokens_seen / max(self.corpus_tokens, 1):.2f} epochs of {self.corpus_documents:,} documents) "
            f"in {self.train_seconds / 60:.1f} min ({self.tokens_per_second:,.0f} tok/s)",
            f"  final training loss {self.final_loss:.4f}",
        ]
        if self.eval is not None:
            per = "target byte" if self.eval_metric != "perplexity" else "token"
            lines.append(
                f"  held-out {self.eval_metric} {self.eval.perplexity:.2f} per {per} "
                f"({self.eval.bits_per_byte:.3f} bits/byte) on {self.eval.documents:,} documents"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- data


def read_corpus(path: str | os.PathLike[str], *, max_docs: int | None = None) -> list[str]:
    """Documents of a text file.

    Plain text is one document per line. A file whose first line is NSMC's header (``id``, ``document``,
    ``label``, tab-separated) is read as NSMC: the ``document`` column of each row. Blank documents are
    skipped.

    Args:
        path: the file.
        max_docs: stop after this many documents.

    Raises:
        DataError: missing file, a line that is not UTF-8 (with its number), or no documents.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"corpus {str(path)!r} not found: pass a UTF-8 text file (one document per line) or an NSMC ratings file"
        )
    docs: list[str] = []
    column: int | None = None  # NSMC's document column, once its header is seen
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(
                    f"{path} line {lineno} is not UTF-8: convert the file first, "
                    f"e.g. `iconv -f cp949 -t utf-8 {shlex.quote(str(path))} > {shlex.quote(path.stem + '.utf8.txt')}`"
                ) from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
                header = line.split("\t")
                if len(header) >= 2 and header[0] == "id" and "document" in header:
                    column = header.index("document")
                    continue
            text = (
                line if column is None else (line.split("\t")[column] if line.count("\t") >= column else "")
            )
            text = text.strip()
            if text:
                docs.append(text)
                if max_docs is not None and len(docs) >= max_docs:
                    break
    if not docs:
        raise DataError(
            f"{path} has no documents (empty or only blank lines): pass a file with one document per line"
        )
    return docs


def train_tokenizer(texts: Iterable[str], *, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (GPT-2/GPT-NeoX style: no unknown tokens).

    ``<|endoftext|>`` is id 0 and serves as bos, eos and document separator; ``<|pad|>`` is id 1.

    Args:
        texts: training documents.
        vocab_size: target vocabulary size including the 256 byte tokens and the two specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
    )


def pack_documents(ids: Sequence[Sequence[int]], *, eos_id: int, seq_len: int) -> torch.Tensor:
    """Joins tokenized documents with ``eos_id`` (one before each) and cuts them into training rows.

    Returns:
        int64 ``[n, seq_len + 1]``: row ``i`` covers stream tokens ``i*seq_len .. (i+1)*seq_len``, so inputs
        are ``row[:-1]`` and targets ``row[1:]`` and every token is a target exactly once.

    Raises:
        DataError: fewer tokens than one row.
    """
    import torch

    stream = [t for doc in ids for t in (eos_id, *doc)]
    stream.append(eos_id)
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"the corpus has only {len(stream)} tokens, less than one --seq-len {seq_len} row: "
            "add text or lower --seq-len"
        )
    flat = torch.tensor(stream[: n * seq_len + 1], dtype=torch.long)
    return flat.unfold(0, seq_len + 1, seq_len).contiguous()


class _BatchOrder:
    """Which rows form the batch of each step: a fresh seeded shuffle per epoch, a pure function of step.

    Being a function of the step number (not of iterator state) is what makes resuming exact.
    """

    def __init__(self, n_rows: int, *, batch_size: int, seed: int) -> None:
        self.n_rows, self.batch_size, self.seed = n_rows, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        import torch

        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n_rows, generator=g)}  # keep one epoch's order
        return self._perms[epoch]

    def position(self, step: int) -> dict[str, int]:
        """Data position before ``step`` (0-based): samples consumed, epoch and offset in it."""
        samples = step * self.batch_size
        return {"samples": samples, "epoch": samples // self.n_rows, "offset": samples % self.n_rows}

    def rows(self, step: int) -> list[int]:
        start = step * self.batch_size
        return [
            int(self._perm(k // self.n_rows)[k % self.n_rows]) for k in range(start, start + self.batch_size)
        ]


# --------------------------------------------------------------------------------------------- byte-level T5


def sentinel_id(i: int) -> int:
    """Id of ``<extra_id_{i}>`` in ByT5's convention: 258, 257, ... (the top byte ids, counting down)."""
    if not 0 <= i < MAX_SENTINELS:
        raise InvalidRequestError(f"sentinel index must be in 0..{MAX_SENTINELS - 1}, got {i}")
    return FIRST_SENTINEL_ID - i


def byte_tokenizer(*, model_max_length: int = BYTE_MODEL_MAX_LENGTH) -> Any:
    """ByT5's tokenizer (id = UTF-8 byte + 3) with ``<extra_id_N>`` bound to ByT5's sentinel ids.

    transformers' ``ByT5Tokenizer`` appends its 125 ``<extra_id_N>`` tokens after the bytes (259, 260, ...),
    which is not where ByT5 (or KEByT5) pre-training put them: its sentinels are the top byte ids
    counting down from 258. This tokenizer maps ``<extra_id_0>`` .. ``<extra_id_10>`` to 258 .. 248 (bytes
    0xFF .. 0xF5, which UTF-8 text never contains), so a prompt like ``"배우들 <extra_id_0> 좋았다"`` gives
    the model the id it was trained with, and generated sentinels decode back to their names. They are
    plain (not special) added tokens: decoding with ``skip_special_tokens=True`` keeps them, so a filled
    span shows which mask it fills.
    """
    from transformers import AddedToken, ByT5Tokenizer

    sentinels = {
        sentinel_id(i): AddedToken(f"<extra_id_{i}>", special=False, normalized=False)
        for i in range(MAX_SENTINELS)
    }
    return ByT5Tokenizer(extra_ids=0, added_tokens_decoder=sentinels, model_max_length=model_max_length)


@dataclass(frozen=True)
class SpanPlan:
    """Lengths of one span-corruption example (T5's ``random_spans_helper`` arithmetic).

    Attributes:
        raw_length: bytes of original text in the example.
        noise_tokens: bytes masked (``round(raw_length * noise_density)``, at least 1).
        spans: masked spans (``round(noise_tokens / mean_span_length)``, at least 1).
    """

    raw_length: int
    noise_tokens: int
    spans: int

    @property
    def inputs_length(self) -> int:
        """Encoder input: kept bytes, one sentinel per span, ``</s>``."""
        return self.raw_length - self.noise_tokens + self.spans + 1

    @property
    def targets_length(self) -> int:
        """Decoder target: a sentinel before each span, the span bytes, a closing sentinel, ``</s>``."""
        return self.noise_tokens + self.spans + 2


def span_plan(raw_length: int, *, noise_density: float = 0.15, mean_span_length: float = 20.0) -> SpanPlan:
    """How many bytes and spans of a ``raw_length``-byte text span corruption masks."""
    if raw_length < 1:
        raise DataError("span corruption needs at least one byte of text")
    noise = min(max(round(raw_length * noise_density), 1), raw_length)
    # Kept text separates spans, so n spans need n - 1 kept bytes between them.
    spans = min(max(round(noise / mean_span_length), 1), noise, raw_length - noise + 1)
    return SpanPlan(raw_length=raw_length, noise_tokens=noise, spans=spans)


def raw_length_for(inputs_length: int, *, noise_density: float = 0.15, mean_span_length: float = 20.0) -> int:
    """The longest raw text whose corrupted input (with ``</s>``) is at most ``inputs_length`` ids."""
    raw = max(inputs_length - 1, 1)  # always fits: spans <= noise, so inputs <= raw + 1
    while (
        span_plan(raw + 1, noise_density=noise_density, mean_span_length=mean_span_length).inputs_length
        <= inputs_length
    ):
        raw += 1
    return raw


def _random_segmentation(total: int, parts: int, rng: random.Random) -> list[int]:
    """``parts`` positive lengths summing to ``total``, uniformly over all such splits."""
    cuts = sorted(rng.sample(range(1, total), parts - 1))
    edges = [0, *cuts, total]
    return [b - a for a, b in zip(edges, edges[1:], strict=False)]


def span_corrupt(
    ids: Sequence[int],
    *,
    rng: random.Random,
    noise_density: float = 0.15,
    mean_span_length: float = 20.0,
) -> tuple[list[int], list[int]]:
    """T5's span corruption of one byte-id sequence, with ByT5's sentinels.

    ``span_plan`` fixes how many bytes and spans are masked; where the spans fall and how long each is
    are drawn from ``rng``. Unlike T5, whose text always ends in a masked span, the kept stretches
    before the first and after the last span may be empty or not, so a mask can sit anywhere, as in a
    user's ``"배우들 <extra_id_0> 좋았다"``.

    Args:
        ids: byte ids (byte + 3) of the raw text, no ``</s>``.
        rng: randomness (seed it for reproducible examples).
        noise_density: fraction of bytes masked.
        mean_span_length: mean masked span in bytes.

    Returns:
        (inputs, targets): the text with each span replaced by its sentinel, then ``</s>``; and each
        sentinel followed by the bytes it hides, a closing sentinel, then ``</s>``. Lengths are
        `SpanPlan.inputs_length` and `SpanPlan.targets_length`.

    Example:
        "배우들 연기가 좋았다" -> inputs "배우들 <extra_id_0> 좋았다</s>", targets
        "<extra_id_0>연기가<extra_id_1></s>" (as ids: 258 ... 257, 1).
    """
    plan = span_plan(len(ids), noise_density=noise_density, mean_span_length=mean_span_length)
    n = plan.spans
    if n + 1 > MAX_SENTINELS:
        raise InvalidRequestError(
            f"{len(ids)} bytes make {n} spans but only {MAX_SENTINELS - 1} sentinels are free; "
            "corrupt shorter texts or raise mean_span_length"
        )
    noise = _random_segmentation(plan.noise_tokens, n, rng)
    # n + 1 kept stretches around the spans; the inner ones non-empty, the outer two possibly empty.
    keep = _random_segmentation(len(ids) - plan.noise_tokens + 2, n + 1, rng)
    keep[0] -= 1
    keep[-1] -= 1
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for i in range(n):
        inputs.extend(ids[pos : pos + keep[i]])
        pos += keep[i]
        inputs.append(FIRST_SENTINEL_ID - i)
        targets.append(FIRST_SENTINEL_ID - i)
        targets.extend(ids[pos : pos + noise[i]])
        pos += noise[i]
    inputs.extend(ids[pos:])
    inputs.append(BYTE_EOS_ID)
    targets.extend((FIRST_SENTINEL_ID - n, BYTE_EOS_ID))
    return inputs, targets


def document_examples(docs: Sequence[str], *, raw_length: int) -> list[bytes]:
    """Each document's UTF-8 bytes as one example; a longer document is cut into ``raw_length`` pieces.

    T5 packs documents into full-length windows. Reviews are short and so are the prompts a span-filling
    model is given, and a model that only ever saw full 128-byte windows (documents joined by newlines)
    did far worse on single reviews than on windows (held-out span-corruption perplexity 7.7 per target
    byte on single NSMC reviews vs 4.5 on windows of the same reviews), so hubkit keeps documents apart.
    """
    examples = []
    for doc in docs:
        data = doc.encode("utf-8")
        examples.extend(data[i : i + raw_length] for i in range(0, len(data), raw_length))
    return examples


def _pad_span_pairs(
    pairs: Sequence[tuple[list[int], list[int]]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input ids, attention mask, labels) tensors for (input, target) pairs: inputs padded with the pad
    byte, labels with -100 (ignored by the loss)."""
    import torch

    width = max(len(p[0]) for p in pairs)
    twidth = max(len(p[1]) for p in pairs)
    inputs = torch.full((len(pairs), width), BYTE_PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    targets = torch.full((len(pairs), twidth), -100, dtype=torch.long)
    for i, (inp, tgt) in enumerate(pairs):
        inputs[i, : len(inp)] = torch.tensor(inp)
        mask[i, : len(inp)] = 1
        targets[i, : len(tgt)] = torch.tensor(tgt)
    return inputs, mask, targets


class _SpanBatches:
    """Span-corrupted batches of byte examples: a pure function of the step, like `_BatchOrder`."""

    def __init__(self, examples: list[bytes], order: _BatchOrder, config: TrainConfig) -> None:
        self.examples, self.order, self.config = examples, order, config

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(inputs, attention mask, targets with -100 padding, text bytes in the batch) of ``step``."""

        # Its own seeded stream per step (not the global RNG): a resumed run masks exactly the same bytes.
        rng = random.Random(self.config.seed * 1_000_003 + step)
        rows = self.order.rows(step)
        pairs = [
            span_corrupt(
                [b + BYTE_OFFSET for b in self.examples[row]],
                rng=rng,
                noise_density=self.config.noise_density,
                mean_span_length=self.config.mean_span_length,
            )
            for row in rows
        ]
        inputs, mask, targets = _pad_span_pairs(pairs)
        return inputs, mask, targets, sum(len(self.examples[row]) for row in rows)


def heldout_span_loss(
    model: PreTrainedModel,
    docs: Sequence[str],
    *,
    max_bytes: int,
    noise_density: float = 0.15,
    mean_span_length: float = 20.0,
    seed: int = 0,
    batch_size: int = 32,
) -> Perplexity:
    """Span-corruption loss of a byte-level T5 on held-out documents, each corrupted on its own.

    Document i (its first ``max_bytes`` UTF-8 bytes) is masked with ``random.Random(seed + i)``, so the
    same documents give the same examples in every run. Every target id counts: sentinels, span bytes
    and ``</s>``.

    Returns:
        ``perplexity`` = exp(nll / target ids), ``tokens`` = target ids, and ``bits_per_byte`` = nll in
        bits per target id (each is one byte or one marker).
    """
    import torch

    if not docs:
        raise DataError("no held-out documents to score: pass a non-empty --eval-data file")
    pairs = [
        span_corrupt(
            [b + BYTE_OFFSET for b in doc.encode("utf-8")[:max_bytes]],
            rng=random.Random(seed + i),
            noise_density=noise_density,
            mean_span_length=mean_span_length,
        )
        for i, doc in enumerate(docs)
    ]
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))  # similar lengths: less padding
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [pairs[i] for i in order[start : start + batch_size]]
                ids, mask, labels = _pad_span_pairs(batch)
                # -100 labels become pad in the decoder input (T5 shifts labels right itself).
                logits = model(input_ids=ids, attention_mask=mask, labels=labels).logits
                batch_nll, batch_count = _summed_nll(logits, labels)
                nll, count = nll + batch_nll, count + batch_count
    finally:
        model.train(was_training)
    return Perplexity(
        perplexity=math.exp(nll / count),
        nll=nll,
        tokens=count,
        documents=len(docs),
        bits_per_byte=nll / math.log(2) / count,
    )


# --------------------------------------------------------------------------------------------- eval


def heldout_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    docs: Sequence[str],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
) -> Perplexity:
    """Per-token perplexity of a causal LM over documents, each scored on its own.

    A document is scored as ``<|endoftext|> document <|endoftext|>``: every token after the first is
    predicted, so the model is also scored on ending the document.

    Args:
        model: a causal LM (any dtype; eval mode is set and restored).
        tokenizer: its tokenizer; its eos token opens and closes each document.
        docs: the documents.
        max_length: truncate scored sequences to this many tokens (default: the model's positions).
        batch_size: documents per forward pass.
    """
    import torch

    if not docs:
        raise DataError("no held-out documents to score: pass a non-empty --eval-data file")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    limit = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    encoded = tokenizer(list(docs), add_special_tokens=False)["input_ids"]
    seqs = [([eos, *ids, eos])[: limit + 1] for ids in encoded]
    n_bytes = sum(len(d.encode("utf-8")) + 1 for d in docs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [seqs[i] for i in order[start : start + batch_size]]
                width = max(len(s) for s in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                for row, s in enumerate(batch):
                    ids[row, : len(s)] = torch.tensor(s)
                targets = ids[:, 1:].clone()
                for row, s in enumerate(batch):
                    targets[row, len(s) - 1 :] = -100
                # Right padding: causal attention keeps real tokens blind to the pads after them.
                batch_nll, batch_count = _summed_nll(model(input_ids=ids[:, :-1]).logits, targets)
                nll, count = nll + batch_nll, count + batch_count
    finally:
        model.train(was_training)
    return Perplexity(
        perplexity=math.exp(nll / count),
        nll=nll,
        tokens=count,
        documents=len(docs),
        bits_per_byte=nll / math.log(2) / n_bytes,
    )


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the targets (positions marked -100 skipped), and how many counted."""
    import torch.nn.functional as F

    logits = logits.float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    ).item()
    return nll, int((targets != -100).sum())


# --------------------------------------------------------------------------------------------- training


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        # Linear warmup to the peak, then cosine down to min_lr_ratio of it at the last step.
        if step < config.warmup:
            return (step + 1) / config.warmup
        span = max(config.steps - config.warmup, 1)
        progress = min((step - config.warmup) / span, 1.0)
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _eval_row(ev: Perplexity, state: _State) -> dict[str, Any]:
    return {
        "type": "eval",
        "step": state.step,
        "perplexity": round(ev.perplexity, 4),
        "bits_per_byte": round(ev.bits_per_byte, 5),
        "documents": ev.documents,
        "tokens": state.tokens,
        "elapsed": round(state.elapsed, 3),
    }


@dataclass
class _State:
    """Mutable progress of a run, saved in each checkpoint's state.json."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    recent_losses: list[float] = field(default_factory=list)


def _save_checkpoint(
    out: Path, config: TrainConfig, state: _State, model, optimizer, scheduler, order: _BatchOrder
) -> Path:
    import torch
    from safetensors.torch import save_model

    root = out / CHECKPOINTS
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # float32 master weights
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "trainer_state.pt",
    )
    meta = {
        "step": state.step,
        "tokens": state.tokens,
        "elapsed": state.elapsed,
        "recent_losses": state.recent_losses,
        "data_position": order.position(state.step),
        "config": config.to_json(),
    }
    (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint exists only once complete: a kill mid-save leaves the previous one
    for _, old in list_checkpoints(out)[: -config.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    now = config.to_json()
    for key in _RESUME_MUST_MATCH:
        if saved.get(key, _RESUME_DEFAULTS.get(key)) != now[key]:
            flag = "--" + key.replace("_", "-")
            raise InvalidRequestError(
                f"cannot resume: {flag} was {saved.get(key)!r} in the checkpointed run, now {now[key]!r}; "
                f"pass the original value or train into a new --out"
            )


def train_lm(config: TrainConfig) -> TrainResult:
    """Trains a tokenizer and a decoder from a preset, or a byte-level T5 (``arch="t5-byte"``) with span
    corruption; see the module docstring for the run folder.

    Args:
        config: the run; with ``resume=True`` it continues the newest checkpoint in ``config.out``.

    Returns:
        What happened, with held-out perplexity when ``eval_data`` was given.

    Raises:
        DataError: unusable training or eval data (missing, empty, not UTF-8, too short).
        InvalidRequestError: bad settings, resuming with no checkpoint or different settings, or a fresh
            run into a folder that already holds one.
    """
    import torch
    from safetensors.torch import load_model
    from tqdm.auto import tqdm
    from transformers import PreTrainedTokenizerFast

    from hubkit.presets import build_model, count_parameters

    config.validate()
    wall_start = time.perf_counter()
    out = Path(config.out).expanduser()
    checkpoints = list_checkpoints(out)
    if config.resume and not checkpoints:
        raise InvalidRequestError(
            f"nothing to resume in {out}: it has no checkpoints/step-N; run without --resume"
        )
    if not config.resume and (checkpoints or (out / TRAINING_FILE).exists() or (out / LOG_FILE).exists()):
        raise InvalidRequestError(
            f"{out} already holds a training run: pass --resume to continue it or choose a new --out"
        )
    # Read both corpora before any training so bad eval data fails now, not after the run.
    docs = read_corpus(config.data, max_docs=config.max_docs)
    eval_docs = read_corpus(config.eval_data) if config.eval_data is not None else None
    out.mkdir(parents=True, exist_ok=True)

    previous_threads = torch.get_num_threads()
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        spans: _SpanBatches | None = None
        if config.arch == "t5-byte":
            tokenizer = byte_tokenizer()  # fixed, nothing to train; saved now so the run folder has it
            if not config.resume:
                tokenizer.save_pretrained(out)
            raw_length = raw_length_for(
                config.seq_len, noise_density=config.noise_density, mean_span_length=config.mean_span_length
            )
            examples = document_examples(docs, raw_length=raw_length)
            corpus_tokens = sum(len(e) for e in examples)
            order = _BatchOrder(len(examples), batch_size=config.batch_size, seed=config.seed)
            spans = _SpanBatches(examples, order, config)
            tokens_per_step = 0  # text bytes consumed: counted per batch (documents differ in length)
            # T5 v1.1 and ByT5 pre-train without dropout; the saved config gets 0.1 back for fine-tuning.
            model = build_model(config.preset, seed=config.seed, dropout_rate=0.0)
        else:
            if config.resume:
                tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
            else:
                tokenizer = train_tokenizer(docs, vocab_size=config.vocab_size)
                # Saved before training so a resumed run reuses exactly these ids.
                tokenizer.save_pretrained(out)
            eos = tokenizer.eos_token_id
            encoded = tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)
            rows = pack_documents([e.ids for e in encoded], eos_id=eos, seq_len=config.seq_len)
            del encoded
            corpus_tokens = rows.numel() - rows.size(0)  # every token once (rows overlap by one)
            order = _BatchOrder(rows.size(0), batch_size=config.batch_size, seed=config.seed)
            tokens_per_step = config.batch_size * config.seq_len
            model = build_model(
                config.preset,
                vocab_size=len(tokenizer),
                seed=config.seed,
                bos_token_id=eos,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
            )
        model.train()
        n_params = count_parameters(model)
        if spans is not None:
            from transformers.optimization import Adafactor

            # T5 and ByT5 pre-trained with Adafactor, and T5's init needs it: its query matrices start ~10x
            # smaller than the rest, so Adam's equal-sized steps swamp them, while Adafactor's steps are
            # relative to each matrix's scale (measured on t5-byte-small, 300 steps: loss 2.09 with
            # Adafactor 1e-2 vs 2.22 / 2.32 with AdamW 5e-4 / 2e-3, which sat on a plateau).
            optimizer = Adafactor(
                model.parameters(), lr=config.lr, relative_step=False, scale_parameter=True, warmup_init=False
            )
        else:
            decay = [p for p in model.parameters() if p.ndim >= 2]
            no_decay = [p for p in model.parameters() if p.ndim < 2]
            optimizer = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": config.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=config.lr,
                betas=(0.9, 0.95),
                eps=1e-8,
            )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
        state = _State()
        log_path = out / LOG_FILE

        if config.resume:
            step, ckpt = checkpoints[-1]
            meta = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
            _check_resumable(meta["config"], config)
            load_model(model, str(ckpt / "model.safetensors"))
            trainer_state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
            optimizer.load_state_dict(trainer_state["optimizer"])
            scheduler.load_state_dict(trainer_state["scheduler"])
            torch.set_rng_state(trainer_state["torch_rng"])
            random.setstate(_as_tuple(trainer_state["python_rng"]))
            state = _State(
                step=meta["step"],
                tokens=meta["tokens"],
                elapsed=meta["elapsed"],
                recent_losses=list(meta["recent_losses"]),
            )
            # Rows the interrupted run logged after this checkpoint are redone: drop them, keep the log one run.
            if log_path.exists():
                kept = [
                    line
                    for line in log_path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= step
                ]
                log_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        else:
            torch.manual_seed(config.seed)
            random.seed(config.seed)
            log_path.write_text("", encoding="utf-8")

        recent = deque(state.recent_losses, maxlen=50)
        window: list[float] = []
        stop = min(config.steps, config.stop_after) if config.stop_after is not None else config.steps
        interactive = sys.stderr.isatty()
        bar = tqdm(
            total=config.steps,
            initial=state.step,
            unit="step",
            dynamic_ncols=True,
            mininterval=0.5 if interactive else 30.0,
            desc=f"train {config.preset}",
        )
        use_autocast = cpu_has_native_bf16() if config.autocast is None else config.autocast
        try:
            while state.step < stop:
                t0 = time.perf_counter()
                if spans is not None:
                    inputs, mask, targets, tokens_per_step = spans.batch(state.step)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                        # labels= makes T5 build its decoder input: targets shifted right after pad (0),
                        # with the -100 padding read as pad.
                        logits = model(input_ids=inputs, attention_mask=mask, labels=targets).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-100
                    )
                else:
                    batch = rows[order.rows(state.step)]
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                        logits = model(input_ids=batch[:, :-1]).logits
                    loss = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.size(-1)).float(), batch[:, 1:].reshape(-1)
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                dt = time.perf_counter() - t0
                state.step += 1
                state.tokens += tokens_per_step
                state.elapsed += dt
                value = loss.item()
                recent.append(value)
                window.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}", refresh=False)
                if state.step % config.log_every == 0 or state.step == stop:
                    append_jsonl(
                        log_path,
                        {
                            "type": "train",
                            "step": state.step,
                            "loss": round(sum(window) / len(window), 5),
                            "lr": lr,
                            "tokens": state.tokens,
                            "elapsed": round(state.elapsed, 3),
                        },
                    )
                    window = []
                if (
                    config.checkpoint_every
                    and state.step % config.checkpoint_every == 0
                    and state.step < config.steps
                ):
                    state.recent_losses = list(recent)
                    _save_checkpoint(out, config, state, model, optimizer, scheduler, order)
                    if eval_docs:
                        ev = _heldout(model, tokenizer, eval_docs[: config.eval_docs_during], config)
                        append_jsonl(log_path, _eval_row(ev, state))
                        bar.write(
                            f"step {state.step}: held-out {_eval_metric(config)} {ev.perplexity:.2f} "
                            f"({ev.documents} docs), checkpoint saved"
                        )
        finally:
            bar.close()

        state.recent_losses = list(recent)
        final_loss = sum(recent) / len(recent) if recent else float("nan")
        common = dict(
            out=out,
            step=state.step,
            steps=config.steps,
            final_loss=final_loss,
            tokens_seen=state.tokens,
            train_seconds=state.elapsed,
            parameters=n_params,
            corpus_documents=len(docs),
            corpus_tokens=corpus_tokens,
            eval_metric=_eval_metric(config),
        )
        if state.step < config.steps:
            # Stopped early on purpose: make sure there is a checkpoint to resume from at this very step.
            _save_checkpoint(out, config, state, model, optimizer, scheduler, order)
            return TrainResult(finished=False, eval=None, **common)

        # Score the weights as shipped (cast to --dtype), not the float32 master copy.
        _save_final(out, model, tokenizer, config)
        ev = None
        if eval_docs:
            ev = _heldout(model, tokenizer, eval_docs, config)
            append_jsonl(log_path, _eval_row(ev, state))
        result = TrainResult(finished=True, eval=ev, **common)
        training = {
            "command": command_line(),
            "config": config.to_json(),
            "preset": config.preset,
            "optimizer": type(optimizer).__name__,
            "parameters": n_params,
            "final_loss": final_loss,
            "heldout": asdict(ev) | {"data": str(config.eval_data), "metric": _eval_metric(config)}
            if ev
            else None,
            "steps": state.step,
            "tokens_seen": state.tokens,
            "train_seconds": round(state.elapsed, 1),
            "tokens_per_second": round(result.tokens_per_second, 1),
            "wall_seconds_last_invocation": round(time.perf_counter() - wall_start, 1),
            "corpus": {
                "documents": len(docs),
                "tokens": corpus_tokens,
                "epochs": state.tokens / corpus_tokens,
            },
            "tokenizer": _tokenizer_info(tokenizer, model, config),
            "threads": threads,
            "autocast_bf16": use_autocast,
            "versions": library_versions(),
        }
        if spans is not None:
            plan = span_plan(
                raw_length, noise_density=config.noise_density, mean_span_length=config.mean_span_length
            )
            training["objective"] = {
                "type": "span corruption (T5), ByT5 sentinels, one document per example",
                "noise_density": config.noise_density,
                "mean_span_length": config.mean_span_length,
                "max_raw_bytes": plan.raw_length,
                "max_masked_bytes": plan.noise_tokens,
                "max_spans": plan.spans,
                "max_inputs_length": plan.inputs_length,
                "max_targets_length": plan.targets_length,
                "examples": len(examples),
                "sentinels": [sentinel_id(i) for i in range(plan.spans + 1)],
            }
        (out / TRAINING_FILE).write_text(
            json.dumps(training, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _eval_metric(config: TrainConfig) -> str:
    return "span-corruption perplexity" if config.arch == "t5-byte" else "perplexity"


def _heldout(model: PreTrainedModel, tokenizer: Any, docs: Sequence[str], config: TrainConfig) -> Perplexity:
    if config.arch == "t5-byte":
        return heldout_span_loss(
            model,
            docs,
            max_bytes=raw_length_for(
                config.seq_len, noise_density=config.noise_density, mean_span_length=config.mean_span_length
            ),
            noise_density=config.noise_density,
            mean_span_length=config.mean_span_length,
        )
    return heldout_perplexity(model, tokenizer, docs, max_length=config.seq_len)


def _tokenizer_info(tokenizer: Any, model: PreTrainedModel, config: TrainConfig) -> dict[str, Any]:
    if config.arch == "t5-byte":
        return {
            "type": "byte-level (UTF-8 byte + 3)",
            "vocab_size": int(model.config.vocab_size),
            "specials": {"pad": BYTE_PAD_ID, "eos": BYTE_EOS_ID, "unk": 2},
            "sentinels": f"<extra_id_0> = {FIRST_SENTINEL_ID} counting down to "
            f"<extra_id_{MAX_SENTINELS - 1}> = {sentinel_id(MAX_SENTINELS - 1)}",
        }
    return {"type": "byte-level BPE", "vocab_size": len(tokenizer), "eos": EOS_TOKEN, "pad": PAD_TOKEN}


def default_threads() -> int:
    """Torch threads for training: the CPUs nobody else is using right now, at least one.

    On a machine shared with other jobs, more threads than idle cores is far slower than one thread:
    OpenMP's threads wait on each other at every operator while the scheduler runs someone else's
    process (measured here: 2 threads on 2 busy cores gave ~250 tok/s, 1 thread ~3,800 tok/s). And on
    idle cores one thread too few costs as much: prompt tuning ran 1.5x slower on one of two idle cores.
    """
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(cpus, cpus - round(busy_cpus())))


def busy_cpus(*, seconds: float = 0.5) -> float:
    """How many of this process's CPUs other work keeps busy now, from ``/proc/stat`` over ``seconds``.

    Not the load average: it decays over a minute, so right after a job ends it still counts the job
    (a benchmark's scoring stage made the tuning that followed it run on one of two idle cores).
    Where ``/proc/stat`` cannot be read, the 1-minute load average.
    """
    mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}

    def sample() -> dict[str, tuple[int, int]]:
        times = {}
        for line in Path("/proc/stat").read_text(encoding="ascii").splitlines():
            name, *fields = line.split()
            if name in mine:
                # user nice system idle iowait irq softirq steal ...: idle and iowait are free time; steal
                # is time the hypervisor gave to another machine, so busy.
                ticks = [int(f) for f in fields[:8]]
                times[name] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError):
        return os.getloadavg()[0]
    busy = 0.0
    for name, (work, total) in after.items():
        if name in before and total > before[name][1]:
            busy += (work - before[name][0]) / (total - before[name][1])
    return busy


def _as_tuple(value: Any) -> Any:
    # random.setstate needs tuples; serialisation may hand lists back.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _save_final(out: Path, model, tokenizer, config: TrainConfig) -> None:
    import torch
    from transformers import GenerationConfig

    dtype = getattr(torch, config.dtype)
    model.eval()
    model.to(dtype)
    if config.arch == "t5-byte":
        # Greedy by default: span filling has one right answer more often than not.
        model.generation_config = GenerationConfig(
            decoder_start_token_id=BYTE_PAD_ID,
            bos_token_id=None,
            eos_token_id=BYTE_EOS_ID,
            pad_token_id=BYTE_PAD_ID,
            max_new_tokens=64,
        )
        model.config.dropout_rate = (
            0.1  # pre-trained without dropout; ByT5's checkpoints ship 0.1 for fine-tuning
        )
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        max_new_tokens=64,
    )
    if model.config.model_type == "gpt_neox":
        # transformers 5 keeps RoPE settings in rope_parameters only; transformers 4.x reads these keys and
        # would otherwise silently fall back to its default rotary_pct of 0.25.
        rope = model.config.rope_parameters
        model.config.rotary_pct = rope["partial_rotary_factor"]
        model.config.rotary_emb_base = rope["rope_theta"]
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = (
        getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    )
    tokenizer.save_pretrained(out)
    # "TokenizersBackend" is transformers 5's name for the class; 4.x knows it as PreTrainedTokenizerFast,
    # which 5 also accepts, so the folder loads on both.
    tok_config_path = out / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
