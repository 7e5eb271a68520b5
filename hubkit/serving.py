"""``hubkit serve``: an OpenAI-compatible HTTP API on Ray Serve in front of an EnginePool.

Layout: one Ray Serve ingress replica (``num_cpus=0``: it only parses HTTP and tokenizes) owns an
:class:`~hubkit.pool.EnginePool`, whose engine actors do the work. The FastAPI app is built by
:func:`build_app` from any pool-like object, so it can be tested and reused outside Serve.

Endpoints:

* ``GET /health`` — 200 when the pool has live engine actors, else 503.
* ``GET /v1/models`` — the one served model.
* ``POST /v1/completions`` — ``prompt`` (string or list of strings), ``max_tokens``, ``temperature``,
  ``top_p``, ``top_k`` (extension), ``stop``, ``seed``, ``n=1``, ``stream`` (SSE, ending ``data: [DONE]``),
  ``stream_options.include_usage``.
* ``POST /v1/chat/completions`` — for models whose tokenizer has a chat template (applied with the
  tokenizer); streaming too. A model without a template answers 400.
* ``POST /v1/completions`` with ``echo: true, logprobs: N`` and ``max_tokens`` 0 or 1 — OpenAI's legacy
  scoring form, the one lm-evaluation-harness's ``local-completions`` model sends: each choice's
  ``logprobs`` holds ``tokens``, ``token_logprobs`` (None for the first prompt token), ``top_logprobs`` and
  ``text_offset`` for the prompt's tokens (plus the greedy next token with ``max_tokens: 1``). The prompt
  may be text or token ids (a list of ints, or a list of such lists). ``echo`` without ``logprobs``
  returns the prompt in front of the generated text.
* ``POST /v1/loglikelihood`` — hubkit's own scoring route, the pool's ``loglikelihood`` verb (lm-eval's
  definition, the exact fast path): ``{"model", "requests": [{"context", "continuation"}, ...]}`` answers
  ``{"object": "list", "model", "data": [{"index", "logprob", "is_greedy", "num_tokens"}, ...]}``.

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for requests a client
can fix, 404 for an unknown model name, 500 for engine failures. Request bodies are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from hubkit.engine import (
    MAX_TOP_LOGPROBS,
    Completion,
    CompletionChunk,
    Loglikelihood,
    LoglikelihoodRequest,
    PromptLogprobs,
    SamplingParams,
    check_prompt,
    check_prompt_length,
)
from hubkit.errors import EngineError, HubkitError, InvalidRequestError

if TYPE_CHECKING:
    from hubkit.pool import EnginePool

logger = logging.getLogger(__name__)

#: Name of the Ray Serve application (and of its ingress deployment).
APP_NAME = "hubkit"
#: OpenAI's default ``max_tokens`` for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 16
#: Chat replies default to the rest of the context, capped so a CPU engine does not run for minutes.
DEFAULT_CHAT_MAX_TOKENS = 512
#: Requests one ingress replica accepts at once; the engines batch them (Serve's default of 5 is for
#: request-per-replica models, not for a proxy in front of continuous-batching engines).
MAX_ONGOING_REQUESTS = 256

#: Most (context, continuation) pairs one ``/v1/loglikelihood`` call takes.
MAX_LOGLIKELIHOOD_REQUESTS = 4096

# Request fields we accept for compatibility but cannot honour: set to anything but these values -> 400.
# (/v1/completions declares its own ``echo`` and ``logprobs``; these entries apply to chat.)
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "response_format": (None, {"type": "text"}),
}
_PARAM_NAMES = (
    "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "logprobs",
    "requests",
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Request schemas (responses are plain dicts in OpenAI's format)


class _StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    # Unknown fields are kept (not rejected) so newer OpenAI clients keep working; see _UNSUPPORTED.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    # vLLM's extension (benchmarks use it so every request yields exactly max_tokens tokens).
    ignore_eos: bool = False


class CompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/completions``."""

    # Checked by hand so token-id prompts get a clear message instead of pydantic's union error.
    prompt: Any = None
    echo: bool | None = None
    # Checked by hand: pydantic would turn ``true`` into 1.
    logprobs: Any = None


class LoglikelihoodPair(BaseModel):
    """One (context, continuation) pair of ``POST /v1/loglikelihood``."""

    model_config = ConfigDict(extra="forbid")

    context: str
    continuation: str


class LoglikelihoodBody(BaseModel):
    """Body of ``POST /v1/loglikelihood``."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    requests: list[LoglikelihoodPair]


class ChatMessage(BaseModel):
    """One chat turn. ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# ----------------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape


class _APIError(Exception):
    """An error with an HTTP status, rendered as OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_


def _error_body(
    message: str, *, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    return JSONResponse(_error_body(message, **kwargs), status_code=status)


def _root_cause(exc: BaseException) -> BaseException:
    # Errors raised inside Ray actors arrive as RayTaskError subclasses whose str() holds a remote
    # traceback; the original exception is kept in ``.cause``.
    cause = getattr(exc, "cause", None)
    return _root_cause(cause) if isinstance(cause, BaseException) and cause is not exc else exc


def _one_line(exc: BaseException) -> str:
    text = str(_root_cause(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _guess_param(message: str) -> str | None:
    # hubkit's messages start with the offending field ("max_tokens=9999 is above ...").
    head = message.split(" ", 1)[0].split("=", 1)[0].strip("():,")
    return head if head in _PARAM_NAMES else None


def _invalid(exc: BaseException) -> _APIError:
    message = _one_line(exc)
    return _APIError(400, message, param=_guess_param(message))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return "request body is not valid JSON; send a JSON object", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if param is None and loc:
            param = loc[0]
        # Only pydantic's message and the field path: never echo the submitted values back into logs.
        where = ".".join(loc) or "body"
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(parts) or "invalid request body; send a JSON object", param


# ----------------------------------------------------------------------------------------------------------
# The app


def load_tokenizer(model: str) -> Any:
    """Loads the model's tokenizer (for prompt lengths, usage counts and chat templates)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def build_app(
    pool: EnginePool, *, served_model_name: str, tokenizer: Any = None, aliases: Sequence[str] = ()
) -> FastAPI:
    """Builds the OpenAI-compatible FastAPI app in front of ``pool``.

    Args:
        pool: An EnginePool (only ``agenerate``, ``astream``, ``aloglikelihood``, ``aprompt_logprobs``,
            ``info``, ``model`` and ``max_model_len`` are used, all from the event loop).
        served_model_name: The name clients send as ``model`` and see in ``/v1/models``.
        tokenizer: The model's Hugging Face tokenizer; loaded from ``pool.model`` when None.
        aliases: Other accepted ``model`` values (e.g. the model's folder path).

    Returns:
        A FastAPI app; mount it anywhere or wrap it in Ray Serve (see :func:`serve`).
    """
    tok = tokenizer if tokenizer is not None else load_tokenizer(pool.model)
    max_model_len = int(pool.max_model_len)
    accepted_names = {served_model_name, *aliases}
    started = int(time.time())
    app = FastAPI(title="hubkit", version="1", docs_url="/docs", redoc_url=None)

    # --- error handlers: OpenAI's shape, one line, no tracebacks for user errors -----------------------

    @app.exception_handler(_APIError)
    async def _api_error(_: Request, exc: _APIError) -> JSONResponse:
        return _error_response(exc.status, exc.message, type_=exc.type, param=exc.param, code=exc.code)

    @app.exception_handler(InvalidRequestError)
    async def _invalid_request(_: Request, exc: InvalidRequestError) -> JSONResponse:
        err = _invalid(exc)
        return _error_response(400, err.message, param=err.param)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path}; see /docs for the endpoints"
        return _error_response(exc.status_code, message, type_=type_)

    @app.exception_handler(HubkitError)
    async def _hubkit_error(_: Request, exc: HubkitError) -> JSONResponse:
        # EngineError and friends: already one line (the pool unwraps Ray's wrappers), no traceback needed.
        return _error_response(500, f"engine error: {_one_line(exc)}", type_="server_error")

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        # An engine or server failure, not the client's fault: keep the traceback in the server log
        # (it holds no request body) and give the client one line.
        if isinstance(_root_cause(exc), InvalidRequestError):
            err = _invalid(exc)
            return _error_response(400, err.message, param=err.param)
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return _error_response(500, f"engine error: {_one_line(exc)}", type_="server_error")

    # --- helpers ------------------------------------------------------------------------------------

    def check_model(name: str | None) -> str:
        if name is not None and name not in accepted_names:
            raise _APIError(
                404,
                f"The model `{name}` does not exist; this server serves `{served_model_name}` "
                "(see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return served_model_name

    def count_tokens(text: str) -> int:
        # The same tokenizer (and special-token handling) vLLM applies to a text prompt.
        return len(tok(text)["input_ids"])

    def check_supported(req: _SamplingRequest) -> None:
        extra = req.model_extra or {}
        for name, allowed in _UNSUPPORTED.items():
            if name in extra and extra[name] not in allowed:
                raise _APIError(
                    400, f"{name} is not supported by this server; remove it from the request", param=name
                )
        if req.n not in (None, 1):
            raise _APIError(
                400, f"n={req.n} is not supported; only n=1 (send several requests instead)", param="n"
            )

    def sampling(req: _SamplingRequest, *, max_tokens: int) -> SamplingParams:
        check_supported(req)
        stop = req.stop if req.stop is not None else ()
        params = SamplingParams(
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if req.top_k in (None, 0) else req.top_k,
            max_tokens=max_tokens,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            seed=req.seed,
            ignore_eos=req.ignore_eos,
        )
        return params.validate(max_tokens_limit=max_model_len)

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def first_then_rest(prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Starts a stream and waits for its first chunk, so request errors surface before the 200."""
        it = aiter(pool.astream(prompt, params))
        try:
            first = await anext(it)
        except StopAsyncIteration:
            return _empty()
        return _chain(first, it)

    def sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except Exception as exc:  # the 200 is already sent: report in-band, as OpenAI does
                if isinstance(_root_cause(exc), InvalidRequestError):
                    err = _invalid(exc)
                    yield f"data: {json.dumps(_error_body(err.message, param=err.param))}\n\n"
                else:
                    logger.error("stream failed", exc_info=exc)
                    yield f"data: {json.dumps(_error_body(f'engine error: {_one_line(exc)}', type_='server_error'))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # --- routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            info = await asyncio.to_thread(pool.info)
        except Exception as exc:
            return _error_response(503, f"engine pool unavailable: {_one_line(exc)}", type_="server_error")
        alive = _alive_actors(info)
        body = {
            "status": "ok" if alive else "unavailable",
            "model": served_model_name,
            "alive_actors": alive,
            "pool": info,
        }
        return JSONResponse(json.loads(json.dumps(body, default=str)), status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": served_model_name,
                    "object": "model",
                    "created": started,
                    "owned_by": "hubkit",
                    "max_model_len": max_model_len,
                }
            ],
        }

    def token_text(token_id: int) -> str:
        return tok.decode([token_id])

    def logprobs_block(result: PromptLogprobs) -> dict[str, Any]:
        tokens = [token_text(t) for t in result.token_ids]
        tops: list[dict[str, float] | None] = []
        for alternatives in result.top_logprobs:
            if alternatives is None:
                tops.append(None)
                continue
            by_text: dict[str, float] = {}
            for token_id, logprob in alternatives.items():
                # Two ids can decode to the same text (say, halves of one Korean syllable both show as
                # U+FFFD): keep the larger log-prob, so max(values) stays the position's greedy log-prob.
                text = token_text(token_id)
                by_text[text] = max(logprob, by_text.get(text, -math.inf))
            tops.append(by_text)
        offsets, at = [], 0
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": list(result.logprobs),
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    async def score_prompts(req: CompletionRequest, model: str) -> dict[str, Any]:
        """``echo`` + ``logprobs``: the prompts' per-token log-probs (OpenAI's legacy scoring form)."""
        check_supported(req)
        top = req.logprobs
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _APIError(
                400,
                f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}",
                param="logprobs",
            )
        if req.max_tokens not in (0, 1):
            raise _APIError(
                400,
                "max_tokens must be 0 (the prompt only) or 1 when scoring a prompt with echo and logprobs, "
                f"got {req.max_tokens!r}",
                param="max_tokens",
            )
        if req.max_tokens == 1 and req.temperature not in (None, 0):
            raise _APIError(
                400, "the token generated after a scored prompt is greedy; set temperature to 0",
                param="temperature",
            )  # fmt: skip
        if req.stream:
            raise _APIError(400, "echo with logprobs cannot be streamed; send stream=false", param="stream")
        prompts = _token_prompts(req.prompt, tok)
        results: list[PromptLogprobs] = await asyncio.gather(
            *(pool.aprompt_logprobs(ids, top=top, max_tokens=req.max_tokens) for ids, _ in prompts)
        )
        choices = []
        for i, ((ids, text), result) in enumerate(zip(prompts, results, strict=True)):
            generated = result.token_ids[result.num_prompt_tokens :]
            choices.append(
                {
                    "index": i,
                    "text": (text if text is not None else tok.decode(ids)) + tok.decode(list(generated)),
                    "logprobs": logprobs_block(result),
                    "finish_reason": "length",
                }
            )
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage(sum(len(ids) for ids, _ in prompts), req.max_tokens * len(prompts)),
        }

    @app.post("/v1/loglikelihood")
    async def loglikelihood(body: LoglikelihoodBody) -> dict[str, Any]:
        model = check_model(body.model)
        if not body.requests:
            raise _APIError(
                400, "requests is empty; send at least one {\"context\": ..., \"continuation\": ...}",
                param="requests",
            )  # fmt: skip
        if len(body.requests) > MAX_LOGLIKELIHOOD_REQUESTS:
            raise _APIError(
                400,
                f"requests holds {len(body.requests)} pairs; send at most {MAX_LOGLIKELIHOOD_REQUESTS} per call",
                param="requests",
            )
        results = await pool.aloglikelihood(
            [LoglikelihoodRequest(r.context, r.continuation) for r in body.requests]
        )
        return {
            "object": "list",
            "model": model,
            "data": [
                {"index": i, "logprob": r.logprob, "is_greedy": r.is_greedy, "num_tokens": r.num_tokens}
                for i, r in enumerate(results)
            ],
        }

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse | JSONResponse:
        model = check_model(req.model)
        if req.logprobs is not None and req.logprobs is not False:
            if not req.echo:
                raise _APIError(
                    400,
                    "logprobs is only supported for scoring a prompt: send echo=true with max_tokens 0 or 1 "
                    "(or drop logprobs to generate)",
                    param="logprobs",
                )
            return await score_prompts(req, model)
        if req.echo and req.stream:
            raise _APIError(400, "echo cannot be streamed; send stream=false", param="stream")
        prompts = _prompts(req.prompt)
        if req.echo and req.max_tokens == 0:
            # Nothing to generate: the prompt itself is the answer (OpenAI's echo with max_tokens=0).
            check_supported(req)
            counts = [count_tokens(p) for p in prompts]
            return {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": i, "text": p, "logprobs": None, "finish_reason": "length"}
                    for i, p in enumerate(prompts)
                ],
                "usage": usage(sum(counts), 0),
            }
        params = sampling(
            req, max_tokens=DEFAULT_COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        )
        prompt_tokens = [count_tokens(p) for p in prompts]
        for n in prompt_tokens:
            check_prompt_length(n, params, max_model_len)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first_stream = await first_then_rest(prompts[0], params)

            async def events() -> AsyncIterator[dict[str, Any]]:
                generated = 0
                for index, prompt in enumerate(prompts):
                    chunks = first_stream if index == 0 else pool.astream(prompt, params)
                    async for chunk in chunks:
                        generated += len(chunk.token_ids)
                        if chunk.delta or chunk.finish_reason:
                            yield {
                                "id": rid,
                                "object": "text_completion",
                                "created": created,
                                "model": model,
                                "choices": [
                                    {
                                        "index": index,
                                        "text": chunk.delta,
                                        "logprobs": None,
                                        "finish_reason": chunk.finish_reason,
                                    }
                                ],
                            }
                if include_usage:
                    yield {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(sum(prompt_tokens), generated),
                    }

            return sse(events())

        results: list[Completion] = await asyncio.gather(*(pool.agenerate(p, params) for p in prompts))
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": i,
                    "text": (prompts[i] if req.echo else "") + c.text,
                    "logprobs": None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(results)
            ],
            "usage": usage(
                sum(c.prompt_tokens or n for c, n in zip(results, prompt_tokens, strict=True)),
                sum(c.completion_tokens for c in results),
            ),
        }

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        req: ChatCompletionRequest,
    ) -> dict[str, Any] | StreamingResponse | JSONResponse:
        model = check_model(req.model)
        prompt = _render_chat(tok, req.messages, served_model_name)
        n_prompt = count_tokens(prompt)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested is None:
            # Like vLLM: the rest of the context, capped for CPU engines; an overlong prompt fails below.
            requested = max(1, min(DEFAULT_CHAT_MAX_TOKENS, max_model_len - n_prompt))
        params = sampling(req, max_tokens=requested)
        check_prompt_length(n_prompt, params, max_model_len)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = await first_then_rest(prompt, params)

            def event(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
                    ],
                }

            async def events() -> AsyncIterator[dict[str, Any]]:
                generated, finish = 0, None
                yield event({"role": "assistant", "content": ""})
                async for chunk in chunks:
                    generated += len(chunk.token_ids)
                    finish = chunk.finish_reason or finish
                    if chunk.delta:
                        yield event({"content": chunk.delta})
                yield event({}, finish or "stop")
                if include_usage:
                    yield {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage(n_prompt, generated),
                    }

            return sse(events())

        result = await pool.agenerate(prompt, params)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": result.finish_reason,
                }
            ],
            "usage": usage(result.prompt_tokens or n_prompt, result.completion_tokens),
        }

    return app


async def _empty() -> AsyncIterator[CompletionChunk]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _chain(
    first: CompletionChunk, rest: AsyncIterator[CompletionChunk]
) -> AsyncIterator[CompletionChunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        # A client that disconnects cancels us: close the pool's stream so the engine aborts the request.
        close = getattr(rest, "aclose", None)
        if close is not None:
            await close()


def _prompts(prompt: object) -> list[str]:
    if isinstance(prompt, str):
        return [check_prompt(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [check_prompt(p) for p in prompt]
    if prompt is None or prompt == []:
        raise _APIError(
            400, "prompt is missing; send a string (or a list of strings) to continue", param="prompt"
        )
    raise _APIError(
        400, "prompt must be a string or a list of strings (token ids are not supported)", param="prompt"
    )


def _token_prompts(prompt: object, tokenizer: Any) -> list[tuple[list[int], str | None]]:
    """Prompts to score as (token ids, text or None): text, a list of texts, token ids or lists of them."""
    if isinstance(prompt, str) or (
        isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
    ):
        # Tokenized as vLLM tokenizes a text prompt (the tokenizer's own special tokens).
        return [(list(tokenizer(p)["input_ids"]), p) for p in _prompts(prompt)]

    def is_ids(value: object) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if is_ids(prompt) and prompt:
        return [(list(prompt), None)]  # type: ignore[arg-type]
    if isinstance(prompt, list) and prompt and all(is_ids(p) and p for p in prompt):
        return [(list(p), None) for p in prompt]
    if prompt is None or prompt == [] or prompt == [[]]:
        raise _APIError(400, "prompt is missing; send the text (or token ids) to score", param="prompt")
    raise _APIError(
        400,
        "prompt must be a string, a list of strings, a list of token ids or a list of such lists",
        param="prompt",
    )


def _render_chat(tokenizer: Any, messages: Sequence[ChatMessage], served_model_name: str) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise _APIError(
            400,
            f"model `{served_model_name}` has no chat template in its tokenizer_config.json; "
            "use /v1/completions with a plain prompt instead",
            param="messages",
        )
    if not messages:
        raise _APIError(
            400, "messages is empty; send at least one {'role': 'user', 'content': ...}", param="messages"
        )
    conversation = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts = [part.get("text") for part in m.content if part.get("type") == "text"]
            if len(texts) != len(m.content) or not all(isinstance(t, str) for t in texts):
                raise _APIError(
                    400, f"messages[{i}].content: only text parts are supported", param="messages"
                )
            content = "".join(texts)
        else:
            content = m.content or ""
        conversation.append({"role": m.role, "content": content})
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # templates raise to reject e.g. non-alternating roles
        raise _APIError(
            400, f"messages rejected by the model's chat template: {exc}", param="messages"
        ) from exc
    if not isinstance(text, str) or not text.strip():
        raise _APIError(400, "the chat template rendered an empty prompt; check messages", param="messages")
    return text


def _alive_actors(info: dict[str, Any]) -> int:
    """Number of live engine actors in ``EnginePool.info()``."""
    for key in ("alive", "alive_actors", "live_actors", "healthy"):
        value = info.get(key)
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        if isinstance(value, list | tuple):
            return len(value)
    actors = info.get("actors")
    if isinstance(actors, list | tuple):
        return sum(1 for a in actors if not isinstance(a, dict) or a.get("alive", True))
    return int(info.get("replicas", 0) or 0)


# ----------------------------------------------------------------------------------------------------------
# Ray Serve deployment


class HubkitServer:
    """The Serve ingress: owns the EnginePool (created in the constructor) and the FastAPI app.

    Besides HTTP, a Serve handle can call :meth:`generate` directly
    (``serve.get_app_handle("hubkit").generate.remote(prompt, params)``).
    """

    async def __init__(
        self,
        model: str,
        *,
        backend: str,
        replicas: int,
        engine_options: dict[str, Any] | None,
        served_model_name: str,
        adapter: str | None = None,
    ) -> None:
        from hubkit.pool import EnginePool

        # The pool constructor blocks until its actors hold loaded engines; keep the replica's event
        # loop free meanwhile.
        self._pool = await asyncio.to_thread(
            EnginePool,
            model,
            backend=backend,
            replicas=replicas,
            engine_options=engine_options,
            adapter=adapter,
        )
        self._tokenizer = await asyncio.to_thread(load_tokenizer, model)
        self._served_model_name = served_model_name
        self._model = model

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(
            self._pool,
            served_model_name=self._served_model_name,
            tokenizer=self._tokenizer,
            aliases=(self._model,),
        )

    async def generate(self, prompt: str, params: SamplingParams) -> Completion:
        """Generates one completion with the server's pool (for Serve handles, bypassing HTTP)."""
        return await self._pool.agenerate(prompt, params)

    async def loglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Scores (context, continuation) pairs with the server's pool (for Serve handles, bypassing HTTP)."""
        return await self._pool.aloglikelihood(requests)

    def __del__(self) -> None:
        pool = self.__dict__.get("_pool")
        if pool is not None:
            self.__dict__.pop("_pool")
            pool.shutdown()


def _deployment(*, max_ongoing_requests: int = MAX_ONGOING_REQUESTS) -> Any:
    from ray import serve as ray_serve

    ingress = ray_serve.ingress()(HubkitServer)
    return ray_serve.deployment(
        name=APP_NAME,
        num_replicas=1,
        # The ingress only parses HTTP and tokenizes; CPUs go to the engine actors.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max_ongoing_requests,
        # A pool that fails to start (bad model, out of memory) will fail again: don't retry 3 times.
        max_constructor_retry_count=1,
        graceful_shutdown_timeout_s=30,
    )(ingress)


def default_served_model_name(model: str) -> str:
    """The folder name for a local model, the Hub id otherwise."""
    from pathlib import Path

    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InvalidRequestError(
                f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port"
            ) from exc


def _serve_running() -> bool:
    from ray import serve as ray_serve

    status = ray_serve.status()  # empty, not an error, when Serve was never started on this cluster
    return bool(status.proxies or status.applications)


def serve(
    model: str,
    *,
    backend: str = "auto",
    replicas: int = 1,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    engine_options: dict[str, Any] | None = None,
    adapter: str | None = None,
    blocking: bool = True,
    print_fn: Callable[..., None] = print,
) -> str:
    """Serves ``model`` over an OpenAI-compatible HTTP API on Ray Serve.

    Args:
        model: A resolved model folder or Hub id (see :func:`hubkit.models.resolve_model`).
        backend: Engine backend: "auto" (transformers for encoder-decoders such as byte-level T5, vLLM
            otherwise), "vllm" or "transformers".
        replicas: Number of engine actors behind the one HTTP ingress.
        address: Ray cluster address; None uses $RAY_ADDRESS or starts a local Ray.
        host: Interface the HTTP proxy listens on.
        port: HTTP port.
        served_model_name: Name clients put in ``model``; default: the folder name (or the Hub id).
        engine_options: Extra backend options (e.g. ``{"dtype": "float32"}``).
        adapter: A PEFT prompt-tuning folder (``hubkit tune``) every engine applies: its soft prompt
            goes before every prompt the API receives, for completions, chat and log-likelihoods.
        blocking: Wait until Ctrl-C, then delete the app and disconnect; False returns once serving.
        print_fn: Where the URL and example command are printed.

    Returns:
        The base URL, e.g. ``http://127.0.0.1:8000`` (the OpenAI base URL is that plus ``/v1``).

    Raises:
        InvalidRequestError: the port is taken, or the backend cannot run the model (vllm on a T5).
        EngineError: the deployment failed to start (its first error line is in the message).
    """
    import ray
    from ray import serve as ray_serve

    from hubkit.engine import choose_backend
    from hubkit.pool import connect

    backend = choose_backend(model, backend)  # vllm asked for a T5 fails here, before Serve starts
    if adapter is not None:  # a bad adapter fails here in one line, and actors get an absolute path
        from hubkit.adapters import load_prompt_adapter

        adapter = load_prompt_adapter(adapter).path
    name = served_model_name or default_served_model_name(model)
    connect(address)
    # On a local Ray the proxy binds here, so a taken port can be reported now instead of as a proxy
    # that never comes up. (A remote cluster's proxy binds on its head node: nothing to check here.)
    if address is None and not os.environ.get("RAY_ADDRESS") and not _serve_running():
        _check_port_free(host, port)
    ray_serve.start(http_options={"host": host, "port": port})
    t0 = time.perf_counter()
    app = _deployment().bind(
        model,
        backend=backend,
        replicas=replicas,
        engine_options=engine_options,
        served_model_name=name,
        adapter=adapter,
    )
    with _sigterm_as_interrupt():
        try:
            ray_serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:
            shutdown()  # a deployment that failed to start must not linger (and retry) on the cluster
            raise EngineError(
                f"the server failed to start: {_one_line(exc)}; see the Ray logs above"
            ) from exc
        except KeyboardInterrupt:
            shutdown()
            raise
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        url = f"http://{shown_host}:{port}"
        example = json.dumps({"model": name, "prompt": "안녕하세요", "max_tokens": 32}, ensure_ascii=False)
        print_fn(
            f"hubkit: serving {name} ({backend}, {replicas} engine actor(s)) at {url}/v1 "
            f"(ready in {time.perf_counter() - t0:.1f} s)"
        )
        print_fn(f"  curl {url}/v1/completions -H 'Content-Type: application/json' -d '{example}'")
        if not blocking:
            return url
        print_fn("  press Ctrl-C to stop")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            print_fn("hubkit: shutting down")
        finally:
            shutdown()
            ray.shutdown()
    return url


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treats SIGTERM (docker stop, kill, systemd) like Ctrl-C, so the engines are shut down cleanly.

    SIGINT too: a process started in the background by a non-interactive shell (``cmd &`` in a script, CI)
    inherits SIGINT as ignored, and Python then never raises KeyboardInterrupt, so Ctrl-C or ``kill -INT``
    would leave the server running.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def shutdown() -> None:
    """Deletes the hubkit Serve application (its replica shuts its engine pool down)."""
    from ray import serve as ray_serve

    try:
        ray_serve.delete(APP_NAME)
    except Exception as exc:  # already gone, or Ray is down: nothing left to stop
        logger.debug("serve.delete(%s) failed: %s", APP_NAME, exc)


__all__ = [
    "APP_NAME",
    "ChatCompletionRequest",
    "CompletionRequest",
    "HubkitServer",
    "LoglikelihoodBody",
    "LoglikelihoodPair",
    "build_app",
    "default_served_model_name",
    "serve",
    "shutdown",
]
