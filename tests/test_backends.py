"""The two engine backends: vLLM (default) against transformers (reference), on a tiny Korean GPT-NeoX.

One vLLM engine and one transformers model are shared by the whole module (both float32, so parity is
decided by kernels, not by dtype). Parity numbers are printed (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from hubkit.engine import Completion, Loglikelihood, LoglikelihoodRequest, SamplingParams
from hubkit.errors import InvalidRequestError, ModelNotFoundError

KOREAN_PROMPTS = [
    "오늘 본 영화는",
    "배우들의 연기가",
    "이 영화 정말",
    "스토리가 너무 지루해서",
    "감독의 다음 작품이 기대된다",
    "재미있는 영화",
]
GREEDY_24 = SamplingParams(temperature=0.0, max_tokens=24)
CHOICES = [" 재밌다", " 별로다", " 최고", " 긍정", " 부정"]
LL_CONTEXTS = ["이 영화 정말", "배우들의 연기가", "리뷰: 스토리가 너무 지루해서 감정은"]


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_backend(tiny_model_dir: Path):
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_dir: Path):
    from hubkit.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), dtype="float32")
    print(f"\n[vllm] engine start: {backend.start_seconds:.1f} s")
    yield backend
    backend.shutdown()


def test_engine_processes_run_intel_openmp(vllm_backend: Any) -> None:
    # hubkit preloads libiomp5 into the engine processes vLLM spawns (openmp_preload); this process
    # keeps its own environment.
    import psutil

    from hubkit.backends.vllm import intel_openmp, openmp_preload

    if intel_openmp() is None or openmp_preload() is None:
        pytest.skip("no libiomp5 in this environment, or the environment chose another OpenMP runtime")
    workers = [p for p in psutil.Process().children(recursive=True) if "Worker" in p.name()]
    assert workers
    for worker in workers:
        assert any("libiomp5" in m.path for m in worker.memory_maps()), worker.name()
    assert "libiomp5" not in os.environ.get("LD_PRELOAD", "")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny byte-level T5 (ByT5 tokenizer, random weights) saved as a model folder."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("t5-byte-tiny")
    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=4.0,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _greedy_pair(backend) -> tuple[str, str, int]:
    """A (context, continuation) whose continuation is exactly the model's greedy output.

    The continuation must re-tokenize (lm-eval style) into the generated tokens, which a byte-level
    BPE model does not guarantee when it emits half a Hangul syllable, so try a few contexts.
    """
    from hubkit.backends.transformers import encode_pair

    tok = backend.tokenizer
    for context in KOREAN_PROMPTS:
        (comp,) = backend.generate_batch([context], SamplingParams(temperature=0.0, max_tokens=6))
        ids = list(comp.token_ids)
        best = 0
        for k in range(1, len(ids) + 1):
            if encode_pair(tok, context, tok.decode(ids[:k]))[1] == ids[:k]:
                best = k
        if best >= 2:
            return context, tok.decode(ids[:best]), best
    raise AssertionError("no prompt has a greedy continuation that re-tokenizes to itself")


def _ll_requests(tf_backend) -> tuple[list[LoglikelihoodRequest], int]:
    """~20 (context, " choice") pairs, edge cases, and one greedy continuation (its index is returned)."""
    reqs = [LoglikelihoodRequest(c, x) for c in LL_CONTEXTS for x in CHOICES]
    reqs += [
        LoglikelihoodRequest("", "영화가 재밌다"),  # empty context: lm-eval's prefix token
        LoglikelihoodRequest("이 영화 정말 ", "최고"),  # trailing space moves onto the continuation
        LoglikelihoodRequest("질문: 이 리뷰는 긍정인가요?\n답:", " 네"),
    ]
    context, continuation, _ = _greedy_pair(tf_backend)
    reqs.append(LoglikelihoodRequest(context, continuation))
    return reqs, len(reqs) - 1


# ----------------------------------------------------------------------------------------------------
# Fast tests (no engine)
# ----------------------------------------------------------------------------------------------------


def test_auto_dtype_is_float32_on_a_cpu_without_native_bfloat16() -> None:
    import platform

    import torch

    from hubkit.backends.transformers import TransformersBackend
    from hubkit.engine import choose_dtype, cpu_has_native_bf16

    assert choose_dtype("auto", native_bf16=False) == "float32"
    assert choose_dtype("auto", native_bf16=True) == "auto"  # the backend's own choice
    assert choose_dtype("auto", device="cuda", native_bf16=False) == "auto"
    assert choose_dtype("bfloat16", native_bf16=False) == "bfloat16"  # asked for by name: kept
    assert choose_dtype("half") == "float16"
    with pytest.raises(InvalidRequestError, match="use auto, float32, bfloat16 or float16"):
        choose_dtype("int8")
    if platform.machine() in ("x86_64", "AMD64"):
        # torch's own CPU probe reads the same instructions off this machine.
        assert cpu_has_native_bf16() == torch.cpu._is_avx512_bf16_supported()
    backend = TransformersBackend("default")  # the shipped weights are bfloat16
    try:
        assert backend.dtype == ("bfloat16" if cpu_has_native_bf16() else "float32")
    finally:
        backend.shutdown()


def test_encode_pair_follows_lm_eval(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hubkit.backends.transformers import encode_pair

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ctx, cont = encode_pair(tok, "이 영화 정말 ", "최고")
    # The trailing space belongs to the continuation: same split as scoring "이 영화 정말" + " 최고".
    assert (ctx, cont) == encode_pair(tok, "이 영화 정말", " 최고")
    whole = tok.encode("이 영화 정말 최고", add_special_tokens=False)
    assert ctx + cont == whole
    assert encode_pair(tok, "", "영화")[0] == [tok.bos_token_id]
    with pytest.raises(InvalidRequestError, match="continuation"):
        encode_pair(tok, "영화", "")


def test_encode_pairs_batches_to_the_same_ids_as_encode_pair(tiny_model_dir: Path) -> None:
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from hubkit.backends.transformers import _joins_at_word_starts, encode_pair, encode_pairs
    from hubkit.models import resolve_model

    eos = "<|endoftext|>"
    pairs = [(c, x) for c in KOREAN_PROMPTS for x in CHOICES]
    pairs += [("", "영화가 재밌다"), ("이 영화 정말 ", "최고"), ("배우들의 연기가  \n", " 좋다")]
    pairs += [(eos + "문장: 좋다 긍부정:", " 긍정"), (eos, "영화"), ("   ", " 별로"), ("영화", eos + " 끝")]
    pairs += [
        (eos, " 영화"),
        ("영화" + eos, " 끝"),
        ("점수: 10", " 점"),
        ("ㅋㅋㅋ", " ㅋㅋ"),
        ("최고!", " !!"),
    ]
    for folder in (tiny_model_dir, resolve_model("default")):
        tok = AutoTokenizer.from_pretrained(folder)
        # The GPT-2 style tokenizers encode a continuation that starts a word on its own.
        assert _joins_at_word_starts(tok, pairs)
        assert encode_pairs(tok, pairs) == [encode_pair(tok, c, x) for c, x in pairs]
    # A normalizer could change text across the boundary: lm-eval's way (encode the whole string).
    tok.backend_tokenizer.normalizer = normalizers.Replace(" 좋", "좋")
    assert not _joins_at_word_starts(tok, pairs)
    assert encode_pairs(tok, pairs) == [encode_pair(tok, c, x) for c, x in pairs]
    # A tokenizer with truncation of its own takes transformers' call (which switches it off), so a
    # long context is not cut short either.
    tok.backend_tokenizer.enable_truncation(3)
    batched = encode_pairs(tok, pairs)
    assert max(len(ctx) for ctx, _ in batched) > 3
    assert batched == [encode_pair(tok, c, x) for c, x in pairs]
    with pytest.raises(InvalidRequestError, match="continuation"):
        encode_pairs(tok, [("영화", " 좋다"), ("영화", "")])


def test_text_assembler_holds_back_stop_prefixes_and_partial_characters(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from hubkit.backends.transformers import TextAssembler

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode("영화가 정말 재밌다. 또 보고 싶다", add_special_tokens=False)
    asm = TextAssembler(tok, ["재밌다"], {tok.eos_token_id})
    deltas = [asm.add(i) for i in ids]
    deltas.append(asm.finish())
    assert "".join(deltas) == asm.text == "영화가 정말 "
    assert asm.finish_reason == "stop"
    assert all("\ufffd" not in d for d in deltas)

    asm = TextAssembler(tok, [], {tok.eos_token_id})
    text = "".join(asm.add(i) for i in [*ids, tok.eos_token_id, ids[0]])
    assert text + asm.finish() == "영화가 정말 재밌다. 또 보고 싶다"
    assert asm.finish_reason == "stop" and asm.token_ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("backend", ["vllm", "transformers"])
def test_unloadable_models_fail_before_any_engine_starts(backend: str, tmp_path: Path) -> None:
    from hubkit.engine import load_backend

    cases = {
        str(tmp_path / "does-not-exist"): "not found",
        str(tmp_path): "config.json",  # exists, but is not a model folder
        "nobody-xyz/no-such-model": "hf download",  # a Hub id that is not in the (offline) cache
    }
    for model, hint in cases.items():
        started = time.perf_counter()
        with pytest.raises(ModelNotFoundError, match=hint) as info:
            load_backend(model, backend=backend)
        assert "\n" not in str(info.value)
        assert time.perf_counter() - started < 60  # no engine was spawned


def test_vllm_refuses_seq2seq_naming_the_transformers_backend(t5_dir: Path) -> None:
    from hubkit.backends.vllm import VLLMBackend

    with pytest.raises(ModelNotFoundError, match="backend='transformers'"):
        VLLMBackend(str(t5_dir))


def test_t5_byte_model_generates_and_scores(t5_dir: Path) -> None:
    import torch
    import torch.nn.functional as F

    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(t5_dir), dtype="float32")
    try:
        assert backend.seq2seq
        params = SamplingParams(temperature=0.0, max_tokens=12)
        comp = run(backend.generate("안녕하세요 영화", params))
        assert isinstance(comp, Completion)
        assert 1 <= comp.completion_tokens <= 12
        assert comp.prompt_tokens == len("안녕하세요 영화".encode()) + 1  # bytes + </s>
        chunks = run(_collect(backend.stream("안녕하세요 영화", params)))
        assert "".join(c.delta for c in chunks) == comp.text
        assert backend.generate_batch(["안녕하세요 영화", "재밌다"], params)[0] == comp

        reqs = [LoglikelihoodRequest("이 영화는", " 최고"), LoglikelihoodRequest("", "좋다")]
        got = run(backend.loglikelihood(reqs))
        # Reference: encoder gets the context (+</s>), decoder is teacher-forced on the continuation.
        tok, model = backend.tokenizer, backend._hf
        for req, result in zip(reqs, got, strict=True):
            ctx = tok.encode(req.context) if req.context else [tok.eos_token_id]
            cont = tok.encode(req.continuation, add_special_tokens=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ctx]), labels=torch.tensor([cont])).logits
            lp = F.log_softmax(logits[0].float(), dim=-1)
            expected = float(lp.gather(-1, torch.tensor(cont).unsqueeze(-1)).sum())
            assert result.num_tokens == len(cont)
            assert result.logprob == pytest.approx(expected, abs=1e-4)
            assert result.is_greedy == bool((lp.argmax(-1) == torch.tensor(cont)).all())
            assert result.logprob < 0
        # Greedy decoding's own output scores as greedy.
        target = list(comp.token_ids)
        if target[-1] == tok.eos_token_id:
            target = target[:-1]
        text = tok.decode(target)
        if target and tok.encode(text, add_special_tokens=False) == target:
            (greedy,) = run(backend.loglikelihood([LoglikelihoodRequest("안녕하세요 영화", text)]))
            assert greedy.is_greedy
    finally:
        backend.shutdown()


def test_transformers_keeps_the_event_loop_responsive(tf_backend) -> None:
    async def scenario() -> tuple[int, Completion]:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        comp = await tf_backend.generate("오늘 본 영화는", SamplingParams(temperature=0.0, max_tokens=64))
        done.set()
        await task
        return ticks, comp

    ticks, comp = run(scenario())
    assert comp.completion_tokens == 64
    assert ticks > 10


def test_transformers_batched_generate_matches_one_by_one(tf_backend) -> None:
    batch = tf_backend.generate_batch(KOREAN_PROMPTS, GREEDY_24)
    singles = [run(tf_backend.generate(p, GREEDY_24)) for p in KOREAN_PROMPTS]
    assert [c.token_ids for c in batch] == [c.token_ids for c in singles]
    assert [c.prompt_tokens for c in batch] == [len(tf_backend.tokenizer.encode(p)) for p in KOREAN_PROMPTS]


async def _collect(stream):
    return [chunk async for chunk in stream]


# ----------------------------------------------------------------------------------------------------
# vLLM against transformers
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_greedy_generation_matches_transformers_token_for_token(vllm_backend, tf_backend) -> None:
    async def concurrently() -> list[Completion]:
        # Issued together, so vLLM batches them: batching must not change greedy output.
        return await asyncio.gather(*(vllm_backend.generate(p, GREEDY_24) for p in KOREAN_PROMPTS))

    from_vllm = run(concurrently())
    from_tf = tf_backend.generate_batch(KOREAN_PROMPTS, GREEDY_24)
    same_text = 0
    for prompt, v, t in zip(KOREAN_PROMPTS, from_vllm, from_tf, strict=True):
        assert v.token_ids == t.token_ids, prompt
        # Same text, except that vLLM's incremental detokenizer withholds a tail that never becomes
        # valid UTF-8 (a random model's half syllables), where transformers prints U+FFFD.
        assert t.text.startswith(v.text), prompt
        assert v.text == t.text or "\ufffd" in t.text[len(v.text) :], prompt
        same_text += v.text == t.text
        assert (v.prompt_tokens, v.finish_reason) == (t.prompt_tokens, t.finish_reason)
        assert v.completion_tokens == 24 or v.finish_reason == "stop"
    print(f"\n[parity] greedy: {len(KOREAN_PROMPTS)} prompts token-identical, {same_text} text-identical")
    assert same_text >= 1
    # One at a time gives the same as batched.
    assert run(vllm_backend.generate(KOREAN_PROMPTS[0], GREEDY_24)) == from_vllm[0]
    # ... and so does the list form (one hop to the engine loop for all prompts).
    assert run(vllm_backend.generate_many(KOREAN_PROMPTS, GREEDY_24)) == from_vllm
    with pytest.raises(InvalidRequestError, match="empty"):
        run(vllm_backend.generate_many([KOREAN_PROMPTS[0], ""], GREEDY_24))


@pytest.mark.slow
def test_loglikelihoods_match_transformers(vllm_backend, tf_backend) -> None:
    reqs, greedy_index = _ll_requests(tf_backend)
    from_vllm = run(vllm_backend.loglikelihood(reqs))
    from_tf = run(tf_backend.loglikelihood(reqs))
    assert len(from_vllm) == len(from_tf) == len(reqs) >= 18
    deltas = [abs(v.logprob - t.logprob) for v, t in zip(from_vllm, from_tf, strict=True)]
    print(f"\n[parity] {len(reqs)} pairs, max |Δ logprob| = {max(deltas):.2e} nats")
    for req, v, t, d in zip(reqs, from_vllm, from_tf, deltas, strict=True):
        assert isinstance(v, Loglikelihood) and math.isfinite(v.logprob) and v.logprob < 0, req
        assert d < 1e-3, (req, v, t)
        assert v.is_greedy == t.is_greedy, req
        assert v.num_tokens == t.num_tokens >= 1, req
    assert from_vllm[greedy_index].is_greedy and from_tf[greedy_index].is_greedy
    assert sum(r.is_greedy for r in from_tf) < len(reqs)  # the check can say no, too
    # Scores do not depend on what else is in the batch.
    assert run(vllm_backend.loglikelihood(reqs[:1]))[0].logprob == pytest.approx(
        from_vllm[0].logprob, abs=1e-5
    )
    # Order is the request order even though transformers scores longest-first.
    assert [r.num_tokens for r in from_tf] == [
        len(tf_backend.tokenizer.encode((r.context + r.continuation), add_special_tokens=False))
        - len(tf_backend.tokenizer.encode(r.context.rstrip(), add_special_tokens=False))
        if r.context
        else len(tf_backend.tokenizer.encode(r.continuation, add_special_tokens=False))
        for r in reqs
    ]


def _lm_eval_loglikelihoods(model_dir: Path, reqs: list[LoglikelihoodRequest], **hflm_args) -> list:
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=8, **hflm_args)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=(r.context, r.continuation), idx=i)
        for i, r in enumerate(reqs)
    ]
    return lm.loglikelihood(instances, disable_tqdm=True)


@pytest.mark.slow
def test_loglikelihoods_match_lm_eval(vllm_backend, tf_backend, tiny_model_dir: Path) -> None:
    reqs, greedy_index = _ll_requests(tf_backend)
    expected = _lm_eval_loglikelihoods(tiny_model_dir, reqs)
    assert expected[greedy_index][1]
    for backend in (tf_backend, vllm_backend):
        got = run(backend.loglikelihood(reqs))
        worst = max(abs(r.logprob - lp) for (lp, _), r in zip(expected, got, strict=True))
        print(f"\n[parity] {backend.name} vs lm_eval HFLM: max |Δ logprob| = {worst:.2e} nats")
        for req, (logprob, is_greedy), result in zip(reqs, expected, got, strict=True):
            assert result.logprob == pytest.approx(logprob, abs=1e-3), req
            assert result.is_greedy == is_greedy, req


def test_t5_scores_match_lm_eval(t5_dir: Path) -> None:
    from hubkit.backends.transformers import TransformersBackend

    reqs = [
        LoglikelihoodRequest("이 영화는", " 최고"),
        LoglikelihoodRequest("리뷰: 재밌다 ", "긍정"),
        LoglikelihoodRequest("", "좋다"),
    ]
    expected = _lm_eval_loglikelihoods(t5_dir, reqs, backend="seq2seq")
    backend = TransformersBackend(str(t5_dir), dtype="float32")
    try:
        got = run(backend.loglikelihood(reqs))
    finally:
        backend.shutdown()
    for req, (logprob, is_greedy), result in zip(reqs, expected, got, strict=True):
        assert result.logprob == pytest.approx(logprob, abs=1e-4), req
        assert result.is_greedy == is_greedy, req


@pytest.mark.slow
def test_long_inputs_are_truncated_from_the_left(vllm_backend, tf_backend) -> None:
    long_context = " ".join(["영화가 정말 재밌고 배우들의 연기도 좋았다"] * 80)
    assert len(tf_backend.tokenizer.encode(long_context)) > vllm_backend.max_model_len
    reqs = [LoglikelihoodRequest(long_context, " 최고")]
    (v,) = run(vllm_backend.loglikelihood(reqs))
    (t,) = run(tf_backend.loglikelihood(reqs))
    # Windows differ by a token or two at the far left (vLLM must leave room for one output token),
    # which a 512-token-back context barely moves.
    assert v.num_tokens == t.num_tokens
    assert math.isfinite(v.logprob) and math.isfinite(t.logprob)
    assert abs(v.logprob - t.logprob) < 0.5


@pytest.mark.slow
def test_streaming_deltas_join_to_the_full_text(vllm_backend, tf_backend) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=20)
    for backend in (vllm_backend, tf_backend):
        full = run(backend.generate(KOREAN_PROMPTS[0], params))
        chunks = run(_collect(backend.stream(KOREAN_PROMPTS[0], params)))
        assert "".join(c.delta for c in chunks) == full.text, backend.name
        assert sum((c.token_ids for c in chunks), ()) == full.token_ids, backend.name
        assert chunks[-1].finish_reason == full.finish_reason
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert len(chunks) > 3


def test_text_decoded_once_equals_vllms_incremental_detokenizer(vllm_backend) -> None:
    # Final-only requests without stop strings skip vLLM's per-step detokenizer; hubkit decodes the
    # finished tokens once. Sampled, past end-of-text, so the outputs hold special tokens, spaces and
    # Hangul split across byte-level tokens: the texts must still equal vLLM's own, character for character.
    from vllm.sampling_params import RequestOutputKind

    from hubkit.backends.vllm import _to_vllm

    prompts = [f"{p} {i}" for i in range(3) for p in KOREAN_PROMPTS]
    params = SamplingParams(temperature=1.3, max_tokens=24, seed=7, ignore_eos=True)
    ours = run(vllm_backend.generate_many(prompts, params))
    assert [run(vllm_backend.generate(p, params)) for p in prompts[:4]] == ours[:4]
    theirs = []
    for prompt in prompts:
        ids = vllm_backend._prepare(prompt, params)
        sampling = _to_vllm(params, RequestOutputKind.FINAL_ONLY, detokenize=True)
        theirs.append(run(vllm_backend._call(vllm_backend._final_output(ids, prompt, sampling))).outputs[0])
    assert [c.token_ids for c in ours] == [tuple(o.token_ids) for o in theirs]
    assert [c.text for c in ours] == [o.text for o in theirs]
    assert len({c.text for c in ours}) > len(prompts) // 2  # varied outputs, not one string


@pytest.mark.slow
def test_stop_strings_cut_the_text_in_both_backends(vllm_backend, tf_backend) -> None:
    prompt = "이 영화는 배우들의"
    free = run(tf_backend.generate(prompt, GREEDY_24)).text
    # A stop string from the middle of the greedy text, without replacement characters.
    stop = next(
        free[i : i + 2]
        for i in range(3, len(free) - 2)
        if "\ufffd" not in free[i : i + 2] and free[i : i + 2].strip() == free[i : i + 2]
    )
    params = SamplingParams(temperature=0.0, max_tokens=24, stop=(stop,))
    results = {}
    for backend in (vllm_backend, tf_backend):
        comp = run(backend.generate(prompt, params))
        streamed = run(_collect(backend.stream(prompt, params)))
        assert comp.finish_reason == "stop" and stop not in comp.text
        assert free.startswith(comp.text) and len(comp.text) == free.index(stop)
        assert "".join(c.delta for c in streamed) == comp.text
        assert streamed[-1].finish_reason == "stop"
        results[backend.name] = comp
    assert results["vllm"].text == results["transformers"].text


@pytest.mark.slow
def test_seed_makes_sampling_reproducible(vllm_backend, tf_backend) -> None:
    async def twice(backend, params):
        return await asyncio.gather(backend.generate("영화", params), backend.generate("영화", params))

    for backend in (vllm_backend, tf_backend):
        draws = {}
        for seed in (1, 2, 3):
            params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=seed)
            first, second = run(twice(backend, params))
            assert first.token_ids == second.token_ids, backend.name
            draws[seed] = first.token_ids
        assert len(set(draws.values())) > 1, backend.name  # and the seed matters


@pytest.mark.slow
def test_many_concurrent_requests_from_one_event_loop(vllm_backend) -> None:
    async def scenario():
        gens = [
            vllm_backend.generate(f"{p} {i}", SamplingParams(temperature=0.0, max_tokens=8))
            for i in range(4)
            for p in KOREAN_PROMPTS
        ]
        lls = [vllm_backend.loglikelihood([LoglikelihoodRequest(p, " 최고")]) for p in KOREAN_PROMPTS]
        started = time.perf_counter()
        results = await asyncio.gather(*gens, *lls)
        return results, time.perf_counter() - started

    results, seconds = run(scenario())
    comps = results[: 4 * len(KOREAN_PROMPTS)]
    assert all(isinstance(c, Completion) and c.completion_tokens == 8 for c in comps)
    assert all(len(r) == 1 and r[0].logprob < 0 for r in results[len(comps) :])
    print(f"\n[vllm] {len(results)} concurrent requests in {seconds:.2f} s")


@pytest.mark.slow
def test_closing_a_stream_early_aborts_and_the_engine_goes_on(vllm_backend, tf_backend) -> None:
    async def take_two(backend):
        stream = backend.stream("오늘 본 영화는", SamplingParams(temperature=0.0, max_tokens=200))
        got = []
        async for chunk in stream:
            got.append(chunk)
            if len(got) == 2:
                break
        await stream.aclose()
        return got

    for backend in (vllm_backend, tf_backend):
        assert len(run(take_two(backend))) == 2
        assert (
            run(backend.generate("영화", SamplingParams(temperature=0.0, max_tokens=4))).completion_tokens
            == 4
        )


BAD_REQUESTS = [
    ("", {}, "prompt is empty"),
    ("   ", {}, "prompt is empty"),
    ("영화 " * 700, {}, "shorten the prompt"),
    ("영화", {"max_tokens": 0}, "max_tokens must be a positive integer"),
    ("영화", {"max_tokens": 100_000}, "above this model's limit"),
    ("영화", {"max_tokens": 512}, "lower max_tokens"),
    ("영화", {"temperature": -1.0}, "temperature must be >= 0"),
    ("영화", {"top_p": 0.0}, "top_p"),
]


@pytest.mark.parametrize("fixture", [pytest.param("vllm_backend", marks=pytest.mark.slow), "tf_backend"])
def test_bad_requests_are_refused_and_the_engine_keeps_serving(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    backend = request.getfixturevalue(fixture)
    good = SamplingParams(temperature=0.0, max_tokens=4)
    expected = run(backend.generate("오늘 본 영화는", good))
    for prompt, overrides, hint in BAD_REQUESTS:
        params = SamplingParams(**{"temperature": 0.0, "max_tokens": 4, **overrides})
        with pytest.raises(InvalidRequestError, match=hint) as info:
            run(backend.generate(prompt, params))
        assert "\n" not in str(info.value)
        with pytest.raises(InvalidRequestError, match=hint):
            backend.stream(prompt, params)  # refused before anything is sent
        assert run(backend.generate("오늘 본 영화는", good)) == expected
    for bad in ([("영화", "")], [("영화",)], "영화", [(1, " 최고")]):
        with pytest.raises(InvalidRequestError):
            run(backend.loglikelihood(bad))
    assert run(backend.loglikelihood([("영화", " 최고")]))[0].logprob < 0
    assert run(backend.generate("오늘 본 영화는", good)) == expected


@pytest.mark.slow
def test_loading_by_hub_id_from_an_offline_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tf_backend
) -> None:
    import huggingface_hub.constants

    from hubkit.backends.transformers import TransformersBackend
    from hubkit.backends.vllm import VLLMBackend

    cache = tmp_path / "hub"
    revision = hashlib.sha1(b"hubkit/tiny").hexdigest()
    repo = cache / "models--hubkit--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    # The env reaches vLLM's engine process; the constants are what this process already imported.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    expected = run(tf_backend.generate(KOREAN_PROMPTS[1], GREEDY_24))
    by_id = TransformersBackend("hubkit/tiny", dtype="float32")
    try:
        assert by_id.model == "hubkit/tiny"
        assert run(by_id.generate(KOREAN_PROMPTS[1], GREEDY_24)) == expected
    finally:
        by_id.shutdown()
    engine = VLLMBackend("hubkit/tiny", dtype="float32")
    try:
        print(f"\n[vllm] engine start (Hub id): {engine.start_seconds:.1f} s")
        assert run(engine.generate(KOREAN_PROMPTS[1], GREEDY_24)).token_ids == expected.token_ids
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_prompt_logprobs_agree_between_backends_and_with_loglikelihood(vllm_backend, tf_backend) -> None:
    """The optional echo verb (OpenAI's legacy ``echo`` + ``logprobs``) behind ``hubkit serve``."""
    from hubkit.backends.transformers import encode_pair

    tok = tf_backend.tokenizer
    context, continuation = LL_CONTEXTS[2], CHOICES[0]
    ctx, cont = encode_pair(tok, context, continuation)
    ids = ctx + cont
    got = {b.name: run(b.prompt_logprobs(ids, top=3, max_tokens=1)) for b in (vllm_backend, tf_backend)}
    v, t = got["vllm"], got["transformers"]
    for r in (v, t):
        assert r.num_prompt_tokens == len(ids) and list(r.token_ids[: len(ids)]) == ids
        assert len(r.token_ids) == len(r.logprobs) == len(r.top_logprobs) == len(ids) + 1
        assert r.logprobs[0] is None and r.top_logprobs[0] is None
        for token, logprob, top in zip(r.token_ids[1:], r.logprobs[1:], r.top_logprobs[1:], strict=True):
            assert top[token] == logprob and 3 <= len(top) <= 4 and logprob <= max(top.values())
        # The extra token is the greedy one: what greedy generation starts with.
        assert r.logprobs[-1] == max(r.top_logprobs[-1].values())
    first = run(tf_backend.generate(context + continuation, SamplingParams(temperature=0.0, max_tokens=1)))
    assert v.token_ids[-1] == t.token_ids[-1] == first.token_ids[0]
    worst = max(abs(a - b) for a, b in zip(v.logprobs[1:], t.logprobs[1:], strict=True))
    print(f"\n[parity] prompt log-probs, vllm vs transformers: max |Δ| = {worst:.2e} nats")
    assert worst < 1e-3
    # Summed over the continuation: the loglikelihood verb's number.
    (ll,) = run(tf_backend.loglikelihood([LoglikelihoodRequest(context, continuation)]))
    for r in (v, t):
        assert sum(r.logprobs[len(ctx) :][: len(cont)]) == pytest.approx(ll.logprob, abs=1e-3)
    assert len(run(vllm_backend.prompt_logprobs(ids, top=0, max_tokens=0)).token_ids) == len(ids)

    for bad, message in [
        ({"token_ids": [1, 10**7]}, "out of this model's vocabulary"),
        ({"token_ids": []}, "non-empty list"),
        ({"token_ids": ids, "top": 21}, "from 0 to 20"),
        ({"token_ids": ids, "max_tokens": 2}, "max_tokens must be 0 or 1"),
        ({"token_ids": [5] * tf_backend.max_model_len}, "shorten the prompt"),
    ]:
        for backend in (vllm_backend, tf_backend):
            with pytest.raises(InvalidRequestError, match=message):
                run(backend.prompt_logprobs(**bad))
    assert run(vllm_backend.prompt_logprobs(ids, top=1)).logprobs[1:] == pytest.approx(
        v.logprobs[1:-1], abs=1e-5
    )


# ----------------------------------------------------------------------------------------------------
# hubkit's native GPT-NeoX for vLLM (hubkit/backends/vllm_neox.py)
# ----------------------------------------------------------------------------------------------------

_RESOLVE = """
import json, vllm
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.model_executor.models import ModelRegistry
cls = ModelRegistry._try_load_model_cls("GPTNeoXForCausalLM")
print(json.dumps(cls.__module__ + ":" + cls.__name__))
"""


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["native", "transformers"])
def test_vllm_resolves_gpt_neox_to_hubkits_native_model(choice: str) -> None:
    """vLLM's plugin hook registers hubkit's GPT-NeoX in a fresh process; the env var opts out."""
    import json
    import os
    import subprocess
    import sys

    env = os.environ | {"HUBKIT_VLLM_NEOX": choice}
    out = subprocess.run(
        [sys.executable, "-c", _RESOLVE], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    resolved = json.loads(out.stdout.strip().splitlines()[-1])
    if choice == "native":
        assert resolved == "hubkit.backends.vllm_neox:GPTNeoXForCausalLM"
    else:
        assert resolved.startswith("vllm.") and "Transformers" in resolved


@pytest.mark.slow
def test_native_neox_variants_match_transformers(tmp_path: Path) -> None:
    """The other GPT-NeoX layouts the checkpoints use: sequential residual, tied head, quarter rotary."""
    from conftest import build_tiny_neox

    from hubkit.backends.transformers import TransformersBackend
    from hubkit.backends.vllm import VLLMBackend

    model = build_tiny_neox(
        tmp_path / "variant", seed=1, use_parallel_residual=False, tie_word_embeddings=True, rotary_pct=0.25
    )
    tf = TransformersBackend(str(model), dtype="float32")
    vl = VLLMBackend(str(model), dtype="float32")
    try:
        ids = tf.tokenizer.encode("리뷰: 스토리가 너무 지루해서 감정은 별로다", add_special_tokens=False)
        got = [run(b.prompt_logprobs(ids, top=0, max_tokens=1)) for b in (vl, tf)]
        worst = max(abs(a - b) for a, b in zip(got[0].logprobs[1:], got[1].logprobs[1:], strict=True))
        print(f"\n[parity] native NeoX variant: max |Δ logprob| = {worst:.2e} nats over {len(ids)} tokens")
        assert worst < 1e-3 and len(ids) >= 8
        greedy = [run(b.generate(KOREAN_PROMPTS[1], GREEDY_24)).token_ids for b in (vl, tf)]
        assert list(greedy[0]) == list(greedy[1]) and len(greedy[0]) >= 1
    finally:
        vl.shutdown()
        tf.shutdown()
