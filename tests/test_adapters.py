"""Prompt-tuning adapters (PEFT's PROMPT_TUNING folders) on both backends, the pool, ``hubkit score`` and
the sentiment demo's engine.

transformers + peft is the reference; vLLM takes the soft prompt as prompt embeddings. The module
shares one vLLM engine (float32, the tiny GPT-NeoX with a random 8-token soft prompt made by peft) and
one transformers backend; ``hubkit score --adapter`` starts its own vLLM actor through the pool.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from hubkit.adapters import load_prompt_adapter
from hubkit.datasets import NSMC_SAMPLE_TEST
from hubkit.engine import LoglikelihoodRequest, SamplingParams
from hubkit.errors import InvalidRequestError

DATA = Path(__file__).parent / "data"
TEST_TSV = NSMC_SAMPLE_TEST
NUM_VIRTUAL_TOKENS = 8
PROMPTS = ("오늘 본 영화는", "문장: 정말 재미있는 영화 긍부정:", "배우들의 연기가")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def build_prompt_adapter(model_dir: Path, out: Path, *, num_virtual_tokens: int = NUM_VIRTUAL_TOKENS) -> Path:
    """A PROMPT_TUNING adapter for ``model_dir`` written by peft itself (random soft prompt, N(0, 1))."""
    import torch
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_prompt_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "soft-prompt")


@pytest.fixture(scope="module")
def tf_adapter(tiny_model_dir: Path, adapter_dir: Path):
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(tiny_model_dir), dtype="float32", adapter=str(adapter_dir))
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def vllm_adapter(tiny_model_dir: Path, adapter_dir: Path):
    from hubkit.backends.vllm import VLLMBackend

    # float32: vLLM's "auto" would run this float32 checkpoint in bfloat16 (see hubkit.adapters).
    backend = VLLMBackend(str(tiny_model_dir), dtype="float32", adapter=str(adapter_dir))
    yield backend
    backend.shutdown()


def _rows(n: int = 20) -> list[tuple[str, int]]:
    lines = TEST_TSV.read_text(encoding="utf-8").splitlines()[1:]
    rows = []
    for line in lines:
        _, document, label = line.split("\t")
        if document.strip():
            rows.append((document.strip(), int(label)))
        if len(rows) == n:
            break
    return rows


def _nsmc_requests(rows: list[tuple[str, int]]) -> list[LoglikelihoodRequest]:
    """Per row: 0-shot (even rows) or 3-shot (odd rows) nsmc prompts; the two choices, then two
    multi-token continuations so that scoring walks forced-token chains too."""
    shots = "".join(f"문장: {d} 긍부정: {'긍정' if y else '부정'}\n\n" for d, y in rows[-3:])
    reqs = []
    for i, (document, _) in enumerate(rows[:-3]):
        context = (shots if i % 2 else "") + f"문장: {document} 긍부정:"
        reqs += [LoglikelihoodRequest(context, c) for c in (" 부정", " 긍정", " 재밌다", " 재미없다")]
    return reqs


def _greedy_request(backend: Any) -> LoglikelihoodRequest:
    """A continuation that is the backend's own greedy output with the adapter (is_greedy must be True)."""
    from hubkit.backends.transformers import encode_pair

    tok = backend.tokenizer
    for context in PROMPTS:
        ids = list(run(backend.generate(context, SamplingParams(temperature=0.0, max_tokens=3))).token_ids)
        for k in range(len(ids), 0, -1):
            text = tok.decode(ids[:k])
            if text.strip() and encode_pair(tok, context, text)[1] == ids[:k]:
                return LoglikelihoodRequest(context, text)
    raise AssertionError("no greedy continuation re-tokenizes to itself")


# ----------------------------------------------------------------------------------------------------
# Fast: reading and checking adapter folders (no engine is started)
# ----------------------------------------------------------------------------------------------------


def test_load_prompt_adapter_reads_peft_folders(adapter_dir: Path, tiny_model_dir: Path) -> None:
    adapter = load_prompt_adapter(adapter_dir)
    assert adapter.num_virtual_tokens == NUM_VIRTUAL_TOKENS and adapter.token_dim == 128
    assert (
        adapter.embeddings.shape == (NUM_VIRTUAL_TOKENS, 128) and str(adapter.embeddings.dtype) == "float32"
    )
    assert adapter.path == str(adapter_dir.resolve()) and adapter.name == "soft-prompt"
    assert adapter.base_model == str(tiny_model_dir) and len(adapter.sha256) == 64
    assert load_prompt_adapter(str(adapter_dir)) == adapter


def _copy_adapter(src: Path, dst: Path, **config_changes: Any) -> Path:
    dst.mkdir(parents=True)
    config = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text.strip() == text
    return text


def test_bad_adapter_folders_are_one_line_errors_naming_the_fix(adapter_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    with pytest.raises(InvalidRequestError, match="does not exist; pass the folder `hubkit tune`") as exc:
        load_prompt_adapter(tmp_path / "missing")
    _one_line(exc)

    no_weights = _copy_adapter(adapter_dir, tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidRequestError, match="no adapter_model.safetensors; pass the folder") as exc:
        load_prompt_adapter(no_weights)
    _one_line(exc)
    (no_weights / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(InvalidRequestError, match="safe_serialization=True"):
        load_prompt_adapter(no_weights)

    no_config = _copy_adapter(adapter_dir, tmp_path / "no-config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(InvalidRequestError, match="no adapter_config.json"):
        load_prompt_adapter(no_config)

    lora = _copy_adapter(adapter_dir, tmp_path / "lora", peft_type="LORA")
    with pytest.raises(InvalidRequestError, match="LORA adapter; hubkit serves PROMPT_TUNING") as exc:
        load_prompt_adapter(lora)
    _one_line(exc)

    seq2seq = _copy_adapter(adapter_dir, tmp_path / "seq2seq", task_type="SEQ_2_SEQ_LM")
    with pytest.raises(InvalidRequestError, match="task_type='CAUSAL_LM'"):
        load_prompt_adapter(seq2seq)

    mismatch = _copy_adapter(adapter_dir, tmp_path / "mismatch", num_virtual_tokens=20)
    with pytest.raises(InvalidRequestError, match="num_virtual_tokens=20 but prompt_embeddings has shape"):
        load_prompt_adapter(mismatch)

    import numpy as np

    renamed = _copy_adapter(adapter_dir, tmp_path / "renamed")
    save_file(
        {"embedding.weight": np.zeros((8, 128), np.float32)}, str(renamed / "adapter_model.safetensors")
    )
    with pytest.raises(InvalidRequestError, match="not 'prompt_embeddings'"):
        load_prompt_adapter(renamed)

    nan = _copy_adapter(adapter_dir, tmp_path / "nan")
    save_file(
        {"prompt_embeddings": np.full((8, 128), np.nan, np.float32)}, str(nan / "adapter_model.safetensors")
    )
    with pytest.raises(InvalidRequestError, match="NaN or infinite"):
        load_prompt_adapter(nan)


@pytest.fixture
def narrow_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    """A well-formed adapter for a model of hidden size 64, not the tiny model's 128."""
    import numpy as np
    from safetensors.numpy import save_file

    folder = _copy_adapter(
        adapter_dir, tmp_path / "narrow", token_dim=64, base_model_name_or_path="org/narrow-64"
    )
    save_file({"prompt_embeddings": np.ones((8, 64), np.float32)}, str(folder / "adapter_model.safetensors"))
    return folder


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
def test_an_adapter_of_another_hidden_size_is_refused_before_any_engine_starts(
    backend: str, tiny_model_dir: Path, narrow_adapter: Path
) -> None:
    from hubkit.engine import load_backend

    with pytest.raises(
        InvalidRequestError, match="64-wide soft-prompt vectors but .* has hidden size 128"
    ) as exc:
        load_backend(str(tiny_model_dir), backend=backend, adapter=str(narrow_adapter))  # type: ignore[arg-type]
    assert "serve it with the base model it was tuned on (org/narrow-64)" in _one_line(exc)


def test_a_bad_adapter_fails_the_cli_and_the_pool_before_ray_starts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hubkit.cli import main

    missing = tmp_path / "no-such-adapter"
    argv = ["score", str(tiny_model_dir), "--adapter", str(missing), "--data", str(TEST_TSV), "--out",
            str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hubkit: error: adapter folder") and "\n" not in err and "hubkit tune" in err
    assert main(["generate", str(tiny_model_dir), "안녕", "--adapter", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

    from hubkit.demo import connect_engine

    with pytest.raises(InvalidRequestError, match="unset HUBKIT_ENDPOINT"):
        connect_engine(str(tiny_model_dir), endpoint="http://127.0.0.1:9", adapter=str(missing))


# ----------------------------------------------------------------------------------------------------
# transformers + peft, the reference
# ----------------------------------------------------------------------------------------------------


def test_transformers_backend_applies_the_soft_prompt(tf_adapter: Any, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from hubkit.backends.transformers import TransformersBackend, encode_pair

    assert tf_adapter.max_model_len == 512 - NUM_VIRTUAL_TOKENS
    reqs = _nsmc_requests(_rows(6))
    got = run(tf_adapter.loglikelihood(reqs))
    # By hand: the soft prompt's rows in front of the token embeddings, one plain forward pass.
    soft = torch.from_numpy(tf_adapter.adapter.embeddings)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for req, result in zip(reqs, got, strict=True):
        ctx, cont = encode_pair(tf_adapter.tokenizer, req.context, req.continuation)
        ids = torch.tensor(ctx + cont)
        with torch.inference_mode():
            embeds = torch.cat([soft, model.get_input_embeddings()(ids)])[None]
            lp = torch.log_softmax(model(inputs_embeds=embeds).logits[0].float(), -1)
        rows = lp[NUM_VIRTUAL_TOKENS + len(ctx) - 1 : -1]
        assert result.logprob == pytest.approx(
            float(rows.gather(-1, torch.tensor(cont)[:, None]).sum()), abs=1e-4
        )
    base = TransformersBackend(str(tiny_model_dir), dtype="float32")
    plain = run(base.loglikelihood(reqs))
    base.shutdown()
    # The soft prompt matters: otherwise the parity tests below could pass with it ignored.
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got, plain, strict=True)) > 0.5

    # PEFT misplaces the soft prompt in left-padded batches; the backend generates one by one.
    params = SamplingParams(temperature=0.0, max_tokens=6)
    batch = tf_adapter.generate_batch(list(PROMPTS), params)
    single = [run(tf_adapter.generate(p, params)) for p in PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in single]


# ----------------------------------------------------------------------------------------------------
# Slow: the vLLM engine with prompt embeddings
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vllm_scores_with_the_adapter_like_transformers_and_peft(vllm_adapter: Any, tf_adapter: Any) -> None:
    assert vllm_adapter.max_model_len == tf_adapter.max_model_len == 512 - NUM_VIRTUAL_TOKENS
    assert vllm_adapter.adapter == tf_adapter.adapter
    rows = _rows(23)
    reqs = _nsmc_requests(rows)  # 20 rows: 10 zero-shot, 10 three-shot; 4 continuations each
    reqs.append(_greedy_request(tf_adapter))
    reqs.append(LoglikelihoodRequest("문장: 좋다", " 아주 긴 연속 문장을 이어서 점수를 매긴다" * 3))
    reference = run(tf_adapter.loglikelihood(reqs))
    assert vllm_adapter.fast_scoring
    fast = run(vllm_adapter.loglikelihood(reqs))
    vllm_adapter.fast_scoring = False  # every request through vLLM's prompt log-probs
    try:
        slow = run(vllm_adapter.loglikelihood(reqs))
    finally:
        vllm_adapter.fast_scoring = True
    worst = max(abs(f.logprob - t.logprob) for f, t in zip(fast, reference, strict=True))
    worst_prompt = max(abs(s.logprob - t.logprob) for s, t in zip(slow, reference, strict=True))
    print(
        f"\n[adapter] {len(reqs)} pairs: max |Δ| vs transformers+peft {worst:.1e} (chains), {worst_prompt:.1e} (prompt)"
    )
    for req, f, s, t in zip(reqs, fast, slow, reference, strict=True):
        assert math.isfinite(f.logprob) and f.logprob < 0, req
        assert f.logprob == pytest.approx(t.logprob, abs=1e-3), req
        assert s.logprob == pytest.approx(t.logprob, abs=1e-3), req
        assert f.is_greedy == s.is_greedy == t.is_greedy, req
        assert f.num_tokens == s.num_tokens == t.num_tokens, req
    assert fast[-2].is_greedy and not all(f.is_greedy for f in fast)
    # Predictions (the likelier of " 부정" / " 긍정" per row) are the same on both engines.
    pick = [[int(r[i + 1].logprob > r[i].logprob) for i in range(0, 80, 4)] for r in (fast, reference)]
    assert pick[0] == pick[1]
    # Echo scoring (per-token prompt log-probs) reads past the soft prompt's positions too.
    ids = vllm_adapter.tokenizer.encode(reqs[0].context + reqs[0].continuation)
    echo_v = run(vllm_adapter.prompt_logprobs(ids, max_tokens=1))
    echo_t = run(tf_adapter.prompt_logprobs(ids, max_tokens=1))
    assert echo_v.token_ids == echo_t.token_ids and len(echo_v.logprobs) == len(ids) + 1
    assert echo_v.logprobs[1:] == pytest.approx(echo_t.logprobs[1:], abs=1e-3)


@pytest.mark.slow
def test_vllm_generates_with_the_adapter_like_transformers_and_peft(
    vllm_adapter: Any, tf_adapter: Any
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=12)
    for prompt in PROMPTS:
        want = run(tf_adapter.generate(prompt, params))
        got = run(vllm_adapter.generate(prompt, params))
        assert got.token_ids == want.token_ids, prompt
        assert got.prompt_tokens == want.prompt_tokens == len(vllm_adapter.tokenizer.encode(prompt))

        async def collect(prompt: str = prompt) -> tuple[int, ...]:
            ids: list[int] = []
            async for chunk in vllm_adapter.stream(prompt, params):
                ids += chunk.token_ids
            return tuple(ids)

        assert run(collect()) == want.token_ids, prompt
    # Bad input is still refused in one line, and the engine keeps serving: the soft prompt's positions
    # count against the context.
    too_long = "영화 " * 600
    with pytest.raises(InvalidRequestError, match="context is 504"):
        run(vllm_adapter.generate(too_long, params))
    assert (
        run(vllm_adapter.generate(PROMPTS[0], params)).token_ids
        == run(tf_adapter.generate(PROMPTS[0], params)).token_ids
    )


@pytest.mark.slow
def test_hubkit_score_with_an_adapter_end_to_end(
    tiny_model_dir: Path, adapter_dir: Path, tf_adapter: Any, tmp_path: Path
) -> None:
    import pandas as pd

    from hubkit.cli import main
    from hubkit.tasks import load_task

    out = tmp_path / "run"
    argv = ["score", str(tiny_model_dir), "--adapter", str(adapter_dir), "--task", "nsmc", "--data",
            str(TEST_TSV), "--limit", "20", "--out", str(out), "--backend", "vllm", "--dtype", "float32",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    frame = pd.read_parquet(out / "predictions.parquet").sort_values("row_id")
    assert len(frame) == 20 and frame["error"].isna().all()
    # The same rows scored by transformers + peft: the run's "text" is the rendered nsmc prompt.
    task = load_task("nsmc")
    reqs = [
        LoglikelihoodRequest(prompt, task.target_delimiter + choice)
        for prompt in frame["text"]
        for choice in task.choices
    ]
    reference = [r.logprob for r in run(tf_adapter.loglikelihood(reqs))]
    got = [float(v) for lls in frame["loglikelihoods"] for v in lls]
    assert got == pytest.approx(reference, abs=1e-3)
    adapter = load_prompt_adapter(adapter_dir)
    job = json.loads((out / "job.json").read_text(encoding="utf-8"))
    assert job["job"]["adapter"] == {"name": "soft-prompt", "sha256": adapter.sha256}
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["config"]["adapter"] == "soft-prompt"
    # The same folder without the adapter is another job: refused, not mixed in.
    assert main([a for a in argv if a not in ("--adapter", str(adapter_dir))]) == 2


@pytest.mark.slow
def test_the_sentiment_demo_engine_takes_an_adapter(
    tiny_model_dir: Path, adapter_dir: Path, tf_adapter: Any
) -> None:
    from hubkit.demo import classify_reviews, connect_engine, sentiment_requests

    reviews = [d for d, _ in _rows(4)]
    # The demo's own engine path (connect_engine -> EnginePool -> actor), on the cheap transformers backend.
    client = connect_engine(str(tiny_model_dir), backend="transformers", engine_options={"dtype": "float32"},
                            adapter=str(adapter_dir))  # fmt: skip
    try:
        assert client.label == f"{tiny_model_dir.name} + soft-prompt"
        assert client.pool.info()["adapter"] == str(adapter_dir.resolve())
        results = run(classify_reviews(client, reviews))
    finally:
        client.close()
    want = run(tf_adapter.loglikelihood(sentiment_requests(reviews)))
    got = [lp for r in results for lp in r.loglikelihoods]
    assert got == pytest.approx([w.logprob for w in want], abs=1e-4)


@pytest.mark.slow
def test_hubkit_serve_applies_the_adapter_over_http(
    tiny_model_dir: Path, adapter_dir: Path, tf_adapter: Any
) -> None:
    """`hubkit serve MODEL --adapter DIR`: HTTP scores and completions carry the soft prompt."""
    import socket

    import httpx
    import ray
    from ray import serve as ray_serve

    from hubkit.serving import serve, shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_was_up = ray.is_initialized()
    url = serve(str(tiny_model_dir), port=port, adapter=str(adapter_dir), engine_options={"dtype": "float32"},
                blocking=False, print_fn=lambda *a: None)  # fmt: skip
    try:
        reqs = _nsmc_requests(_rows(6))  # 3 rows scored (the last 3 are the shots), 12 pairs
        body = {"requests": [{"context": r.context, "continuation": r.continuation} for r in reqs]}
        response = httpx.post(f"{url}/v1/loglikelihood", json=body, timeout=120)
        assert response.status_code == 200, response.text
        reference = run(tf_adapter.loglikelihood(reqs))
        for got, want in zip(response.json()["data"], reference, strict=True):
            assert got["logprob"] == pytest.approx(want.logprob, abs=1e-3)
        # ... and they are not the bare model's scores: the soft prompt reached the engines.
        from hubkit.backends.transformers import TransformersBackend

        bare = TransformersBackend(str(tiny_model_dir), dtype="float32")
        plain = run(bare.loglikelihood(reqs))
        bare.shutdown()
        assert max(abs(p.logprob - w.logprob) for p, w in zip(plain, reference, strict=True)) > 1e-2
        body = {"prompt": "이 영화 정말", "max_tokens": 8, "temperature": 0}
        completion = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        expected = run(tf_adapter.generate("이 영화 정말", SamplingParams(temperature=0.0, max_tokens=8)))
        assert completion["choices"][0]["text"] == expected.text
    finally:
        shutdown()
        ray_serve.shutdown()
        if not ray_was_up:
            ray.shutdown()
