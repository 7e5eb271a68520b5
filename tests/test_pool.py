"""The Ray engine pool: real Ray, two real vLLM engine actors, on the tiny Korean GPT-NeoX.

The module shares one pool (two vLLM actors) and, as the reference, the outputs of one bare vLLM
backend, computed up front and shut down before the pool starts so the two never compete for the two
CPU cores. A second, cheap part starts its own Ray cluster (``ray start --head``) and runs a
transformers-backed pool against it from a separate driver process.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hubkit.engine import Completion, CompletionChunk, Loglikelihood, LoglikelihoodRequest, SamplingParams
from hubkit.errors import InvalidRequestError

pytestmark = pytest.mark.slow

PROMPTS = [
    "오늘 본 영화는",
    "배우들의 연기가",
    "이 영화 정말",
    "스토리가 너무 지루해서",
    "감독의 다음 작품이 기대된다",
    "재미있는 영화",
    "음악이 좋았고",
    "다시 보고 싶은",
    "최악의 영화였다",
    "주인공이 너무",
    "가족과 함께 보기 좋은",
    "결말이 아쉬웠지만",
]
GREEDY_24 = SamplingParams(temperature=0.0, max_tokens=24)
# Long enough that a kill lands while every request is still generating.
LONG = SamplingParams(temperature=0.0, max_tokens=160)
LONG_PROMPTS = ["긴 리뷰: 이 영화는", "평점 10점: 배우들이", "한 줄 평: 스토리가", "관람 후기: 음악과 영상이"]
LL_REQUESTS = [
    LoglikelihoodRequest(context, choice)
    for context in ("이 영화 정말", "리뷰: 스토리가 너무 지루해서 감정은")
    for choice in (" 재밌다", " 별로다", " 긍정", " 부정")
] + [LoglikelihoodRequest("", "영화가 재밌다")]


def _join(chunks: list[CompletionChunk]) -> tuple[str, tuple[int, ...]]:
    return "".join(c.delta for c in chunks), tuple(t for c in chunks for t in c.token_ids)


def _assert_scores_equal(got: list[Loglikelihood], want: list[Loglikelihood]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        # Same engine and dtype; only the batch a request lands in differs between the two runs.
        assert g.logprob == pytest.approx(w.logprob, abs=1e-4)
        assert (g.is_greedy, g.num_tokens) == (w.is_greedy, w.num_tokens)


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, Any]:
    """What a bare VLLMBackend answers to every request this module sends through the pool."""
    from hubkit.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), dtype="float32")

    async def collect() -> dict[str, Any]:
        greedy = await asyncio.gather(*(backend.generate(p, GREEDY_24) for p in PROMPTS))
        long = await asyncio.gather(*(backend.generate(p, LONG) for p in LONG_PROMPTS))
        return {"greedy": list(greedy), "long": list(long), "ll": await backend.loglikelihood(LL_REQUESTS)}

    try:
        return asyncio.run(collect())
    finally:
        backend.shutdown()


@pytest.fixture(scope="module")
def pool(tiny_model_dir: Path, reference: dict[str, Any]) -> Iterator[Any]:
    # Depends on `reference` only for ordering: the bare engine is gone before the actors start.
    from hubkit.pool import EnginePool

    started = time.perf_counter()
    # num_cpus=0.5: two actors fit on a 2-CPU machine even next to another test's actor.
    engine_pool = EnginePool(
        str(tiny_model_dir), replicas=2, engine_options={"dtype": "float32"}, num_cpus=0.5
    )
    print(f"\n[pool] 2 vLLM actors ready in {time.perf_counter() - started:.1f} s")
    yield engine_pool
    engine_pool.shutdown()


def _requests_per_actor(pool: Any) -> dict[str, int]:
    return {a["actor_id"]: a["requests"] for a in pool.info()["actors"]}


# ----------------------------------------------------------------------------------------------------
# One local pool, two vLLM actors
# ----------------------------------------------------------------------------------------------------


def test_pool_reports_its_shape(pool: Any, tiny_model_dir: Path) -> None:
    info = pool.info()
    assert (info["model"], info["backend"], info["replicas"]) == (str(tiny_model_dir), "vllm", 2)
    assert info["alive"] == 2 and info["restarts"] == 0
    assert info["max_model_len"] == pool.max_model_len == 512
    assert len({a["pid"] for a in info["actors"]}) == 2
    assert len(pool.actors) == 2


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_replicas_compute_on_different_cores(pool: Any) -> None:
    # vLLM's own "auto" binding pins every engine to the same core; the pool splits them. The engines
    # run inside the actors (VLLMBackend's in_process): no engine-core or worker processes of their own.
    import psutil

    from hubkit.pool import cpu_binding

    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        pytest.skip("the environment sets VLLM_CPU_OMP_THREADS_BIND")
    actors = pool.info()["actors"]
    assert sorted(a["cpu_binding"] for a in actors) == sorted(
        cpu_binding(s, 2, sorted(os.sched_getaffinity(0))) for s in (0, 1)
    )
    everywhere = frozenset(os.sched_getaffinity(0))
    pinned = []
    for actor in actors:
        process = psutil.Process(actor["pid"])
        assert not [
            p.name() for p in process.children(recursive=True) if "Engine" in p.name() or "Worker" in p.name()
        ]
        # The engine's compute threads: pinned to the actor's share, unlike Ray's own threads.
        cores = {frozenset(os.sched_getaffinity(t.id)) for t in process.threads()} - {everywhere}
        assert cores == {frozenset(int(c) for c in actor["cpu_binding"].split(","))}, cores
        pinned.append(cores.pop())
    assert pinned[0].isdisjoint(pinned[1]), pinned


def test_engine_process_env_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubkit.backends import vllm as backend

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.delenv(backend.OPENMP_ENV, raising=False)
    monkeypatch.setattr(backend, "intel_openmp", lambda: "/env/lib/libiomp5.so")
    monkeypatch.setattr(backend, "node_cpus", lambda: [0, 1])
    monkeypatch.setenv("LD_PRELOAD", "/opt/libfoo.so")
    with backend.engine_process_env():
        assert os.environ["LD_PRELOAD"] == "/opt/libfoo.so:/env/lib/libiomp5.so"
        assert os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0,1"
    assert os.environ["LD_PRELOAD"] == "/opt/libfoo.so"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    # The user's own OpenMP runtime, or HUBKIT_VLLM_OPENMP=gnu, keeps vLLM's choice.
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libgomp.so.1")
    assert backend.openmp_preload() is None
    monkeypatch.delenv("LD_PRELOAD")
    assert backend.openmp_preload() == "/env/lib/libiomp5.so"
    monkeypatch.setenv(backend.OPENMP_ENV, "gnu")
    assert backend.openmp_preload() is None
    with backend.engine_process_env():
        assert "LD_PRELOAD" not in os.environ


def test_cpu_binding_splits_the_cores_between_replicas() -> None:
    from hubkit.pool import cpu_binding

    assert cpu_binding(0, 1, [0, 1]) == "0,1"  # one replica computes on every core
    assert cpu_binding(0, 1, [3]) is None  # one core: vLLM's choice
    assert cpu_binding(0, 2, [0]) is None  # nothing to split
    assert [cpu_binding(s, 2, [0, 1]) for s in range(3)] == ["0", "1", "0"]
    assert [cpu_binding(s, 2, [0, 1, 2, 3]) for s in range(2)] == ["0,1", "2,3"]
    assert [cpu_binding(s, 3, [4, 5, 6, 7]) for s in range(3)] == ["4", "5", "6"]


def test_generate_keeps_prompt_order_and_matches_the_backend(pool: Any, reference: dict[str, Any]) -> None:
    before = _requests_per_actor(pool)
    started = time.perf_counter()
    out = pool.generate(PROMPTS, GREEDY_24, progress=True)
    print(f"\n[pool] {len(PROMPTS)} prompts in {time.perf_counter() - started:.2f} s")
    assert out == reference["greedy"]  # text, token ids, prompt tokens and finish reason, in order
    assert len({c.text for c in out}) > len(PROMPTS) // 2  # distinct answers, so order is really checked
    after = _requests_per_actor(pool)
    assert all(after[a] > before[a] for a in before), "both actors should have served part of the batch"
    # A single string is one prompt.
    assert pool.generate(PROMPTS[3], GREEDY_24) == [reference["greedy"][3]]


def test_stream_yields_the_same_completion_chunk_by_chunk(pool: Any, reference: dict[str, Any]) -> None:
    want: Completion = reference["greedy"][1]
    chunks = list(pool.stream(PROMPTS[1], GREEDY_24))
    assert len(chunks) > 1
    assert _join(chunks) == (want.text, want.token_ids)
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == want.finish_reason
    # Leaving a stream early cancels it; the pool keeps serving.
    stream = pool.stream(LONG_PROMPTS[0], LONG)
    next(stream)
    stream.close()
    assert pool.generate([PROMPTS[1]], GREEDY_24) == [want]


def test_loglikelihood_through_the_pool(pool: Any, reference: dict[str, Any]) -> None:
    got = pool.loglikelihood(LL_REQUESTS, progress=True)
    _assert_scores_equal(got, reference["ll"])
    # Plain (context, continuation) tuples work too.
    _assert_scores_equal(pool.loglikelihood([(r.context, r.continuation) for r in LL_REQUESTS[:2]]), got[:2])


def test_async_api_on_the_callers_event_loop(pool: Any, reference: dict[str, Any]) -> None:
    async def main() -> tuple[list[Completion], list[CompletionChunk], list[Loglikelihood]]:
        outs = await asyncio.gather(*(pool.agenerate(p, GREEDY_24) for p in PROMPTS))
        chunks = [c async for c in pool.astream(PROMPTS[2], GREEDY_24)]
        scores = await pool.aloglikelihood(LL_REQUESTS)
        return list(outs), chunks, scores

    outs, chunks, scores = asyncio.run(main())
    assert outs == reference["greedy"]
    assert _join(chunks) == (reference["greedy"][2].text, reference["greedy"][2].token_ids)
    _assert_scores_equal(scores, reference["ll"])


def test_bad_requests_raise_one_line_errors_and_the_actors_keep_serving(
    pool: Any, reference: dict[str, Any]
) -> None:
    actors = pool.actors
    before = _requests_per_actor(pool)
    # Refused on the driver, before any actor sees them.
    with pytest.raises(InvalidRequestError, match="empty"):
        pool.generate(["안녕", "  "], GREEDY_24)
    with pytest.raises(InvalidRequestError, match="temperature"):
        pool.generate(["안녕"], SamplingParams(temperature=-1.0))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        pool.generate(["안녕"], SamplingParams(max_tokens=10_000))
    assert _requests_per_actor(pool) == before
    # Refused inside an actor (only the engine's tokenizer knows the length): still InvalidRequestError.
    too_long = "영화 " * 600
    for call in (
        lambda: pool.generate([too_long], GREEDY_24),
        lambda: list(pool.stream(too_long, GREEDY_24)),
        lambda: pool.loglikelihood([LoglikelihoodRequest("영화", "")]),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            call()
        message = str(caught.value)
        assert "\n" not in message and len(message) < 300, message
        assert type(caught.value) is InvalidRequestError  # the actor's own error, not a Ray wrapper
    # Nothing was restarted and the same actors answer the next request.
    assert pool.actors == actors
    assert pool.info()["restarts"] == 0
    assert pool.generate([PROMPTS[0]], GREEDY_24) == [reference["greedy"][0]]


def test_pool_that_cannot_fit_is_refused_up_front(pool: Any, tiny_model_dir: Path) -> None:
    from hubkit import pool as pool_module

    if not pool_module._started_local_ray:
        pytest.skip("only a local Ray has a fixed size; a cluster may autoscale")
    with pytest.raises(InvalidRequestError, match="CPUs"):
        pool_module.EnginePool(str(tiny_model_dir), replicas=1000)


def _wait_until_alive(pool: Any, actors: int, *, timeout: float = 300) -> dict[str, Any]:
    """Waits until the pool has ``actors`` live actors (a replacement loads its engine); returns its info."""
    deadline = time.monotonic() + timeout
    while (info := pool.info())["alive"] < actors:
        assert time.monotonic() < deadline, info
        time.sleep(2)
    return info


def test_actor_killed_mid_request_is_replaced_and_its_requests_retried(
    pool: Any, reference: dict[str, Any]
) -> None:
    import ray
    from ray.exceptions import RayActorError

    info = pool.info()
    restarts = info["restarts"]
    victim, survivor = pool.actors
    survivor_id = next(a["actor_id"] for a in info["actors"] if a["slot"] == 1)
    counts = _requests_per_actor(pool)

    async def scenario() -> tuple[list[Completion], list[list[CompletionChunk]]]:
        # Four generations and two streams: least-outstanding routing gives each actor half of each.
        generations = [asyncio.ensure_future(pool.agenerate(p, LONG)) for p in LONG_PROMPTS]
        streamed: list[list[CompletionChunk]] = [[], []]
        flowing = [asyncio.Event(), asyncio.Event()]

        async def consume(i: int) -> None:
            async for chunk in pool.astream(LONG_PROMPTS[i], LONG):
                streamed[i].append(chunk)
                if len(streamed[i]) >= 3:
                    flowing[i].set()

        consumers = [asyncio.ensure_future(consume(i)) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in flowing)), timeout=120)
        assert not any(g.done() for g in generations), "requests finished before the kill; make them longer"
        ray.kill(victim, no_restart=True)
        done = await asyncio.wait_for(asyncio.gather(*generations), timeout=300)
        await asyncio.wait_for(asyncio.gather(*consumers), timeout=300)
        return list(done), streamed

    started = time.perf_counter()
    generated, streamed = asyncio.run(scenario())
    print(
        f"\n[pool] 6 long requests with a kill in the middle answered in {time.perf_counter() - started:.1f} s"
    )

    assert generated == reference["long"]
    for i in range(2):
        want = reference["long"][i]
        assert _join(streamed[i]) == (want.text, want.token_ids), f"stream {i} lost or repeated text"
        assert streamed[i][-1].finish_reason == want.finish_reason
    # The dead actor's share (2 generations + 1 stream) was retried on the survivor, not queued behind
    # the replacement, which was still loading its engine.
    served = _requests_per_actor(pool).get(survivor_id, 0) - counts[survivor_id]
    assert served == 3 + 3, served
    with pytest.raises(RayActorError):
        ray.get(victim.info.remote(), timeout=60)
    # Replaced exactly once, in the same slot; back to two live actors once the new engine is up.
    info = pool.info()
    assert (info["restarts"], info["alive"], info["starting"]) == (restarts + 1, 1, 1)
    assert pool.actors[0] is not victim and pool.actors[1] is survivor
    info = _wait_until_alive(pool, 2)
    assert info["restarts"] == restarts + 1
    assert pool.generate(PROMPTS, GREEDY_24) == reference["greedy"]


def test_actor_whose_engine_stopped_is_replaced_and_its_requests_retried(
    pool: Any, reference: dict[str, Any]
) -> None:
    import ray
    from ray.exceptions import RayActorError

    restarts = _wait_until_alive(pool, 2)["restarts"]  # after the previous test's replacement
    victim = pool.actors[0]

    def break_engine(actor: Any) -> None:
        # The engine's next step fails inside the live actor process (a fault injected for the test; the
        # process itself stays up, as it would after a Python error in vLLM's step).
        def fail() -> None:
            raise RuntimeError("simulated engine failure")

        actor._backend._engine._engine.step = fail

    ray.get(victim.__ray_call__.remote(break_engine), timeout=60)
    # One prompt per call (8 prompts over 2 actors): the victim gets some, fails them, exits, and the pool
    # retries them on the other actor. The caller sees the reference answers, no error.
    assert pool.generate(PROMPTS, GREEDY_24) == reference["greedy"]
    with pytest.raises(RayActorError):
        ray.get(victim.info.remote(), timeout=60)
    info = pool.info()
    assert info["restarts"] == restarts + 1 and pool.actors[0] is not victim, info


# ----------------------------------------------------------------------------------------------------
# An existing cluster
# ----------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A one-node Ray cluster of our own: its own ports, temp dir and auth token.

    Stopped by signalling its ``ray start --block`` process, never with ``ray stop``, which would stop
    every Ray on the machine (other test runs' included).
    """
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="hkray-")  # short: Ray's socket paths live under it
    token_path = Path(temp_dir) / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_USAGE_STATS_ENABLED": "0"}
    port, *others = _free_ports(9)
    flags = ["ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port",
             "dashboard-port"]  # fmt: skip
    log_path = Path(temp_dir) / "ray-start.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
             f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
             *(f"--{flag}={p}" for flag, p in zip(flags, others, strict=True))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in log_path.read_text():
            assert head.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "ray start did not come up in 120 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", env
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


_CLUSTER_DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    import ray
    from hubkit.backends.transformers import TransformersBackend
    from hubkit.engine import SamplingParams
    from hubkit.errors import HubkitError
    from hubkit.pool import EnginePool, connect

    model, missing = sys.argv[1], sys.argv[2]
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompts = ["오늘 본 영화는", "배우들의 연기가", "이 영화 정말"]
    out = {}
    started = time.perf_counter()
    with EnginePool(model, backend="transformers", engine_options={"dtype": "float32"}) as pool:
        out["start_s"] = time.perf_counter() - started
        out["gcs"] = ray.get_runtime_context().gcs_address
        out["pool"] = [c.text for c in pool.generate(prompts, params)]
        out["info"] = {k: pool.info()[k] for k in ("alive", "restarts", "backend")}
    connect()  # idempotent
    try:
        connect("127.0.0.1:1")
    except HubkitError as exc:
        out["other_address"] = f"{type(exc).__name__}: {exc}"
    try:
        EnginePool(missing, backend="transformers")
    except HubkitError as exc:
        out["missing"] = f"{type(exc).__name__}: {exc}"
    backend = TransformersBackend(model, dtype="float32")
    out["bare"] = [asyncio.run(backend.generate(p, params)).text for p in prompts]
    print("RESULT " + json.dumps(out, ensure_ascii=False))
    """
)


def test_pool_on_an_existing_cluster_via_ray_address(
    ray_cluster: tuple[str, dict[str, str]], tiny_model_dir: Path, tmp_path: Path
) -> None:
    address, env = ray_cluster
    started = time.perf_counter()
    # Alongside: a driver without the cluster's token is refused with a one-line error naming the fix.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")} | {"RAY_AUTH_MODE": "disabled"}
    refused = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hubkit.pool import connect; connect(sys.argv[1])", address],
        env=no_token, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", _CLUSTER_DRIVER, str(tiny_model_dir), str(tmp_path / "no-such-model")],
        env=env | {"RAY_ADDRESS": address}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    _, refused_err = refused.communicate(timeout=300)
    print(
        f"\n[pool] transformers pool on an existing cluster: driver ran {time.perf_counter() - started:.1f} s"
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[0].removeprefix("RESULT "))
    print(f"[pool] transformers actor ready in {out['start_s']:.1f} s")
    assert out["gcs"].endswith(f":{address.rsplit(':', 1)[1]}"), out["gcs"]
    assert out["pool"] == out["bare"]
    assert out["info"] == {"alive": 1, "restarts": 0, "backend": "transformers"}
    assert out["other_address"].startswith("InvalidRequestError: this process is already connected")
    assert out["missing"].startswith("ModelNotFoundError:") and "no-such-model" in out["missing"]
    assert "\n" not in out["missing"]
    assert refused.returncode != 0
    last = refused_err.strip().splitlines()[-1]
    assert last.startswith("hubkit.errors.EngineError:") and "RAY_AUTH_MODE=token" in last, last
