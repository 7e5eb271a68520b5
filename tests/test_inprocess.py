"""The in-process vLLM engine (``VLLMBackend(in_process=True)``, what the pool's actors run).

The pool tests check its answers against a bare multi-process engine; this module checks the driver's
own behaviour. The engine runs in a subprocess: an in-process engine takes over process-wide settings
(vLLM makes ``torch.set_num_threads`` a no-op), which must not leak into the rest of the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, time

    from hubkit.backends.vllm import VLLMBackend
    from hubkit.engine import LoglikelihoodRequest, SamplingParams
    from hubkit.errors import EngineError, InvalidRequestError

    backend = VLLMBackend(sys.argv[1], dtype="float32", in_process=True)
    engine = backend._engine._engine  # vLLM's LLMEngine, stepped by hubkit's driver
    out = {}
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    out["greedy"] = list(asyncio.run(backend.generate("이 영화 정말", greedy)).token_ids)
    out["ll"] = [r.logprob for r in asyncio.run(backend.loglikelihood(
        [LoglikelihoodRequest("문장: 재밌다 긍부정:", " 긍정"), LoglikelihoodRequest("문장: 재밌다 긍부정:", " 부정")]
    ))]

    async def abandon():
        stream = backend.stream("영화", SamplingParams(max_tokens=500, temperature=0.8, ignore_eos=True))
        chunks = 0
        async for _ in stream:
            chunks += 1
            if chunks == 2:
                break
        running = engine.get_num_unfinished_requests()  # still generating: nobody closed the stream yet
        await stream.aclose()  # what a client disconnect does
        for _ in range(5):  # the abort lands within a step; 500 tokens would take far longer
            if engine.get_num_unfinished_requests() == 0:
                break
            await asyncio.sleep(0.02)
        return chunks, running, engine.get_num_unfinished_requests()

    out["abandon"] = list(asyncio.run(abandon()))
    try:
        asyncio.run(backend.generate("", greedy))
    except InvalidRequestError as exc:
        out["bad_request"] = str(exc)
    out["after_bad_request"] = list(asyncio.run(backend.generate("이 영화 정말", greedy)).token_ids)

    async def affinity():  # runs on the engine's thread
        return sorted(os.sched_getaffinity(0))

    out["pinned"] = backend._loop.submit(affinity()).result()
    out["main_thread"] = sorted(os.sched_getaffinity(0))

    def fail():
        raise RuntimeError("simulated step failure")

    engine.step = fail  # an engine that breaks mid-run: every waiter learns it, and so does the next caller
    for key in ("failed", "next"):
        try:
            asyncio.run(backend.generate("이 영화 정말", greedy))
            out[key] = "no error"
        except EngineError as exc:
            out[key] = str(exc)
    backend.shutdown()
    print("RESULT " + json.dumps(out, ensure_ascii=False))
    """
)


# The engine options `hubkit score --compile` starts pool actors with: torch.compile over hubkit's GPT-NeoX,
# including the prefill that finishes only the positions it reads (``prompt_logprobs=False``).
COMPILED_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys

    from hubkit.backends.vllm import VLLMBackend
    from hubkit.engine import LoglikelihoodRequest, SamplingParams

    backend = VLLMBackend(
        sys.argv[1], dtype="float32", in_process=True, enforce_eager=False, prompt_logprobs=False
    )
    out = {"eager": backend._engine.model_config.enforce_eager}
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    out["greedy"] = list(asyncio.run(backend.generate("이 영화 정말", greedy)).token_ids)
    out["ll"] = [r.logprob for r in asyncio.run(backend.loglikelihood(
        [LoglikelihoodRequest("문장: 재밌다 긍부정:", " 긍정"), LoglikelihoodRequest("문장: 재밌다 긍부정:", " 부정")]
    ))]
    backend.shutdown()
    print("RESULT " + json.dumps(out))
    """
)


def _run(script: str, model: Path) -> dict:
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0")
    proc = subprocess.run(
        [sys.executable, "-c", script, str(model)], capture_output=True, text=True, timeout=300, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def result(tiny_model_dir: Path) -> dict:
    return _run(SCRIPT, tiny_model_dir)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict:
    """Greedy tokens and log-likelihoods of the same requests from transformers (float32)."""
    import asyncio

    from hubkit.backends.transformers import TransformersBackend
    from hubkit.engine import LoglikelihoodRequest, SamplingParams

    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    try:
        greedy = asyncio.run(backend.generate("이 영화 정말", SamplingParams(max_tokens=12, temperature=0.0)))
        ll = asyncio.run(
            backend.loglikelihood(
                [
                    LoglikelihoodRequest("문장: 재밌다 긍부정:", " 긍정"),
                    LoglikelihoodRequest("문장: 재밌다 긍부정:", " 부정"),
                ]
            )
        )
    finally:
        backend.shutdown()
    return {"greedy": list(greedy.token_ids), "ll": [r.logprob for r in ll]}


def test_in_process_engine_answers_like_transformers(result: dict, reference: dict) -> None:
    assert result["greedy"] == reference["greedy"]
    assert max(abs(a - b) for a, b in zip(result["ll"], reference["ll"], strict=True)) < 1e-3


def test_compiled_engine_answers_like_transformers(tiny_model_dir: Path, reference: dict) -> None:
    compiled = _run(COMPILED_SCRIPT, tiny_model_dir)
    assert compiled["eager"] is False  # the option reached vLLM: the model really ran compiled
    assert compiled["greedy"] == reference["greedy"]
    assert max(abs(a - b) for a, b in zip(compiled["ll"], reference["ll"], strict=True)) < 1e-3


def test_closing_a_stream_aborts_its_request(result: dict) -> None:
    chunks, running, after = result["abandon"]
    assert (chunks, running, after) == (2, 1, 0)


def test_bad_request_leaves_the_engine_working(result: dict) -> None:
    assert "prompt is empty" in result["bad_request"]
    assert result["after_bad_request"] == result["greedy"]


def test_engine_thread_is_pinned_to_its_binding(result: dict) -> None:
    if 0 not in os.sched_getaffinity(0):
        pytest.skip("core 0 is not available here")
    assert result["pinned"] == [0]
    assert result["main_thread"] == sorted(os.sched_getaffinity(0))  # the rest of the process keeps its cores


def test_a_failed_engine_says_so_to_every_caller(result: dict) -> None:
    for key in ("failed", "next"):
        assert "simulated step failure" in result[key], result[key]
        assert "start a new backend" in result[key], result[key]
