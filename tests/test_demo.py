"""The Gradio demos, launched on loopback and driven with ``gradio_client``.

One vLLM engine pool (one actor, float32 tiny model) serves every app of this module:

* the generate, sentiment and compare apps on a :class:`~hubkit.demo.PoolClient`;
* a second generate app on an :class:`~hubkit.demo.HTTPClient` to the OpenAI server app
  (``hubkit.serving.build_app`` on the same pool, served by uvicorn in a thread), as with
  ``HUBKIT_ENDPOINT``;
* the results Space run as a user runs it (``python spaces/results/app.py``) on a run folder that
  ``hubkit score``'s ``run_score`` wrote with the same pool.
"""

from __future__ import annotations

import ast
import csv
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

import httpx
import pytest

from hubkit.datasets import NSMC_SAMPLE_TEST
from hubkit.demo import (
    EXAMPLE_PROMPTS,
    KOGPT_PROMPT,
    DemoLimits,
    HTTPClient,
    PoolClient,
    check_reviews,
    generation_params,
    parse_stop,
    read_reviews_file,
    sentiment_requests,
)
from hubkit.engine import SamplingParams
from hubkit.errors import DataError, EngineError, InvalidRequestError
from hubkit.privacy import mask_personal_data

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "spaces"
DATA = Path(__file__).parent / "data"
NSMC_TEST = NSMC_SAMPLE_TEST
PROMPT = "이 영화 정말"
REVIEWS = ["정말 재미있고 감동적인 영화였어요", "시간 낭비였다 너무 지루하다", "배우들 연기가 좋았다"]
# 250 characters (under the demo's limits) but ~750 byte-level tokens: over the tiny model's 512.
OVER_CONTEXT = "".join(chr(0x4E00 + 7 * i) for i in range(250))
START_TIMEOUT_S = 300
JOB_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url: str) -> Any:
    from gradio_client import Client

    return Client(url, verbose=False)


def _app_error(job_or_call: Any) -> str:
    """The message of the gr.Error a call ends with (gradio_client raises it as AppError)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        job_or_call()
    return str(info.value.message if hasattr(info.value, "message") else info.value)


# ----------------------------------------------------------------------------------------------------
# Fast: the pieces the apps are made of, and the Space folders
# ----------------------------------------------------------------------------------------------------


def test_sentiment_requests_are_the_nsmc_scoring_requests() -> None:
    from hubkit.tasks import load_task

    task = load_task("nsmc")
    want = []
    for i, review in enumerate(REVIEWS):
        # What `hubkit score --task nsmc` sends for a labelled row with this document.
        doc = task.prepare({"id": str(i), "document": review, "label": "1"}, i)
        want += task.requests(doc)
    got = [(r.context, r.continuation) for r in sentiment_requests(REVIEWS)]
    assert got == want
    assert got[0] == (f"문장: {REVIEWS[0]} 긍부정:", " 부정")
    assert got[1] == (f"문장: {REVIEWS[0]} 긍부정:", " 긍정")


def test_generation_settings_are_checked_with_messages_naming_the_fix() -> None:
    limits = DemoLimits(max_new_tokens=100)
    ok = generation_params(
        temperature=0.7, top_p=0.9, max_length=50, seed=3, stop="\\n\\n\n끝", limits=limits, max_model_len=512
    )
    assert ok == SamplingParams(temperature=0.7, top_p=0.9, max_tokens=50, seed=3, stop=("\n\n", "끝"))
    assert (
        generation_params(
            temperature=0, top_p=1, max_length=5, seed=-1, stop="", limits=limits, max_model_len=512
        ).seed
        is None
    )
    with pytest.raises(InvalidRequestError, match="cap of 100; lower it"):
        generation_params(temperature=0, top_p=1, max_length=101, seed=None, stop="", limits=limits,
                          max_model_len=512)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="cap of 31"):  # the model's context is the tighter cap
        generation_params(temperature=0, top_p=1, max_length=40, seed=None, stop="", limits=limits,
                          max_model_len=32)  # fmt: skip
    with pytest.raises(InvalidRequestError, match="temperature must be >= 0"):
        generation_params(temperature=-1, top_p=1, max_length=5, seed=None, stop="", limits=limits,
                          max_model_len=512)  # fmt: skip
    assert parse_stop("  \n.\n\\t") == (".", "\t")


def test_reviews_files_and_limits(tmp_path: Path) -> None:
    limits = DemoLimits(max_reviews=5, max_review_chars=20, max_upload_bytes=10_000)
    # NSMC's own format (id, document, label; tab-separated) works as it is.
    nsmc = tmp_path / "ratings.txt"
    nsmc.write_text(
        "".join(NSMC_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:4]), encoding="utf-8"
    )
    assert read_reviews_file(nsmc, limits=limits)[0].startswith("보는내내 짜증났음")
    spreadsheet = tmp_path / "reviews.csv"
    with spreadsheet.open("w", encoding="utf-8-sig", newline="") as f:
        csv.writer(f).writerows([["번호", "리뷰"], [1, "좋다, 정말 좋다"], [2, "별로"], [3, ""]])
    assert read_reviews_file(spreadsheet, limits=limits) == ["좋다, 정말 좋다", "별로"]
    plain = tmp_path / "one_per_line.txt"
    plain.write_text("첫 리뷰\n\n둘째 리뷰\n", encoding="utf-8")
    assert read_reviews_file(plain, limits=limits) == ["첫 리뷰", "둘째 리뷰"]

    no_column = tmp_path / "bad.csv"
    no_column.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="no review column; name it one of document"):
        read_reviews_file(no_column, limits=limits)
    euc_kr = tmp_path / "euckr.tsv"
    euc_kr.write_bytes("document\n좋아요\n".encode("euc-kr"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_reviews_file(euc_kr, limits=limits)
    big = tmp_path / "big.tsv"
    big.write_text("document\n" + "가" * 10_000, encoding="utf-8")
    with pytest.raises(DataError, match="up to 10,000 bytes"):
        read_reviews_file(big, limits=limits)

    assert check_reviews(["  a ", "", "b"], limits) == ["a", "b"]
    with pytest.raises(InvalidRequestError, match="no review given"):
        check_reviews(["", " "], limits)
    with pytest.raises(InvalidRequestError, match="6 reviews; this demo scores at most 5"):
        check_reviews(["x"] * 6, limits)
    with pytest.raises(InvalidRequestError, match="review 2 is 21 characters"):
        check_reviews(["ok", "가" * 21], limits)


@pytest.mark.parametrize("name", ["generate", "sentiment", "compare", "results"])
def test_space_folders_can_be_pushed_as_they_are(name: str) -> None:
    import gradio
    from huggingface_hub import SpaceCard

    folder = SPACES / name
    card = SpaceCard.load(folder / "README.md")
    data = card.data
    assert data.sdk == "gradio"
    assert data.sdk_version == gradio.__version__  # the installed gradio: what the demos were tested on
    assert data.app_file == "app.py"
    assert data.models and data.datasets
    assert "hubkit" in (folder / "requirements.txt").read_text(encoding="utf-8")
    # app.py only wires: imports from hubkit, and starts under `if __name__ == "__main__":`.
    tree = ast.parse((folder / "app.py").read_text(encoding="utf-8"))
    imports = [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports and all(isinstance(n, ast.ImportFrom) and n.module == "hubkit.demo" for n in imports)
    guards = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    assert len(guards) == 1 and f"run_demo('{name}')" in ast.unparse(guards[0])
    assert KOGPT_PROMPT in EXAMPLE_PROMPTS


def test_an_unreachable_endpoint_is_one_line_naming_the_fix() -> None:
    with pytest.raises(
        EngineError, match="no hubkit server answers at http://127.0.0.1:.*hubkit serve MODEL"
    ):
        HTTPClient(f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(InvalidRequestError, match="must be an http"):
        HTTPClient("localhost:8000")


# ----------------------------------------------------------------------------------------------------
# Slow: real engine, real servers
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path) -> Iterator[Any]:
    from hubkit.pool import EnginePool

    started = time.perf_counter()
    engine_pool = EnginePool(str(tiny_model_dir), engine_options={"dtype": "float32"}, num_cpus=0.5)
    print(f"\n[demo] vLLM actor ready in {time.perf_counter() - started:.1f} s")
    yield engine_pool
    engine_pool.shutdown()


@pytest.fixture(scope="module")
def apps(pool: Any) -> Iterator[dict[str, str]]:
    """The generate, sentiment and compare apps on the pool, each on its own loopback port."""
    from hubkit.demo import build_compare_app, build_generate_app, build_sentiment_app, launch

    client = PoolClient(pool, label="tiny")
    # Small limits so the tests can go over them cheaply; a queue that holds the 32-job burst.
    limits = DemoLimits(max_prompt_chars=300, max_new_tokens=64, max_reviews=50, concurrency_limit=16,
                        max_queue=64)  # fmt: skip
    built = {
        "generate": build_generate_app(client, limits=limits),
        "sentiment": build_sentiment_app(client, limits=limits),
        "compare": build_compare_app(client, limits=limits),
    }
    urls = {}
    for name, app in built.items():
        urls[name] = launch(app, host="127.0.0.1", port=_free_port(), block=False, quiet=True).rstrip("/")
    yield urls
    for app in built.values():
        app.close(verbose=False)


def _greedy(pool: Any, prompt: str, max_tokens: int) -> str:
    return _greedy_completion(pool, prompt, max_tokens).text


def _greedy_completion(pool: Any, prompt: str, max_tokens: int) -> Any:
    return pool.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0]


@pytest.mark.slow
def test_generation_streams_into_the_page(apps: dict[str, str], pool: Any) -> None:
    client = _client(apps["generate"])
    job = client.submit(PROMPT, 0.0, 1.0, 24, -1, "", True, api_name="/generate")
    final_text, final_stats = job.result(timeout=JOB_TIMEOUT_S)
    updates = [text for text, _ in job.outputs()]
    # Streamed: many updates, each extending the last one (no number in the text to hold back).
    assert len(updates) >= 5, updates
    assert all(b.startswith(a) for a, b in zip(updates, updates[1:], strict=False))
    want = _greedy_completion(pool, PROMPT, 24)
    assert final_text == mask_personal_data(PROMPT + want.text)
    assert final_stats.startswith(f"{want.completion_tokens} tokens · ") and "tokens/s" in final_stats, (
        final_stats
    )


@pytest.mark.slow
def test_over_limit_input_is_answered_with_a_message_and_the_app_keeps_serving(apps: dict[str, str]) -> None:
    client = _client(apps["generate"])

    def call(prompt: str, max_length: float = 8) -> Any:
        return client.predict(prompt, 0.0, 1.0, max_length, -1, "", False, api_name="/generate")

    assert "the prompt is 301 characters; this demo accepts at most 300, shorten it" in _app_error(
        lambda: call("가" * 301)
    )
    assert "greater than maximum value 64" in _app_error(lambda: call(PROMPT, 1000))
    assert "the prompt is empty" in _app_error(lambda: call("   "))
    # Under the demo's character limit but over the model's context: the engine's one-line message.
    long_prompt = OVER_CONTEXT
    message = _app_error(lambda: call(long_prompt, 64))
    assert "context" in message and "Traceback" not in message, message
    text, stats = call(PROMPT)
    assert text.startswith(PROMPT) and "tokens" in stats


@pytest.mark.slow
def test_32_concurrent_generations_all_finish(apps: dict[str, str]) -> None:
    client = _client(apps["generate"])
    started = time.perf_counter()
    jobs = [
        client.submit(
            f"{EXAMPLE_PROMPTS[i % len(EXAMPLE_PROMPTS)]}", 0.8, 0.95, 16, i, "", True, api_name="/generate"
        )  # fmt: skip
        for i in range(32)
    ]
    results = []
    for job in jobs:
        try:
            results.append(job.result(timeout=JOB_TIMEOUT_S))
        except FutureTimeout:
            pytest.fail("a generation did not finish in time")
    elapsed = time.perf_counter() - started
    print(f"\n[demo] 32 concurrent generations in {elapsed:.1f} s")
    assert len(results) == 32
    for (text, stats), i in zip(results, range(32), strict=True):
        assert text.startswith(EXAMPLE_PROMPTS[i % len(EXAMPLE_PROMPTS)])
        assert "tokens/s" in stats
    # Seeded sampling: the same seed gives the same text, so the 32 requests were not mixed up.
    again = client.predict(EXAMPLE_PROMPTS[3], 0.8, 0.95, 16, 3, "", True, api_name="/generate")
    assert again[0] == results[3][0]


@pytest.mark.slow
def test_sentiment_batch_table_chart_and_download(apps: dict[str, str], pool: Any, tmp_path: Path) -> None:
    from gradio_client import handle_file

    client = _client(apps["sentiment"])
    headline, plot, table, download = client.predict("\n".join(REVIEWS), None, api_name="/sentiment")
    rows = table["data"]
    assert table["headers"] == ["#", "review", "prediction", "P(부정)", "P(긍정)"]
    assert [r[1] for r in rows] == REVIEWS
    # The probabilities are the softmax of the nsmc choices' log-likelihoods, scored by the same engine.
    lls = [r.logprob for r in pool.loglikelihood(sentiment_requests(REVIEWS))]
    for i, row in enumerate(rows):
        neg, pos = lls[2 * i], lls[2 * i + 1]
        p_pos = 1 / (1 + math.exp(neg - pos))
        assert row[4] == pytest.approx(p_pos, abs=2e-4)
        assert row[3] + row[4] == pytest.approx(1.0, abs=2e-4)
        assert row[2] == ("긍정" if pos > neg else "부정")
    assert headline.startswith("### 3 reviews:")
    assert plot is not None
    with open(download, encoding="utf-8-sig") as f:
        downloaded = list(csv.reader(f))
    assert downloaded[0] == table["headers"] and len(downloaded) == 4

    # One review: its label and both probabilities in the headline.
    single = client.predict(REVIEWS[0], None, api_name="/sentiment")[0]
    assert single.startswith("### ") and "부정" in single and "긍정" in single and "%" in single

    # An uploaded NSMC file (id, document, label) is scored as a batch.
    upload = tmp_path / "nsmc_head.tsv"
    upload.write_text(
        "".join(NSMC_TEST.read_text(encoding="utf-8").splitlines(keepends=True)[:21]), encoding="utf-8"
    )
    _, _, table, _ = client.predict("", handle_file(str(upload)), api_name="/sentiment")
    assert len(table["data"]) == 20

    too_many = "\n".join(f"리뷰 {i}" for i in range(51))
    assert "51 reviews; this demo scores at most 50" in _app_error(
        lambda: client.predict(too_many, None, api_name="/sentiment")
    )


@pytest.mark.slow
def test_compare_streams_two_settings_side_by_side(apps: dict[str, str], pool: Any) -> None:
    client = _client(apps["compare"])
    job = client.submit(PROMPT, 16, "", False, 0.0, 1.0, -1, 1.2, 0.95, 7, api_name="/compare")
    text_a, text_b, stats_a, stats_b = job.result(timeout=JOB_TIMEOUT_S)
    assert len(job.outputs()) >= 4
    assert text_a == PROMPT + _greedy(pool, PROMPT, 16)  # side A: greedy
    assert text_b.startswith(PROMPT) and text_b != PROMPT
    assert "tokens/s" in stats_a and "tokens/s" in stats_b
    assert "greater than maximum value 64" in _app_error(
        lambda: client.predict(PROMPT, 65, "", False, 0.0, 1.0, -1, 0.0, 1.0, -1, api_name="/compare")
    )


@pytest.fixture(scope="module")
def http_server(pool: Any, tiny_model_dir: Path) -> Iterator[tuple[str, Any]]:
    """The OpenAI server app of ``hubkit serve`` on the same pool, served by uvicorn in a thread."""
    import uvicorn

    from hubkit.serving import build_app

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(pool, served_model_name="tiny"), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.started
    yield f"http://127.0.0.1:{port}", server
    server.should_exit = True
    thread.join(timeout=30)


@pytest.mark.slow
def test_endpoint_client_streams_from_a_running_server_and_reports_engine_errors(
    http_server: tuple[str, Any], pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubkit.demo import build_generate_app, connect_engine, launch

    url, server = http_server
    monkeypatch.setenv("HUBKIT_ENDPOINT", url + "/v1")
    engine = connect_engine("no-such-model-is-loaded")  # the endpoint wins: nothing is loaded
    assert (
        isinstance(engine, HTTPClient)
        and engine.model == "tiny"
        and engine.max_model_len == pool.max_model_len
    )
    app = build_generate_app(engine, limits=DemoLimits(max_new_tokens=32))
    app_url = launch(app, host="127.0.0.1", port=_free_port(), block=False, quiet=True)
    try:
        client = _client(app_url)
        job = client.submit(PROMPT, 0.0, 1.0, 12, -1, "", True, api_name="/generate")
        text, stats = job.result(timeout=JOB_TIMEOUT_S)
        assert text == mask_personal_data(PROMPT + _greedy(pool, PROMPT, 12))
        assert len(job.outputs()) >= 3
        # The exact count comes from the server's usage event.
        assert stats.startswith(f"{_greedy_completion(pool, PROMPT, 12).completion_tokens} tokens · "), stats
        # The server's 400 reaches the page as the server's one-line message.
        long_prompt = OVER_CONTEXT
        assert "context" in _app_error(lambda: client.predict(long_prompt, 0.0, 1.0, 32, -1, "", True,
                                                               api_name="/generate"))  # fmt: skip
        # Log-likelihoods come from the server's /v1/loglikelihood: the pool's own numbers.
        import asyncio

        remote = asyncio.run(engine.aloglikelihood(sentiment_requests(REVIEWS[:1])))
        local = pool.loglikelihood(sentiment_requests(REVIEWS[:1]))
        assert [r.logprob for r in remote] == pytest.approx([r.logprob for r in local], abs=1e-5)
        assert [r.is_greedy for r in remote] == [r.is_greedy for r in local]

        # The server goes away: an engine error in the page, and the app itself stays up.
        server.should_exit = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/v1/models", timeout=2)
            except httpx.HTTPError:
                break
            time.sleep(0.2)
        message = _app_error(lambda: client.predict(PROMPT, 0.0, 1.0, 8, -1, "", True, api_name="/generate"))
        assert message.startswith("engine error:") and "\n" not in message, message
        assert httpx.get(app_url.rstrip("/") + "/config", timeout=10).status_code == 200
        assert "the prompt is empty" in _app_error(
            lambda: client.predict("", 0.0, 1.0, 8, -1, "", True, api_name="/generate")
        )
    finally:
        app.close(verbose=False)
        engine.close()


@pytest.fixture(scope="module")
def run_folder(pool: Any, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished `hubkit score` run (nsmc, 24 rows) scored with the module's pool."""
    from hubkit.scoring import ScoreConfig, run_score

    runs = tmp_path_factory.mktemp("runs")
    config = ScoreConfig(model=str(tiny_model_dir), task="nsmc", data=(str(NSMC_TEST),), out=str(runs / "nsmc-tiny"),
                         limit=24, dtype="float32", progress=False, split="test")  # fmt: skip
    run_score(config, pool=pool)
    return runs


@pytest.mark.slow
def test_results_space_shows_finished_runs(run_folder: Path, tmp_path: Path) -> None:
    from hubkit.demo import find_runs, load_run

    assert find_runs(run_folder) == [run_folder / "nsmc-tiny"]
    view = load_run(run_folder / "nsmc-tiny")
    assert list(view.metrics["shots"]) == [0] and {"acc", "f1_macro"} <= set(view.metrics.columns)
    assert int(view.metrics["rows"][0]) == 24 and len(view.predictions) == 24
    # What a reader compares comes first; the long prompt text last, so it pushes nothing out of view.
    assert list(view.predictions.columns)[:4] == ["id", "shots", "label", "prediction"]
    assert list(view.predictions.columns)[-1] == "text"
    # Plots are shown whole: Gradio's gallery would crop each to a square thumbnail (axes cut off).
    from hubkit.demo import build_results_app

    galleries = [c for c in build_results_app(run_folder).config["components"] if c.get("type") == "gallery"]
    assert galleries and all(c["props"].get("object_fit") == "contain" for c in galleries)
    assert view.plots, "the run folder's plots are shown"

    # The Space as a user runs it: `python spaces/results/app.py` with its settings in the environment.
    port = _free_port()
    env = {**os.environ, "HUBKIT_RUNS": str(run_folder), "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False"}  # fmt: skip
    log = tmp_path / "results-space.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=SPACES / "results", env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"app.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(url + "/config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        client = _client(url)
        summary, metrics, per_class, plots, predictions, report = client.predict(
            "nsmc-tiny", api_name="/results"
        )
        assert summary.startswith("**nsmc**") and "tiny" in summary
        assert "acc" in metrics["headers"] and metrics["data"][0][0] == 0
        assert {row[1] for row in per_class["data"]} <= {"부정", "긍정"}
        assert len(plots) == len(view.plots)
        assert len(predictions["data"]) == 24
        assert "nsmc" in report
        # Only listed runs can be opened (no path of the server's choosing).
        assert "not in the list of choices" in _app_error(
            lambda: client.predict("../..", api_name="/results")
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
