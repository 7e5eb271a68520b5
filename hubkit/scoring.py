"""The scoring job: rows in, log-likelihoods through the engine pool, a run folder out.

``run_score(ScoreConfig(...))`` (``hubkit score`` on the command line, ``ray_jobs/score.py`` on a
cluster) does, for a task (:mod:`hubkit.tasks`), data files (:mod:`hubkit.datasets`) and an n-shot grid:

1. reads every row with Ray Data and validates it: a row that cannot be scored (unreadable, not UTF-8,
   missing text or label, a label outside the choices, too long for the model after the truncation
   rule) becomes an error row, never a failed job;
2. builds lm-eval's requests (``context = few-shot examples + prompt``, one continuation
   ``" " + choice`` per choice) and scores them through an :class:`~hubkit.pool.EnginePool` (vLLM actors
   by default), a batch of rows at a time; a batch the engine refuses is retried row by row, so one bad
   row cannot fail its neighbours;
3. writes each finished batch as a shard (``OUT/shards/part-*.parquet``, atomically: written to a
   temporary name, then renamed), so an interrupted job (Ctrl-C, SIGTERM, a killed driver) loses at most
   the batches in flight, and running the same command again scores only the rows no shard holds;
4. at the end, merges the shards into ``predictions.parquet`` (one row per input row and shot count,
   deduplicated by ``(row_id, shots)``), and writes ``metrics.json``, ``report.md`` and the plots: the
   run folder of :mod:`hubkit.results`.

``OUT/job.json`` records what the folder holds (task, data checksums, model and a digest of its files, shots,
seed...): running a different job into the same folder, or the same job on retrained weights, is refused
(``--overwrite`` replaces it), so a resumed run never mixes results of two jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubkit.errors import DataError, HubkitError, InvalidRequestError, ModelNotFoundError
from hubkit.results import (
    METRICS_FILE,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    REPORT_FILE,
    ClassScores,
    RunMetrics,
    ShotResult,
    write_metrics,
)
from hubkit.runs import hash_file
from hubkit.tasks import Doc, FewShotSampler, RowError, TaskSpec, load_task, parse_shots

if TYPE_CHECKING:
    import pyarrow as pa

    from hubkit.datasets import Row
    from hubkit.pool import EnginePool

JOB_FILE = "job.json"
SHARDS_DIR = "shards"
JOB_SCHEMA = "hubkit.job/1"

#: Columns of ``predictions.parquet`` and of every shard, in order (see :mod:`hubkit.results`).
PREDICTION_COLUMNS = (
    "row_id",
    "id",
    "shots",
    "text",
    "label",
    "label_index",
    "prediction",
    "prediction_index",
    "prediction_norm",
    "loglikelihoods",
    "loglikelihoods_norm",
    "num_tokens",
    "choices",
    "source",
    "error_kind",
    "error",
)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    """A scoring job. The fields are the ``hubkit score`` flags and the keys of a job YAML.

    Attributes:
        model: Model folder, Hub id or "default".
        adapter: A PEFT prompt-tuning folder the engines apply to ``model`` (``--adapter``; see
            :mod:`hubkit.adapters`).
        task: Built-in task name, path to a task YAML, or a mapping of task fields.
        data: Data files or folders (NSMC .txt/.tsv, .csv, .jsonl, .parquet).
        out: Run folder to write (and to resume from).
        shots: The n-shot grid, e.g. (0, 5, 10, 50); default: the task's (0).
        fewshot_data: Labelled file the few-shot examples come from; default: the task's.
        seed: Few-shot seed; default: the task's (1234).
        columns: Task field -> column in the data files.
        format: Data format when the extension does not say (tsv, csv, jsonl, parquet).
        limit: Score only the first ``limit`` rows.
        split: Name of the data split, for reports and cards (e.g. "test").
        backend: ``auto`` (transformers for encoder-decoders such as byte-level T5, vLLM otherwise),
            ``vllm`` or ``transformers``.
        replicas: Engine actors.
        address: Ray cluster address (default: $RAY_ADDRESS, else a local Ray).
        dtype: Engine weights dtype.
        num_cpus: Ray CPUs per engine actor.
        engine_options: More backend options (e.g. ``max_model_len``).
        compile: vLLM engines compile the model with torch.compile (vLLM's ``enforce_eager=False``):
            the first start takes longer (later starts reuse vLLM's compile cache), steps run faster.
            Ignored by the transformers backend.
        batch_rows: Rows per shard: the unit of progress that survives an interruption.
        max_inflight: Batches scored concurrently (default: 2 per replica).
        overwrite: Replace a run folder that holds another job.
        progress: Show the progress bar and status lines (stderr).
    """

    model: str = "default"
    adapter: str | None = None
    task: str | Mapping[str, Any] = "nsmc"
    data: tuple[str, ...] = ()
    out: str = ""
    shots: tuple[int, ...] | None = None
    fewshot_data: str | None = None
    seed: int | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    format: str | None = None
    limit: int | None = None
    split: str | None = None
    backend: str = "auto"
    replicas: int = 1
    address: str | None = None
    dtype: str = "auto"
    num_cpus: float = 1
    engine_options: Mapping[str, Any] = field(default_factory=dict)
    compile: bool = False
    batch_rows: int = 128
    max_inflight: int | None = None
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.adapter, os.PathLike):
            object.__setattr__(self, "adapter", os.fspath(self.adapter))
        if isinstance(self.data, str | os.PathLike):
            object.__setattr__(self, "data", (os.fspath(self.data),))
        else:
            object.__setattr__(self, "data", tuple(os.fspath(d) for d in self.data))
        if self.shots is not None:
            object.__setattr__(self, "shots", parse_shots(self.shots))
        if isinstance(self.columns, str | list | tuple):
            from hubkit.datasets import parse_columns

            object.__setattr__(self, "columns", parse_columns(self.columns))
        if not self.data:
            raise DataError("no data given; pass --data FILE (or data: in the job YAML)")
        if not str(self.out):
            raise DataError("no output folder given; pass --out DIR (or out: in the job YAML)")
        if self.backend not in ("auto", "vllm", "transformers"):
            raise InvalidRequestError(
                f"unknown backend {self.backend!r}; use 'auto', 'vllm' or 'transformers'"
            )
        for name in ("replicas", "batch_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        if self.max_inflight is not None and (
            not isinstance(self.max_inflight, int) or self.max_inflight < 1
        ):
            raise InvalidRequestError(f"max_inflight must be a positive integer, got {self.max_inflight!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidRequestError(f"limit must be a positive integer, got {self.limit!r}")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> ScoreConfig:
        """Builds a config from YAML keys (``fewshot_data`` or ``fewshot-data``), naming unknown keys."""
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise DataError(f"unknown job field {key!r}; valid fields: {', '.join(sorted(names))}")
            values[name] = value
        if "shots" in values and values["shots"] is not None:
            values["shots"] = parse_shots(values["shots"])
        if isinstance(values.get("data"), str):
            values["data"] = (values["data"],)
        try:
            return cls(**values)
        except TypeError as exc:
            raise DataError(f"invalid job config: {exc}") from None


def load_config(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> ScoreConfig:
    """Reads a job YAML (the same fields as the ``hubkit score`` flags); ``overrides`` win over the file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise DataError(
            f"job config {path} does not exist; pass a job YAML (fields: ray_jobs/job.example.yaml)"
        )
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise DataError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, Mapping):
        raise DataError(f"{path} must hold a mapping of job fields (model, task, data, out, ...)")
    return ScoreConfig.from_mapping({**raw, **dict(overrides or {})})


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ScoreResult:
    """What a finished job did.

    Attributes:
        out: The run folder.
        metrics: What ``metrics.json`` holds.
        rows: Input rows (per shot count).
        errors: Error rows over all shot counts.
        errors_by_kind: Error rows by kind.
        scored: (row, shots) pairs computed by this run.
        reused: Pairs found in the folder from an earlier, interrupted run.
        requests: Log-likelihood requests this run sent to the engines.
        seconds: Wall time of this run.
    """

    out: Path
    metrics: RunMetrics
    rows: int
    errors: int
    errors_by_kind: dict[str, int]
    scored: int
    reused: int
    requests: int
    seconds: float


# ----------------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------------


def run_score(config: ScoreConfig, *, pool: EnginePool | None = None) -> ScoreResult:
    """Runs (or resumes) a scoring job and writes its run folder.

    Args:
        config: The job.
        pool: An engine pool to use instead of starting one (it is left running); its model and backend
            replace ``config.model`` / ``config.backend``.

    Returns:
        A ScoreResult; the run folder holds predictions, metrics, report and plots.

    Raises:
        DataError: bad data files, task or config, or a run folder holding another job.
        InvalidRequestError: bad options.
        EngineError: the engines failed (finished batches are kept: run again to resume).
        KeyboardInterrupt: Ctrl-C or SIGTERM (finished batches are kept: run again to resume).
    """
    started = time.monotonic()
    say = _say if config.progress else (lambda _msg: None)
    task = load_task(config.task)
    shots = config.shots or task.shots
    if task.kind == "perplexity" and any(shots):
        raise DataError(f"task {task.name} scores texts on their own; use --shots 0")
    seed = config.seed if config.seed is not None else task.fewshot.seed
    columns = {**task.columns, **config.columns}
    model = pool.model if pool is not None else config.model
    backend = pool.backend if pool is not None else config.backend
    adapter_dir = getattr(pool, "adapter", None) if pool is not None else config.adapter
    adapter = None
    if adapter_dir is not None:
        from hubkit.adapters import load_prompt_adapter

        adapter = load_prompt_adapter(adapter_dir)  # a bad folder fails before Ray starts
    engine_options = {"dtype": config.dtype, **config.engine_options}
    from hubkit.models import model_fingerprint

    try:
        model_files = model_fingerprint(model)  # also checks the model: a bad one fails before Ray starts
    except ModelNotFoundError:
        if pool is None:
            raise
        model_files = None  # a running pool's model may live only on its cluster's nodes
    if pool is None:
        from hubkit.engine import choose_backend

        backend = choose_backend(config.model, backend)  # "auto" resolved, so the run records the real one
    from hubkit.datasets import list_files, read_rows

    out = Path(config.out)
    data_files = list_files(config.data)  # a missing file fails before Ray starts
    fewshot_source = config.fewshot_data or task.fewshot.source
    if max(shots) > 0:
        if not fewshot_source:
            raise DataError(
                f"{max(shots)}-shot needs few-shot examples; pass --fewshot-data with a labelled file (e.g. the "
                "train split), never the rows being scored"
            )
        list_files(fewshot_source)
    from hubkit.pool import connect

    connect(config.address)
    rows = read_rows(data_files, format=config.format, columns=columns, limit=config.limit)  # type: ignore[arg-type]
    if not rows:
        raise DataError(f"{', '.join(config.data)} has no rows")
    docs, row_errors = _prepare(task, rows)

    sampler = None
    if max(shots) > 0 and fewshot_source:
        pool_rows = read_rows(fewshot_source, format=config.format, columns=columns)
        pool_docs, _ = _prepare(task, pool_rows)
        sampler = FewShotSampler(
            [pool_docs[r.row_id] for r in pool_rows if r.row_id in pool_docs],
            seed=seed,
            sampler=task.fewshot.sampler,
            exclude=list(docs.values()),
            use_ids=bool(task.id_field)
            and _has_field(rows, task.id_field)
            and _has_field(pool_rows, task.id_field),
        )
        if max(shots) > len(sampler.pool):
            raise DataError(
                f"{max(shots)}-shot needs {max(shots)} few-shot examples but {fewshot_source} has "
                f"{len(sampler.pool)} usable rows; pass a larger --fewshot-data file or fewer --shots"
            )

    job = _jsonable(
        {
            "schema": JOB_SCHEMA,
            "task": task.to_dict(),
            "model": model,
            # A retrained model in the same folder is another job: its old rows must not be resumed.
            "model_files": model_files,
            "backend": backend,
            "engine_options": _jsonable(engine_options),
            "data": [_file_digest(f) for f in data_files],
            "fewshot_data": _file_digest(fewshot_source) if sampler is not None and fewshot_source else None,
            "shots": list(shots),
            "seed": seed,
            "columns": columns,
            "format": config.format,
            "limit": config.limit,
            # Only with an adapter, so that run folders of plain models resume as before.
            **({"adapter": {"name": adapter.name, "sha256": adapter.sha256}} if adapter is not None else {}),
        }
    )  # as JSON stores it, so a resumed run compares like with like
    _open_run_dir(out, job, overwrite=config.overwrite)
    done = _finished_keys(out)
    todo = [(k, row) for k in shots for row in rows if (row.row_id, k) not in done]
    reused = len(rows) * len(shots) - len(todo)
    say(
        f"{task.name}: {len(rows):,} rows x shots {','.join(map(str, shots))} from "
        f"{', '.join(Path(f).name for f in data_files)}; {reused:,} already done, {len(todo):,} to score"
    )

    requests = 0
    engine_dtype = None
    if todo:
        own_pool = pool is None
        if own_pool:
            from hubkit.pool import EnginePool

            say(f"starting {config.replicas} {backend} engine(s) for {model}")
            pool = EnginePool(
                model,
                backend=backend,  # type: ignore[arg-type]
                replicas=config.replicas,
                address=config.address,
                engine_options=_pool_options(task, backend, engine_options, compile=config.compile),
                num_cpus=config.num_cpus,
                adapter=adapter.path if adapter is not None else None,
            )
        assert pool is not None
        engine_dtype = pool.info().get("dtype")  # "auto" as the engines resolved it, for the run's record
        length_check = _LengthCheck(model, pool.max_model_len) if task.truncation == "error" else None
        job_run = _JobRun(
            task=task,
            docs=docs,
            row_errors=row_errors,
            sampler=sampler,
            pool=pool,
            writer=_ShardWriter(out),
            length_check=length_check,
            progress=config.progress,
        )
        batches = [
            (k, chunk)
            for k in shots
            for chunk in _chunks([row for kk, row in todo if kk == k], config.batch_rows)
        ]
        inflight = config.max_inflight or 2 * pool.replicas
        try:
            _run_async(job_run.run(batches, inflight, total=len(todo)))
        except (KeyboardInterrupt, HubkitError) as exc:
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "stopped by an error"
            say(
                f"{what}: {job_run.rows_done:,} more rows saved in {out / SHARDS_DIR}; run the same command "
                "again to score the rest"
            )
            raise
        finally:
            requests = job_run.requests
            if own_pool:
                pool.shutdown()

    frame = _consolidate(out)
    frame = frame[frame["shots"].isin(list(shots))]
    results = tuple(_shot_result(task, frame[frame["shots"] == k], k) for k in shots)
    metrics = RunMetrics(
        task=task.name,
        model=_model_label(model),
        results=results,
        dataset=task.dataset or task.name,
        model_parameters=count_parameters(model),
        backend=backend,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.monotonic() - started, 3),
        config={
            "split": config.split,
            "data": [Path(f).name for f in data_files],
            "fewshot_data": Path(fewshot_source).name if sampler is not None and fewshot_source else None,
            "fewshot_excluded": sampler.excluded if sampler is not None else 0,
            "shots": list(shots),
            "seed": seed,
            "limit": config.limit,
            "engine_options": _jsonable(engine_options),
            "dtype": engine_dtype,
            **({"adapter": adapter.name, "adapter_sha256": adapter.sha256} if adapter is not None else {}),
            "replicas": config.replicas,
            "compile": config.compile,
            "task": task.to_dict(),
        },
    )
    write_metrics(out, metrics)
    plots = write_plots(out, task, metrics, frame)
    write_report(out, metrics, frame, plots)
    errors = frame[frame["error"].notna()]
    result = ScoreResult(
        out=out,
        metrics=metrics,
        rows=len(rows),
        errors=len(errors),
        errors_by_kind=dict(Counter(errors["error_kind"].fillna("invalid"))),
        scored=len(todo),
        reused=reused,
        requests=requests,
        seconds=time.monotonic() - started,
    )
    say(
        f"done in {result.seconds:.1f} s: scored {result.scored:,} (rows x shots) now, {result.reused:,} from an "
        f"earlier run, {result.requests:,} engine requests; {result.errors:,} error rows; wrote {out}"
    )
    return result


def _say(message: str) -> None:
    print(f"hubkit: {message}", file=sys.stderr, flush=True)


def _has_field(rows: Sequence[Row], name: str) -> bool:
    return any(name in r.record for r in rows[:1000])


def _prepare(task: TaskSpec, rows: Sequence[Row]) -> tuple[dict[int, Doc], dict[int, RowError]]:
    docs: dict[int, Doc] = {}
    errors: dict[int, RowError] = {}
    for row in rows:
        if row.error_kind is not None:
            errors[row.row_id] = RowError(row.error_kind, f"{row.source}: {row.error or row.error_kind}")
            continue
        try:
            docs[row.row_id] = task.prepare(row.record, row.row_id)
        except RowError as exc:
            errors[row.row_id] = RowError(exc.kind, f"{row.source}: {exc}")
    return docs, errors


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _run_async(coro: Any) -> None:
    """Runs the job's coroutine; SIGTERM (``ray job stop``, ``kill``) stops it like Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        asyncio.run(coro)
        return
    terminated = False
    previous = signal.getsignal(signal.SIGTERM)

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_sigterm() -> None:
            nonlocal terminated
            terminated = True
            assert task is not None
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
        await coro

    try:
        asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt("SIGTERM") from None
        raise
    finally:
        if previous is not None:  # closing the loop reset SIGTERM to the default; put back the caller's
            signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------


class _LengthCheck:
    """``truncation: error``: refuses a request that would not fit the model without cutting its context."""

    def __init__(self, model: str, max_model_len: int) -> None:
        from hubkit.backends.transformers import load_tokenizer
        from hubkit.models import resolve_model

        self._tokenizer = load_tokenizer(resolve_model(model), model)
        self._max = max_model_len

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> str | None:
        from hubkit.backends.transformers import encode_pair

        for context, continuation in pairs:
            ctx, cont = encode_pair(self._tokenizer, context, continuation)
            # The model reads all but the last token; vLLM keeps one position free for its own token.
            if len(ctx) + len(cont) > self._max - 1:
                return (
                    f"the prompt is {len(ctx) + len(cont)} tokens, over the model's context of {self._max} "
                    "(truncation: error); shorten the text or use truncation: left"
                )
        return None


@dataclass(eq=False)
class _JobRun:
    task: TaskSpec
    docs: dict[int, Doc]
    row_errors: dict[int, RowError]
    sampler: FewShotSampler | None
    pool: Any
    writer: _ShardWriter
    length_check: _LengthCheck | None
    progress: bool
    requests: int = 0
    rows_done: int = 0

    async def run(self, batches: list[tuple[int, list[Row]]], inflight: int, *, total: int) -> None:
        from tqdm import tqdm

        bar = tqdm(
            total=total,
            unit="row",
            desc=self.task.name,
            disable=not self.progress,
            mininterval=0.5,
            smoothing=0.1,
            dynamic_ncols=True,
        )
        limit = asyncio.Semaphore(inflight)

        async def one(shots: int, rows: list[Row]) -> None:
            async with limit:
                records = await self._score_batch(shots, rows)
                self.writer.write(records)
                self.rows_done += len(rows)
                bar.update(len(rows))

        tasks = [asyncio.ensure_future(one(k, rows)) for k, rows in batches]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            # Let cancelled batches unwind (they cancel their Ray calls) before the pool goes away.
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            bar.close()

    async def _score_batch(self, shots: int, rows: list[Row]) -> list[dict[str, Any]]:
        records: list[dict[str, Any] | None] = []
        pending: list[tuple[int, Doc, list[tuple[str, str]]]] = []
        for row in rows:
            error = self.row_errors.get(row.row_id)
            if error is not None:
                records.append(_error_record(self.task, row, shots, error.kind, str(error)))
                continue
            doc = self.docs[row.row_id]
            examples = self.sampler.examples(row.row_id, shots) if (shots and self.sampler) else []
            pairs = self.task.requests(doc, examples)
            if self.length_check is not None and (problem := self.length_check(pairs)):
                records.append(
                    _error_record(self.task, row, shots, "too_long", f"{row.source}: {problem}", doc=doc)
                )
                continue
            pending.append((len(records), doc, pairs))
            records.append(None)
        if pending:
            flat = [p for _, _, pairs in pending for p in pairs]
            try:
                self.requests += len(flat)
                results = await self.pool.aloglikelihood(_requests(flat), greedy=False)
            except InvalidRequestError:
                # One bad row refused the whole batch: score row by row to find it and keep the rest.
                results = None
            if results is not None:
                at = 0
                for slot, doc, pairs in pending:
                    part = results[at : at + len(pairs)]
                    records[slot] = _scored_record(self.task, doc, shots, part, rows[slot].source)
                    at += len(pairs)
            else:
                outcomes = await asyncio.gather(*(self._score_one(pairs) for _, _, pairs in pending))
                for (slot, doc, _), outcome in zip(pending, outcomes, strict=True):
                    if isinstance(outcome, InvalidRequestError):
                        kind = "too_long" if "context" in str(outcome) else "invalid"
                        message = re.sub(r"^request \d+: ", "", str(outcome))
                        row = rows[slot]
                        records[slot] = _error_record(
                            self.task, row, shots, kind, f"{row.source}: {message}", doc=doc
                        )
                    else:
                        records[slot] = _scored_record(self.task, doc, shots, outcome, rows[slot].source)
        return [r for r in records if r is not None]

    async def _score_one(self, pairs: list[tuple[str, str]]) -> list[Any] | InvalidRequestError:
        try:
            self.requests += len(pairs)
            return await self.pool.aloglikelihood(_requests(pairs), greedy=False)
        except InvalidRequestError as exc:
            return exc


def _requests(pairs: Sequence[tuple[str, str]]) -> list[Any]:
    from hubkit.engine import LoglikelihoodRequest

    return [LoglikelihoodRequest(c, k) for c, k in pairs]


def _scored_record(
    task: TaskSpec, doc: Doc, shots: int, results: Sequence[Any], source: str
) -> dict[str, Any]:
    lls = [float(r.logprob) for r in results]
    tokens = [int(r.num_tokens) for r in results]
    if task.kind == "perplexity":
        return _record(
            row_id=doc.row_id,
            id=doc.id,
            shots=shots,
            text=doc.text,
            loglikelihoods=lls,
            loglikelihoods_norm=[lls[0] / max(1, len(doc.text))],
            num_tokens=tokens,
            source=source,
        )
    labels = task.labels(len(doc.choices))
    # acc_norm as lm-eval computes it: log-likelihood divided by the choice's length in characters.
    norm = [ll / max(1, len(c)) for ll, c in zip(lls, doc.choices, strict=True)]
    pred = argmax(lls)
    pred_norm = argmax(norm)
    return _record(
        row_id=doc.row_id,
        id=doc.id,
        shots=shots,
        text=doc.prompt,
        label=labels[doc.gold] if doc.gold is not None else None,
        label_index=doc.gold,
        prediction=labels[pred],
        prediction_index=pred,
        prediction_norm=labels[pred_norm],
        loglikelihoods=lls,
        loglikelihoods_norm=norm,
        num_tokens=tokens,
        choices=list(doc.choices),
        source=source,
    )


def _error_record(
    task: TaskSpec, row: Row, shots: int, kind: str, message: str, *, doc: Doc | None = None
) -> dict[str, Any]:
    label = label_index = None
    if doc is not None:
        text: str | None = doc.text if task.kind == "perplexity" else doc.prompt
        if doc.gold is not None:
            label_index = doc.gold
            label = task.labels(len(doc.choices))[doc.gold]
    else:
        # What the row would have shown: its text, or the first prompt field it has.
        names = (task.text_field,) if task.kind == "perplexity" else task.templates[0].fields
        values = [row.record.get(n) for n in names if row.record.get(n) not in (None, "")]
        text = str(values[0]) if values else None
    return _record(
        row_id=row.row_id,
        id=doc.id if doc is not None else task.row_key(row.record, row.row_id),
        shots=shots,
        text=text,
        label=label,
        label_index=label_index,
        choices=list(doc.choices) if doc is not None and doc.choices else None,
        source=row.source,
        error_kind=kind,
        error=message.replace("\n", " "),
    )


def _record(**values: Any) -> dict[str, Any]:
    return {name: values.get(name) for name in PREDICTION_COLUMNS}


def argmax(values: Sequence[float]) -> int:
    """Index of the highest value, the first of equal maxima (numpy's and lm-eval's ``acc`` choice)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


# ----------------------------------------------------------------------------------------------------
# The run folder: shards, resume, consolidation
# ----------------------------------------------------------------------------------------------------


def predictions_schema() -> pa.Schema:
    """The Arrow schema of ``predictions.parquet`` (and of every shard)."""
    import pyarrow as pa

    types = {
        "row_id": pa.int64(),
        "id": pa.string(),
        "shots": pa.int64(),
        "text": pa.string(),
        "label": pa.string(),
        "label_index": pa.int64(),
        "prediction": pa.string(),
        "prediction_index": pa.int64(),
        "prediction_norm": pa.string(),
        "loglikelihoods": pa.list_(pa.float64()),
        "loglikelihoods_norm": pa.list_(pa.float64()),
        "num_tokens": pa.list_(pa.int64()),
        "choices": pa.list_(pa.string()),
        "source": pa.string(),
        "error_kind": pa.string(),
        "error": pa.string(),
    }
    return pa.schema([(name, types[name]) for name in PREDICTION_COLUMNS])


class _ShardWriter:
    """Writes finished batches as ``shards/part-<run>-<n>.parquet``: a temporary file, then a rename."""

    def __init__(self, out: Path) -> None:
        self.dir = out / SHARDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self._run = f"{int(time.time()):x}{secrets.token_hex(3)}"
        self._n = 0
        self._schema = predictions_schema()

    def write(self, records: list[dict[str, Any]]) -> Path | None:
        if not records:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._n += 1
        path = self.dir / f"part-{self._run}-{self._n:06d}.parquet"
        tmp = self.dir / f".{path.name}.tmp"
        pq.write_table(pa.Table.from_pylist(records, schema=self._schema), tmp)
        os.replace(tmp, path)  # atomic: a reader (or a resumed run) sees the whole shard or none of it
        return path


def _open_run_dir(out: Path, job: Mapping[str, Any], *, overwrite: bool) -> None:
    """Creates the run folder or checks it holds this job; clears it first with ``overwrite``."""
    path = out / JOB_FILE
    digest = hashlib.sha256(json.dumps(job, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            existing = {}
        if existing.get("fingerprint") != digest:
            if not overwrite:
                old = existing.get("job", {})
                differs = sorted(k for k in set(job) | set(old) if job.get(k) != old.get(k)) or ["schema"]
                why = " (the model's weights or tokenizer changed)" if "model_files" in differs else ""
                raise DataError(
                    f"{out} holds the results of a different job ({', '.join(differs)} differ{why}); pass a new "
                    "--out, or --overwrite to replace them"
                )
            clear_run_dir(out)
    elif overwrite:
        clear_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = out / SHARDS_DIR
    if shards.is_dir():
        for tmp in shards.glob(".*.tmp"):  # a write a killed run did not finish
            tmp.unlink(missing_ok=True)
    if not path.is_file() or overwrite:
        record = {"schema": JOB_SCHEMA, "fingerprint": digest, "job": job}
        tmp = path.with_suffix(".json.tmp")
        out.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
        tmp.replace(path)


def clear_run_dir(out: Path) -> None:
    """Removes what a scoring job writes into ``out`` (nothing else)."""
    import shutil

    for name in (JOB_FILE, METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE):
        (out / name).unlink(missing_ok=True)
    for name in (SHARDS_DIR, PLOTS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)


def _prediction_files(out: Path) -> list[Path]:
    files = sorted((out / SHARDS_DIR).glob("part-*.parquet")) if (out / SHARDS_DIR).is_dir() else []
    if (out / PREDICTIONS_FILE).is_file():
        files.insert(0, out / PREDICTIONS_FILE)
    return files


def _finished_keys(out: Path) -> set[tuple[int, int]]:
    import pyarrow.parquet as pq

    done: set[tuple[int, int]] = set()
    for f in _prediction_files(out):
        table = pq.read_table(f, columns=["row_id", "shots"])
        done.update(zip(table["row_id"].to_pylist(), table["shots"].to_pylist(), strict=True))
    return done


def _consolidate(out: Path) -> Any:
    """Merges shards into ``predictions.parquet`` (deduplicated by row_id + shots); returns it as pandas."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _prediction_files(out)
    schema = predictions_schema()
    tables = [pq.read_table(f).select(list(PREDICTION_COLUMNS)).cast(schema) for f in files]
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    # A batch finished twice (e.g. by a run killed after its shard was renamed, before it was counted)
    # must not count twice: keep the first row of each (row_id, shots).
    keys = table.select(["row_id", "shots"]).append_column("_i", pa.array(range(len(table)), pa.int64()))
    first = keys.group_by(["row_id", "shots"], use_threads=False).aggregate([("_i", "min")])
    table = table.take(first["_i_min"])
    table = table.sort_by([("shots", "ascending"), ("row_id", "ascending")])
    target = out / PREDICTIONS_FILE
    tmp = out / f".{PREDICTIONS_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, target)
    for f in files:
        if f != target:
            f.unlink(missing_ok=True)  # its rows are in predictions.parquet now
    with contextlib.suppress(OSError):
        (out / SHARDS_DIR).rmdir()
    return table.to_pandas()


# ----------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------


def classification_scores(
    golds: Sequence[int], preds: Sequence[int], labels: Sequence[str]
) -> tuple[float, float, dict[str, ClassScores], tuple[tuple[int, ...], ...]]:
    """Accuracy, macro F1, per-class scores and the confusion matrix, as scikit-learn computes them.

    Macro F1 and the per-class report cover the classes that occur among the golds or predictions
    (scikit-learn's default label set); an undefined precision or recall counts as 0.

    Returns:
        (accuracy, macro F1, {label: ClassScores}, confusion[true][pred]).
    """
    n = len(labels)
    confusion = [[0] * n for _ in range(n)]
    for g, p in zip(golds, preds, strict=True):
        confusion[g][p] += 1
    total = len(golds)
    acc = sum(confusion[i][i] for i in range(n)) / total if total else float("nan")
    present = sorted(set(golds) | set(preds))
    per_class: dict[str, ClassScores] = {}
    f1s = []
    for i in present:
        tp = confusion[i][i]
        fp = sum(confusion[j][i] for j in range(n)) - tp
        fn = sum(confusion[i]) - tp
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        f1s.append(f1)
        per_class[labels[i]] = ClassScores(precision=precision, recall=recall, f1=f1, support=tp + fn)
    f1_macro = sum(f1s) / len(f1s) if f1s else float("nan")
    return acc, f1_macro, per_class, tuple(tuple(row) for row in confusion)


def _shot_result(task: TaskSpec, frame: Any, shots: int) -> ShotResult:
    ok = frame[frame["error"].isna()]
    n_errors = int(frame["error"].notna().sum())
    if task.kind == "perplexity":
        lls = [float(v[0]) for v in ok["loglikelihoods"]]
        tokens = sum(int(v[0]) for v in ok["num_tokens"])
        texts = list(ok["text"])
        words = sum(len(re.split(r"\s+", t)) for t in texts)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        total = sum(lls)
        values = {
            "perplexity": math.exp(-total / tokens) if tokens else float("nan"),
            "word_perplexity": math.exp(-total / words) if words else float("nan"),
            "bits_per_byte": -total / (nbytes * math.log(2)) if nbytes else float("nan"),
        }
        return ShotResult(
            shots=shots,
            n_rows=len(frame),
            n_errors=n_errors,
            metrics={k: values[k] for k in task.metrics},
        )
    labelled = ok[ok["label_index"].notna()]
    golds = [int(v) for v in labelled["label_index"]]
    preds = [int(v) for v in labelled["prediction_index"]]
    width = max([len(c) for c in labelled["choices"]], default=task.num_choices or 2)
    labels = task.labels(width)
    acc, f1_macro, per_class, confusion = classification_scores(golds, preds, labels)
    norm_preds = [argmax(list(v)) for v in labelled["loglikelihoods_norm"]]
    acc_norm = (
        sum(int(p == g) for p, g in zip(norm_preds, golds, strict=True)) / len(golds)
        if golds
        else float("nan")
    )
    values = {"acc": acc, "acc_norm": acc_norm, "f1_macro": f1_macro}
    return ShotResult(
        shots=shots,
        n_rows=len(frame),
        n_errors=n_errors,
        metrics={k: values[k] for k in task.metrics},
        per_class=per_class,
        labels=tuple(labels),
        confusion=confusion,
    )


def headline_metric(result: ShotResult) -> str | None:
    """The number an n-shot table shows: macro F1 (the KoBEST papers' choice), else acc, else perplexity."""
    for key in ("f1_macro", "acc", "acc_norm", "perplexity"):
        if key in result.metrics:
            return key
    return next(iter(result.metrics), None)


# ----------------------------------------------------------------------------------------------------
# Report, plots, console
# ----------------------------------------------------------------------------------------------------


def _model_label(model: str) -> str:
    from hubkit.models import DEFAULT_MODEL_ALIASES, DEFAULT_MODEL_DIR

    if model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_DIR.name
    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


def count_parameters(model: str) -> int | None:
    """Parameters of a local model, summed from its safetensors headers (no weights are loaded)."""
    from hubkit.models import resolve_model

    try:
        folder = Path(resolve_model(model))
    except Exception:  # a Hub id or a missing folder: unknown
        return None
    if not folder.is_dir():
        return None
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta.get("shape", []))
    return total or None


def _short_count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.4f}"


def nshot_table(metrics: RunMetrics) -> tuple[list[str], list[str]] | None:
    """The seeds' n-shot table (Model | params | 0-shot | 5-shot ...) as (headers, the one row)."""
    if not metrics.results:
        return None
    key = headline_metric(metrics.results[0])
    if key is None:
        return None
    results = sorted(metrics.results, key=lambda r: r.shots)
    headers = ["Model", "params", *(f"{r.shots}-shot" for r in results)]
    row = [metrics.model, _short_count(metrics.model_parameters), *(_fmt(r.metrics[key]) for r in results)]
    return headers, row


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _metric_rows(metrics: RunMetrics) -> tuple[list[str], list[list[str]]]:
    keys: list[str] = []
    for r in metrics.results:
        keys += [k for k in r.metrics if k not in keys]
    rows = [
        [str(r.shots), *(_fmt(r.metrics[k]) for k in keys), str(r.n_rows), str(r.n_errors)]
        for r in metrics.results
    ]
    return ["shots", *keys, "rows", "errors"], rows


def _report_rows(result: ShotResult) -> list[list[str]]:
    """scikit-learn's classification_report as rows: classes, accuracy, macro and weighted averages."""
    scores = list(result.per_class.items())
    support = sum(s.support for _, s in scores)
    rows = [[label, _fmt(s.precision), _fmt(s.recall), _fmt(s.f1), str(s.support)] for label, s in scores]
    if not scores:
        return rows
    k = len(scores)
    if "acc" in result.metrics:
        rows.append(["accuracy", "", "", _fmt(result.metrics["acc"]), str(support)])
    rows.append(
        [
            "macro avg",
            _fmt(sum(s.precision for _, s in scores) / k),
            _fmt(sum(s.recall for _, s in scores) / k),
            _fmt(sum(s.f1 for _, s in scores) / k),
            str(support),
        ]
    )
    if support:
        rows.append(
            [
                "weighted avg",
                _fmt(sum(s.precision * s.support for _, s in scores) / support),
                _fmt(sum(s.recall * s.support for _, s in scores) / support),
                _fmt(sum(s.f1 * s.support for _, s in scores) / support),
                str(support),
            ]
        )
    return rows


def write_plots(out: Path, task: TaskSpec, metrics: RunMetrics, frame: Any) -> list[Path]:
    """Confusion matrix and score distribution per shot count, and the n-shot curve for a grid."""
    from hubkit.plots import plot_confusion, plot_nshot, plot_scores

    plots_dir = out / PLOTS_DIR
    written: list[Path] = []
    for r in metrics.results:
        if not r.labels or not r.confusion:
            continue
        path = plots_dir / f"confusion_{r.shots}shot.png"
        written.append(plot_confusion(r.labels, r.confusion, path, title=f"{metrics.task}, {r.shots}-shot"))
        part = frame[(frame["shots"] == r.shots) & frame["error"].isna() & frame["label_index"].notna()]
        path = plot_scores(
            r.labels,
            [int(v) for v in part["label_index"]],
            [list(v) for v in part["loglikelihoods"]],
            plots_dir / f"scores_{r.shots}shot.png",
            title=f"{metrics.task}, {r.shots}-shot: score distribution",
        )
        if path is not None:
            written.append(path)
    if len(metrics.results) > 1 and (key := headline_metric(metrics.results[0])):
        points = {
            r.shots: r.metrics[key]
            for r in metrics.results
            if key in r.metrics and r.metrics[key] == r.metrics[key]
        }
        path = plot_nshot(
            points, plots_dir / "nshot.png", metric=key, title=f"{metrics.task}: {key} by n-shot"
        )
        if path is not None:
            written.append(path)
    return written


def write_report(out: Path, metrics: RunMetrics, frame: Any, plots: Sequence[Path]) -> Path:
    """``report.md``: metrics by shots, the n-shot table, classification reports, errors, plots."""
    parts = [f"# {metrics.task}: {metrics.model}", ""]
    data = ", ".join(metrics.config.get("data", [])) if isinstance(metrics.config, Mapping) else ""
    parts.append(
        f"Data: {data or metrics.dataset}. Backend: {metrics.backend}. "
        f"Parameters: {f'{metrics.model_parameters:,}' if metrics.model_parameters else 'unknown'}. Written {metrics.created} (schema {metrics.schema})."
    )
    parts += ["", "## Metrics", "", _md_table(*_metric_rows(metrics)), ""]
    table = nshot_table(metrics)
    if table is not None and len(metrics.results) > 1:
        key = headline_metric(metrics.results[0])
        parts += [f"## n-shot ({key})", "", _md_table(table[0], [table[1]]), ""]
    labelled = next((r for r in metrics.results if r.labels), None)
    if labelled is not None and not all(label.isascii() for label in labelled.labels):
        parts += [
            "Classes in the plots: " + ", ".join(f"{i} = {lab}" for i, lab in enumerate(labelled.labels)),
            "",
        ]
    for r in metrics.results:
        if r.per_class:
            parts += [
                f"## Classification report ({r.shots}-shot)",
                "",
                _md_table(["", "precision", "recall", "f1-score", "support"], _report_rows(r)),
                "",
            ]
    errors = frame[frame["error"].notna()]
    if len(errors):
        by_kind = Counter(errors["error_kind"].fillna("invalid"))
        example = {k: errors[errors["error_kind"] == k]["error"].iloc[0] for k in by_kind}
        parts += [
            "## Error rows",
            "",
            f"{len(errors)} rows (over all shot counts) could not be scored; their `error` column in "
            f"`{PREDICTIONS_FILE}` says why.",
            "",
            _md_table(
                ["kind", "rows", "example"],
                [[k, str(v), str(example[k]).replace("|", "\\|")] for k, v in sorted(by_kind.items())],
            ),
            "",
        ]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots]
        parts.append("")
    path = out / REPORT_FILE
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)
    return path


def print_summary(result: ScoreResult, *, console: Any = None) -> None:
    """Prints the metrics table (and the n-shot table for a grid) with rich."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    m = result.metrics
    headers, rows = _metric_rows(m)
    table = Table(title=f"{m.task} — {m.model} ({m.backend})")
    for h in headers:
        table.add_column(h, justify="left" if h == "shots" else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    nshot = nshot_table(m)
    if nshot is not None and len(m.results) > 1:
        t = Table(title=f"n-shot ({headline_metric(m.results[0])})")
        for h in nshot[0]:
            t.add_column(h, justify="left" if h == "Model" else "right")
        t.add_row(*nshot[1])
        console.print(t)
    if result.errors:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(result.errors_by_kind.items()))
        console.print(
            f"{result.errors} error rows ({kinds}); see the error column of {result.out / PREDICTIONS_FILE}"
        )
    else:
        console.print("no error rows")
    console.print(f"run folder: {result.out}")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _file_digest(path: str) -> dict[str, Any]:
    """Name and SHA-256 of a local file (a URI is recorded as given): the job's identity, not its path."""
    if "://" in path:
        return {"uri": path}
    return {"name": Path(path).name, "sha256": hash_file(path).hexdigest()}


def _pool_options(
    task: TaskSpec, backend: str, engine_options: Mapping[str, Any], *, compile: bool = False
) -> dict[str, Any]:
    """The engine options of the pool a job starts: the job's, plus speed options that change no number.

    Multiple-choice scoring reads next-token log-probs only, so vLLM engines start without prompt
    log-probs, which lets the model skip work at prompt positions nobody reads (same scores; see
    :class:`hubkit.backends.vllm.VLLMBackend`). Kept out of the job's identity, so run folders resume
    across hubkit versions. Perplexity reads every position and keeps them.
    """
    from hubkit.engine import compile_options

    options = {**compile_options(backend, compile), **engine_options}
    if backend == "vllm" and task.kind == "multiple_choice" and options.get("fast_scoring", True):
        options.setdefault("prompt_logprobs", False)
    return options


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


__all__ = [
    "JOB_FILE",
    "PREDICTION_COLUMNS",
    "SHARDS_DIR",
    "ScoreConfig",
    "ScoreResult",
    "classification_scores",
    "clear_run_dir",
    "count_parameters",
    "headline_metric",
    "load_config",
    "nshot_table",
    "predictions_schema",
    "print_summary",
    "run_score",
    "write_plots",
    "write_report",
]
