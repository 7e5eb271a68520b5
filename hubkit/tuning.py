"""``hubkit tune``: prompt tuning (a soft prompt on a frozen decoder) and full fine-tuning, for classification.

ko-gpt-bot-sc froze KoGPT and trained only a soft prompt to classify NSMC reviews as 긍정/부정; this module
does the same for any task of :mod:`hubkit.tasks` with fixed choices, on CPU, and ``method="full"`` fine-tunes
every weight instead, for comparison.

The classifier is the language model itself. A row's score for each choice is the summed log-prob of the
continuation ``target_delimiter + choice`` after the context (lm-eval's ``loglikelihood``, tokenized by
:func:`hubkit.backends.transformers.encode_pair` as the backends tokenize it), and training minimises the
cross-entropy of the gold choice over those scores. So the tuned model, scored the ordinary way (the
``loglikelihood`` verb, ``hubkit score``), predicts what training optimised. The soft prompt is PEFT's
prompt tuning: N trainable vectors prepended to the input embeddings (before any BOS), saved by ``peft``
itself (``adapter_config.json`` + ``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads it.

The run folder ``OUT`` is the model folder at the end (``checkpoints/`` is never published)::

    OUT/
      adapter_config.json, adapter_model.safetensors   --method prompt: the soft prompt (PEFT format)
      config.json, model.safetensors, tokenizer ...    --method full: a Hugging Face folder vLLM loads
      train_log.jsonl      {"type": "train", step, epoch, loss, lr, examples, elapsed} every log_every steps,
                           {"type": "eval", step, acc, loss, rows, best, elapsed} at each evaluation
      tuning.json          the config, parameter counts (all / trainable / frozen), data sizes, best step,
                           eval metrics, time, and the fingerprint a rerun is compared with
      eval/                predictions on the eval set as a scoring run folder (hubkit.results schema):
                           metrics.json, predictions.parquet, report.md, plots/
      README.md, plots/    the card (hubkit.cards): All/Trainable/Frozen, loss curve, labels vs predictions,
                           classification report
      checkpoints/step-N/  trainable weights, AdamW + scheduler + RNG state, early-stopping state
      checkpoints/best.safetensors   the trainable weights of the best evaluation so far

Running the same command again continues from the newest checkpoint (or, when the run finished, reports it);
a different command into the same folder is refused unless ``overwrite=True``. With an eval set, the model is
evaluated every ``eval_every`` steps on its first ``eval_rows`` rows, training stops after ``patience``
evaluations without a better accuracy, and the best weights are the ones saved. Batches are length-bucketed
(rows of similar length together, dynamic right padding) and the order is a function of the seed and the
step, so a resumed run sees exactly the batches an uninterrupted one would.

torch, transformers and peft are imported inside the functions that use them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hubkit.errors import DataError, InvalidRequestError
from hubkit.models import model_fingerprint
from hubkit.runs import CHECKPOINTS, append_jsonl, command_line, hash_file, library_versions, list_checkpoints
from hubkit.scoring import argmax  # the choice lm-eval's acc counts: first of equal maxima

if TYPE_CHECKING:
    import torch

    from hubkit.results import RunMetrics
    from hubkit.tasks import TaskSpec

Method = Literal["prompt", "full"]
Init = Literal["examples", "vocab", "random", "text"]

LOG_FILE = "train_log.jsonl"
TUNING_FILE = "tuning.json"
EVAL_DIR = "eval"

BEST_FILE = "best.safetensors"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TUNING_SCHEMA = "hubkit.tune/1"
#: Default learning rates (AdamW), the best of a few 1-epoch NSMC runs on the default model: the soft prompt
#: moves far from its init (0.3, as Lester et al. with Adafactor; 0.03 and 1.0 were worse); all weights of a
#: pretrained model need small steps (3e-4 beat 1e-4).
DEFAULT_LR: dict[str, float] = {"prompt": 0.3, "full": 3e-4}
# Rows that stop a tune before it starts: a label outside the choices or a row that cannot be read is a
# data problem to fix; an empty review (NSMC has some) is only skipped.
_FATAL_KINDS = ("unreadable", "undecodable", "missing_label", "bad_label", "template")
# Config fields that do not change what a run computes: a rerun that differs only in these resumes.
_NOT_FINGERPRINTED = ("out", "threads", "progress", "card", "overwrite", "stop_after")


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """Everything that decides a tuning run (the ``hubkit tune`` flags).

    Attributes:
        train: Labelled training data (NSMC .txt/.tsv, .csv, .jsonl, .parquet; see :mod:`hubkit.datasets`).
        out: Run folder; the adapter (or model) folder at the end.
        model: Base model folder, Hub id (in the local cache) or "default".
        method: ``prompt`` (train a soft prompt, the model frozen) or ``full`` (train every weight).
        task: Built-in task name or task YAML; its prompt and choices make the classifier.
        eval: Labelled data for periodic evaluation, early stopping and the final predictions.
        num_virtual_tokens: Soft-prompt length N (``prompt`` only).
        init: Soft-prompt init: ``examples`` (the embeddings of task examples from the training data, i.e. a
            few-shot prompt), ``vocab`` (random vocabulary embeddings), ``random``, or ``text`` (``init_text``).
        init_text: The text whose token embeddings start the soft prompt, with ``init="text"``.
        epochs: Passes over the training data (fractions allowed).
        max_steps: Optimizer steps; overrides ``epochs``.
        batch_size: Rows per step.
        lr: Peak learning rate of AdamW (default: `DEFAULT_LR` of the method).
        warmup_steps: Linear warmup, then linear decay to 0 at the last step.
        weight_decay: AdamW weight decay on matrices (default: 0 for prompt, 0.01 for full).
        eval_every: Steps between evaluations (and checkpoints).
        eval_rows: Rows of the eval data used at each periodic evaluation (None: all); the final
            evaluation uses all of them.
        patience: Stop after this many evaluations without a higher accuracy (0: never stop early).
        log_every: Steps per training row of ``train_log.jsonl`` (each averages the loss over them).
        limit: Use only the first ``limit`` training rows.
        columns: Task field -> column of the data files, for other schemas.
        seed: Seed of the data order and the init.
        threads: torch CPU threads (default: the idle CPUs, see `hubkit.training.default_threads`).
        card: Write the model card (README.md + plots/) at the end.
        overwrite: Replace a different run found in ``out``.
        progress: Show a progress bar (stderr).
        stop_after: End this invocation after this step without finishing, as an interruption would
            (to time-box a run and to test resuming); run again to continue.
    """

    train: Path
    out: Path
    model: str = "default"
    method: Method = "prompt"
    task: str = "nsmc"
    eval: Path | None = None
    num_virtual_tokens: int = 50
    init: Init = "examples"
    init_text: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float | None = None
    warmup_steps: int = 50
    weight_decay: float | None = None
    eval_every: int = 200
    eval_rows: int | None = 1000
    patience: int = 5
    log_every: int = 10
    limit: int | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    threads: int | None = None
    card: bool = True
    overwrite: bool = False
    progress: bool = True
    stop_after: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "train", Path(self.train).expanduser())
        object.__setattr__(self, "out", Path(self.out).expanduser())
        if self.eval is not None:
            object.__setattr__(self, "eval", Path(self.eval).expanduser())
        object.__setattr__(self, "columns", dict(self.columns))

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.0 if self.method == "prompt" else 0.01

    def validate(self) -> TuneConfig:
        """Checks values a user can get wrong; returns self.

        Raises:
            InvalidRequestError: a value out of range, with the fix.
        """
        if self.method not in ("prompt", "full"):
            raise InvalidRequestError(f"--method must be 'prompt' or 'full', got {self.method!r}")
        if self.init not in ("examples", "vocab", "random", "text"):
            raise InvalidRequestError(f"--init must be examples, vocab, random or text, got {self.init!r}")
        if self.init == "text" and not (self.init_text or "").strip():
            raise InvalidRequestError(
                "--init text needs --init-text 'some words to start the soft prompt from'"
            )
        for name in ("num_virtual_tokens", "batch_size", "eval_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        for name in ("max_steps", "eval_rows", "limit", "stop_after", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        if not self.epochs > 0:
            raise InvalidRequestError(f"--epochs must be positive, got {self.epochs}")
        if not self.learning_rate > 0:
            raise InvalidRequestError(f"--lr must be positive, got {self.learning_rate}")
        if self.warmup_steps < 0 or self.patience < 0 or self.decay < 0:
            raise InvalidRequestError("--warmup-steps, --patience and --weight-decay must be 0 or more")
        return self

    def to_json(self) -> dict[str, Any]:
        """The config as JSON values (paths as absolute strings)."""
        out = asdict(self)
        for key in ("train", "out", "eval"):
            if out[key] is not None:
                out[key] = str(Path(out[key]).resolve())
        out["columns"] = dict(self.columns)
        return out


@dataclass(frozen=True, kw_only=True)
class TuneResult:
    """What `tune` did.

    Attributes:
        out: The run folder (the adapter or model folder when ``finished``).
        method: ``prompt`` or ``full``.
        finished: False when the run stopped at ``stop_after`` (run the command again to continue).
        step: The last completed optimizer step.
        steps: The planned steps.
        stopped_early: Training ended by early stopping before ``steps``.
        best_step: Step of the saved weights (the best evaluation; the last step without eval data).
        best_eval_acc: Accuracy of the best periodic evaluation (on ``eval_rows`` rows).
        eval: Metrics of the final evaluation on the whole eval set (None without eval data).
        final_loss: Mean training loss over the last (up to) 50 steps.
        train_seconds: Time spent training (all invocations, evaluations excluded).
        parameters: Parameters of the model as tuned (base + soft prompt for ``prompt``).
        trainable_parameters: Parameters that were trained.
        train_rows: Training rows used.
        resumed: This invocation continued an earlier one (or found it finished).
    """

    out: Path
    method: str
    finished: bool
    step: int
    steps: int
    stopped_early: bool
    best_step: int | None
    best_eval_acc: float | None
    eval: RunMetrics | None
    final_loss: float
    train_seconds: float
    parameters: int
    trainable_parameters: int
    train_rows: int
    resumed: bool = False

    @property
    def frozen_parameters(self) -> int:
        return self.parameters - self.trainable_parameters

    def summary(self) -> str:
        """A few human-readable lines for the terminal."""
        what = "adapter folder" if self.method == "prompt" else "model folder"
        state = (
            what
            if self.finished
            else f"stopped at step {self.step}/{self.steps}; run the same command to continue"
        )
        share = self.trainable_parameters / self.parameters if self.parameters else 0.0
        lines = [
            f"{state}: {self.out}",
            f"  parameters: all {self.parameters:,}, trainable {self.trainable_parameters:,} ({share:.2%}), "
            f"frozen {self.frozen_parameters:,}",
            f"  {self.step} steps on {self.train_rows:,} rows in {self.train_seconds / 60:.1f} min"
            + (", stopped early" if self.stopped_early else "")
            + f"; final training loss {self.final_loss:.4f}",
        ]
        if self.best_eval_acc is not None:
            lines.append(f"  best periodic eval accuracy {self.best_eval_acc:.4f} at step {self.best_step}")
        if self.eval is not None and self.eval.results:
            r = self.eval.results[0]
            shown = ", ".join(f"{k} {v:.4f}" for k, v in r.metrics.items())
            lines.append(
                f"  eval ({r.n_rows - r.n_errors:,} rows): {shown}; predictions in {self.out / EVAL_DIR}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One row as token ids, laid out for scoring every choice in as few forward rows as possible.

    A choice's tokens are predicted at the positions of ``context + continuation[:-1]``; ``extensions``
    holds the distinct token runs to append to the context so that every choice's inputs are a prefix of
    one forward row (for NSMC one row: `` 부정`` is one token, read where `` 긍정``'s first token is).

    Attributes:
        row_id: Position of the row in its data files.
        context: Context token ids (few-shot examples + prompt), after left truncation.
        continuations: Per choice, the continuation's token ids.
        gold: The gold choice index (None when unknown).
        extensions: Token runs appended to the context, one forward row each.
        choice_rows: Per choice, the index in ``extensions`` of the row its log-probs are read from.
    """

    row_id: int
    context: tuple[int, ...]
    continuations: tuple[tuple[int, ...], ...]
    gold: int | None
    extensions: tuple[tuple[int, ...], ...]
    choice_rows: tuple[int, ...]

    @property
    def length(self) -> int:
        """Tokens of its longest forward row."""
        return len(self.context) + max(len(e) for e in self.extensions)


def layout(
    row_id: int, context: Sequence[int], continuations: Sequence[Sequence[int]], gold: int | None
) -> Example:
    """Builds an `Example`: the fewest forward rows that yield every choice's token log-probs."""
    extensions: list[tuple[int, ...]] = []
    choice_rows = [0] * len(continuations)
    for j in sorted(range(len(continuations)), key=lambda j: -len(continuations[j])):
        need = tuple(continuations[j][:-1])
        for r, ext in enumerate(extensions):
            if ext[: len(need)] == need:
                choice_rows[j] = r
                break
        else:
            extensions.append(need)
            choice_rows[j] = len(extensions) - 1
    return Example(
        row_id=row_id,
        context=tuple(context),
        continuations=tuple(tuple(c) for c in continuations),
        gold=gold,
        extensions=tuple(extensions),
        choice_rows=tuple(choice_rows),
    )


@dataclass(frozen=True, kw_only=True)
class Problem:
    """A row that could not become an example: its position, source, error kind and one-line message."""

    row_id: int
    source: str
    kind: str
    message: str
    record: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Encoded:
    """A data set ready for scoring: the examples, their docs, and the rows that failed."""

    examples: list[Example]
    docs: dict[int, Any]
    sources: dict[int, str]
    problems: list[Problem]
    rows: int

    def fatal(self) -> Problem | None:
        """The first problem that must stop a tune (an unreadable row, a missing or foreign label)."""
        return next((p for p in self.problems if p.kind in _FATAL_KINDS), None)


def encode_data(
    task: TaskSpec,
    tokenizer: Any,
    paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    max_length: int,
    reserved: int = 0,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    shots: int = 0,
    fewshot: Any = None,
) -> Encoded:
    """Reads data files (in this process) and tokenizes every row's (context, continuation) pairs.

    Args:
        task: A multiple-choice task.
        tokenizer: The model's tokenizer.
        paths: Data files.
        max_length: The model's context length.
        reserved: Positions taken before the text (the soft prompt's virtual tokens).
        columns: Task field -> column.
        limit: Only the first ``limit`` rows.
        shots: Few-shot examples per row (drawn from ``fewshot``, a `hubkit.tasks.FewShotSampler`).
        fewshot: The sampler, when ``shots`` > 0.

    Returns:
        The examples and the rows that could not be used (read errors, bad labels, too long...).
    """
    from hubkit.backends.transformers import encode_pair
    from hubkit.datasets import read_local_rows
    from hubkit.tasks import RowError

    rows = read_local_rows(paths, columns=columns, limit=limit)
    examples: list[Example] = []
    docs: dict[int, Any] = {}
    sources: dict[int, str] = {}
    problems: list[Problem] = []
    budget = max_length - reserved
    for row in rows:
        sources[row.row_id] = row.source
        if row.error_kind:
            problems.append(
                Problem(
                    row_id=row.row_id,
                    source=row.source,
                    kind=row.error_kind,
                    message=row.error or row.error_kind,
                    record=row.record,
                )
            )
            continue
        try:
            doc = task.prepare(row.record, row.row_id)
            pairs = task.requests(doc, fewshot.examples(row.row_id, shots) if shots else ())
            encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
        except (RowError, InvalidRequestError) as exc:
            kind = exc.kind if isinstance(exc, RowError) else "invalid"
            problems.append(
                Problem(row_id=row.row_id, source=row.source, kind=kind, message=str(exc), record=row.record)
            )
            continue
        context = list(encoded[0][0])
        continuations = [cont for _, cont in encoded]
        # lm-eval's left truncation: a context that does not fit loses its oldest tokens.
        room = budget - max(len(c) for c in continuations)
        if room < 1:
            problems.append(
                Problem(
                    row_id=row.row_id,
                    source=row.source,
                    kind="too_long",
                    message=f"a choice is longer than the model's {budget} positions",
                    record=row.record,
                )
            )
            continue
        docs[row.row_id] = doc
        examples.append(layout(row.row_id, context[-room:], continuations, doc.gold))
    return Encoded(examples=examples, docs=docs, sources=sources, problems=problems, rows=len(rows))


# --------------------------------------------------------------------------------------------- scoring


class ChoiceScorer:
    """Scores examples: per choice, the summed log-prob of its continuation (what ``loglikelihood`` returns).

    Three ways to compute the same numbers, the fastest that agrees with the model's own forward is used:

    * ``prefix``: the soft prompt comes first and a causal model's first N positions see only it, so its
      keys and values are the same for every row: they are computed once per batch (a 1-row forward) and
      every row attends to them through the KV cache. Gradients reach the soft prompt through the cache.
      With N = 50 virtual tokens and ~30-token reviews this is ~2.5x less work than the next path.
    * ``concat``: the backbone runs on ``[soft prompt; embed(tokens)]`` row by row (PEFT's layout).
    * ``full``: the model's (or the PEFT model's) own forward with an attention mask.

    The first two right-pad (in a causal model padding after a token cannot change it, so they need no
    mask) and apply the LM head only at the positions that predict continuation tokens. At construction
    they are checked against ``full`` on a few examples and dropped when they differ (an architecture whose
    logits are more than ``lm_head(last_hidden_state)``, or whose cache cannot be repeated over a batch).

    Args:
        model: The causal LM (frozen under a soft prompt, or being fine-tuned).
        peft_model: The PEFT prompt-tuning wrapper of ``model``, or None.
        pad_id: Token id used for padding.
        probe: A few examples to check the fast paths on.
    """

    def __init__(
        self, model: Any, peft_model: Any = None, *, pad_id: int, probe: Sequence[Example] = ()
    ) -> None:
        self.model = model
        self.peft_model = peft_model
        self.pad_id = pad_id
        self.virtual_tokens = int(peft_model.peft_config["default"].num_virtual_tokens) if peft_model else 0
        candidates = (["prefix"] if peft_model is not None else []) + ["concat"]
        self.path = candidates[0]
        if probe:
            import torch

            with torch.inference_mode():
                self.path = "full"
                want = self(probe)
                for path in candidates:
                    self.path = path
                    try:
                        got = self(probe)
                    except (RuntimeError, TypeError, ValueError, AttributeError):
                        continue
                    if torch.allclose(got, want, atol=1e-4, rtol=1e-4):
                        break
                else:
                    self.path = "full"

    def __call__(self, examples: Sequence[Example]) -> torch.Tensor:
        """A [len(examples), choices] tensor of continuation log-likelihoods (differentiable)."""
        import torch

        rows: list[tuple[int, ...]] = []
        t_row: list[int] = []
        t_pos: list[int] = []
        t_tok: list[int] = []
        t_ex: list[int] = []
        t_choice: list[int] = []
        for i, ex in enumerate(examples):
            first = len(rows)
            rows += [ex.context + ext for ext in ex.extensions]
            start = len(ex.context) - 1
            for j, cont in enumerate(ex.continuations):
                for k, token in enumerate(cont):
                    t_row.append(first + ex.choice_rows[j])
                    t_pos.append(start + k)
                    t_tok.append(token)
                    t_ex.append(i)
                    t_choice.append(j)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, tokens in enumerate(rows):
            ids[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[r, : len(tokens)] = 1
        index_row = torch.tensor(t_row)
        index_pos = torch.tensor(t_pos)
        backbone = self.model.base_model
        if self.path == "prefix":
            prompt = self.peft_model.get_prompt(batch_size=1)
            embeds = self.model.get_input_embeddings()(ids)
            cache = backbone(inputs_embeds=prompt.to(embeds.dtype), use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(rows))
            hidden = backbone(inputs_embeds=embeds, past_key_values=cache, use_cache=True).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[index_row, index_pos])
        elif self.path == "concat":
            embeds = self.model.get_input_embeddings()(ids)
            if self.peft_model is not None:
                prompt = self.peft_model.get_prompt(batch_size=len(rows)).to(embeds.dtype)
                embeds = torch.cat([prompt, embeds], dim=1)
            hidden = backbone(inputs_embeds=embeds).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[index_row, index_pos + self.virtual_tokens])
        else:
            full = (self.peft_model or self.model)(input_ids=ids, attention_mask=mask).logits
            logits = full[index_row, index_pos + self.virtual_tokens]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        picked = logprobs[torch.arange(len(t_tok)), torch.tensor(t_tok)]
        n_choices = max(len(ex.continuations) for ex in examples)
        scores = torch.zeros((len(examples), n_choices), dtype=picked.dtype)
        return scores.index_put((torch.tensor(t_ex), torch.tensor(t_choice)), picked, accumulate=True)


def length_batches(
    examples: Sequence[Example], batch_size: int, *, seed: int | None = None, epoch: int = 0
) -> list[list[int]]:
    """Index batches of rows of similar length (less padding).

    With a seed: a shuffle per (seed, epoch), sorted by length within pools of 50 batches, batches in a
    shuffled order (a function of seed and epoch only, so a resumed run sees the same batches). Without
    one: all rows sorted by length (evaluation).
    """
    n = len(examples)
    if seed is None:
        order = sorted(range(n), key=lambda i: examples[i].length)
        return [order[s : s + batch_size] for s in range(0, n, batch_size)]
    rng = random.Random(f"hubkit-tune:{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    pool = batch_size * 50
    batches: list[list[int]] = []
    for s in range(0, n, pool):
        chunk = sorted(order[s : s + pool], key=lambda i: examples[i].length)
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def score_examples(
    scorer: ChoiceScorer, examples: Sequence[Example], *, batch_size: int = 64, progress: Any = None
) -> list[list[float]]:
    """Per example (input order), the log-likelihood of each choice."""
    import torch

    out: list[list[float]] = [[] for _ in examples]
    with torch.inference_mode():
        for batch in length_batches(examples, batch_size):
            scores = scorer([examples[i] for i in batch])
            for i, row in zip(batch, scores.tolist(), strict=True):
                out[i] = row[: len(examples[i].continuations)]
            if progress is not None:
                progress.update(len(batch))
    return out


def _accuracy(examples: Sequence[Example], scores: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(accuracy, mean cross-entropy of the gold choice) over labelled examples."""
    right, loss, n = 0, 0.0, 0
    for ex, s in zip(examples, scores, strict=True):
        if ex.gold is None:
            continue
        n += 1
        right += int(argmax(s) == ex.gold)
        top = max(s)
        loss += top + math.log(sum(math.exp(v - top) for v in s)) - s[ex.gold]
    return (right / n, loss / n) if n else (float("nan"), float("nan"))


# --------------------------------------------------------------------------------------------- run folders


def write_run(
    out: str | os.PathLike[str],
    *,
    task: TaskSpec,
    encoded: Encoded,
    scores: Sequence[Sequence[float]],
    model_label: str,
    model_parameters: int | None,
    shots: int = 0,
    seconds: float = 0.0,
    config: Mapping[str, Any] | None = None,
) -> RunMetrics:
    """Writes a scoring run folder (:mod:`hubkit.results` schema) from scored examples.

    The folder holds the same files ``hubkit score`` writes (metrics.json, predictions.parquet, report.md,
    plots), so cards, the results page and ``hubkit card --results`` read it. Rows in ``encoded.problems``
    become error rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hubkit.results import PREDICTIONS_FILE, RunMetrics, ShotResult, write_metrics
    from hubkit.scoring import (
        PREDICTION_COLUMNS,
        classification_scores,
        predictions_schema,
        write_plots,
        write_report,
    )

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    labels_default = task.labels()
    for ex, lls in zip(encoded.examples, scores, strict=True):
        doc = encoded.docs[ex.row_id]
        labels = task.labels(len(doc.choices))
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, doc.choices, strict=True)]
        pred, pred_norm = argmax(lls), argmax(norm)
        records.append(
            {
                "row_id": ex.row_id,
                "id": doc.id,
                "shots": shots,
                "text": doc.prompt,
                "label": labels[doc.gold] if doc.gold is not None else None,
                "label_index": doc.gold,
                "prediction": labels[pred],
                "prediction_index": pred,
                "prediction_norm": labels[pred_norm],
                "loglikelihoods": [float(v) for v in lls],
                "loglikelihoods_norm": norm,
                "num_tokens": [len(c) for c in ex.continuations],
                "choices": list(doc.choices),
                "source": encoded.sources.get(ex.row_id),
            }
        )
    for p in encoded.problems:
        names = task.templates[0].fields
        values = [p.record.get(n) for n in names if p.record.get(n) not in (None, "")]
        records.append(
            {
                "row_id": p.row_id,
                "id": task.row_key(p.record, p.row_id),
                "shots": shots,
                "text": str(values[0]) if values else None,
                "source": p.source,
                "error_kind": p.kind,
                "error": p.message.replace("\n", " "),
            }
        )
    records.sort(key=lambda r: r["row_id"])
    table = pa.Table.from_pylist(
        [{c: r.get(c) for c in PREDICTION_COLUMNS} for r in records], schema=predictions_schema()
    )
    tmp = folder / f".{PREDICTIONS_FILE}.tmp"
    pq.write_table(table, tmp)
    tmp.replace(folder / PREDICTIONS_FILE)
    frame = table.to_pandas()

    labelled = [(ex, s) for ex, s in zip(encoded.examples, scores, strict=True) if ex.gold is not None]
    golds = [ex.gold for ex, _ in labelled]
    preds = [argmax(s) for _, s in labelled]
    acc, f1_macro, per_class, confusion = classification_scores(golds, preds, labels_default)
    norm_right = [
        argmax([v / max(1, len(c)) for v, c in zip(s, encoded.docs[ex.row_id].choices, strict=True)])
        == ex.gold
        for ex, s in labelled
    ]
    values = {
        "acc": acc,
        "acc_norm": sum(norm_right) / len(norm_right) if norm_right else float("nan"),
        "f1_macro": f1_macro,
    }
    result = ShotResult(
        shots=shots,
        n_rows=encoded.rows,
        n_errors=len(encoded.problems),
        metrics={k: values[k] for k in task.metrics if k in values},
        per_class=per_class,
        labels=tuple(labels_default),
        confusion=confusion,
    )
    metrics = RunMetrics(
        task=task.name,
        model=model_label,
        results=(result,),
        dataset=task.dataset,
        model_parameters=model_parameters,
        backend="transformers",
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(seconds, 3),
        config=json.loads(json.dumps(dict(config or {}), default=str)),
    )
    write_metrics(folder, metrics)
    plots = write_plots(folder, task, metrics, frame)
    write_report(folder, metrics, frame, plots)
    return metrics


def evaluate(
    model: str = "default",
    *,
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    task: str = "nsmc",
    adapter: str | os.PathLike[str] | None = None,
    shots: int = 0,
    fewshot_data: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    columns: Mapping[str, str] | None = None,
    limit: int | None = None,
    split: str | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    progress: bool = True,
) -> RunMetrics:
    """Scores a classification task with transformers (+ a PEFT adapter) and writes a run folder.

    The reference path for tuned models: float32, the same tokenization and scores as the ``loglikelihood``
    verb, the soft prompt applied by ``peft``. ``hubkit score`` is the scalable path (vLLM engines on Ray);
    this one needs no engine and scores a few thousand rows of a small model in a minute.

    Args:
        model: Base model folder, Hub id or "default".
        data: Labelled data files.
        out: Run folder to write.
        task: Task name or YAML.
        adapter: A PEFT prompt-tuning folder to apply.
        shots: Few-shot examples per row (from ``fewshot_data``, the task's sampler and seed).
        fewshot_data: Labelled file the examples come from (default: the task's ``fewshot.source``).
        seed: Few-shot seed (default: the task's).
        columns: Task field -> column.
        limit: Score only the first rows.
        split: Split name for reports and cards.
        batch_size: Rows per forward pass.
        threads: torch CPU threads (default: the idle CPUs).
        progress: Show a progress bar.

    Returns:
        What ``metrics.json`` holds.

    Raises:
        DataError, InvalidRequestError, ModelNotFoundError: unusable inputs, with the fix.
    """
    import torch
    from tqdm.auto import tqdm

    from hubkit.backends.transformers import check_model, context_length, load_tokenizer
    from hubkit.tasks import FewShotSampler
    from hubkit.training import default_threads

    spec = _classification_task(task)
    resolved, hf_config = check_model(model)
    tokenizer = load_tokenizer(resolved, model)
    started = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        base = _load_model(resolved)
        peft_model = _load_adapter(base, adapter) if adapter is not None else None
        reserved = int(peft_model.peft_config["default"].num_virtual_tokens) if peft_model else 0
        sampler = None
        if shots:
            source = fewshot_data or spec.fewshot.source
            if source is None:
                raise DataError(
                    f"{shots}-shot needs labelled examples; pass fewshot_data (--fewshot-data FILE)"
                )
            pool = encode_pool(spec, source, columns=columns)
            exclude = [d for d in _prepared_docs(spec, data, columns=columns, limit=limit)]
            sampler = FewShotSampler(
                pool,
                seed=seed if seed is not None else spec.fewshot.seed,
                sampler=spec.fewshot.sampler,
                exclude=exclude,
            )
        encoded = encode_data(
            spec,
            tokenizer,
            _as_list(data),
            max_length=context_length(hf_config, tokenizer),
            reserved=reserved,
            columns=columns,
            limit=limit,
            shots=shots,
            fewshot=sampler,
        )
        if not encoded.examples:
            raise DataError(f"no row of {_names(data)} could be scored; first problem: {_first(encoded)}")
        scorer = ChoiceScorer(base, peft_model, pad_id=_pad_id(tokenizer), probe=encoded.examples[:4])
        bar = tqdm(
            total=len(encoded.examples),
            unit="row",
            desc=f"score {spec.name} {shots}-shot",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        try:
            scores = score_examples(scorer, encoded.examples, batch_size=batch_size, progress=bar)
        finally:
            bar.close()
        n_params = sum(p.numel() for p in (peft_model or base).parameters())
        label = _model_label(model) + (f" + {Path(adapter).name}" if adapter is not None else "")
        return write_run(
            out,
            task=spec,
            encoded=encoded,
            scores=scores,
            model_label=label,
            model_parameters=n_params,
            shots=shots,
            seconds=time.perf_counter() - started,
            config={
                "split": split,
                "data": [str(Path(p).resolve()) for p in _as_list(data)],
                "adapter": str(Path(adapter).resolve()) if adapter is not None else None,
                "fewshot_data": str(fewshot_data) if fewshot_data else None,
                "shots": [shots],
                "seed": seed,
                "task": spec.to_dict(),
                "scorer": "transformers+peft (hubkit.tuning)",
            },
        )
    finally:
        torch.set_num_threads(previous)


def encode_pool(
    task: TaskSpec, source: str | os.PathLike[str], *, columns: Mapping[str, str] | None = None
) -> list[Any]:
    """Labelled docs of a few-shot file (rows that cannot be used are left out)."""
    return [d for d in _prepared_docs(task, source, columns=columns) if d.gold is not None]


def _prepared_docs(
    task: TaskSpec, paths: Any, *, columns: Mapping[str, str] | None = None, limit: int | None = None
) -> list[Any]:
    from hubkit.datasets import read_local_rows
    from hubkit.tasks import RowError

    docs = []
    for row in read_local_rows(_as_list(paths), columns=columns, limit=limit):
        if row.error_kind:
            continue
        try:
            docs.append(task.prepare(row.record, row.row_id))
        except RowError:
            continue
    return docs


# --------------------------------------------------------------------------------------------- tune


def tune(config: TuneConfig) -> TuneResult:
    """Trains a soft prompt (or every weight) on a classification task; see the module docstring.

    Args:
        config: The run. Running the same config again continues an interrupted run.

    Returns:
        What happened, with the final evaluation when eval data was given.

    Raises:
        DataError: unusable data (missing file, a label outside the choices, no usable rows), with the row.
        InvalidRequestError: bad settings, or ``out`` holding a different run (pass overwrite).
        ModelNotFoundError: a model that cannot be loaded.
    """
    import torch
    from tqdm.auto import tqdm

    from hubkit.backends.transformers import check_model, context_length, load_tokenizer
    from hubkit.training import default_threads

    config.validate()
    wall_start = time.perf_counter()
    spec = _classification_task(config.task)
    out = config.out
    # Read and check every input before anything is written or trained: a bad label must not cost a run.
    for path, flag in ((config.train, "--train"), (config.eval, "--eval")):
        if path is not None and not path.exists():
            raise DataError(
                f"{flag} file {path} does not exist; check the path (relative paths start at {os.getcwd()})"
            )
    resolved, hf_config = check_model(config.model)
    tokenizer = load_tokenizer(resolved, config.model)
    max_length = context_length(hf_config, tokenizer)
    reserved = config.num_virtual_tokens if config.method == "prompt" else 0
    if reserved >= max_length - 2:
        raise InvalidRequestError(
            f"--num-virtual-tokens {reserved} leaves no room in the model's {max_length} positions; use fewer"
        )
    train = encode_data(
        spec,
        tokenizer,
        [config.train],
        max_length=max_length,
        reserved=reserved,
        columns=config.columns,
        limit=config.limit,
    )
    _check_usable(train, config.train, "--train")
    evals = None
    if config.eval is not None:
        evals = encode_data(
            spec, tokenizer, [config.eval], max_length=max_length, reserved=reserved, columns=config.columns
        )
        _check_usable(evals, config.eval, "--eval")
    fingerprint = _fingerprint(config, resolved)
    status = _open_out(out, fingerprint, overwrite=config.overwrite)
    if status == "finished":
        return _finished_result(out, config)

    previous_threads = torch.get_num_threads()
    threads = config.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        base = _load_model(resolved)
        peft_model = None
        if config.method == "prompt":
            peft_model = _prompt_model(base, resolved, config, spec, train, tokenizer)
            trainable = [p for p in peft_model.parameters() if p.requires_grad]
        else:
            trainable = list(base.parameters())
        base.train(config.method == "full")
        n_trainable = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in (peft_model or base).parameters())
        scorer = ChoiceScorer(base, peft_model, pad_id=_pad_id(tokenizer), probe=train.examples[:4])
        decay = [p for p in trainable if p.ndim >= 2 and config.method == "full"]
        no_decay = [p for p in trainable if not (p.ndim >= 2 and config.method == "full")]
        groups = [{"params": no_decay, "weight_decay": 0.0}]
        if decay:
            groups.insert(0, {"params": decay, "weight_decay": config.decay})
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate)
        steps_per_epoch = len(length_batches(train.examples, config.batch_size, seed=config.seed))
        total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        warmup = min(config.warmup_steps, max(0, total - 1))

        def lr_factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        state = _State()
        log_path = out / LOG_FILE
        checkpoints = list_checkpoints(out)
        resumed = bool(checkpoints)
        if checkpoints:
            state = _load_checkpoint(
                checkpoints[-1][1], peft_model or base, config.method, optimizer, scheduler
            )
            _truncate_log(log_path, state.step)
        else:
            log_path.write_text("", encoding="utf-8")
        eval_subset = evals.examples[: config.eval_rows] if evals is not None else []

        stop_at = min(total, config.stop_after) if config.stop_after is not None else total
        bar = tqdm(
            total=total,
            initial=state.step,
            unit="step",
            dynamic_ncols=True,
            disable=not config.progress,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
            desc=f"tune {config.method} {spec.name}",
        )
        batches: list[list[int]] = []
        batches_epoch = -1
        try:
            while state.step < stop_at and not state.stopped_early:
                epoch, index = divmod(state.step, steps_per_epoch)
                if epoch != batches_epoch:
                    batches = length_batches(train.examples, config.batch_size, seed=config.seed, epoch=epoch)
                    batches_epoch = epoch
                batch = [train.examples[i] for i in batches[index]]
                t0 = time.perf_counter()
                scores = scorer(batch)
                gold = torch.tensor([ex.gold for ex in batch])
                loss = torch.nn.functional.cross_entropy(scores, gold)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                state.elapsed += time.perf_counter() - t0
                state.step += 1
                state.examples += len(batch)
                value = float(loss.item())
                state.window.append(value)
                state.recent = (state.recent + [value])[-50:]
                bar.update(1)
                bar.set_postfix(
                    loss=f"{value:.3f}",
                    best=f"{state.best_acc:.3f}" if state.best_acc is not None else "-",
                    refresh=False,
                )
                if state.step % config.log_every == 0 or state.step == total:
                    append_jsonl(
                        log_path,
                        {
                            "type": "train",
                            "step": state.step,
                            "epoch": round(state.examples / len(train.examples), 4),
                            "loss": round(sum(state.window) / len(state.window), 5),
                            "lr": lr,
                            "examples": state.examples,
                            "elapsed": round(state.elapsed, 3),
                        },
                    )
                    state.window = []
                at_eval = state.step % config.eval_every == 0 or state.step == total
                if at_eval and eval_subset:
                    was_training = base.training
                    base.eval()
                    acc, eval_loss = _accuracy(eval_subset, score_examples(scorer, eval_subset))
                    base.train(was_training)
                    improved = state.best_acc is None or acc > state.best_acc
                    if improved:
                        state.best_acc, state.best_step, state.bad_evals = acc, state.step, 0
                        _save_weights(out / CHECKPOINTS / BEST_FILE, peft_model or base, config.method)
                    else:
                        state.bad_evals += 1
                        if config.patience and state.bad_evals >= config.patience:
                            state.stopped_early = state.step < total
                    append_jsonl(
                        log_path,
                        {
                            "type": "eval",
                            "step": state.step,
                            "acc": round(acc, 5),
                            "loss": round(eval_loss, 5),
                            "rows": len(eval_subset),
                            "best": improved,
                            "elapsed": round(state.elapsed, 3),
                        },
                    )
                    bar.write(
                        f"step {state.step}: eval acc {acc:.4f} on {len(eval_subset)} rows"
                        + (
                            " (best)"
                            if improved
                            else f" (best {state.best_acc:.4f} at step {state.best_step})"
                        )
                    )
                if at_eval or state.stopped_early:
                    _save_checkpoint(
                        out, state, peft_model or base, config, optimizer, scheduler, fingerprint
                    )
        except KeyboardInterrupt:
            # Keep what was trained: the same command continues from this step.
            _save_checkpoint(out, state, peft_model or base, config, optimizer, scheduler, fingerprint)
            raise
        finally:
            bar.close()

        final_loss = sum(state.recent) / len(state.recent) if state.recent else float("nan")
        common = dict(
            out=out,
            method=config.method,
            step=state.step,
            steps=total,
            stopped_early=state.stopped_early,
            best_eval_acc=state.best_acc,
            final_loss=final_loss,
            train_seconds=state.elapsed,
            parameters=n_all,
            trainable_parameters=n_trainable,
            train_rows=len(train.examples),
            resumed=resumed,
        )
        if state.step < total and not state.stopped_early:
            _save_checkpoint(out, state, peft_model or base, config, optimizer, scheduler, fingerprint)
            return TuneResult(finished=False, best_step=state.best_step, eval=None, **common)

        # The weights to ship: the best evaluation's, else the last step's.
        best_path = out / CHECKPOINTS / BEST_FILE
        if evals is not None and best_path.is_file():
            _load_weights(best_path, peft_model or base, config.method)
            shipped_step = state.best_step
        else:
            shipped_step = state.step
        base.eval()
        _save_artifact(out, config, peft_model, base, tokenizer)
        metrics = None
        if evals is not None:
            t0 = time.perf_counter()
            scores = score_examples(scorer, evals.examples)
            metrics = write_run(
                out / EVAL_DIR,
                task=spec,
                encoded=evals,
                scores=scores,
                model_label=str(out.resolve()),
                model_parameters=n_all,
                seconds=time.perf_counter() - t0,
                config={
                    "split": "eval",
                    "data": [str(config.eval.resolve())],
                    "tune": str(out.resolve()),
                    "step": shipped_step,
                    "task": spec.to_dict(),
                    "scorer": "transformers+peft (hubkit.tuning)",
                },
            )
        result = TuneResult(finished=True, best_step=shipped_step, eval=metrics, **common)
        _write_tuning_json(
            out,
            config,
            result,
            resolved,
            spec,
            train,
            evals,
            threads,
            fingerprint,
            time.perf_counter() - wall_start,
        )
        if config.card:
            write_card(out)
        return result
    finally:
        torch.set_num_threads(previous_threads)


def write_card(out: str | os.PathLike[str], **options: Any) -> Path | None:
    """Writes the card of a tuned folder (README.md + plots/) with `hubkit.cards.build_card`."""
    from hubkit.cards import build_card

    folder = Path(out)
    tuning = json.loads((folder / TUNING_FILE).read_text(encoding="utf-8"))
    results = [folder / EVAL_DIR] if (folder / EVAL_DIR / "metrics.json").is_file() else []
    datasets = [tuning["dataset"]] if tuning.get("dataset") else None
    result = build_card(
        folder,
        results=results,
        out_dir=folder,
        datasets=datasets,
        base_model=tuning.get("base_model"),
        **options,
    )
    return result.path


# --------------------------------------------------------------------------------------------- internals


@dataclass
class _State:
    """Mutable progress of a run, saved in each checkpoint's state.json."""

    step: int = 0
    examples: int = 0
    elapsed: float = 0.0
    recent: list[float] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # losses since the last log row
    best_acc: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False


def _classification_task(task: str | Any) -> TaskSpec:
    from hubkit.tasks import load_task

    spec = load_task(task)
    if spec.kind != "multiple_choice":
        raise InvalidRequestError(
            f"task {spec.name} is {spec.kind}; tune and evaluate need a multiple_choice task"
        )
    return spec


def _check_usable(encoded: Encoded, path: Path, flag: str) -> None:
    bad = encoded.fatal()
    if bad is not None:
        count = sum(p.kind == bad.kind for p in encoded.problems)
        more = f" ({count} rows like it)" if count > 1 else ""
        raise DataError(
            f"{flag} {bad.source}: {bad.message}{more}; fix the data or pass --columns for its schema"
        )
    if not encoded.examples:
        raise DataError(f"{flag} {path} has no usable rows; first problem: {_first(encoded)}")
    if flag == "--train" and len({ex.gold for ex in encoded.examples}) < 2:
        raise DataError(
            f"{flag} {path}: every row has the same label; a classifier needs examples of each choice"
        )


def _first(encoded: Encoded) -> str:
    p = encoded.problems[0] if encoded.problems else None
    return f"{p.source}: {p.message}" if p else "the file has no data rows"


def _load_model(resolved: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    from hubkit.errors import ModelNotFoundError

    try:
        # float32 whatever the checkpoint's dtype: CPU training and the reference scores want full precision.
        return AutoModelForCausalLM.from_pretrained(resolved, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot load {resolved} as a causal LM ({first}); pass a decoder model folder"
        ) from None


def _load_adapter(base: Any, adapter: str | os.PathLike[str]) -> Any:
    from peft import PeftModel

    folder = Path(adapter)
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise InvalidRequestError(
            f"adapter {folder} has no {', '.join(missing)}; pass the folder `hubkit tune --method prompt` wrote"
        )
    try:
        return PeftModel.from_pretrained(base, str(folder)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidRequestError(
            f"adapter {folder} does not fit this model ({first}); pass the base it was tuned on"
        ) from None


def _prompt_model(
    base: Any, resolved: str, config: TuneConfig, task: TaskSpec, train: Encoded, tokenizer: Any
) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    init = {
        "examples": PromptTuningInit.TEXT,
        "text": PromptTuningInit.TEXT,
        "vocab": PromptTuningInit.SAMPLE_VOCAB,
        "random": PromptTuningInit.RANDOM,
    }[config.init]
    text = None
    if config.init == "text":
        text = config.init_text
    elif config.init == "examples":
        text = _examples_text(task, train, tokenizer, config.num_virtual_tokens, config.seed)
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config.num_virtual_tokens,
        prompt_tuning_init=init,
        prompt_tuning_init_text=text,
        tokenizer_name_or_path=resolved if text is not None else None,
    )
    for p in base.parameters():
        p.requires_grad_(False)
    return get_peft_model(base, peft_config)


def _examples_text(task: TaskSpec, train: Encoded, tokenizer: Any, n_tokens: int, seed: int) -> str:
    """A few-shot prompt from training rows, the classes taking turns, at least ``n_tokens`` tokens long.

    Short rows are preferred so that the soft prompt starts as several whole examples.
    """
    rng = random.Random(f"hubkit-tune-init:{seed}")
    by_class: dict[int, list[Any]] = {}
    for ex in train.examples:
        if ex.gold is not None and len(ex.context) <= 24:
            by_class.setdefault(ex.gold, []).append(train.docs[ex.row_id])
    if len(by_class) < 2:
        by_class = {}
        for ex in train.examples:
            by_class.setdefault(ex.gold, []).append(train.docs[ex.row_id])
    for docs in by_class.values():
        rng.shuffle(docs)
    text, turn = "", 0
    while len(tokenizer.encode(text, add_special_tokens=False)) < n_tokens and any(by_class.values()):
        docs = list(by_class.values())[turn % len(by_class)]
        if docs:
            text += task.example(docs.pop())
        turn += 1
    return text or "".join(task.example(d) for d in list(train.docs.values())[:2])


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _trainable_state(model: Any, method: str) -> dict[str, torch.Tensor]:
    if method == "prompt":
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _save_weights(path: Path, model: Any, method: str) -> None:
    from safetensors.torch import save_file, save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if method == "prompt":
        save_file(_trainable_state(model, method), str(tmp))
    else:
        save_model(model, str(tmp))  # handles tied weights
    tmp.replace(path)


def _load_weights(path: Path, model: Any, method: str) -> None:
    from safetensors.torch import load_file, load_model

    if method == "prompt":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path)))
    else:
        load_model(model, str(path))


def _save_checkpoint(
    out: Path, state: _State, model: Any, config: TuneConfig, optimizer: Any, scheduler: Any, fingerprint: str
) -> Path:
    import torch

    root = out / CHECKPOINTS
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save_weights(tmp / "weights.safetensors", model, config.method)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        tmp / "trainer_state.pt",
    )
    meta = {"schema": TUNING_SCHEMA, "fingerprint": fingerprint, "config": config.to_json(), **asdict(state)}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # complete or absent: a kill mid-save leaves the previous checkpoint
    for _, old in list_checkpoints(out)[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(folder: Path, model: Any, method: str, optimizer: Any, scheduler: Any) -> _State:
    import torch

    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    _load_weights(folder / "weights.safetensors", model, method)
    saved = torch.load(folder / "trainer_state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_as_tuple(saved["python_rng"]))
    names = {f for f in _State.__dataclass_fields__}
    return _State(**{k: v for k, v in meta.items() if k in names})


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def _truncate_log(path: Path, step: int) -> None:
    # Rows the interrupted run logged after its checkpoint are redone: drop them, keep the log one run.
    if not path.exists():
        path.write_text("", encoding="utf-8")
        return
    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _fingerprint(config: TuneConfig, resolved: str) -> str:
    values = {k: v for k, v in config.to_json().items() if k not in _NOT_FINGERPRINTED}
    values["model"] = resolved
    values["model_files"] = model_fingerprint(resolved)
    values["lr"] = config.learning_rate
    values["weight_decay"] = config.decay
    values["data"] = {str(p): hash_file(p).hexdigest() for p in (config.train, config.eval) if p is not None}
    for key in ("train", "eval"):
        values.pop(key, None)  # the files' contents decide, not where they are
    return hashlib.sha256(json.dumps(values, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _open_out(out: Path, fingerprint: str, *, overwrite: bool) -> str:
    """'fresh', 'resume' or 'finished'; refuses (or with overwrite clears) a folder holding another run."""
    tuning = out / TUNING_FILE
    checkpoints = list_checkpoints(out)
    found = None
    if tuning.is_file():
        found = json.loads(tuning.read_text(encoding="utf-8")).get("fingerprint")
    elif checkpoints:
        found = json.loads((checkpoints[-1][1] / "state.json").read_text(encoding="utf-8")).get("fingerprint")
    elif out.is_dir() and any((out / f).exists() for f in ("config.json", *ADAPTER_FILES)):
        found = "something else"
    if found is not None and found != fingerprint:
        if not overwrite:
            raise InvalidRequestError(
                f"{out} holds a different run (other data, model or settings); pass a new --out, or --overwrite "
                "to replace it"
            )
        _clear(out)
        found = None
    elif found is not None and overwrite:
        _clear(out)
        found = None
    out.mkdir(parents=True, exist_ok=True)
    if found is None:
        return "fresh"
    return "finished" if tuning.is_file() else "resume"


def _clear(out: Path) -> None:
    """Removes what a tune writes into ``out`` (nothing else)."""
    for name in (
        TUNING_FILE,
        LOG_FILE,
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        *ADAPTER_FILES,
    ):
        (out / name).unlink(missing_ok=True)
    for name in (CHECKPOINTS, EVAL_DIR, "plots"):
        shutil.rmtree(out / name, ignore_errors=True)


def _save_artifact(out: Path, config: TuneConfig, peft_model: Any, base: Any, tokenizer: Any) -> None:
    if config.method == "prompt":
        # PEFT writes the format itself (adapter_config.json + adapter_model.safetensors, float32).
        peft_model.save_pretrained(str(out))
        return
    base.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))


def _write_tuning_json(
    out: Path,
    config: TuneConfig,
    result: TuneResult,
    resolved: str,
    task: TaskSpec,
    train: Encoded,
    evals: Encoded | None,
    threads: int,
    fingerprint: str,
    wall_seconds: float,
) -> None:

    eval_metrics = result.eval.results[0].metrics if result.eval is not None and result.eval.results else None
    record = {
        "schema": TUNING_SCHEMA,
        "fingerprint": fingerprint,
        "command": command_line(),
        "method": config.method,
        "task": task.name,
        "dataset": task.dataset or task.name,
        "labels": list(task.labels()),
        "prompt": task.prompt,
        "base_model": _model_label(config.model),
        "base_model_path": resolved,
        "num_virtual_tokens": config.num_virtual_tokens if config.method == "prompt" else None,
        "init": config.init if config.method == "prompt" else None,
        "total_parameters": result.parameters,
        "trainable_parameters": result.trainable_parameters,
        "frozen_parameters": result.frozen_parameters,
        "train_rows": len(train.examples),
        "train_skipped": len(train.problems),
        "eval_rows": len(evals.examples) if evals is not None else None,
        "eval_rows_periodic": min(config.eval_rows or 10**9, len(evals.examples))
        if evals is not None
        else None,
        "steps": result.step,
        "planned_steps": result.steps,
        "epochs": round(result.step * config.batch_size / max(1, len(train.examples)), 3),
        "stopped_early": result.stopped_early,
        "best_step": result.best_step,
        "best_eval_acc": result.best_eval_acc,
        "final_loss": result.final_loss,
        "eval": eval_metrics,
        "eval_run": EVAL_DIR if result.eval is not None else None,
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds_last_invocation": round(wall_seconds, 1),
        "learning_rate": config.learning_rate,
        "threads": threads,
        "config": config.to_json(),
        "versions": library_versions() | {"peft": _peft_version()},
    }
    tmp = out / f".{TUNING_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(out / TUNING_FILE)


def _finished_result(out: Path, config: TuneConfig) -> TuneResult:
    from hubkit.results import read_metrics

    record = json.loads((out / TUNING_FILE).read_text(encoding="utf-8"))
    metrics = read_metrics(out / EVAL_DIR) if (out / EVAL_DIR / "metrics.json").is_file() else None
    return TuneResult(
        out=out,
        method=record["method"],
        finished=True,
        step=record["steps"],
        steps=record["planned_steps"],
        stopped_early=record["stopped_early"],
        best_step=record["best_step"],
        best_eval_acc=record["best_eval_acc"],
        eval=metrics,
        final_loss=record["final_loss"],
        train_seconds=record["train_seconds"],
        parameters=record["total_parameters"],
        trainable_parameters=record["trainable_parameters"],
        train_rows=record["train_rows"],
        resumed=True,
    )


def _peft_version() -> str:
    import peft

    return peft.__version__


def _model_label(model: str) -> str:
    from hubkit.models import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_DIR

    if model in DEFAULT_MODEL_ALIASES or Path(model).resolve() == DEFAULT_MODEL_DIR:
        return "hubkit/ko-nsmc-neox"
    path = Path(model)
    return path.name if path.exists() else model


def _as_list(paths: Any) -> list[str]:
    if isinstance(paths, str | os.PathLike):
        return [os.fspath(paths)]
    return [os.fspath(p) for p in paths]


def _names(paths: Any) -> str:
    return ", ".join(Path(p).name for p in _as_list(paths))


__all__ = [
    "DEFAULT_LR",
    "ChoiceScorer",
    "Encoded",
    "Example",
    "TuneConfig",
    "TuneResult",
    "encode_data",
    "evaluate",
    "layout",
    "length_batches",
    "score_examples",
    "tune",
    "write_card",
    "write_run",
]
