"""NSMC accuracy of the default model untuned, prompt-tuned and fully fine-tuned, and of TF-IDF, in one run.

Everything is trained on ``ratings_train.txt`` and scored on all of ``ratings_test.txt`` (5,000 rows) in this
one process, with hubkit's ``nsmc`` task (prompt ``문장: {document} 긍부정:``, choices `` 부정`` / `` 긍정``,
lm-eval's ``acc``: the choice with the higher summed log-prob wins):

* ``0-shot`` / ``5-shot``: the default model as shipped, scored by ``hubkit score`` (vLLM in a Ray actor);
  5-shot prompts hold five ``ratings_train.txt`` reviews from the task's seeded sampler (seed 1234).
* ``frozen features + logreg``: not a hubkit method but a yardstick for prompt tuning: logistic regression
  on the frozen model's hidden states (every layer, at the prompt's last token) for 5,000 training rows,
  i.e. what a linear read-out of the frozen model can get.
* ``prompt-tuned``: ``hubkit tune --method prompt``: a soft prompt of N virtual tokens on the frozen model
  (PEFT prompt tuning), trained on ``ratings_train.txt`` minus its first 1,000 rows, which are the dev set
  for periodic evaluation and early stopping; the best dev checkpoint is scored on the test set.
* ``fully fine-tuned``: ``hubkit tune --method full``, same data and dev set, every weight trained.
* ``tf-idf + logreg``: scikit-learn, character 1-3-grams, trained on all 20,000 rows of ``ratings_train.txt``
  (the baseline of ``benchmarks/scoring.py``; it uses the dev rows too, so the comparison favours it).

Tuned models' test scores come from `hubkit.tuning.evaluate` (transformers + peft, float32: the
``loglikelihood`` verb's numbers). Then the fully fine-tuned folder is scored again through ``hubkit score``'s engine pool
(vLLM in a Ray actor) and, when the pool can serve adapters (``hubkit.adapters``), the prompt-tuned adapter
too: both paths must agree, which shows the folders load in vLLM and the adapter scores through the
ordinary ``loglikelihood`` verb.

    .venv/bin/python benchmarks/tuning.py       # writes benchmarks/results/tuning.{md,json}

Target (issue): prompt tuning beats the TF-IDF baseline (0.839), and the whole run fits in 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nsmc"
DEV_ROWS = 1000
# The prompt-tuning run's settings (the CLI flags' defaults); benchmarks/tuning_scaling.py tunes with them too.
PROMPT_SETTINGS = {"num_virtual_tokens": 50, "epochs": 2.0, "lr": 0.3, "batch_size": 16, "patience": 4}
EVAL_EVERY_ROWS = 6400


@dataclass(frozen=True)
class Row:
    """One system's test accuracy."""

    system: str
    acc: float
    f1_macro: float | None
    rows: int
    train_seconds: float | None = None
    score_seconds: float | None = None
    trainable: int | None = None
    parameters: int | None = None
    note: str = ""


def split_train(train: Path, out: Path) -> tuple[Path, Path]:
    """``ratings_train.txt`` as (train minus the first DEV_ROWS rows, those rows), header kept."""
    lines = train.read_text(encoding="utf-8").splitlines()
    head, body = lines[0], lines[1:]
    dev = out / "dev.txt"
    rest = out / "train.txt"
    dev.write_text("\n".join([head, *body[:DEV_ROWS]]) + "\n", encoding="utf-8")
    rest.write_text("\n".join([head, *body[DEV_ROWS:]]) + "\n", encoding="utf-8")
    return rest, dev


def run_tfidf(train: Path, test: Path) -> tuple[Row, float]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.pipeline import make_pipeline

    def read(path: Path) -> tuple[list[str], list[int]]:
        rows = [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()[1:]]
        rows = [r for r in rows if len(r) == 3 and r[1].strip()]
        return [r[1] for r in rows], [int(r[2]) for r in rows]

    x_train, y_train = read(train)
    x_test, y_test = read(test)
    clf = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
        LogisticRegression(max_iter=2000, C=4.0),
    )
    t0 = time.perf_counter()
    clf.fit(x_train, y_train)
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = clf.predict(x_test)
    predict = time.perf_counter() - t0
    acc = sum(int(p == y) for p, y in zip(pred, y_test, strict=True)) / len(y_test)
    row = Row(
        system="tf-idf + logreg (char 1-3-grams)",
        acc=acc,
        f1_macro=float(f1_score(y_test, pred, average="macro")),
        rows=len(y_test),
        train_seconds=fit,
        score_seconds=predict,
        note=f"all {len(x_train):,} rows of ratings_train.txt",
    )
    return row, fit


def metrics_row(system: str, metrics, *, train_seconds=None, trainable=None, note="") -> Row:
    r = metrics.results[0]
    return Row(
        system=system,
        acc=r.metrics["acc"],
        f1_macro=r.metrics.get("f1_macro"),
        rows=r.n_rows - r.n_errors,
        train_seconds=train_seconds,
        score_seconds=metrics.seconds,
        trainable=trainable,
        parameters=metrics.model_parameters,
        note=note,
    )


def prompt_config(
    model: str, train: Path, dev: Path, out: Path, *, eval_every_rows: int = EVAL_EVERY_ROWS, **options
):
    """The ``hubkit tune --method prompt`` config: `PROMPT_SETTINGS` with ``options`` over them."""
    from hubkit.tuning import TuneConfig

    settings = {**PROMPT_SETTINGS, **options}
    return TuneConfig(
        model=model,
        method="prompt",
        train=train,
        eval=dev,
        out=out,
        eval_every=max(1, eval_every_rows // settings["batch_size"]),
        **settings,
    )


def score_untuned(test: Path, train: Path, out: Path):
    """The default model 0-shot and 5-shot on the test set through ``hubkit score`` (one engine pool)."""
    from hubkit.scoring import ScoreConfig, run_score

    config = ScoreConfig(
        model="default",
        task="nsmc",
        data=(str(test),),
        out=str(out),
        shots=(0, 5),
        fewshot_data=str(train),
        split="test",
        dtype="float32",
        progress=False,
        overwrite=True,
    )
    t0 = time.perf_counter()
    metrics = run_score(config).metrics
    return replace(metrics, seconds=time.perf_counter() - t0)


def answer_shares(run: Path) -> str:
    """Which answer the untuned model gives most per shot count, and to what share of rows."""
    import pandas as pd

    from hubkit.results import PREDICTIONS_FILE

    frame = pd.read_parquet(run / PREDICTIONS_FILE)
    parts = []
    for shots, rows in frame.groupby("shots"):
        counts = rows["prediction"].value_counts(normalize=True)
        parts.append(f"{counts.index[0]} on {counts.iloc[0]:.2%} of rows {shots}-shot")
    return ", ".join(parts)


def frozen_probe(model: str, train: Path, test: Path, *, train_rows: int = 5000) -> Row:
    """Logistic regression on the frozen model's hidden states at the prompt's last token (all layers)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from transformers import AutoTokenizer

    from hubkit.tasks import load_task
    from hubkit.training import default_threads
    from hubkit.tuning import encode_data

    torch.set_num_threads(default_threads())
    tokenizer = AutoTokenizer.from_pretrained(model)
    task = load_task("nsmc")
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def features(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        examples = encode_data(task, tokenizer, [path], max_length=512, limit=limit).examples
        xs, ys = [], []
        with torch.inference_mode():
            for i in range(0, len(examples), 64):
                batch = examples[i : i + 64]
                ids = torch.full((len(batch), max(len(e.context) for e in batch)), tokenizer.pad_token_id)
                for j, e in enumerate(batch):
                    ids[j, : len(e.context)] = torch.tensor(e.context)
                states = lm.base_model(input_ids=ids, output_hidden_states=True).hidden_states[1:]
                for j, e in enumerate(batch):
                    xs.append(torch.cat([h[j, len(e.context) - 1] for h in states]).numpy())
                    ys.append(e.gold)
        return np.array(xs), np.array(ys)

    t0 = time.perf_counter()
    x_train, y_train = features(train, train_rows)
    clf = LogisticRegression(max_iter=3000, C=0.1).fit(x_train, y_train)
    fit = time.perf_counter() - t0
    x_test, y_test = features(test, None)
    pred = clf.predict(x_test)
    return Row(
        system="frozen features + logreg (yardstick)",
        acc=float((pred == y_test).mean()),
        f1_macro=float(f1_score(y_test, pred, average="macro")),
        rows=len(y_test),
        train_seconds=fit,
        note=f"hidden states of all layers at the prompt's last token; {train_rows:,} training rows",
    )


def score_through_pool(model: str, test: Path, out: Path, *, adapter: str | None = None) -> dict:
    """``hubkit score`` (vLLM engine pool) on the test set; returns its metrics and the run folder."""
    from hubkit.scoring import ScoreConfig, run_score

    options = {
        "model": model,
        "task": "nsmc",
        "data": (str(test),),
        "out": str(out),
        "dtype": "float32",
        "progress": False,
        "overwrite": True,
    }
    if adapter is not None:
        options["adapter"] = adapter
    t0 = time.perf_counter()
    result = run_score(ScoreConfig(**options))
    return {"metrics": result.metrics.results[0].metrics, "seconds": time.perf_counter() - t0, "out": out}


def agreement(a: Path, b: Path) -> tuple[float, float]:
    """(max |Δ log-likelihood|, share of equal predictions) between two run folders' predictions."""
    import pandas as pd

    x = pd.read_parquet(a / "predictions.parquet").set_index("row_id")
    y = pd.read_parquet(b / "predictions.parquet").set_index("row_id")
    both = x.index.intersection(y.index)
    delta = max(
        max(abs(p - q) for p, q in zip(x.at[i, "loglikelihoods"], y.at[i, "loglikelihoods"], strict=True))
        for i in both
    )
    same = sum(x.at[i, "prediction_index"] == y.at[i, "prediction_index"] for i in both) / len(both)
    return float(delta), float(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA, help="folder with NSMC's ratings_*.txt"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for runs (default: a temporary one)")
    parser.add_argument("--virtual-tokens", type=int, default=PROMPT_SETTINGS["num_virtual_tokens"])
    parser.add_argument("--prompt-epochs", type=float, default=PROMPT_SETTINGS["epochs"])
    parser.add_argument("--prompt-lr", type=float, default=PROMPT_SETTINGS["lr"])
    parser.add_argument("--full-epochs", type=float, default=2.0)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--prompt-batch-size", type=int, default=PROMPT_SETTINGS["batch_size"])
    parser.add_argument("--full-batch-size", type=int, default=32)
    parser.add_argument(
        "--eval-every", type=int, default=EVAL_EVERY_ROWS, help="training rows between dev evaluations"
    )
    parser.add_argument("--patience", type=int, default=PROMPT_SETTINGS["patience"])
    parser.add_argument("--no-pool", action="store_true", help="skip the vLLM cross-checks")
    parser.add_argument("--no-probe", action="store_true", help="skip the frozen-features yardstick")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tuning.md")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hubkit.models import resolve_model
    from hubkit.tuning import TuneConfig, evaluate, tune

    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    work = args.work or Path(tempfile.mkdtemp(prefix="hubkit-tuning-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, test_file = args.data_dir / "ratings_train.txt", args.data_dir / "ratings_test.txt"
    train, dev = split_train(train_file, work)
    model = resolve_model("default")
    rows: list[Row] = []
    notes: list[str] = []
    timings: dict[str, float] = {}

    tfidf, _ = run_tfidf(train_file, test_file)
    rows.append(tfidf)
    print(tfidf, flush=True)

    untuned = score_untuned(test_file, train_file, work / "default")
    timings["score 0- and 5-shot (hubkit score, with engine start)"] = untuned.seconds
    notes.append(
        f"0-shot and 5-shot: one `hubkit score` run with both shot counts ({untuned.seconds:.0f} s with engine "
        f"start). The untuned model gives nearly every row the same answer: {answer_shares(work / 'default')}."
    )
    for r in sorted(untuned.results, key=lambda r: r.shots):
        rows.append(
            Row(
                system=f"ko-nsmc-neox {r.shots}-shot",
                acc=r.metrics["acc"],
                f1_macro=r.metrics.get("f1_macro"),
                rows=r.n_rows - r.n_errors,
                parameters=untuned.model_parameters,
                note="as shipped; `hubkit score` (vLLM)",
            )
        )
        print(rows[-1], flush=True)
    if not args.no_probe:
        t0 = time.perf_counter()
        rows.append(frozen_probe(model, train_file, test_file))
        timings["frozen features + logreg"] = time.perf_counter() - t0
        print(rows[-1], flush=True)

    runs = {
        "prompt": prompt_config(
            "default",
            train,
            dev,
            work / "prompt",
            eval_every_rows=args.eval_every,
            num_virtual_tokens=args.virtual_tokens,
            epochs=args.prompt_epochs,
            lr=args.prompt_lr,
            batch_size=args.prompt_batch_size,
            patience=args.patience,
            progress=False,
            overwrite=True,
        ),
        "full": TuneConfig(
            model="default",
            method="full",
            train=train,
            eval=dev,
            out=work / "full",
            epochs=args.full_epochs,
            lr=args.full_lr,
            batch_size=args.full_batch_size,
            eval_every=max(1, args.eval_every // args.full_batch_size),
            patience=args.patience,
            progress=False,
            overwrite=True,
        ),
    }
    tuned = {}
    for method, config in runs.items():
        t0 = time.perf_counter()
        result = tune(config)
        timings[f"tune {method} (wall, with dev evaluations and card)"] = time.perf_counter() - t0
        tuned[method] = result
        adapter = config.out if method == "prompt" else None
        m = evaluate(
            "default" if method == "prompt" else str(config.out),
            adapter=adapter,
            data=test_file,
            out=work / f"{method}-test",
            split="test",
            progress=False,
        )
        what = (
            f"{args.virtual_tokens} virtual tokens, lr {config.learning_rate}"
            if method == "prompt"
            else f"lr {config.learning_rate}"
        )
        note = (
            f"{what}; {result.step} steps ({result.step * config.batch_size / result.train_rows:.2f} epochs) "
            f"on {result.train_rows:,} rows, best dev acc {result.best_eval_acc:.4f} at step {result.best_step}"
            + (", stopped early" if result.stopped_early else "")
        )
        rows.append(
            metrics_row(
                "prompt-tuned" if method == "prompt" else "fully fine-tuned",
                m,
                train_seconds=result.train_seconds,
                trainable=result.trainable_parameters,
                note=note,
            )
        )
        print(rows[-1], flush=True)

    checks: list[str] = []
    if not args.no_pool:
        pool_runs = [("fully fine-tuned", str(runs["full"].out), None, work / "full-test")]
        try:
            import hubkit.adapters  # noqa: F401  (serving adapters through the pool)

            pool_runs.append(("prompt-tuned", model, str(runs["prompt"].out), work / "prompt-test"))
        except ImportError:
            notes.append(
                "The engine pool cannot serve adapters in this checkout: the adapter was not scored by vLLM."
            )
        for name, pool_model, adapter, reference in pool_runs:
            try:
                got = score_through_pool(
                    pool_model, test_file, work / f"pool-{name.split()[0]}", adapter=adapter
                )
            except Exception as exc:  # report, don't lose the table
                checks.append(
                    f"{name} through `hubkit score` (vLLM pool): failed: {str(exc).splitlines()[0]}"
                )
                continue
            delta, same = agreement(reference, got["out"])
            checks.append(
                f"{name} through `hubkit score` (vLLM engine pool): acc {got['metrics']['acc']:.4f}, max |Δ "
                f"log-likelihood| vs the transformers+peft scores {delta:.1e}, same prediction on {same:.2%} of rows "
                f"({got['seconds']:.0f} s with engine start)"
            )
            print(checks[-1], flush=True)

    wall = time.perf_counter() - start
    meta = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_seconds": wall,
        "timings": timings,
        "commands": {
            m: "hubkit tune default "
            + shlex.join(
                [
                    f"--method={m}",
                    "--train",
                    "train.txt",
                    "--eval",
                    "dev.txt",
                    "--out",
                    m,
                    f"--epochs={c.epochs}",
                    f"--lr={c.learning_rate}",
                    f"--batch-size={c.batch_size}",
                    f"--eval-every={c.eval_every}",
                    f"--patience={c.patience}",
                ]
                + ([f"--num-virtual-tokens={c.num_virtual_tokens}"] if m == "prompt" else [])
            )
            for m, c in runs.items()
        },
    }
    notes = [*checks, *notes]
    text = write_report(rows, meta, notes, args.out)
    print(text)


def write_report(rows: list[Row], meta: dict, notes: list[str], out: Path) -> str:
    def fmt(v, spec=".4f"):
        return "" if v is None else format(v, spec)

    baseline = next(r.acc for r in rows if r.system.startswith("tf-idf"))
    lines = [
        f"NSMC `ratings_test.txt`, all 5,000 rows, accuracy (lm-eval `acc`: the choice with the higher summed "
        f"log-prob). One run of `benchmarks/tuning.py`: {meta['wall_seconds'] / 60:.1f} min wall on "
        f"{meta['cpus']} CPU cores shared with other work (1-minute load average {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after). Tuned models: trained on `ratings_train.txt` minus its first "
        f"{DEV_ROWS:,} rows (the dev set for early stopping), float32, torch on CPU.",
        "",
        "| system | acc | macro F1 | vs tf-idf | trainable params | train time | test scoring | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        train = "" if r.train_seconds is None else f"{r.train_seconds / 60:.1f} min"
        score = "" if r.score_seconds is None else f"{r.score_seconds:.0f} s"
        trainable = "" if r.trainable is None else f"{r.trainable:,}"
        if r.trainable and r.parameters:
            trainable += f" ({r.trainable / r.parameters:.2%})"
        vs = "" if r.system.startswith("tf-idf") else f"{r.acc - baseline:+.4f}"
        lines.append(
            f"| {r.system} | {r.acc:.4f} | {fmt(r.f1_macro)} | {vs} | {trainable} | {train} | {score} | {r.note} |"
        )
    prompt = next((r.acc for r in rows if r.system == "prompt-tuned"), None)
    if prompt is not None:
        verdict = "met" if prompt > baseline else "not met"
        lines += [
            "",
            f"Targets: prompt-tuned above tf-idf ({prompt:.4f} vs {baseline:.4f}): **{verdict}**; the whole run "
            f"within 30 minutes ({meta['wall_seconds'] / 60:.1f} min): "
            f"**{'met' if meta['wall_seconds'] <= 1800 else 'not met'}**.",
        ]
    lines += ["", *[f"- {n}" for n in notes]]
    lines += ["", "Commands (in the run's work folder):", "", "```bash", *meta["commands"].values(), "```"]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    payload = {
        "schema": "hubkit.benchmarks.tuning/1",
        "meta": meta,
        "notes": notes,
        "rows": [asdict(r) for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
