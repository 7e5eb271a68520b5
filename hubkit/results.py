"""Run folders: the files a scoring run leaves behind, with a documented, versioned schema.

Cards, the results page and reports read these files, never a live engine, so a card can be rebuilt years
later from a run folder. Layout of a run folder (schema ``hubkit.run/1``)::

    RUN_DIR/
      metrics.json                 RunMetrics (below), the source of every number shown elsewhere
      predictions.parquet          one row per (input row, shots): row_id, id, shots, text, label,
                                   prediction, loglikelihoods (list[float], one per choice),
                                   loglikelihoods_norm (per-char normalised), error (null when scored)
      report.md                    the tables, for people
      plots/confusion_<shots>shot.png, plots/scores_<shots>shot.png, plots/nshot.png (grid runs only)
      job.json                     what the folder holds (task, data checksums, model and its files'
                                   digest, shots, seed): a rerun resumes only the same job on the same
                                   weights (schema ``hubkit.job/1``)
      shards/part-*.parquet        only while a job runs or after it was interrupted: finished batches,
                                   same columns as predictions.parquet, merged into it at the end

``predictions.parquet`` columns (``hubkit.scoring.predictions_schema()`` is the Arrow schema):

    row_id               int64    position of the row in the input (files in order, from 0)
    id                   string   the row's id column, else str(row_id)
    shots                int64    few-shot examples in the prompt; (row_id, shots) is unique
    text                 string   the row's own prompt (no few-shot examples); the text for perplexity
    label                string   gold class name (a task's label_names/choices); null when unknown
    label_index          int64    gold choice index; null when unknown
    prediction           string   class name of the highest log-likelihood (acc); null for error rows
    prediction_index     int64    its choice index
    prediction_norm      string   class name of the highest loglikelihoods_norm (acc_norm)
    loglikelihoods       list<double>  per choice: sum of the continuation tokens' log-probs (nats);
                                   one value (the whole text) for perplexity; null for error rows
    loglikelihoods_norm  list<double>  loglikelihoods / characters of the choice (lm-eval's acc_norm)
    num_tokens           list<int64>   continuation tokens per choice
    choices              list<string>  the choices scored (continuation = " " + choice)
    source               string   file:line (text formats) or file:#index (Parquet) of the input row
    error_kind           string   null, or one of hubkit.tasks.ERROR_KINDS (unreadable, undecodable,
                                   missing_text, missing_label, bad_label, template, too_long, invalid)
    error                string   null when scored, else one line saying what is wrong

Metrics of a shot count are computed over its rows without ``error``; ``n_errors`` counts the others.
``per_class`` and macro F1 cover the classes that occur among golds or predictions (scikit-learn's
default). ``config`` records the job (split, data files, few-shot file, shots, seed, task spec).

A reader must check ``schema`` and refuse a major version it does not know.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hubkit.errors import DataError

RUN_SCHEMA = "hubkit.run/1"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.parquet"
REPORT_FILE = "report.md"
PLOTS_DIR = "plots"


@dataclass(frozen=True, kw_only=True)
class ClassScores:
    """One row of the classification report."""

    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, kw_only=True)
class ShotResult:
    """Metrics of one task at one number of few-shot examples.

    Attributes:
        shots: Few-shot examples in each prompt (0 = zero-shot).
        n_rows: Input rows (scored + failed).
        n_errors: Rows that became error rows (see ``predictions.parquet``'s ``error`` column).
        metrics: Headline metrics, e.g. ``acc``, ``acc_norm``, ``f1_macro``; ``perplexity`` for LM tasks.
        per_class: Classification report by label name (empty for perplexity).
        labels: Label names in confusion-matrix order.
        confusion: ``confusion[true][pred]`` counts.
    """

    shots: int
    n_rows: int
    n_errors: int
    metrics: dict[str, float]
    per_class: dict[str, ClassScores] = field(default_factory=dict)
    labels: tuple[str, ...] = ()
    confusion: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True, kw_only=True)
class RunMetrics:
    """Everything ``metrics.json`` holds."""

    task: str
    model: str
    results: tuple[ShotResult, ...]
    dataset: str = ""
    model_parameters: int | None = None
    backend: str = "vllm"
    created: str = ""
    seconds: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    schema: str = RUN_SCHEMA

    def by_shots(self) -> dict[int, ShotResult]:
        return {r.shots: r for r in self.results}


def write_metrics(run_dir: Path, metrics: RunMetrics) -> Path:
    """Writes ``metrics.json`` atomically (a reader never sees half a file)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / METRICS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(metrics), ensure_ascii=False, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def read_metrics(run_dir: Path) -> RunMetrics:
    """Reads a run folder's ``metrics.json``.

    Raises:
        DataError: the file is missing or of a schema version this hubkit does not know.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise DataError(
            f"{run_dir} is not a hubkit run folder (no {METRICS_FILE}); pass the --out of `hubkit score`"
        )
    raw = json.loads(path.read_text(encoding="utf-8"))
    schema = raw.get("schema", "")
    if schema.split("/")[0] != RUN_SCHEMA.split("/")[0] or schema.split("/")[-1] != RUN_SCHEMA.split("/")[-1]:
        raise DataError(f"{path} has schema {schema!r}, this hubkit reads {RUN_SCHEMA!r}; upgrade hubkit")
    results = tuple(
        ShotResult(
            shots=r["shots"],
            n_rows=r["n_rows"],
            n_errors=r["n_errors"],
            metrics=r["metrics"],
            per_class={k: ClassScores(**v) for k, v in r.get("per_class", {}).items()},
            labels=tuple(r.get("labels", ())),
            confusion=tuple(tuple(row) for row in r.get("confusion", ())),
        )
        for r in raw["results"]
    )
    return RunMetrics(**{**raw, "results": results})
