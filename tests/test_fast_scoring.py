"""The vLLM backend's fast scoring path: how requests are planned, and that it is exact.

The plan tests need no engine. The engine tests score the same requests through the fast path and
through vLLM's prompt log-probs (lm-eval's way, ``fast_scoring=False``) and against transformers.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest

from hubkit.backends.vllm import Chain, plan_scoring
from hubkit.engine import LoglikelihoodRequest

CTX = tuple(range(100, 140))  # a 40-token context
REVIEWS = Path(__file__).parent / "data" / "ko_reviews_sample.txt"


def plan(*continuations: list[int], context: tuple[int, ...] = CTX, **options):
    inputs = [(list(context) + list(c), len(context)) for c in continuations]
    return plan_scoring(
        inputs, **({"block_size": 32, "prefix_caching": True, "max_model_len": 2048} | options)
    )


# ----------------------------------------------------------------------------------------------------
# Planning (no engine)
# ----------------------------------------------------------------------------------------------------


def test_choices_of_a_question_are_one_request() -> None:
    # " 부정" (one token) and " 긍정" (two tokens) after the same prompt: one request prefills the
    # context, reads both first tokens there, then generates " 긍정"'s first token (forced) to read its
    # second, and finally reports the greedy token it overrode at the context (two tokens are read there).
    p = plan([10], [11, 12])
    assert p.chains == (Chain(CTX, (11,), (10, 11, 12), report=(0,)),)
    assert p.steps == {0: ((0, 0),), 1: ((0, 0), (0, 1))}
    assert p.num_requests == 1 and p.prompt_logprobs == ()


def test_branching_continuations_get_one_chain_per_branch() -> None:
    p = plan([1, 2, 3], [1, 2, 4], [1, 5, 6], [7])
    # Heavy path first: context -> 1 -> (1, 2); the branch at (1, 5) starts from its full prefix,
    # which the prefix cache serves up to the last whole KV block.
    assert p.chains == (Chain(CTX, (1, 2), (1, 7, 2, 5, 3, 4), (0, 1)), Chain(CTX + (1, 5), (), (6,)))
    assert p.steps[0] == p.steps[1] == ((0, 0), (0, 1), (0, 2))
    assert p.steps[2] == ((0, 0), (0, 1), (1, 0))
    assert p.steps[3] == ((0, 0),)


def test_without_greedy_flags_chains_skip_their_reports() -> None:
    # greedy=False (how `hubkit score` asks): the same reads, one decode step fewer per branching node.
    with_flags, without = plan([10], [11, 12]), plan([10], [11, 12], greedy=False)
    assert without.chains == (Chain(CTX, (11,), (10, 11, 12), report=()),)
    assert without.steps == with_flags.steps


def test_a_single_choice_needs_no_greedy_reports() -> None:
    # Only the forced token is read at each forced step, so its rank says whether it is greedy.
    assert plan([1, 2, 3]).chains == (Chain(CTX, (1, 2), (1, 2, 3), ()),)


def test_without_forcing_every_prefix_is_a_request() -> None:
    p = plan([10], [11, 12], forcing=False)
    assert p.chains == (Chain(CTX, (), (10, 11)), Chain(CTX + (11,), (), (12,)))
    assert p.steps == {0: ((0, 0),), 1: ((0, 0), (1, 0))}


def test_separate_contexts_are_planned_separately() -> None:
    inputs = [([1, 2, 3, 9], 3), ([1, 2, 4, 9], 3), ([1, 2, 3, 8], 3)]
    p = plan_scoring(inputs, block_size=32, prefix_caching=True, max_model_len=64)
    assert p.chains == (Chain((1, 2, 3), (), (9, 8)), Chain((1, 2, 4), (), (9,)))
    assert p.steps == {0: ((0, 0),), 2: ((0, 0),), 1: ((1, 0),)}


def test_more_than_128_next_tokens_are_split_over_requests() -> None:
    p = plan(*[[t] for t in range(300)])
    assert [len(c.targets) for c in p.chains] == [128, 128, 44]
    assert all(p.steps[t] == ((t // 128, 0),) for t in range(300))
    assert p.num_requests == 3


def test_chains_fit_the_context_window() -> None:
    p = plan(*[[t, 1, 2, 3, 4, 5, 6] for t in range(100, 130)], max_model_len=50)
    assert p.prompt_logprobs == ()
    assert all(len(c.prompt) + 2 * len(c.forced) + 1 <= 50 for c in p.chains)
    assert max(len(c.forced) for c in p.chains) >= 2  # still walks down several tokens per request


def test_long_continuations_fall_back_to_prompt_logprobs() -> None:
    # Two decode steps per token would cost more than one prompt-logprobs pass over a short context.
    assert plan(list(range(60)), context=(1, 2, 3, 4, 5)).prompt_logprobs == (0,)
    # Behind a long context, computing the context once still wins.
    assert plan(list(range(20)), list(range(1, 21)), context=tuple(range(400))).prompt_logprobs == ()


def test_fast_path_off_sends_everything_through_prompt_logprobs() -> None:
    p = plan([10], [11, 12], fast_path=False)
    assert p.chains == () and p.prompt_logprobs == (0, 1) and p.num_requests == 2


def test_forcing_processor_walks_down_then_reports_the_argmax_it_overrode() -> None:
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate

    from hubkit.backends.vllm_forced import FORCED_TOKENS_ARG, REPORT_STEPS_ARG, ForcedTokens

    forced, report = [5, 6], [0]
    params = SamplingParams(
        max_tokens=4, temperature=0.0, extra_args={FORCED_TOKENS_ARG: forced, REPORT_STEPS_ARG: report}
    )
    ForcedTokens.validate_params(params)
    with pytest.raises(ValueError, match="max_tokens=4"):
        ForcedTokens.validate_params(SamplingParams(max_tokens=3, extra_args=params.extra_args))
    proc = ForcedTokens(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    output: list[int] = []
    plain = SamplingParams(max_tokens=4, temperature=0.0)  # another request in the batch: untouched
    proc.update_state(
        BatchUpdate(
            batch_size=2, removed=[], added=[(0, plain, None, []), (1, params, None, output)], moved=[]
        )
    )
    # Raw argmax per step: 2, 3, 4, 7; the request gets 5, 6 (forced), 4 (free), then 2 (reported).
    expected = [5, 6, 4, 2]
    for step, argmax in enumerate([2, 3, 4, 7]):
        logits = torch.zeros(2, 10)
        logits[:, argmax] = 1.0
        out = proc.apply(logits)
        assert int(out[0].argmax()) == argmax and torch.isfinite(out[0]).all()
        assert int(out[1].argmax()) == expected[step]
        output.append(int(out[1].argmax()))
    assert output == expected
    proc.update_state(BatchUpdate(batch_size=1, removed=[1], added=[], moved=[]))
    assert not proc.rows


# ----------------------------------------------------------------------------------------------------
# Exactness on a real engine
# ----------------------------------------------------------------------------------------------------


def run(coro):
    return asyncio.run(coro)


def test_engines_without_prompt_logprobs_plan_chains_only() -> None:
    # The long continuation that falls back to prompt log-probs above walks down a chain instead.
    p = plan(list(range(60)), context=(1, 2, 3, 4, 5), prompt_logprobs=False)
    assert p.prompt_logprobs == () and p.chains and p.steps[0]


@pytest.fixture(scope="module")
def vllm_backend(tiny_model_dir: Path):
    from hubkit.backends.vllm import VLLMBackend

    backend = VLLMBackend(str(tiny_model_dir), dtype="float32")
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def tf_backend(tiny_model_dir: Path):
    from hubkit.backends.transformers import TransformersBackend

    backend = TransformersBackend(str(tiny_model_dir), dtype="float32")
    yield backend
    backend.shutdown()


def _nsmc_like_requests() -> list[LoglikelihoodRequest]:
    """0-shot and 3-shot sentiment prompts over real reviews, with one- and multi-token choices."""
    reviews = [ln.strip() for ln in REVIEWS.read_text(encoding="utf-8").splitlines() if ln.strip()][:30]
    reqs = []
    for i, review in enumerate(reviews[6:]):
        shots = "".join(
            f"문장: {r} 긍부정: {'긍정' if k % 2 else '부정'}\n\n" for k, r in enumerate(reviews[:6])
        )
        context = (shots if i % 2 else "") + f"문장: {review} 긍부정:"
        reqs += [LoglikelihoodRequest(context, c) for c in (" 부정", " 긍정", " 재밌다", " 재미없다")]
    return reqs


def _single_token_continuations(tokenizer, context: str, n: int) -> list[str]:
    from hubkit.backends.transformers import encode_pair
    from hubkit.errors import InvalidRequestError

    out = []
    for token_id in range(2, len(tokenizer)):
        text = tokenizer.decode([token_id])
        if not text.strip() or "\ufffd" in text:
            continue
        try:
            if encode_pair(tokenizer, context, text)[1] == [token_id]:
                out.append(text)
        except InvalidRequestError:
            continue
        if len(out) == n:
            break
    return out


def _greedy_request(backend) -> LoglikelihoodRequest:
    """A continuation that is exactly the engine's greedy output (and re-tokenizes to it)."""
    from hubkit.backends.transformers import encode_pair
    from hubkit.engine import SamplingParams

    tok = backend.tokenizer
    for context in ("오늘 본 영화는", "배우들의 연기가", "이 영화 정말", "재미있는 영화"):
        ids = list(run(backend.generate(context, SamplingParams(temperature=0.0, max_tokens=4))).token_ids)
        for k in range(len(ids), 1, -1):
            if encode_pair(tok, context, tok.decode(ids[:k]))[1] == ids[:k]:
                return LoglikelihoodRequest(context, tok.decode(ids[:k]))
    raise AssertionError("no greedy continuation re-tokenizes to itself")


@pytest.mark.slow
def test_fast_path_equals_prompt_logprobs_and_transformers(vllm_backend, tf_backend) -> None:
    singles = _single_token_continuations(vllm_backend.tokenizer, "리뷰: 영화", 140)
    assert len(singles) == 140
    reqs = _nsmc_like_requests()
    reqs += [LoglikelihoodRequest("리뷰: 영화", s) for s in singles]  # > 128 tokens after one prefix
    reqs += [LoglikelihoodRequest("리뷰: 영화", s + " 좋다") for s in singles[:20]]
    reqs += [
        LoglikelihoodRequest("", "영화가 재밌다"),
        LoglikelihoodRequest("이 영화 정말 ", "최고"),
        LoglikelihoodRequest("문장: 좋다", " 아주 긴 연속 문장을 이어서 점수를 매긴다" * 4),  # prompt path
    ]
    greedy = _greedy_request(vllm_backend)
    # Beside a sibling choice, the argmax the forcing overrode is reported; alone (below), the forced
    # tokens' ranks say it is greedy.
    reqs += [LoglikelihoodRequest(greedy.context, " 최고"), greedy]
    assert vllm_backend.fast_scoring
    fast = run(vllm_backend.loglikelihood(reqs))
    vllm_backend.fast_scoring = False
    try:
        slow = run(vllm_backend.loglikelihood(reqs))
    finally:
        vllm_backend.fast_scoring = True
    reference = run(tf_backend.loglikelihood(reqs))
    worst_engine = max(abs(f.logprob - s.logprob) for f, s in zip(fast, slow, strict=True))
    worst_tf = max(abs(f.logprob - t.logprob) for f, t in zip(fast, reference, strict=True))
    print(
        f"\n[fast scoring] {len(reqs)} pairs: max |Δ| vs prompt_logprobs {worst_engine:.1e}, vs transformers {worst_tf:.1e}"
    )
    for req, f, s, t in zip(reqs, fast, slow, reference, strict=True):
        assert math.isfinite(f.logprob) and f.logprob < 0, req
        assert f.logprob == pytest.approx(s.logprob, abs=1e-5), req
        assert f.logprob == pytest.approx(t.logprob, abs=1e-3), req
        assert f.is_greedy == s.is_greedy == t.is_greedy, req
        assert f.num_tokens == s.num_tokens == t.num_tokens, req
    assert fast[-1].is_greedy and not all(f.is_greedy for f in fast)
    (alone,) = run(vllm_backend.loglikelihood([greedy]))
    assert alone.is_greedy and alone.logprob == pytest.approx(fast[-1].logprob, abs=1e-5)
    # Without greedy flags: the same log-probs, is_greedy left out, on both backends.
    for backend, expected in ((vllm_backend, fast), (tf_backend, reference)):
        bare = run(backend.loglikelihood(reqs, greedy=False))
        assert [b.is_greedy for b in bare] == [None] * len(reqs)
        assert [b.num_tokens for b in bare] == [e.num_tokens for e in expected]
        assert max(abs(b.logprob - e.logprob) for b, e in zip(bare, expected, strict=True)) < 1e-5


@pytest.mark.slow
def test_a_cancelled_scoring_call_leaves_the_engine_serving(vllm_backend) -> None:
    reqs = _nsmc_like_requests()
    expected = run(vllm_backend.loglikelihood(reqs[:8]))

    async def cancel_midway() -> None:
        # Many distinct contexts (sessions included), so the call is still running when cancelled.
        many = [LoglikelihoodRequest(f"{r.context} {i}", r.continuation) for i in range(25) for r in reqs]
        task = asyncio.ensure_future(vllm_backend.loglikelihood(many))
        await asyncio.sleep(0.5)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(cancel_midway())
    again = run(vllm_backend.loglikelihood(reqs[:8]))
    assert [r.logprob for r in again] == pytest.approx([r.logprob for r in expected], abs=1e-5)
    assert [r.is_greedy for r in again] == [r.is_greedy for r in expected]


def _count_mlp_rows(worker) -> None:
    """Runs in vLLM's worker: counts the rows the first and the last layer's MLP compute per step."""
    model = worker.get_model()
    model.hubkit_rows = []
    layers = model.gpt_neox.layers

    def first(module, args, output):
        model.hubkit_rows.append([args[0].shape[0], None])

    def last(module, args, output):
        model.hubkit_rows[-1][1] = args[0].shape[0]

    layers[0].mlp.register_forward_hook(first)
    layers[-1].mlp.register_forward_hook(last)


def _read_mlp_rows(worker) -> list:
    return worker.get_model().hubkit_rows


@pytest.mark.slow
def test_without_prompt_logprobs_the_last_layer_skips_unread_positions(
    vllm_backend, tiny_model_dir: Path, monkeypatch
) -> None:
    from hubkit.backends.vllm import VLLMBackend
    from hubkit.engine import SamplingParams
    from hubkit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="drop prompt_logprobs=False"):
        VLLMBackend(str(tiny_model_dir), fast_scoring=False, prompt_logprobs=False)
    # The hooks travel to vLLM's worker as pickled functions.
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    lean = VLLMBackend(str(tiny_model_dir), dtype="float32", prompt_logprobs=False)
    try:
        engine = lean._require_engine()
        lean._loop.submit(engine.collective_rpc(_count_mlp_rows)).result()
        reqs = _nsmc_like_requests()
        reqs += [
            LoglikelihoodRequest(
                "문장: 좋다", " 아주 긴 연속 문장을 이어서 점수를 매긴다" * 4
            ),  # a chain now
            LoglikelihoodRequest("", "영화가 재밌다"),
        ]
        reqs.append(_greedy_request(vllm_backend))
        got = run(lean.loglikelihood(reqs))
        want = run(vllm_backend.loglikelihood(reqs))
        for req, g, w in zip(reqs, got, want, strict=True):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-5), req
            assert (g.is_greedy, g.num_tokens) == (w.is_greedy, w.num_tokens), req
        greedy = SamplingParams(temperature=0.0, max_tokens=12)
        assert (
            run(lean.generate("이 영화 정말", greedy)).token_ids
            == run(vllm_backend.generate("이 영화 정말", greedy)).token_ids
        )
        (rows,) = lean._loop.submit(engine.collective_rpc(_read_mlp_rows)).result()
        # Prefill steps finish the last layer at one position per request; decode steps at all.
        assert rows and all(last is not None and last <= first for first, last in rows)
        assert any(first >= 4 * last for first, last in rows), rows
        with pytest.raises(InvalidRequestError, match="prompt_logprobs=False"):
            run(lean.prompt_logprobs([5, 6, 7]))
        lean.fast_scoring = False
        with pytest.raises(InvalidRequestError, match="switch fast_scoring back on"):
            run(lean.loglikelihood(reqs[:2]))
    finally:
        lean.shutdown()
