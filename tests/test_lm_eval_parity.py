"""hubkit's scores equal lm-evaluation-harness's on the same model, task and rows.

The reference is lm-eval 0.4's ``hf`` backend (``simple_evaluate(model="hf")``) running a local task
YAML over a local JSONL copy of 100 NSMC test rows, 0-shot and 3-shot (lm-eval's ``first_n`` sampler
over a train file). hubkit scores the same rows from NSMC's own TSV file with ``run_score`` through its
default engine, vLLM in a Ray actor, float32. Every choice's log-likelihood must agree within 1e-3 nats
and the predictions on at least 99.5% of rows; the prompts must be identical strings.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from hubkit.datasets import NSMC_SAMPLE_TEST, NSMC_SAMPLE_TRAIN

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
N_ROWS = 100
SHOTS = (0, 3)
PROMPT = "문장: {document} 긍부정:"


def _tsv_rows(path: Path, n: int) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [{"id": i, "document": d, "label": int(lab)} for i, d, lab in (line.split("\t") for line in lines)]


@pytest.fixture(scope="module")
def lm_eval_scores(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, list[dict[str, Any]]]:
    """lm-eval's per-row (context, continuation) arguments and log-likelihoods, by shot count."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    root = tmp_path_factory.mktemp("lm-eval")
    for name, source, n in (("test", NSMC_SAMPLE_TEST, N_ROWS), ("train", NSMC_SAMPLE_TRAIN, 20)):
        with (root / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for row in _tsv_rows(source, n):
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tasks_dir = root / "tasks"
    tasks_dir.mkdir()
    for shots in SHOTS:
        (tasks_dir / f"nsmc_{shots}shot.yaml").write_text(
            f"task: hubkit_parity_nsmc_{shots}shot\n"
            "dataset_path: json\n"
            "dataset_kwargs:\n"
            f"  data_files: {{test: {root / 'test.jsonl'}, train: {root / 'train.jsonl'}}}\n"
            f"  cache_dir: {root / 'cache'}\n"
            "output_type: multiple_choice\n"
            "test_split: test\n"
            "fewshot_split: train\n"
            'doc_to_text: "문장: {{document}} 긍부정:"\n'
            'doc_to_target: "{{label}}"\n'
            'doc_to_choice: ["부정", "긍정"]\n'
            f"num_fewshot: {shots}\n"
            "fewshot_config: {sampler: first_n}\n"
            "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]\n",
            encoding="utf-8",
        )
    started = time.monotonic()
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_model_dir},dtype=float32",
        tasks=[f"hubkit_parity_nsmc_{k}shot" for k in SHOTS],
        task_manager=TaskManager(include_path=str(tasks_dir)),
        device="cpu",
        batch_size=16,
        log_samples=True,
    )
    print(f"\n[parity] lm-eval hf, {N_ROWS} rows x {SHOTS}-shot: {time.monotonic() - started:.1f} s")
    out = {}
    for k in SHOTS:
        samples = sorted(results["samples"][f"hubkit_parity_nsmc_{k}shot"], key=lambda s: s["doc_id"])
        out[k] = [
            {
                "arguments": [tuple(a) for a in s["arguments"]],
                "lls": [float(r[0]) for r in s["filtered_resps"]],
                "gold": int(s["doc"]["label"]),
            }
            for s in samples
        ]
    return out


@pytest.fixture(scope="module")
def hubkit_run(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, lm_eval_scores: dict[int, Any]
) -> Any:
    """hubkit's run over the same rows, read from NSMC's TSV, through a vLLM engine actor."""
    from hubkit.scoring import ScoreConfig, run_score

    out = tmp_path_factory.mktemp("hubkit") / "parity"
    config = ScoreConfig(
        model=str(tiny_model_dir),
        task={
            "name": "nsmc_first_n",
            "prompt": PROMPT,
            "choices": ["부정", "긍정"],
            "fewshot": {"sampler": "first_n"},
        },
        data=(str(NSMC_SAMPLE_TEST),),
        limit=N_ROWS,
        fewshot_data=str(NSMC_SAMPLE_TRAIN),
        shots=SHOTS,
        out=str(out),
        backend="vllm",
        dtype="float32",
        progress=False,
    )
    started = time.monotonic()
    result = run_score(config)
    print(f"[parity] hubkit vLLM x1 (engine start included): {time.monotonic() - started:.1f} s")
    return result


def test_loglikelihoods_and_predictions_match_lm_eval(
    lm_eval_scores: dict[int, Any], hubkit_run: Any
) -> None:
    import pandas as pd

    from hubkit.tasks import FewShotSampler, load_task

    frame = pd.read_parquet(hubkit_run.out / "predictions.parquet")
    assert hubkit_run.errors == 0 and len(frame) == N_ROWS * len(SHOTS)
    task = load_task({"name": "p", "prompt": PROMPT, "choices": ["부정", "긍정"]})
    train = [task.prepare(r, i) for i, r in enumerate(_tsv_rows(NSMC_SAMPLE_TRAIN, 200))]
    test = [task.prepare(r, i) for i, r in enumerate(_tsv_rows(NSMC_SAMPLE_TEST, N_ROWS))]
    worst = 0.0
    for k in SHOTS:
        ours = frame[frame["shots"] == k].sort_values("row_id")
        theirs = lm_eval_scores[k]
        assert len(ours) == len(theirs) == N_ROWS
        agree = 0
        for (_, row), ref in zip(ours.iterrows(), theirs, strict=True):
            # The same prompts, character for character (few-shot examples included).
            doc = test[int(row["row_id"])]
            examples = FewShotSampler(train, sampler="first_n").examples(doc.row_id, k)
            assert task.requests(doc, examples) == ref["arguments"]
            assert row["text"] == doc.prompt
            assert row["label_index"] == ref["gold"]
            diffs = [abs(a - b) for a, b in zip(row["loglikelihoods"], ref["lls"], strict=True)]
            worst = max(worst, *diffs)
            assert max(diffs) < 1e-3, (k, row["row_id"], list(row["loglikelihoods"]), ref["lls"])
            agree += int(row["prediction_index"] == max(range(2), key=lambda i: (ref["lls"][i], -i)))
        assert agree / N_ROWS >= 0.995, (k, agree)
    print(
        f"[parity] largest |hubkit - lm-eval| over {N_ROWS * len(SHOTS) * 2} log-likelihoods: {worst:.2e} nats"
    )
