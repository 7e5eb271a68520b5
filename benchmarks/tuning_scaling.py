"""Prompt tuning's NSMC accuracy against the frozen base model's pretraining budget.

`benchmarks/tuning.py` found prompt tuning on the first default model (2,400 pretraining steps) far below the
TF-IDF baseline (0.707 vs 0.839). This benchmark asks whether that is the method or the base model: it
pretrains the default model's recipe with other step budgets and prompt-tunes each one the same way. Its
answer (0.762 at 4,800 steps, 0.808 at 16,000) is why the default model now ships with 16,000 steps.

* Base models: ``hubkit train-lm`` with the shipped default model's recipe (``neox-small``, an 8,000-token
  byte-level BPE, 16 x 128-token batches, peak lr 2e-3, seed 0, bfloat16 weights; see
  ``hubkit/assets/ko-nsmc-neox/TRAINING.md``), only ``--steps`` changed (warmup: 100 steps, or a tenth of a
  shorter run). The shipped model is the point at its own step count (``training.json``) and is not
  retrained. A run folder under ``--work`` that already holds a finished run is reused.
* Per base model, exactly as ``benchmarks/tuning.py`` runs them on the same split: held-out perplexity
  (``ratings_test.txt`` documents, from the run's ``training.json``), the frozen-features yardstick
  (logistic regression on every layer's hidden state at the prompt's last token) and ``hubkit tune
  --method prompt`` (50 virtual tokens, lr 0.3, 2 epochs, early stopping on the dev rows), scored on all
  5,000 test rows.
* The TF-IDF baseline of ``benchmarks/tuning.py``.

It then takes prompt tuning's gain per doubling of pretraining between the two largest budgets and reports
the budget at which that rate would reach the baseline. The review corpus is 3.7M tokens, so larger budgets
repeat it: the extrapolation is the optimistic case.

    .venv/bin/python benchmarks/tuning_scaling.py   # writes benchmarks/results/tuning-scaling.{md,json,png}
    .venv/bin/python benchmarks/tuning_scaling.py --add --steps 16000   # one more budget, the others kept
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tuning import DEFAULT_DATA, ROOT, frozen_probe, prompt_config, run_tfidf, split_train

#: `Point.model` of the model hubkit ships (the saved JSON holds this label).
SHIPPED = "shipped default"
#: `reviews_unlabeled.txt` packed by the default tokenizer (``training.json``: ``corpus.tokens``).
CORPUS_TOKENS = 3_680_384


@dataclass(frozen=True)
class Point:
    """One base model and what prompt tuning gets from it."""

    steps: int
    tokens: int
    perplexity: float
    bits_per_byte: float
    pretrain_seconds: float | None
    tokens_per_second: float | None
    probe_acc: float
    prompt_acc: float
    prompt_dev_acc: float | None
    prompt_train_seconds: float
    model: str


def shipped_training() -> dict:
    """The shipped default model's ``training.json``: its recipe (``config``) and step count (``steps``)."""
    from hubkit.models import resolve_model

    return json.loads((Path(resolve_model("default")) / "training.json").read_text(encoding="utf-8"))


def pretrain(steps: int, recipe: dict, work: Path, unlabeled: Path, test: Path, threads: int | None) -> Path:
    """``recipe`` (a ``training.json`` config) with ``steps`` steps; reuses a finished run in ``work/steps-N``."""
    from hubkit.training import TrainConfig, train_lm

    out = work / f"steps-{steps}"
    if (out / "training.json").is_file() and (out / "model.safetensors").is_file():
        return out
    recipe = {**recipe, "resume": False, "stop_after": None}
    recipe.update(
        data=unlabeled,
        out=out,
        steps=steps,
        warmup=min(recipe["warmup"], steps // 10),
        checkpoint_every=0,
        eval_data=test,
        threads=threads,
    )
    train_lm(TrainConfig(**recipe))
    return out


def prompt_tune(
    model: Path, train: Path, dev: Path, test: Path, out: Path
) -> tuple[float, float | None, float]:
    """``hubkit tune --method prompt`` with benchmarks/tuning.py's settings: (test acc, dev acc, train s)."""
    from hubkit.tuning import evaluate, tune

    config = prompt_config(str(model), train, dev, out / "prompt", card=False, progress=False, overwrite=True)
    result = tune(config)
    metrics = evaluate(
        str(model), adapter=config.out, data=test, out=out / "prompt-test", split="test", progress=False
    )
    return metrics.results[0].metrics["acc"], result.best_eval_acc, result.train_seconds


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", default="300,900,2400,4800", help="pretraining budgets besides the shipped model's"
    )
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with NSMC's files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/hubkit-tuning-scaling"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads for pretraining")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tuning-scaling.md")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the .md and .png from the .json next to --out"
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="keep the points of the .json next to --out and measure only the budgets it lacks",
    )
    args = parser.parse_args()
    saved_path = args.out.with_suffix(".json")
    saved = json.loads(saved_path.read_text(encoding="utf-8")) if saved_path.is_file() else None
    if args.report_only:
        if saved is None:
            raise SystemExit(f"--report-only: no {saved_path}; run without it first")
        print(write_report([Point(**p) for p in saved["points"]], saved["meta"], args.out))
        return
    kept = [Point(**p) for p in saved["points"]] if args.add and saved else []
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from hubkit.models import resolve_model

    start = time.perf_counter()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train_file = args.data_dir / "ratings_train.txt"
    test_file = args.data_dir / "ratings_test.txt"
    unlabeled = args.data_dir / "reviews_unlabeled.txt"
    train, dev = split_train(train_file, work)
    # With --add the data and split are the saved run's, so its baseline still holds.
    tfidf_acc = saved["meta"]["tfidf_acc"] if kept else run_tfidf(train_file, test_file)[0].acc
    print(f"tf-idf {tfidf_acc:.4f}", flush=True)

    have = {p.steps for p in kept}
    training = shipped_training()
    shipped = int(training["steps"])
    budgets = sorted({shipped, *(int(s) for s in args.steps.split(",") if s.strip())} - have)
    models: dict[int, Path] = {}
    for steps in budgets:
        if steps == shipped:
            models[steps] = Path(resolve_model("default"))
            continue
        t0 = time.perf_counter()
        models[steps] = pretrain(steps, training["config"], work, unlabeled, test_file, args.threads)
        print(f"base model, {steps} steps: {models[steps]} ({time.perf_counter() - t0:.0f} s)", flush=True)

    points: list[Point] = list(kept)
    for steps in sorted(models):
        model = models[steps]
        info = json.loads((model / "training.json").read_text(encoding="utf-8"))
        probe = frozen_probe(str(model), train_file, test_file)
        acc, dev_acc, seconds = prompt_tune(model, train, dev, test_file, work / f"tune-{steps}")
        points.append(
            Point(
                steps=steps,
                tokens=int(info["tokens_seen"]),
                perplexity=float(info["heldout"]["perplexity"]),
                bits_per_byte=float(info["heldout"]["bits_per_byte"]),
                pretrain_seconds=info.get("train_seconds"),
                tokens_per_second=info.get("tokens_per_second"),
                probe_acc=probe.acc,
                prompt_acc=acc,
                prompt_dev_acc=dev_acc,
                prompt_train_seconds=seconds,
                model=SHIPPED if steps == shipped else str(model),
            )
        )
        print(points[-1], flush=True)

    points.sort(key=lambda p: p.tokens)
    meta = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "wall_seconds": time.perf_counter() - start + (saved["meta"]["wall_seconds"] if kept else 0.0),
        "tfidf_acc": tfidf_acc,
    }
    print(write_report(points, meta, args.out))


def write_report(points: list[Point], meta: dict, out: Path) -> str:
    baseline = meta["tfidf_acc"]
    xs = [math.log2(p.tokens) for p in points]
    a, b = fit_line(xs, [p.prompt_acc for p in points])
    pa, pb = fit_line(xs, [p.probe_acc for p in points])
    # The extrapolation uses the rate between the two largest budgets: small budgets sit at chance (a soft
    # prompt cannot steer a model that has not learned the language yet) and would steepen a global fit.
    top, below = points[-1], points[-2]
    rate = (top.prompt_acc - below.prompt_acc) / math.log2(top.tokens / below.tokens)
    probe_rate = (top.probe_acc - below.probe_acc) / math.log2(top.tokens / below.tokens)
    shipped = next(p for p in points if p.model == SHIPPED)
    speed = max(p.tokens_per_second or 0.0 for p in points) or None
    pretrain = sum(p.pretrain_seconds or 0.0 for p in points)
    lines = [
        "Prompt tuning's NSMC test accuracy (all 5,000 rows of `ratings_test.txt`) against the pretraining "
        "budget of the frozen base model. One run of `benchmarks/tuning_scaling.py` "
        f"({meta['wall_seconds'] / 60:.0f} min wall on {meta['cpus']} shared CPU cores; the base models took "
        f"{pretrain / 60:.0f} min of pretraining in all, made by it or before it). Every base model is the "
        "shipped default model's recipe (`neox-small`, 7.3M parameters, trained on the 200,000 reviews of "
        "`reviews_unlabeled.txt`, 3.7M tokens) with another step budget; (shipped) marks the model hubkit ships. "
        "Prompt tuning and the frozen-features yardstick are `benchmarks/tuning.py`'s, on the same split.",
        "",
        "| pretraining steps | tokens seen | epochs of the reviews | held-out ppl | bits/byte "
        "| frozen features + logreg | prompt-tuned (test) | best dev | prompt vs tf-idf |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        dev = "" if p.prompt_dev_acc is None else f"{p.prompt_dev_acc:.4f}"
        lines.append(
            f"| {p.steps:,}{' (shipped)' if p.model == SHIPPED else ''} | {p.tokens / 1e6:.1f}M "
            f"| {p.tokens / CORPUS_TOKENS:.2f} | {p.perplexity:.1f} | {p.bits_per_byte:.3f} | {p.probe_acc:.4f} "
            f"| {p.prompt_acc:.4f} | {dev} | {p.prompt_acc - baseline:+.4f} |"
        )
    lines += [
        "",
        f"TF-IDF + logistic regression (char 1-3-grams, `benchmarks/tuning.py`): **{baseline:.4f}**.",
        "",
    ]
    lines.append(
        f"- From {below.steps:,} to {top.steps:,} steps ({top.tokens / below.tokens:.0f}x the pretraining) prompt "
        f"tuning moved {top.prompt_acc - below.prompt_acc:+.4f} ({rate:+.4f} per doubling) and the frozen "
        f"features {top.probe_acc - below.probe_acc:+.4f} ({probe_rate:+.4f} per doubling). A least-squares "
        f"line over all budgets gives {b:+.4f} per doubling for prompt tuning and {pb:+.4f} for the features."
    )
    if rate > 0 and top.prompt_acc < baseline:
        need = top.tokens * 2 ** ((baseline - top.prompt_acc) / rate)
        hours = need / speed / 3600 if speed else float("nan")
        lines.append(
            f"- At the top rate prompt tuning would reach the baseline after about {need / 1e6:,.0f}M pretraining "
            f"tokens: {need / shipped.tokens:,.1f}x the shipped model's, {need / CORPUS_TOKENS:,.1f} epochs of the "
            f"review corpus, about {hours:,.1f} hours at this machine's {speed:,.0f} tokens/s (2 threads, bfloat16 "
            "autocast). The review corpus is the only Korean text here: whether the rate holds while it is "
            "repeated that often is what a run of that length would show."
        )
    elif top.prompt_acc >= baseline:
        lines.append(f"- The {top.steps:,}-step base model's prompt tuning reaches the baseline.")
    else:
        lines.append("- More pretraining did not raise prompt tuning's accuracy at the top budgets.")
    lines.append(
        "- Pretraining time per model is in `tuning-scaling.json` (`pretrain_seconds`); the 2,400-step model "
        "(hubkit's first default, in git history) was trained on another machine with one thread."
    )
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    payload = {
        "schema": "hubkit.benchmarks.tuning_scaling/1",
        "meta": meta,
        "fit": {"prompt": {"a": a, "b": b}, "probe": {"a": pa, "b": pb}, "top_rate": rate},
        "points": [asdict(p) for p in points],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    plot(points, baseline, rate, out.with_suffix(".png"))
    return text


def plot(points: list[Point], baseline: float, rate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [p.tokens for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(tokens, [p.prompt_acc for p in points], "o-", label="prompt-tuned (frozen base)")
    ax.plot(tokens, [p.probe_acc for p in points], "s--", label="frozen features + logreg")
    ax.axhline(baseline, color="tab:red", linestyle=":", label=f"tf-idf + logreg ({baseline:.3f})")
    top = points[-1]
    if rate > 0 and top.prompt_acc < baseline:
        far = top.tokens * 2 ** ((baseline - top.prompt_acc) / rate)
        xs = [top.tokens, min(far, top.tokens * 2**10)]
        ys = [top.prompt_acc + rate * math.log2(x / top.tokens) for x in xs]
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, label="top rate, extended")
    for p in points:
        ax.annotate(
            f"ppl {p.perplexity:.0f}", (p.tokens, p.prompt_acc), textcoords="offset points", xytext=(4, -12)
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("pretraining tokens of the frozen base model")
    ax.set_ylabel("NSMC test accuracy")
    ax.set_title("Prompt tuning vs the base model's pretraining budget (7.3M params)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
