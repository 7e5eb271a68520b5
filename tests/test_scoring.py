"""The scoring job with real Ray: data formats, the n-shot grid, error rows, resuming, a killed actor,
an interrupted driver, and a ``ray job submit`` on a two-node cluster.

The module shares one engine pool (one transformers actor on the tiny float32 GPT-NeoX: cheap, and the
reference implementation) and one finished n-shot run that later tests compare against. The
driver-interruption test runs ``hubkit score`` in subprocesses; the cluster test runs
``scripts/two_node_cluster.sh``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubkit.cli import main
from hubkit.datasets import NSMC_SAMPLE_TEST, NSMC_SAMPLE_TRAIN
from hubkit.errors import DataError
from hubkit.scoring import JOB_FILE, SHARDS_DIR, ScoreConfig, load_config, run_score

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parent.parent
TEST_TSV = NSMC_SAMPLE_TEST
TRAIN_TSV = NSMC_SAMPLE_TRAIN
GRID = (0, 3)


def _config(tiny: Path, out: Path, **kw: Any) -> ScoreConfig:
    values: dict[str, Any] = {
        "model": str(tiny),
        "task": "nsmc",
        "data": (str(TEST_TSV),),
        "out": str(out),
        "backend": "transformers",
        "dtype": "float32",
        "progress": False,
    }
    return ScoreConfig(**(values | kw))


def _predictions(out: Path) -> Any:
    import pandas as pd

    return pd.read_parquet(out / "predictions.parquet")


def _assert_complete(frame: Any, rows: int, shots: tuple[int, ...]) -> None:
    """One prediction per (row, shots): nothing lost, nothing twice."""
    assert len(frame) == rows * len(shots)
    assert not frame.duplicated(["row_id", "shots"]).any()
    assert sorted(set(frame["shots"])) == sorted(shots)
    for k in shots:
        assert sorted(frame[frame["shots"] == k]["row_id"]) == list(range(rows))


def _lls(frame: Any) -> dict[tuple[int, int], list[float]]:
    return {
        (int(r), int(s)): list(v)
        for r, s, v in zip(frame["row_id"], frame["shots"], frame["loglikelihoods"], strict=True)
    }


def _assert_same_scores(got: Any, want: Any) -> None:
    a, b = _lls(got), _lls(want)
    assert a.keys() == b.keys()
    for key, values in a.items():
        # Same engine and dtype; only the padded batch a request landed in differs.
        assert values == pytest.approx(b[key], abs=1e-4), key


# ----------------------------------------------------------------------------------------------------
# Fast: configuration and errors before any engine starts
# ----------------------------------------------------------------------------------------------------


def test_job_yaml_has_the_cli_fields() -> None:
    config = load_config(REPO / "ray_jobs" / "job.example.yaml")
    assert (config.task, config.shots, config.replicas, config.backend) == ("nsmc", (0, 5, 10, 50), 2, "vllm")
    assert config.data == ("ratings_test.txt",) and config.fewshot_data == "ratings_train.txt"
    over = load_config(REPO / "ray_jobs" / "job.example.yaml", {"shots": "0", "batch_rows": 16})
    assert (over.shots, over.batch_rows) == ((0,), 16)


def test_bad_job_fields_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown job field 'shot'; valid fields:"):
        ScoreConfig.from_mapping({"shot": 5, "data": ["x"], "out": "y"})
    with pytest.raises(DataError, match="no data given"):
        ScoreConfig.from_mapping({"out": "y"})
    (tmp_path / "job.yaml").write_text("data: [a.txt]\nout: o\nbatch-rows: 0\n")
    with pytest.raises(Exception, match="batch_rows must be a positive integer"):
        load_config(tmp_path / "job.yaml")
    with pytest.raises(DataError, match=r"missing.yaml does not exist; pass a job YAML \(fields: ray_jobs"):
        load_config(tmp_path / "missing.yaml")


def test_cli_errors_are_one_line_and_start_no_ray(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    started = time.monotonic()
    code = main(
        ["score", str(tiny_model_dir), "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err.startswith("hubkit: error: data file") and "nope.txt does not exist" in err
    code = main(
        [
            "score",
            str(tiny_model_dir),
            "--data",
            str(TEST_TSV),
            "--out",
            str(tmp_path / "o"),
            "--shots",
            "0,5",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and "5-shot needs few-shot examples; pass --fewshot-data" in err
    assert time.monotonic() - started < 10  # no Ray was started for either


# ----------------------------------------------------------------------------------------------------
# Fixtures: one pool, one reference grid run
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path) -> Iterator[Any]:
    from hubkit.pool import EnginePool

    with EnginePool(
        str(tiny_model_dir), backend="transformers", replicas=1, engine_options={"dtype": "float32"}
    ) as p:
        yield p


@pytest.fixture(scope="module")
def grid_run(pool: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """nsmc on 200 NSMC test rows, 0- and 3-shot from the train sample: the module's reference."""
    out = tmp_path_factory.mktemp("grid") / "nsmc-grid"
    started = time.monotonic()
    result = run_score(
        _config(tiny_model_dir, out, shots=GRID, fewshot_data=str(TRAIN_TSV), split="test"), pool=pool
    )
    print(f"\n[scoring] nsmc 200 rows x {GRID}-shot, transformers x1: {time.monotonic() - started:.1f} s")
    return result


# ----------------------------------------------------------------------------------------------------
# Data formats
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_format_reads_the_same_rows(pool: Any, tmp_path: Path) -> None:
    import pandas as pd

    from hubkit.datasets import read_rows
    from hubkit.tasks import load_task

    lines = TEST_TSV.read_text(encoding="utf-8").splitlines()[:21]
    (tmp_path / "nsmc.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    frame = pd.read_csv(tmp_path / "nsmc.txt", sep="\t", quoting=3, dtype={"id": str})
    other = frame.rename(columns={"id": "review_id", "document": "review", "label": "sentiment"})
    other.to_csv(tmp_path / "reviews.csv", index=False)
    other.to_parquet(tmp_path / "reviews.parquet", index=False)
    frame.to_json(tmp_path / "nsmc.jsonl", orient="records", lines=True, force_ascii=False)
    (tmp_path / "folder").mkdir()
    for i, part in enumerate((frame[:7], frame[7:])):  # a folder of files: read in name order
        part.to_json(tmp_path / "folder" / f"part-{i}.jsonl", orient="records", lines=True, force_ascii=False)

    task = load_task("nsmc")
    mapping = {"id": "review_id", "document": "review", "label": "sentiment"}
    sources = {
        "tsv": read_rows(tmp_path / "nsmc.txt"),
        "jsonl": read_rows(tmp_path / "nsmc.jsonl"),
        "csv": read_rows(tmp_path / "reviews.csv", columns=mapping),
        "parquet": read_rows(tmp_path / "reviews.parquet", columns=mapping),
        "folder": read_rows(tmp_path / "folder"),
        "explicit format": read_rows(tmp_path / "nsmc.txt", format="tsv", limit=5),
    }
    want = [task.prepare(r.record, r.row_id) for r in sources["tsv"]]
    assert len(want) == 20 and [d.row_id for d in want] == list(range(20))
    assert want[0].id == "4869413" and want[0].gold == 0
    for name, rows in sources.items():
        assert all(r.error_kind is None for r in rows), name
        docs = [task.prepare(r.record, r.row_id) for r in rows]
        assert docs == want[: len(docs)], name
    assert (
        sources["csv"][3].source == "reviews.csv:5" and sources["parquet"][3].source == "reviews.parquet:#3"
    )
    with pytest.raises(DataError, match=r"column\(s\) \['title'\] are not in reviews.csv .*fix --columns"):
        read_rows(tmp_path / "reviews.csv", columns={"document": "title"})


@pytest.mark.slow
def test_parquet_data_scores_like_the_tsv(
    pool: Any, grid_run: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import pandas as pd

    frame = pd.read_csv(TEST_TSV, sep="\t", quoting=3, dtype={"id": str}).head(30)
    frame.rename(columns={"document": "review"}).to_parquet(tmp_path / "r.parquet", index=False)
    result = run_score(
        _config(
            tiny_model_dir,
            tmp_path / "out",
            data=(str(tmp_path / "r.parquet"),),
            columns={"document": "review"},
        ),
        pool=pool,
    )
    got = _predictions(tmp_path / "out")
    want = _predictions(grid_run.out)
    want = want[(want["shots"] == 0) & (want["row_id"] < 30)]
    _assert_same_scores(got, want)
    assert list(got["id"]) == list(want["id"]) and result.errors == 0


# ----------------------------------------------------------------------------------------------------
# The n-shot grid, the run folder, resuming a finished job
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_run_folder(grid_run: Any, pool: Any, tiny_model_dir: Path) -> None:
    from sklearn.metrics import accuracy_score, f1_score

    from hubkit.engine import LoglikelihoodRequest
    from hubkit.results import read_metrics
    from hubkit.tasks import FewShotSampler, load_task

    out = grid_run.out
    frame = _predictions(out)
    _assert_complete(frame, 200, GRID)
    assert frame["error"].isna().all() and grid_run.errors == 0
    assert grid_run.scored == 400 and grid_run.requests == 800

    # metrics.json is what the card generator reads: it must equal scikit-learn on predictions.parquet.
    metrics = read_metrics(out)
    assert (metrics.task, metrics.backend, metrics.config["split"], metrics.config["shots"]) == (
        "nsmc",
        "transformers",
        "test",
        list(GRID),
    )
    assert metrics.model_parameters and metrics.model_parameters > 100_000
    # The run records the dtype the engines ran in, not the "auto" it may have asked for.
    assert metrics.config["dtype"] == pool.info()["dtype"] == "float32"
    for result in metrics.results:
        part = frame[frame["shots"] == result.shots]
        golds, preds = list(part["label_index"]), list(part["prediction_index"])
        assert result.metrics["acc"] == pytest.approx(accuracy_score(golds, preds))
        assert result.metrics["f1_macro"] == pytest.approx(f1_score(golds, preds, average="macro"))
        norm = [max(range(2), key=lambda i, v=v: (v[i], -i)) for v in part["loglikelihoods_norm"]]
        assert result.metrics["acc_norm"] == pytest.approx(accuracy_score(golds, norm))
        assert (result.n_rows, result.n_errors, result.labels) == (200, 0, ("부정", "긍정"))
        assert sum(map(sum, result.confusion)) == 200

    # The scores are the engine's for exactly lm-eval's requests (context, " " + choice).
    task = load_task("nsmc")
    row0 = frame[(frame["shots"] == 0) & (frame["row_id"] == 0)].iloc[0]
    assert row0["text"] == "문장: 보는내내 짜증났음.. 히스테리가 계속 이어지니까 신물이 남 긍부정:"
    direct = pool.loglikelihood(
        [LoglikelihoodRequest(row0["text"], " 부정"), LoglikelihoodRequest(row0["text"], " 긍정")]
    )
    assert list(row0["loglikelihoods"]) == pytest.approx([r.logprob for r in direct], abs=1e-4)
    assert list(row0["num_tokens"]) == [r.num_tokens for r in direct]

    # 3-shot prompts: the seeded examples from the train file, never a test row.
    from hubkit.datasets import read_rows

    train = [task.prepare(r.record, r.row_id) for r in read_rows(TRAIN_TSV)]
    test = [task.prepare(r.record, r.row_id) for r in read_rows(TEST_TSV)]
    sampler = FewShotSampler(train, seed=1234, exclude=test)
    row5 = frame[(frame["shots"] == 3) & (frame["row_id"] == 5)].iloc[0]
    requests = task.requests(test[5], sampler.examples(5, 3))
    direct = pool.loglikelihood([LoglikelihoodRequest(c, k) for c, k in requests])
    assert list(row5["loglikelihoods"]) == pytest.approx([r.logprob for r in direct], abs=1e-4)
    assert requests[0][0].count("\n\n") == 3 and all(
        e.id not in {d.id for d in test} for e in sampler.examples(5, 3)
    )

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "| Model | params | 0-shot | 3-shot |" in report
    assert f"| {metrics.model} | " in report and "## Classification report (3-shot)" in report
    assert "| macro avg |" in report and "Classes in the plots: 0 = 부정, 1 = 긍정" in report
    for name in ("confusion_0shot", "confusion_3shot", "scores_0shot", "scores_3shot", "nshot"):
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"(plots/{name}.png)" in report
    assert not (out / SHARDS_DIR).exists()  # merged into predictions.parquet
    job = json.loads((out / JOB_FILE).read_text())["job"]
    assert job["shots"] == list(GRID)
    from hubkit.models import model_fingerprint

    # Weights retrained in the same folder make another job (refused, not resumed with stale rows).
    assert job["model_files"] is not None and job["model_files"] == model_fingerprint(tiny_model_dir)


@pytest.mark.slow
def test_rerunning_a_finished_job_scores_nothing(grid_run: Any, pool: Any, tiny_model_dir: Path) -> None:
    before = _predictions(grid_run.out)
    again = run_score(
        _config(tiny_model_dir, grid_run.out, shots=GRID, fewshot_data=str(TRAIN_TSV), split="test"),
        pool=pool,
    )
    assert (again.scored, again.reused, again.requests) == (0, 400, 0)
    assert again.metrics.results == grid_run.metrics.results
    assert _predictions(grid_run.out).equals(before)
    # Another job into the same folder is refused, naming what differs.
    with pytest.raises(
        DataError, match=r"holds the results of a different job \(seed, shots differ\); pass a new --out"
    ):
        run_score(
            _config(tiny_model_dir, grid_run.out, shots=(0, 5), fewshot_data=str(TRAIN_TSV), seed=7),
            pool=pool,
        )


# ----------------------------------------------------------------------------------------------------
# Error rows
# ----------------------------------------------------------------------------------------------------


def _malformed_tsv(path: Path) -> Path:
    rng = random.Random(0)
    # Rare syllables: each costs several byte-level tokens, far over the tiny model's 512.
    long_text = "".join(chr(rng.randrange(0xAC00, 0xD7A4)) for _ in range(1500))
    lines = [
        b"id\tdocument\tlabel",
        "1\t정말 재미있다\t1".encode(),
        b"2\t\t0",  # missing text
        "3\t그저 그렇다\t2".encode(),  # label outside the choices
        b"4\tbad \xff\xfe bytes\t1",  # not UTF-8
        "5\t탭이 하나뿐인 줄".encode(),  # a field short
        f"6\t{long_text}\t0".encode(),  # over the context
        "7\t지루했다\t0".encode(),
        "8\t최고\t".encode(),  # no label
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "kinds", "scored"),
    [
        # lm-eval's rule: a context that does not fit loses its oldest tokens, so row 6 is scored.
        (
            "nsmc",
            {
                "2": "missing_text",
                "3": "bad_label",
                "4": "undecodable",
                "5": "unreadable",
                "8": "missing_label",
            },
            ["1", "6", "7"],
        ),
        # truncation: error refuses it (checked with the model's tokenizer before any request).
        (
            {
                "name": "nsmc_strict",
                "prompt": "문장: {document} 긍부정:",
                "choices": ["부정", "긍정"],
                "truncation": "error",
            },
            {
                "2": "missing_text",
                "3": "bad_label",
                "4": "undecodable",
                "5": "unreadable",
                "6": "too_long",
                "8": "missing_label",
            },
            ["1", "7"],
        ),
        # Perplexity needs no label; the engine refuses the long text and its batch is retried row by row.
        (
            "perplexity",
            {"2": "missing_text", "4": "undecodable", "5": "unreadable", "6": "too_long"},
            ["1", "3", "7", "8"],
        ),
    ],
    ids=["nsmc", "truncation-error", "perplexity"],
)
def test_malformed_rows_become_error_rows(
    pool: Any, tiny_model_dir: Path, tmp_path: Path, task: Any, kinds: dict[str, str], scored: list[str]
) -> None:
    from rich.console import Console

    from hubkit.scoring import print_summary

    data = _malformed_tsv(tmp_path / "bad.txt")
    columns = {"text": "document"} if task == "perplexity" else {}
    result = run_score(
        _config(
            tiny_model_dir, tmp_path / "out", task=task, data=(str(data),), columns=columns, batch_rows=100
        ),
        pool=pool,
    )
    frame = _predictions(tmp_path / "out")
    _assert_complete(frame, 8, (0,))  # every input row has an output row
    errors = frame[frame["error"].notna()]
    assert dict(zip(errors["id"], errors["error_kind"], strict=True)) == kinds
    assert sorted(frame[frame["error"].isna()]["id"]) == scored
    assert result.errors == len(kinds) and result.errors_by_kind == dict(Counter(kinds.values()))
    by_id = dict(zip(frame["id"], frame["error"], strict=True))
    assert by_id["4"].startswith("bad.txt:5: bytes that are not UTF-8 (0xff")
    assert "re-save the file as UTF-8" in by_id["4"]
    assert by_id["5"] == "bad.txt:6: 2 tab-separated fields where the header has 3"
    if "6" in kinds:
        assert "context" in by_id["6"] and by_id["6"].startswith("bad.txt:7:")
    for ok in frame[frame["error"].isna()]["loglikelihoods"]:
        assert len(ok) >= 1 and all(v < 0 for v in ok)
    # Metrics cover the scored rows; the count of failed rows is reported.
    shot = result.metrics.results[0]
    assert (shot.n_rows, shot.n_errors) == (8, len(kinds))
    console = Console(record=True, width=120)
    print_summary(result, console=console)
    assert f"{len(kinds)} error rows (" in console.export_text()
    assert "## Error rows" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------------
# KoBEST
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"]
)
def test_kobest_tasks_score_kobest_files(pool: Any, tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    from hubkit.engine import LoglikelihoodRequest
    from hubkit.tasks import load_task

    data = DATA / f"{name}.jsonl"
    result = run_score(_config(tiny_model_dir, tmp_path / name, task=name, data=(str(data),)), pool=pool)
    frame = _predictions(tmp_path / name)
    rows = len(data.read_text(encoding="utf-8").splitlines())
    _assert_complete(frame, rows, (0,))
    assert result.errors == 0
    assert set(result.metrics.results[0].metrics) == {"acc", "acc_norm", "f1_macro"}
    task = load_task(name)
    first = json.loads(data.read_text(encoding="utf-8").splitlines()[0])
    doc = task.prepare(first, 0)
    direct = pool.loglikelihood([LoglikelihoodRequest(c, k) for c, k in task.requests(doc)])
    assert list(frame.iloc[0]["loglikelihoods"]) == pytest.approx([r.logprob for r in direct], abs=1e-4)
    assert list(frame.iloc[0]["choices"]) == list(doc.choices)


# ----------------------------------------------------------------------------------------------------
# Faults: a killed engine actor, an interrupted driver
# ----------------------------------------------------------------------------------------------------


def _wait_for_shards(out: Path, n: int, *, alive: Any = None, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = len(list((out / SHARDS_DIR).glob("part-*.parquet"))) if (out / SHARDS_DIR).is_dir() else 0
        if count >= n:
            return count
        assert alive is None or alive(), "the job ended before it could be interrupted"
        assert time.monotonic() < deadline, f"no {n} shards in {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_killing_an_engine_actor_mid_job_loses_and_duplicates_nothing(
    pool: Any, grid_run: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray

    out = tmp_path / "killed"
    config = _config(
        tiny_model_dir, out, shots=GRID, fewshot_data=str(TRAIN_TSV), batch_rows=5, max_inflight=1
    )
    restarts = pool.info()["restarts"]
    results: list[Any] = []
    errors: list[BaseException] = []

    def job() -> None:
        try:
            results.append(run_score(config, pool=pool))
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=job)
    thread.start()
    shards = _wait_for_shards(out, 2, alive=thread.is_alive)
    ray.kill(pool.actors[0], no_restart=True)
    thread.join(timeout=600)
    assert not errors, errors
    result = results[0]
    print(f"\n[scoring] actor killed after {shards} of 80 shards; job finished in {result.seconds:.1f} s")
    assert shards < 80
    assert pool.info()["restarts"] == restarts + 1
    frame = _predictions(out)
    _assert_complete(frame, 200, GRID)
    assert frame["error"].isna().all()
    _assert_same_scores(frame, _predictions(grid_run.out))
    assert result.metrics.results == grid_run.metrics.results


def _score_cmd(tiny: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "hubkit.cli", "score", str(tiny), "--task", "nsmc", "--data", str(TEST_TSV),
        "--fewshot-data", str(TRAIN_TSV), "--shots", "0,3", "--out", str(out), "--backend", "transformers",
        "--dtype", "float32", "--batch-rows", "5", "--max-inflight", "1", "--split", "test",
    ]  # fmt: skip


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with log.open("w") as fh:
        # Its own session: the driver and the local Ray it starts can be killed as one group.
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its session is left (its local Ray)


def _status(log: Path) -> tuple[int, int]:
    """(already done, to score) from the job's first status line."""
    match = re.search(
        r"nsmc: 200 rows x shots 0,3 from nsmc_test_200.txt; (\d+) already done, (\d+) to score",
        log.read_text(),
    )
    assert match, log.read_text()[-3000:]
    return int(match.group(1)), int(match.group(2))


@pytest.mark.slow
def test_an_interrupted_driver_resumes_with_only_the_missing_rows(
    grid_run: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from hubkit.scoring import _finished_keys

    out = tmp_path / "resumed"
    cmd = _score_cmd(tiny_model_dir, out)

    # 1. SIGTERM (what `kill` and `ray job stop` send): the job stops cleanly and says how to resume.
    first = _start(cmd, tmp_path / "run1.log")
    try:
        _wait_for_shards(out, 1, alive=lambda: first.poll() is None)
        first.send_signal(signal.SIGTERM)
        code = first.wait(timeout=120)
    finally:
        _reap(first)
    log1 = (tmp_path / "run1.log").read_text()
    assert code == 130, log1[-3000:]
    assert "interrupted:" in log1 and "run the same command again to score the rest" in log1
    done1 = len(_finished_keys(out))
    assert 0 < done1 < 400

    # 2. SIGKILL of the whole process group (a killed driver): no chance to clean up.
    second = _start(cmd, tmp_path / "run2.log")
    try:
        before = len(list((out / SHARDS_DIR).glob("part-*.parquet")))
        _wait_for_shards(out, before + 2, alive=lambda: second.poll() is None)
        os.killpg(second.pid, signal.SIGKILL)
    finally:
        _reap(second)
    assert _status(tmp_path / "run2.log") == (done1, 400 - done1)  # it started from where run 1 stopped
    done2 = len(_finished_keys(out))
    assert done1 < done2 < 400

    # 3. The same command again: scores exactly the missing rows (2 requests per row) and finishes.
    third = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )
    assert third.returncode == 0, third.stderr[-3000:]
    (tmp_path / "run3.log").write_text(third.stderr)
    assert _status(tmp_path / "run3.log") == (done2, 400 - done2)
    done = re.search(
        r"scored (\d+) \(rows x shots\) now, (\d+) from an earlier run, (\d+) engine requests", third.stderr
    )
    assert done and (int(done.group(1)), int(done.group(2)), int(done.group(3))) == (
        400 - done2,
        done2,
        2 * (400 - done2),
    )
    frame = _predictions(out)
    _assert_complete(frame, 200, GRID)
    assert frame["error"].isna().all()
    _assert_same_scores(frame, _predictions(grid_run.out))
    # The command prints the metrics table and the n-shot table at the end.
    assert (
        "acc_norm" in third.stdout
        and "f1_macro" in third.stdout
        and "0-shot" in third.stdout
        and "3-shot" in third.stdout
    )
    print(f"\n[scoring] interrupted after {done1}, then {done2} of 400; the rerun scored {400 - done2}")


# ----------------------------------------------------------------------------------------------------
# A Ray job on a two-node cluster
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_job_submit_on_a_two_node_cluster(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cluster-run"
    config = tmp_path / "job.yaml"
    # Relative data paths: the job runs in its uploaded copy of the repository (--working-dir .).
    config.write_text(
        f"model: {tiny_model_dir}\ntask: nsmc\ndata: [{NSMC_SAMPLE_TEST}]\n"
        f"fewshot_data: {NSMC_SAMPLE_TRAIN}\nshots: [0, 2]\nlimit: 60\nout: {out}\n"
        "backend: transformers\ndtype: float32\nreplicas: 2\nnum_cpus: 1\nbatch_rows: 20\nsplit: test\n",
        encoding="utf-8",
    )
    started = time.monotonic()
    proc = subprocess.run(
        [str(REPO / "scripts" / "two_node_cluster.sh"), str(config)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    print(f"\n[scoring] two-node cluster + ray job submit: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, text[-4000:]
    assert "cluster up: 2 nodes, 2 CPUs" in text
    assert re.search(r"Job .hubkit-score-\d+. succeeded", text)
    assert "engine actors: 2 on 2 nodes" in text  # SPREAD put one engine on each node
    from hubkit.results import read_metrics

    metrics = read_metrics(out)
    assert [r.shots for r in metrics.results] == [0, 2] and all(r.n_rows == 60 for r in metrics.results)
    _assert_complete(_predictions(out), 60, (0, 2))
    temp_dir = re.search(r"temp (/tmp/hk2n-\w+)/head\)", text)
    assert temp_dir and not Path(temp_dir.group(1)).exists()  # both nodes stopped, their files removed


def test_multiple_choice_jobs_start_vllm_engines_without_prompt_logprobs() -> None:
    # Same scores, less prefill work (tests/test_fast_scoring.py); perplexity reads every position.
    from hubkit.scoring import _pool_options
    from hubkit.tasks import load_task

    nsmc, ppl = load_task("nsmc"), load_task("perplexity")
    assert _pool_options(nsmc, "vllm", {"dtype": "float32"}) == {"dtype": "float32", "prompt_logprobs": False}
    assert "prompt_logprobs" not in _pool_options(ppl, "vllm", {})
    assert "prompt_logprobs" not in _pool_options(nsmc, "transformers", {})
    assert "prompt_logprobs" not in _pool_options(nsmc, "vllm", {"fast_scoring": False})
    assert _pool_options(nsmc, "vllm", {"prompt_logprobs": True})["prompt_logprobs"] is True


def test_compile_starts_vllm_engines_compiled_and_leaves_transformers_alone() -> None:
    from hubkit.scoring import _pool_options
    from hubkit.tasks import load_task

    nsmc = load_task("nsmc")
    assert _pool_options(nsmc, "vllm", {}, compile=True)["enforce_eager"] is False
    assert "enforce_eager" not in _pool_options(nsmc, "vllm", {})
    assert "enforce_eager" not in _pool_options(nsmc, "transformers", {}, compile=True)
    config = ScoreConfig.from_mapping({"data": ["x.txt"], "out": "o", "compile": True})
    assert config.compile is True and "enforce_eager" not in config.engine_options
