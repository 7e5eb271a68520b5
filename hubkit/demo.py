"""Gradio demos (the Spaces under ``spaces/``) and the ``hubkit demo`` launcher.

Four apps, each a ``gr.Blocks`` built by a function here, so that a Space's ``app.py`` only wires calls:

* :func:`build_generate_app`: a prompt, sampling settings (temperature, top_p, max_length, seed, stop),
  tokens streamed into the output as they come, a Stop button, tokens/s;
* :func:`build_sentiment_app`: one review or many (one per line, or a CSV/TSV upload) scored with the
  ``nsmc`` task's prompt and choices (``문장: {document} 긍부정:`` then `` 부정`` / `` 긍정``), the two
  probabilities as a bar chart and the batch as a downloadable table;
* :func:`build_compare_app`: one prompt to two models, or to one model with two sampling settings, side
  by side;
* :func:`build_results_app`: the tables, plots and report of finished ``hubkit score`` run folders.

:func:`build_demo_app` puts all four in tabs (``hubkit demo MODEL``).

The apps talk to an :class:`EngineClient`: :class:`PoolClient` wraps a local
:class:`~hubkit.pool.EnginePool`; :class:`HTTPClient` talks to a running ``hubkit serve`` (its
OpenAI-compatible ``/v1/completions``, streamed as server-sent events, and ``/v1/loglikelihood`` for the
sentiment demo). :func:`connect_engine` picks one:
``$HUBKIT_ENDPOINT`` set means the server, otherwise a model is loaded.

Every app runs with Gradio's queue (a concurrency limit and a maximum queue size, see
:class:`DemoLimits`); bad input (too long a prompt, too many reviews...) and engine errors are shown
as one-line messages in the page (``gr.Error``), never as a stack trace, and the app stays up.
Generated text can go through :mod:`hubkit.privacy`'s filter.

``import hubkit.demo`` imports gradio but not torch, vllm or ray; the engine is imported when one is
started.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import math
import os
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import gradio as gr

from hubkit.engine import CompletionChunk, Loglikelihood, LoglikelihoodRequest, SamplingParams
from hubkit.errors import DataError, EngineError, HubkitError, InvalidRequestError
from hubkit.privacy import StreamMasker

if TYPE_CHECKING:
    import pandas as pd

    from hubkit.pool import EnginePool
    from hubkit.results import RunMetrics

logger = logging.getLogger(__name__)

#: A running ``hubkit serve`` to use instead of loading a model (``http://host:port``).
ENDPOINT_ENV = "HUBKIT_ENDPOINT"
#: The second engine of the compare demo (a server URL), when it compares two models.
ENDPOINT_B_ENV = "HUBKIT_ENDPOINT_B"
#: The model a Space loads when no endpoint is set (default: hubkit's embedded model).
MODEL_ENV = "HUBKIT_MODEL"
#: The second model of the compare demo.
MODEL_B_ENV = "HUBKIT_MODEL_B"
#: A prompt-tuning adapter folder applied to the model a Space loads (see :mod:`hubkit.adapters`).
ADAPTER_ENV = "HUBKIT_ADAPTER"
#: Engine options for Spaces, as JSON (e.g. ``{"dtype": "float32"}``).
ENGINE_OPTIONS_ENV = "HUBKIT_ENGINE_OPTIONS"
#: Folder of scoring run folders for the results page.
RUNS_ENV = "HUBKIT_RUNS"

DemoName = Literal["all", "generate", "sentiment", "compare", "results"]
DEMOS: tuple[DemoName, ...] = ("all", "generate", "sentiment", "compare", "results")

#: KoGPT's model-card example prompt comes first.
KOGPT_PROMPT = "인간처럼 생각하고, 행동하는 '지능'을 통해 인류가 이제까지 풀지 못했던"
EXAMPLE_PROMPTS: tuple[str, ...] = (
    KOGPT_PROMPT,
    "오늘 본 영화는 정말",
    "이 영화의 결말은",
    "주말에 친구들과 함께",
    "한국어 언어 모델은",
)
EXAMPLE_REVIEWS: tuple[str, ...] = (
    "정말 재미있고 감동적인 영화였어요. 배우들 연기도 최고!",
    "시간 낭비였다. 스토리가 너무 지루하고 뻔하다.",
    "음악이 좋아서 끝까지 봤는데 결말은 좀 아쉽네요.\n두 번 보세요. 두 번 보세요!\n최악의 영화, 돈이 아깝다",
)
_TEXT_COLUMNS = ("document", "text", "review", "sentence", "문장", "리뷰", "content")


@dataclass(frozen=True, kw_only=True)
class DemoLimits:
    """Input limits and queue settings shared by the demos.

    Attributes:
        max_prompt_chars: Longest prompt accepted, in characters.
        max_new_tokens: Cap of the max_length slider (also capped by the model's context).
        max_reviews: Reviews per sentiment batch.
        max_review_chars: Longest review, in characters.
        max_upload_bytes: Largest CSV/TSV upload.
        concurrency_limit: Events of one kind processed at once (the engine batches them).
        max_queue: Events waiting at most; more are refused with "queue is full".
    """

    max_prompt_chars: int = 2000
    max_new_tokens: int = 256
    max_reviews: int = 200
    max_review_chars: int = 1000
    max_upload_bytes: int = 2_000_000
    concurrency_limit: int = 16
    max_queue: int = 64

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_new_tokens", "max_reviews", "max_review_chars",
                     "max_upload_bytes", "concurrency_limit", "max_queue"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"DemoLimits.{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------------
# Engine clients
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class EngineClient(Protocol):
    """What the demos need from an engine: streamed generation and log-likelihoods, async.

    Attributes:
        label: The model's name as shown in the page.
        max_model_len: The model's context length in tokens.
    """

    label: str
    max_model_len: int

    def astream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Generates one continuation, yielding text as it is produced."""
        ...

    async def aloglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        """Scores (context, continuation) pairs; results in request order."""
        ...

    def close(self) -> None:
        """Frees what the client owns (an engine pool it started, connections)."""
        ...


class PoolClient:
    """An :class:`EngineClient` over a local :class:`~hubkit.pool.EnginePool`.

    Args:
        pool: The pool; its async verbs run on Gradio's event loop.
        label: Shown in the page (default: the model folder's name or the Hub id).
        owns_pool: ``close()`` shuts the pool down.
    """

    def __init__(self, pool: EnginePool, *, label: str | None = None, owns_pool: bool = False) -> None:
        self.pool = pool
        self.label = label or _model_label(pool.model)
        self.max_model_len = int(pool.max_model_len)
        self._owns_pool = owns_pool

    def astream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        return self.pool.astream(prompt, params)

    async def aloglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        return await self.pool.aloglikelihood(requests)

    def close(self) -> None:
        if self._owns_pool:
            self.pool.shutdown()

    def __repr__(self) -> str:
        return f"PoolClient({self.label!r})"


class HTTPClient:
    """An :class:`EngineClient` over a running ``hubkit serve`` (or any OpenAI-compatible server).

    Generation uses ``POST /v1/completions`` with ``stream: true``; log-likelihoods use hubkit's
    ``POST /v1/loglikelihood`` (a plain OpenAI server has none: :meth:`aloglikelihood` then says so).

    Args:
        endpoint: The server's base URL, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is fine).
        timeout: Seconds to wait for the server between two streamed events.

    Raises:
        EngineError: the server does not answer ``GET /v1/models``.
    """

    def __init__(self, endpoint: str, *, timeout: float = 300.0) -> None:
        import httpx

        base = endpoint.strip().rstrip("/")
        if base.endswith("/v1"):
            base = base[: -len("/v1")]
        if not base.startswith(("http://", "https://")):
            raise InvalidRequestError(
                f"endpoint {endpoint!r} must be an http(s) URL, e.g. http://127.0.0.1:8000"
            )
        self.endpoint = base
        self._timeout = timeout
        try:
            response = httpx.get(f"{base}/v1/models", timeout=30)
            response.raise_for_status()
            model = response.json()["data"][0]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
            raise EngineError(
                f"no hubkit server answers at {base} ({type(exc).__name__}: {_first_line(str(exc))}); "
                f"start one with `hubkit serve MODEL` or unset {ENDPOINT_ENV}"
            ) from exc
        self.model = str(model["id"])
        self.label = f"{self.model} @ {base}"
        self.max_model_len = int(model.get("max_model_len") or 2048)
        # One connection pool per event loop: httpx's async pools cannot be shared between loops.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()

    def _client(self) -> Any:
        import httpx

        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                base_url=self.endpoint,
                timeout=httpx.Timeout(self._timeout, connect=30),
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            )
            self._clients[loop] = client
        return client

    def astream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "stop": list(params.stop) or None,
            "seed": params.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.ignore_eos:
            body["ignore_eos"] = True
        return _SSEStream(self._client(), body)

    async def aloglikelihood(self, requests: Sequence[LoglikelihoodRequest]) -> list[Loglikelihood]:
        import httpx

        body = {
            "model": self.model,
            "requests": [{"context": r.context, "continuation": r.continuation} for r in requests],
        }
        try:
            response = await self._client().post("/v1/loglikelihood", json=body)
        except httpx.HTTPError as exc:
            raise EngineError(
                f"the server at {self.endpoint} failed: {type(exc).__name__}: {_first_line(str(exc))}"
            ) from exc
        if response.status_code in (404, 405):
            raise InvalidRequestError(
                f"the server at {self.endpoint} has no /v1/loglikelihood (it is not `hubkit serve`); "
                f"run this demo against `hubkit serve`, or unset {ENDPOINT_ENV} and pass a model"
            )
        if response.status_code != 200:
            raise _server_error(response.status_code, response.text)
        data = response.json()["data"]
        return [
            Loglikelihood(
                logprob=float(d["logprob"]),
                is_greedy=bool(d["is_greedy"]),
                num_tokens=int(d.get("num_tokens", 0)),
            )
            for d in sorted(data, key=lambda d: d["index"])
        ]

    def close(self) -> None:
        clients, self._clients = list(self._clients.items()), weakref.WeakKeyDictionary()
        for loop, client in clients:
            if not loop.is_closed() and loop.is_running():
                asyncio.run_coroutine_threadsafe(client.aclose(), loop)

    def __repr__(self) -> str:
        return f"HTTPClient({self.endpoint!r})"


class _SSEStream:
    """One streamed completion from ``/v1/completions``; ``completion_tokens`` is set at the end.

    The server's events carry text, not token ids: the exact token count arrives in the final usage
    event (``stream_options.include_usage``).
    """

    def __init__(self, client: Any, body: dict[str, Any]) -> None:
        self._client = client
        self._body = body
        self._gen: AsyncIterator[CompletionChunk] | None = None
        self.completion_tokens: int | None = None

    def __aiter__(self) -> _SSEStream:
        return self

    async def __anext__(self) -> CompletionChunk:
        if self._gen is None:
            self._gen = self._events()
        return await anext(self._gen)

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()  # type: ignore[attr-defined]

    async def _events(self) -> AsyncIterator[CompletionChunk]:
        import httpx

        try:
            async with self._client.stream("POST", "/v1/completions", json=self._body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _server_error(response.status_code, response.text)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[len("data:") :].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise _server_error(500, data)
                    if event.get("usage"):
                        self.completion_tokens = int(event["usage"].get("completion_tokens") or 0)
                    for choice in event.get("choices") or ():
                        yield CompletionChunk(
                            delta=choice.get("text") or "", finish_reason=choice.get("finish_reason")
                        )
        except httpx.HTTPError as exc:
            raise EngineError(
                f"the server at {self._client.base_url} failed: {type(exc).__name__}: {_first_line(str(exc))}"
            ) from exc


def _server_error(status: int, text: str) -> HubkitError:
    """The server's OpenAI-style error body as hubkit's error (400 = the request, else the engine)."""
    try:
        error = json.loads(text)["error"]
        message, kind = str(error.get("message") or text), str(error.get("type") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, kind = _first_line(text) or f"HTTP {status}", ""
    if status == 400 or kind == "invalid_request_error":
        return InvalidRequestError(message)
    return EngineError(message.removeprefix("engine error: "))


def connect_engine(
    model: str | None = None,
    *,
    endpoint: str | None = None,
    backend: str = "auto",
    replicas: int = 1,
    address: str | None = None,
    engine_options: Mapping[str, Any] | None = None,
    num_cpus: float = 1,
    adapter: str | None = None,
) -> EngineClient:
    """The engine the demos use: a running server when ``endpoint`` (or ``$HUBKIT_ENDPOINT``) is set,
    else a local :class:`~hubkit.pool.EnginePool` on ``model``.

    Args:
        model: Model folder, Hub id or "default"; ignored when an endpoint is used.
        endpoint: A ``hubkit serve`` URL; None reads ``$HUBKIT_ENDPOINT``, "" means none (load ``model``).
        backend: Engine backend of a local pool: "auto" (transformers for encoder-decoders, vLLM
            otherwise), "vllm" or "transformers".
        replicas: Engine actors of a local pool.
        address: Ray cluster address of a local pool.
        engine_options: Backend options, e.g. ``{"dtype": "float32"}``.
        num_cpus: Ray CPUs per engine actor.
        adapter: A prompt-tuning adapter folder the local pool applies to ``model``.

    Raises:
        ModelNotFoundError: a model that cannot be found.
        InvalidRequestError: an adapter together with an endpoint, or an adapter folder that cannot be used.
        EngineError: an unreachable endpoint, or an engine that failed to start.
    """
    if endpoint is None:
        endpoint = os.environ.get(ENDPOINT_ENV)
    if endpoint and adapter:
        raise InvalidRequestError(
            f"an adapter is applied by a local engine, not by the server at {endpoint}; unset "
            f"{ENDPOINT_ENV} to load the model here, or drop the adapter"
        )
    if endpoint:
        return HTTPClient(endpoint)
    from hubkit.models import resolve_model

    resolved = resolve_model(model)  # fail fast on a bad path, before Ray starts
    from hubkit.pool import EnginePool

    pool = EnginePool(
        resolved,
        backend=backend,  # type: ignore[arg-type]
        replicas=replicas,
        address=address,
        engine_options=dict(engine_options or {}),
        num_cpus=num_cpus,
        adapter=adapter,
    )
    label = f"{_model_label(resolved)} + {Path(pool.adapter).name}" if pool.adapter else None
    return PoolClient(pool, label=label, owns_pool=True)


# --------------------------------------------------------------------------------------------------
# Errors and input checks shared by the apps
# --------------------------------------------------------------------------------------------------


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _user_error(exc: BaseException) -> gr.Error:
    """A one-line message for the page. Request errors as they are; anything else as an engine error."""
    if isinstance(exc, InvalidRequestError | DataError):
        return gr.Error(_first_line(str(exc)), title="Input error", print_exception=False)
    if isinstance(exc, HubkitError):
        return gr.Error(f"engine error: {_first_line(str(exc))}", title="Engine error", print_exception=False)
    # Not ours: the traceback goes to the server log (never to the page), the page gets one line.
    logger.error("demo request failed", exc_info=exc)
    message = _first_line(str(exc)) or type(exc).__name__
    return gr.Error(
        f"engine error: {type(exc).__name__}: {message}", title="Engine error", print_exception=False
    )


def parse_stop(text: str | None) -> tuple[str, ...]:
    r"""Stop strings from the page's box: one per line; ``\n`` and ``\t`` stand for newline and tab."""
    if not text:
        return ()
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(line.replace("\\n", "\n").replace("\\t", "\t"))
    return tuple(out)


def generation_params(
    *,
    temperature: float,
    top_p: float,
    max_length: int,
    seed: float | int | None,
    stop: str | None,
    limits: DemoLimits,
    max_model_len: int,
) -> SamplingParams:
    """The page's settings as SamplingParams; raises InvalidRequestError naming the fix."""
    cap = max_length_cap(limits, max_model_len)
    if max_length is None or not float(max_length).is_integer() or max_length < 1:
        raise InvalidRequestError(f"max_length must be a whole number from 1 to {cap}, got {max_length!r}")
    if max_length > cap:
        raise InvalidRequestError(f"max_length={int(max_length)} is above this demo's cap of {cap}; lower it")
    if seed is not None and (isinstance(seed, float) and math.isnan(seed)):
        seed = None
    if seed is not None and not float(seed).is_integer():
        raise InvalidRequestError(f"seed must be a whole number (or -1 for a random one), got {seed!r}")
    seed_value = None if seed is None or int(seed) < 0 else int(seed)
    params = SamplingParams(
        temperature=float(temperature),
        top_p=float(top_p),
        max_tokens=int(max_length),
        seed=seed_value,
        stop=parse_stop(stop),
    )
    return params.validate(max_tokens_limit=max_model_len)


def max_length_cap(limits: DemoLimits, max_model_len: int) -> int:
    """The largest max_length the page offers: the demo's cap, within the model's context."""
    return max(1, min(limits.max_new_tokens, max_model_len - 1))


def check_prompt_text(prompt: str | None, limits: DemoLimits) -> str:
    """Returns the prompt, or raises InvalidRequestError for an empty or too long one."""
    if prompt is None or not str(prompt).strip():
        raise InvalidRequestError("the prompt is empty; type some Korean text to continue")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequestError(
            f"the prompt is {len(prompt)} characters; this demo accepts at most {limits.max_prompt_chars}, "
            "shorten it"
        )
    return prompt


@dataclass
class _Meter:
    """Counts streamed tokens and their rate for the page."""

    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    tokens: int = 0
    finish: str | None = None

    def add(self, chunk: CompletionChunk) -> None:
        if self.first is None and (chunk.delta or chunk.token_ids):
            self.first = time.perf_counter()
        # Pool chunks carry token ids; a server's events carry text only (about one token each).
        self.tokens += len(chunk.token_ids) or (1 if chunk.delta else 0)
        self.finish = chunk.finish_reason or self.finish

    def text(self, *, done: bool = False, exact_tokens: int | None = None) -> str:
        tokens = exact_tokens if exact_tokens is not None else self.tokens
        elapsed = time.perf_counter() - self.started
        # The rate after the first token: what the engine sustains, not the queue and prefill wait.
        decode = time.perf_counter() - self.first if self.first is not None else 0.0
        rate = (tokens - 1) / decode if tokens > 1 and decode > 0 else 0.0
        parts = [f"{tokens} tokens", f"{rate:.1f} tokens/s"]
        if self.first is not None:
            parts.append(f"first token {self.first - self.started:.2f} s")
        parts.append(f"{elapsed:.1f} s")
        if done:
            # "stop" is the model's end of text or a stop string, not the Stop button (that leaves "done").
            ended = {"length": "max_length reached", "stop": "ended: end of text or stop string"}
            parts.append(ended.get(self.finish or "", "done"))
        return " · ".join(parts)


# --------------------------------------------------------------------------------------------------
# Generate
# --------------------------------------------------------------------------------------------------


def _stream_handler(
    client: EngineClient, limits: DemoLimits
) -> Callable[..., AsyncIterator[tuple[str, str]]]:
    async def generate(
        prompt: str, temperature: float, top_p: float, max_length: int, seed: float | None, stop: str,
        privacy: bool,
    ) -> AsyncIterator[tuple[str, str]]:  # fmt: skip
        try:
            text = check_prompt_text(prompt, limits)
            params = generation_params(
                temperature=temperature, top_p=top_p, max_length=max_length, seed=seed, stop=stop,
                limits=limits, max_model_len=client.max_model_len,
            )  # fmt: skip
        except HubkitError as exc:
            raise _user_error(exc) from None
        masker = StreamMasker(text, enabled=bool(privacy))
        meter = _Meter()
        yield masker.feed(""), "generating…"
        stream = client.astream(text, params)
        try:
            async for chunk in stream:
                meter.add(chunk)
                yield masker.feed(chunk.delta), meter.text()
        except Exception as exc:
            raise _user_error(exc) from None
        finally:
            # The Stop button cancels this generator: closing the stream aborts the request in the engine.
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]
        exact = getattr(stream, "completion_tokens", None)
        yield masker.finish(), meter.text(done=True, exact_tokens=exact)

    return generate


def _generate_ui(client: EngineClient, limits: DemoLimits, *, privacy: bool) -> None:
    cap = max_length_cap(limits, client.max_model_len)
    gr.Markdown(
        f"## 한국어 텍스트 생성 · Korean text generation\n"
        f"Model: `{client.label}` — the continuation streams in as the engine produces it."
    )
    with gr.Row():
        with gr.Column(scale=3):
            # No max_length on the box: a longer paste is answered with the limit, not silently cut.
            prompt = gr.Textbox(
                label=f"Prompt (up to {limits.max_prompt_chars} characters)", lines=4,
                placeholder="예: " + KOGPT_PROMPT, elem_id="generate-prompt",
            )  # fmt: skip
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="generate-run")
                stop_button = gr.Button("Stop", variant="stop", elem_id="generate-stop")
            output = gr.Textbox(label="Output", lines=10, interactive=False, elem_id="generate-output")
            stats = gr.Markdown("", elem_id="generate-stats")
        with gr.Column(scale=1):
            temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="top_p")
            max_length = gr.Slider(1, cap, value=min(64, cap), step=1, label="max_length (new tokens)")
            seed = gr.Number(value=-1, precision=0, label="seed (-1 = random)")
            stop = gr.Textbox(label="stop (one per line; \\n = newline)", lines=2)
            privacy_box = gr.Checkbox(
                value=privacy, label="개인정보 가리기 (mask phone / RRN / account numbers)"
            )
    gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="예시 프롬프트")
    inputs = [prompt, temperature, top_p, max_length, seed, stop, privacy_box]
    handler = _stream_handler(client, limits)
    event = run.click(handler, inputs, [output, stats], api_name="generate")
    submit = prompt.submit(handler, inputs, [output, stats], api_name=False)
    stop_button.click(None, None, None, cancels=[event, submit], api_name=False)


def build_generate_app(
    client: EngineClient, *, limits: DemoLimits | None = None, privacy_filter: bool = True
) -> gr.Blocks:
    """The generation demo: prompt, sampling settings, streamed output, Stop button, tokens/s.

    API (``gradio_client``): ``/generate`` with (prompt, temperature, top_p, max_length, seed, stop,
    privacy) streaming (text, stats).
    """
    limits = limits or DemoLimits()
    with gr.Blocks(title="hubkit · generate", analytics_enabled=False) as app:
        _generate_ui(client, limits, privacy=privacy_filter)
    return _configure(app, limits)


# --------------------------------------------------------------------------------------------------
# Sentiment
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class SentimentResult:
    """One review's class probabilities (softmax of the two choices' log-likelihoods)."""

    text: str
    label: str
    probabilities: dict[str, float]
    loglikelihoods: tuple[float, ...]


def _sentiment_task() -> Any:
    """The ``nsmc`` scoring task (prompt, choices, target delimiter), as ``hubkit score`` uses it."""
    from hubkit.tasks import load_task

    return load_task("nsmc")


def sentiment_requests(reviews: Sequence[str], task: Any = None) -> list[LoglikelihoodRequest]:
    """The log-likelihood requests ``hubkit score --task nsmc`` sends for these reviews (zero-shot).

    Two per review, in review order: the task's prompt (``문장: {document} 긍부정:``) as context and
    each choice after the target delimiter (`` 부정``, `` 긍정``) as continuation.
    """
    from hubkit.tasks import Doc, template

    task = task or _sentiment_task()
    choices = tuple(task.choices)
    requests: list[LoglikelihoodRequest] = []
    for i, review in enumerate(reviews):
        doc = Doc(
            row_id=i, id=str(i), prompt=template(task.prompt).render({"document": review}), choices=choices
        )
        requests += [LoglikelihoodRequest(c, k) for c, k in task.requests(doc)]
    return requests


async def classify_reviews(client: EngineClient, reviews: Sequence[str]) -> list[SentimentResult]:
    """Scores each review with the ``nsmc`` task's prompt and choices; one engine call for all."""
    task = _sentiment_task()
    labels = task.labels(len(task.choices))
    n = len(labels)
    results = await client.aloglikelihood(sentiment_requests(reviews, task))
    out = []
    for i, review in enumerate(reviews):
        lls = tuple(float(r.logprob) for r in results[i * n : (i + 1) * n])
        top = max(lls)
        weights = [math.exp(ll - top) for ll in lls]
        total = sum(weights)
        probs = {label: w / total for label, w in zip(labels, weights, strict=True)}
        # The first of equal maxima, as `hubkit score` predicts.
        best = lls.index(top)
        out.append(SentimentResult(text=review, label=labels[best], probabilities=probs, loglikelihoods=lls))
    return out


def read_reviews_file(path: str | os.PathLike[str], *, limits: DemoLimits) -> list[str]:
    """Reviews from an uploaded CSV/TSV (or one-review-per-line .txt) file.

    The text column is the first of ``document``, ``text``, ``review``, ``sentence``, ``문장``, ``리뷰``
    present in the header (NSMC's ``id, document, label`` files work as they are); a file with one
    column and no such header is read as one review per row.

    Raises:
        DataError: unreadable, empty, too big, not UTF-8, or no text column.
    """
    file = Path(path)
    size = file.stat().st_size
    if size > limits.max_upload_bytes:
        raise DataError(
            f"{file.name} is {size:,} bytes; this demo reads files up to {limits.max_upload_bytes:,} bytes"
        )
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{file.name} is not UTF-8 text; save it as UTF-8 (CSV UTF-8 in Excel)") from None
    suffix = file.suffix.lower()
    if suffix == ".csv":
        delimiter = ","
    elif suffix in (".tsv", ".txt"):
        delimiter = "\t"
    else:
        raise DataError(f"{file.name}: upload a .csv, .tsv or .txt file")
    rows = [r for r in csv.reader(io.StringIO(text), delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{file.name} is empty; put one review per row")
    header = [c.strip().lower() for c in rows[0]]
    column = next((header.index(name) for name in _TEXT_COLUMNS if name in header), None)
    if column is not None:
        body = rows[1:]
    elif len(header) == 1:
        column, body = 0, rows
    else:
        raise DataError(
            f"{file.name} has no review column; name it one of {', '.join(_TEXT_COLUMNS)} (found {', '.join(rows[0])})"
        )
    return [r[column].strip() for r in body if len(r) > column and r[column].strip()]


def check_reviews(reviews: Sequence[str], limits: DemoLimits) -> list[str]:
    """Returns the reviews, or raises InvalidRequestError for none, too many, or too long ones."""
    reviews = [r.strip() for r in reviews if r and r.strip()]
    if not reviews:
        raise InvalidRequestError("no review given; type one (or one per line) or upload a CSV/TSV file")
    if len(reviews) > limits.max_reviews:
        raise InvalidRequestError(
            f"{len(reviews)} reviews; this demo scores at most {limits.max_reviews} at once, split the batch"
        )
    for i, review in enumerate(reviews, start=1):
        if len(review) > limits.max_review_chars:
            raise InvalidRequestError(
                f"review {i} is {len(review)} characters; this demo accepts at most {limits.max_review_chars}, "
                "shorten it"
            )
    return reviews


def results_table(results: Sequence[SentimentResult]) -> pd.DataFrame:
    """The batch as a table: #, review, prediction and one probability column per class."""
    import pandas as pd

    labels = list(results[0].probabilities) if results else ["부정", "긍정"]
    return pd.DataFrame(
        [
            {
                "#": i,
                "review": r.text,
                "prediction": r.label,
                **{f"P({k})": round(r.probabilities[k], 4) for k in labels},
            }
            for i, r in enumerate(results, start=1)
        ],
        columns=["#", "review", "prediction", *[f"P({k})" for k in labels]],
    )


#: Bar colours: negative red, positive blue, whatever order the classes come in.
_CLASS_COLORS = {"부정": "#d9534f", "긍정": "#2e7dd7"}


def _sentiment_plot(results: Sequence[SentimentResult]) -> Any:
    import pandas as pd

    labels = list(results[0].probabilities)
    colors = {k: v for k, v in _CLASS_COLORS.items() if k in labels} or None
    if len(results) == 1:
        r = results[0]
        frame = pd.DataFrame({"label": labels, "probability": [r.probabilities[k] for k in labels]})
        return gr.BarPlot(
            frame, x="label", y="probability", color="label", color_map=colors, y_lim=[0, 1], sort=labels,
            title="긍부정 확률 · class probabilities",
        )  # fmt: skip
    # One stacked bar per review (the two probabilities add up to 1), in review order.
    names = [f"#{i}" for i in range(1, len(results) + 1)]
    rows = [
        {"review": name, "label": label, "probability": r.probabilities[label]}
        for name, r in zip(names, results, strict=True)
        for label in labels
    ]
    return gr.BarPlot(
        pd.DataFrame(rows), x="review", y="probability", color="label", color_map=colors, y_lim=[0, 1],
        sort=names, title="리뷰별 긍부정 확률 · probabilities per review",
    )  # fmt: skip


def _sentiment_handler(client: EngineClient, limits: DemoLimits) -> Callable[..., Any]:
    async def classify(text: str, upload: str | None) -> tuple[str, Any, Any, str]:
        try:
            reviews = read_reviews_file(upload, limits=limits) if upload else (text or "").splitlines()
            reviews = check_reviews(reviews, limits)
            results = await classify_reviews(client, reviews)
        except Exception as exc:
            raise _user_error(exc) from None
        table = results_table(results)
        out_dir = Path(tempfile.mkdtemp(prefix="hubkit-sentiment-"))
        csv_path = out_dir / "sentiment.csv"
        # utf-8-sig: spreadsheet programs then read the Korean text correctly.
        table.to_csv(csv_path, index=False, encoding="utf-8-sig")
        if len(results) == 1:
            r = results[0]
            headline = f"### {r.label}  ({' · '.join(f'{k} {v:.1%}' for k, v in r.probabilities.items())})"
        else:
            counts = {label: sum(r.label == label for r in results) for label in results[0].probabilities}
            headline = f"### {len(results)} reviews: " + " · ".join(f"{k} {v}" for k, v in counts.items())
        return headline, _sentiment_plot(results), table, str(csv_path)

    return classify


def _sentiment_ui(client: EngineClient, limits: DemoLimits) -> None:
    gr.Markdown(
        "## 영화 리뷰 긍부정 · Review sentiment\n"
        f"Model: `{client.label}` — each review is scored like `hubkit score --task nsmc`: the prompt "
        "`문장: {review} 긍부정:` followed by ` 부정` or ` 긍정`; the probabilities are the softmax of the two "
        "log-likelihoods."
    )
    with gr.Row():
        with gr.Column():
            text = gr.Textbox(
                label=f"Review(s) — one per line, up to {limits.max_reviews}", lines=6,
                placeholder=EXAMPLE_REVIEWS[0], elem_id="sentiment-text",
            )  # fmt: skip
            upload = gr.File(
                label="…or a CSV/TSV file (column document/text/review)", file_types=[".csv", ".tsv", ".txt"],
                type="filepath",
            )  # fmt: skip
            run = gr.Button("Classify", variant="primary", elem_id="sentiment-run")
            gr.Examples(examples=[[r] for r in EXAMPLE_REVIEWS], inputs=[text], label="예시 리뷰")
        with gr.Column():
            headline = gr.Markdown("", elem_id="sentiment-headline")
            plot = gr.BarPlot(x="label", y="probability", label="probabilities", elem_id="sentiment-plot")
    # Empty but with its columns from the start (Gradio would head an empty table "1 2 3").
    table = gr.Dataframe(value=results_table([]), label="Batch", interactive=False, wrap=True)
    download = gr.File(label="Download (CSV)", interactive=False)
    handler = _sentiment_handler(client, limits)
    run.click(handler, [text, upload], [headline, plot, table, download], api_name="sentiment")


def build_sentiment_app(client: EngineClient, *, limits: DemoLimits | None = None) -> gr.Blocks:
    """The sentiment demo: reviews (typed or uploaded) to 긍정/부정 with probabilities.

    API: ``/sentiment`` with (text, file) returning (headline, plot, table, csv file).
    """
    limits = limits or DemoLimits()
    with gr.Blocks(title="hubkit · sentiment", analytics_enabled=False) as app:
        _sentiment_ui(client, limits)
    return _configure(app, limits)


# --------------------------------------------------------------------------------------------------
# Compare
# --------------------------------------------------------------------------------------------------


async def _merge_streams(
    streams: Sequence[AsyncIterator[CompletionChunk]],
) -> AsyncIterator[tuple[int, CompletionChunk]]:
    """Yields (stream index, chunk) from several streams as their chunks arrive."""

    async def step(it: AsyncIterator[CompletionChunk]) -> CompletionChunk:
        return await anext(it)

    pending = {asyncio.ensure_future(step(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    chunk = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, chunk
                pending[asyncio.ensure_future(step(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()  # type: ignore[attr-defined]


def _compare_handler(
    clients: tuple[EngineClient, EngineClient], limits: DemoLimits
) -> Callable[..., AsyncIterator[tuple[str, str, str, str]]]:
    max_model_len = min(c.max_model_len for c in clients)

    async def compare(
        prompt: str, max_length: int, stop: str, privacy: bool,
        temperature_a: float, top_p_a: float, seed_a: float | None,
        temperature_b: float, top_p_b: float, seed_b: float | None,
    ) -> AsyncIterator[tuple[str, str, str, str]]:  # fmt: skip
        try:
            text = check_prompt_text(prompt, limits)
            params = [
                generation_params(
                    temperature=t,
                    top_p=p,
                    max_length=max_length,
                    seed=s,
                    stop=stop,
                    limits=limits,
                    max_model_len=max_model_len,
                )  # fmt: skip
                for t, p, s in ((temperature_a, top_p_a, seed_a), (temperature_b, top_p_b, seed_b))
            ]
        except HubkitError as exc:
            raise _user_error(exc) from None
        maskers = [StreamMasker(text, enabled=bool(privacy)) for _ in clients]
        meters = [_Meter(), _Meter()]
        shown = [m.feed("") for m in maskers]
        yield shown[0], shown[1], "generating…", "generating…"
        streams = [c.astream(text, p) for c, p in zip(clients, params, strict=True)]
        try:
            async for side, chunk in _merge_streams(streams):
                meters[side].add(chunk)
                shown[side] = maskers[side].feed(chunk.delta)
                yield shown[0], shown[1], meters[0].text(), meters[1].text()
        except Exception as exc:
            raise _user_error(exc) from None
        exact = [getattr(s, "completion_tokens", None) for s in streams]
        yield (
            maskers[0].finish(), maskers[1].finish(),
            meters[0].text(done=True, exact_tokens=exact[0]), meters[1].text(done=True, exact_tokens=exact[1]),
        )  # fmt: skip

    return compare


def _compare_ui(left: EngineClient, right: EngineClient | None, limits: DemoLimits, *, privacy: bool) -> None:
    clients = (left, right or left)
    cap = max_length_cap(limits, min(c.max_model_len for c in clients))
    same = right is None or right is left
    what = f"`{left.label}` with two sampling settings" if same else f"`{left.label}` and `{right.label}`"
    gr.Markdown(f"## 나란히 비교 · Side by side\nThe same prompt to {what}; both stream at once.")
    prompt = gr.Textbox(
        label=f"Prompt (up to {limits.max_prompt_chars} characters)", lines=3, elem_id="compare-prompt"
    )
    with gr.Row():
        max_length = gr.Slider(1, cap, value=min(64, cap), step=1, label="max_length (new tokens)")
        stop = gr.Textbox(label="stop (one per line; \\n = newline)", lines=1)
        privacy_box = gr.Checkbox(value=privacy, label="개인정보 가리기")
    with gr.Row():
        run = gr.Button("Generate both", variant="primary", elem_id="compare-run")
        stop_button = gr.Button("Stop", variant="stop")
    sides = []
    with gr.Row():
        for name, client, temp in (("A", clients[0], 0.0 if same else 0.8), ("B", clients[1], 0.9)):
            with gr.Column():
                gr.Markdown(f"### {name}: `{client.label}`")
                t = gr.Slider(0.0, 2.0, value=temp, step=0.05, label=f"temperature {name}")
                p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label=f"top_p {name}")
                s = gr.Number(value=-1, precision=0, label=f"seed {name} (-1 = random)")
                out = gr.Textbox(
                    label=f"Output {name}", lines=10, interactive=False, elem_id=f"compare-output-{name}"
                )
                st = gr.Markdown("")
                sides.append((t, p, s, out, st))
    gr.Examples(examples=[[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label="예시 프롬프트")
    (ta, pa, sa, out_a, st_a), (tb, pb, sb, out_b, st_b) = sides
    handler = _compare_handler(clients, limits)
    event = run.click(
        handler, [prompt, max_length, stop, privacy_box, ta, pa, sa, tb, pb, sb], [out_a, out_b, st_a, st_b],
        api_name="compare",
    )  # fmt: skip
    stop_button.click(None, None, None, cancels=[event], api_name=False)


def build_compare_app(
    left: EngineClient,
    right: EngineClient | None = None,
    *,
    limits: DemoLimits | None = None,
    privacy_filter: bool = True,
) -> gr.Blocks:
    """The side-by-side demo: one prompt to two models, or to one model with two sampling settings.

    API: ``/compare`` with (prompt, max_length, stop, privacy, temperature_a, top_p_a, seed_a,
    temperature_b, top_p_b, seed_b) streaming (text_a, text_b, stats_a, stats_b).
    """
    limits = limits or DemoLimits()
    with gr.Blocks(title="hubkit · compare", analytics_enabled=False) as app:
        _compare_ui(left, right, limits, privacy=privacy_filter)
    return _configure(app, limits)


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


def find_runs(root: str | os.PathLike[str], *, max_depth: int = 3) -> list[Path]:
    """Run folders (folders holding ``metrics.json``) under ``root``, newest first."""
    from hubkit.results import METRICS_FILE

    base = Path(root).expanduser()
    if not base.is_dir():
        return []
    found = []
    if (base / METRICS_FILE).is_file():
        found.append(base)
    for depth in range(1, max_depth + 1):
        found += [p.parent for p in base.glob("/".join(["*"] * depth) + "/" + METRICS_FILE)]
    return sorted(set(found), key=lambda p: (p / METRICS_FILE).stat().st_mtime, reverse=True)


def runs_table(runs: Sequence[Path], root: Path | None = None) -> pd.DataFrame:
    """One row per (run, shots): task, model, rows, errors and the headline metrics."""
    import pandas as pd

    from hubkit.results import read_metrics

    rows = []
    for run in runs:
        name = str(run.relative_to(root)) if root is not None and run.is_relative_to(root) else str(run)
        try:
            metrics = read_metrics(run)
        except (DataError, ValueError, KeyError, TypeError) as exc:
            rows.append({"run": name, "task": f"unreadable: {_first_line(str(exc))}"})
            continue
        for shot in metrics.results:
            rows.append({
                "run": name, "task": metrics.task, "model": metrics.model, "shots": shot.shots,
                "rows": shot.n_rows, "errors": shot.n_errors,
                **{k: round(v, 4) for k, v in shot.metrics.items()},
            })  # fmt: skip
    return pd.DataFrame(rows)


@dataclass(frozen=True, kw_only=True)
class RunView:
    """What the results page shows for one run folder."""

    summary: str
    metrics: pd.DataFrame
    per_class: pd.DataFrame
    plots: list[tuple[Any, str]]
    predictions: pd.DataFrame
    report: str


def load_run(run_dir: str | os.PathLike[str], *, preview_rows: int = 200) -> RunView:
    """Reads a run folder into tables, plot images and the report, for people to look at.

    Raises:
        DataError: not a run folder, or of a schema this hubkit cannot read.
    """
    import pandas as pd

    from hubkit.results import PLOTS_DIR, PREDICTIONS_FILE, REPORT_FILE, read_metrics

    run = Path(run_dir)
    metrics: RunMetrics = read_metrics(run)
    metric_rows = [
        {
            "shots": r.shots,
            "rows": r.n_rows,
            "errors": r.n_errors,
            **{k: round(v, 4) for k, v in r.metrics.items()},
        }
        for r in metrics.results
    ]
    class_rows = [
        {
            "shots": r.shots,
            "class": name,
            "precision": round(s.precision, 4),
            "recall": round(s.recall, 4),
            "f1": round(s.f1, 4),
            "support": s.support,
        }  # fmt: skip
        for r in metrics.results
        for name, s in r.per_class.items()
    ]
    plots = _run_plots(run / PLOTS_DIR, metrics)
    predictions = pd.DataFrame()
    pred_file = run / PREDICTIONS_FILE
    if pred_file.is_file():
        import pyarrow.parquet as pq

        # The long prompt text last: what a reader compares (label, prediction, scores) stays in view.
        wanted = ["id", "shots", "label", "prediction", "loglikelihoods", "error", "text"]
        table = pq.read_table(pred_file)
        columns = [c for c in wanted if c in table.column_names]
        predictions = table.select(columns).slice(0, preview_rows).to_pandas()
        if "loglikelihoods" in predictions:
            predictions["loglikelihoods"] = predictions["loglikelihoods"].map(
                lambda v: None if v is None else ", ".join(f"{x:.3f}" for x in v)
            )
    report_file = run / REPORT_FILE
    report = (
        report_file.read_text(encoding="utf-8") if report_file.is_file() else "_no report.md in this run_"
    )
    params = f", {metrics.model_parameters:,} parameters" if metrics.model_parameters else ""
    summary = (
        f"**{metrics.task}** on `{metrics.dataset or '?'}` · model `{metrics.model}`{params} · backend "
        f"{metrics.backend} · {metrics.created or 'date unknown'} · {metrics.seconds:.1f} s"
    )
    return RunView(
        summary=summary,
        metrics=pd.DataFrame(metric_rows),
        per_class=pd.DataFrame(class_rows),
        plots=plots,
        predictions=predictions,
        report=report,
    )


def _run_plots(plot_dir: Path, metrics: RunMetrics) -> list[tuple[Any, str]]:
    """The run's plots as (image, caption); drawn from metrics.json when the folder has none."""
    from PIL import Image

    pngs = sorted(plot_dir.glob("*.png")) if plot_dir.is_dir() else []
    with contextlib.ExitStack() as stack:
        if not pngs:
            from hubkit import plots as draw

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hubkit-plots-")))
            for r in metrics.results:
                if r.labels and r.confusion:
                    path = tmp / f"confusion_{r.shots}shot.png"
                    draw.plot_confusion(r.labels, r.confusion, path, title=f"{metrics.task}, {r.shots}-shot")
                    pngs.append(path)
            metric = next(
                (
                    m
                    for m in ("acc", "f1_macro", "perplexity")
                    if all(m in r.metrics for r in metrics.results)
                ),
                None,
            )
            if metric is not None:
                points = {r.shots: r.metrics[metric] for r in metrics.results}
                path = draw.plot_nshot(
                    points, tmp / "nshot.png", metric=metric, title=f"{metrics.task}: {metric}"
                )
                if path is not None:
                    pngs.append(path)
        plots = []
        for png in pngs:
            with Image.open(png) as image:
                plots.append((image.copy(), png.stem))
    return plots


def _results_ui(runs_dir: Path) -> tuple[Callable[..., Any], list[Any], list[Any]]:
    """Builds the results page; returns the event that fills it, for the page's load event."""
    gr.Markdown(
        "## 평가 결과 · Scoring results\n"
        f"Finished `hubkit score` runs under `{runs_dir}`: pick one to see its tables, plots and report."
    )

    def choices() -> list[str]:
        return [str(p.relative_to(runs_dir)) if p != runs_dir else "." for p in find_runs(runs_dir)]

    def refresh() -> tuple[Any, Any]:
        found = choices()
        table = runs_table([runs_dir / c for c in found], runs_dir)
        return gr.Dropdown(choices=found, value=found[0] if found else None), table

    def show(name: str | None) -> tuple[str, Any, Any, Any, Any, str]:
        import pandas as pd

        if not name:
            empty = pd.DataFrame()
            return (
                f"_no run folders under `{runs_dir}` yet: run `hubkit score ... --out {runs_dir}/NAME`_",
                empty,
                empty,
                [],
                empty,
                "",
            )
        run = (runs_dir / name).resolve()
        if not run.is_relative_to(runs_dir.resolve()):
            raise gr.Error("pick a run from the list", print_exception=False)
        try:
            view = load_run(run)
        except Exception as exc:
            raise _user_error(exc) from None
        return view.summary, view.metrics, view.per_class, view.plots, view.predictions, view.report

    found = choices()
    with gr.Row():
        run_box = gr.Dropdown(choices=found, value=found[0] if found else None, label="Run", scale=4,
                              elem_id="results-run")  # fmt: skip
        refresh_button = gr.Button("Refresh", scale=1)
    all_runs = gr.Dataframe(value=runs_table([runs_dir / c for c in found], runs_dir), label="All runs",
                            interactive=False)  # fmt: skip
    summary = gr.Markdown(elem_id="results-summary")
    with gr.Row():
        metrics = gr.Dataframe(label="Metrics by shots", interactive=False)
        per_class = gr.Dataframe(label="Per class", interactive=False)
    # "contain": the gallery's default crops each plot to a square thumbnail, cutting off axes and labels.
    gallery = gr.Gallery(label="Plots", columns=3, height="auto", object_fit="contain")
    predictions = gr.Dataframe(label="Predictions (first rows)", interactive=False, wrap=True)
    with gr.Accordion("report.md", open=False):
        report = gr.Markdown()
    outputs = [summary, metrics, per_class, gallery, predictions, report]
    run_box.change(show, [run_box], outputs, api_name="results")
    refresh_button.click(refresh, None, [run_box, all_runs], api_name="refresh_runs")
    # The first view is filled when a page loads, so a run finished after start-up shows up too.
    return show, [run_box], outputs


def build_results_app(runs_dir: str | os.PathLike[str], *, limits: DemoLimits | None = None) -> gr.Blocks:
    """The results page: tables, plots and reports of the run folders under ``runs_dir``.

    API: ``/results`` with (run name) returning (summary, metrics, per_class, plots, predictions,
    report); ``/refresh_runs``.
    """
    limits = limits or DemoLimits()
    with gr.Blocks(title="hubkit · results", analytics_enabled=False) as app:
        # Filled when a page loads, so a run that finished after start-up shows up too.
        app.load(*_results_ui(Path(runs_dir).expanduser().resolve()), api_name=False)
    return _configure(app, limits)


# --------------------------------------------------------------------------------------------------
# All in tabs, launching
# --------------------------------------------------------------------------------------------------


def build_demo_app(
    client: EngineClient,
    *,
    compare_with: EngineClient | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    limits: DemoLimits | None = None,
    privacy_filter: bool = True,
) -> gr.Blocks:
    """Every demo in one page, one tab each: Generate, Sentiment, Compare, Results."""
    limits = limits or DemoLimits()
    with gr.Blocks(title=f"hubkit · {client.label}", analytics_enabled=False) as app:
        with gr.Tab("Generate"):
            _generate_ui(client, limits, privacy=privacy_filter)
        with gr.Tab("Sentiment"):
            _sentiment_ui(client, limits)
        with gr.Tab("Compare"):
            _compare_ui(client, compare_with, limits, privacy=privacy_filter)
        with gr.Tab("Results"):
            on_load = _results_ui(Path(runs_dir).expanduser().resolve())
        app.load(*on_load, api_name=False)
    return _configure(app, limits)


def _configure(app: gr.Blocks, limits: DemoLimits) -> gr.Blocks:
    """Gradio's queue with a concurrency limit and a maximum size."""
    app.queue(default_concurrency_limit=limits.concurrency_limit, max_size=limits.max_queue)
    return app


def launch(
    app: gr.Blocks,
    *,
    host: str | None = None,
    port: int | None = None,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Serves ``app``; returns its URL (with ``block=False``, at once, the server running in a thread).

    Args:
        host: Interface to listen on; default ``$GRADIO_SERVER_NAME`` (Spaces set 0.0.0.0), else 127.0.0.1.
        port: Port; default ``$GRADIO_SERVER_PORT``, else 7860.
        block: Wait until Ctrl-C.
        quiet: Do not print Gradio's banner.
    """
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    # No share link, no server-side rendering (it would need Node), errors as one line in the page.
    _, url, _ = app.launch(
        server_name=host, server_port=port, prevent_thread_lock=True, share=False, ssr_mode=False,
        show_error=False, quiet=quiet, footer_links=["api"],
    )  # fmt: skip
    if block:
        app.block_thread()
    return url


def _engine_options_from_env() -> dict[str, Any]:
    raw = os.environ.get(ENGINE_OPTIONS_ENV)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f'{ENGINE_OPTIONS_ENV} must be a JSON object, e.g. \'{{"dtype": "float32"}}\''
        )
    return value


def build_app(
    demo: DemoName,
    *,
    client: EngineClient | None,
    compare_with: EngineClient | None = None,
    runs_dir: str | os.PathLike[str] = "runs",
    limits: DemoLimits | None = None,
    privacy_filter: bool = True,
) -> gr.Blocks:
    """The app of one demo by name (``all`` for the tabbed page)."""
    if demo not in DEMOS:
        raise InvalidRequestError(f"unknown demo {demo!r}; use one of {', '.join(DEMOS)}")
    if demo == "results":
        return build_results_app(runs_dir, limits=limits)
    if client is None:
        raise InvalidRequestError(f"the {demo} demo needs an engine client")
    if demo == "generate":
        return build_generate_app(client, limits=limits, privacy_filter=privacy_filter)
    if demo == "sentiment":
        return build_sentiment_app(client, limits=limits)
    if demo == "compare":
        return build_compare_app(client, compare_with, limits=limits, privacy_filter=privacy_filter)
    return build_demo_app(client, compare_with=compare_with, runs_dir=runs_dir, limits=limits,
                          privacy_filter=privacy_filter)  # fmt: skip


def run_demo(
    demo: DemoName = "all",
    *,
    model: str | None = None,
    adapter: str | None = None,
    endpoint: str | None = None,
    compare_model: str | None = None,
    compare_endpoint: str | None = None,
    runs_dir: str | os.PathLike[str] | None = None,
    backend: str = "auto",
    replicas: int = 1,
    address: str | None = None,
    engine_options: Mapping[str, Any] | None = None,
    host: str | None = None,
    port: int | None = None,
    privacy_filter: bool = True,
    limits: DemoLimits | None = None,
    print_fn: Callable[..., None] = print,
) -> None:
    """Starts the engine(s), builds the demo and serves it until Ctrl-C (``hubkit demo`` and the Spaces).

    Args:
        demo: ``all`` (tabs) or one of ``generate``, ``sentiment``, ``compare``, ``results``.
        model: Model folder, Hub id or "default" (default: ``$HUBKIT_MODEL``, else "default").
        adapter: A prompt-tuning adapter folder applied to ``model``, not to ``compare_model``
            (default: ``$HUBKIT_ADAPTER``).
        endpoint: A ``hubkit serve`` URL to use instead of loading a model (default ``$HUBKIT_ENDPOINT``).
        compare_model: Second model of the compare demo (default ``$HUBKIT_MODEL_B``); without it and
            without ``compare_endpoint``, the compare demo compares two sampling settings of one model.
        compare_endpoint: Second server of the compare demo (default ``$HUBKIT_ENDPOINT_B``).
        runs_dir: Folder of scoring runs for the results page (default ``$HUBKIT_RUNS``, else ``runs``).
        backend, replicas, address, engine_options: Local engine pool settings (default engine options
            from ``$HUBKIT_ENGINE_OPTIONS``).
        host, port: Where to listen (see :func:`launch`).
        privacy_filter: Whether the privacy filter starts switched on.
        limits: Input limits and queue settings.
        print_fn: Where the URL is printed.
    """
    if demo not in DEMOS:
        raise InvalidRequestError(f"unknown demo {demo!r}; use one of {', '.join(DEMOS)}")
    model = model or os.environ.get(MODEL_ENV) or "default"
    adapter = adapter or os.environ.get(ADAPTER_ENV) or None
    options = dict(engine_options) if engine_options is not None else _engine_options_from_env()
    runs = runs_dir or os.environ.get(RUNS_ENV) or "runs"
    clients: list[EngineClient] = []
    try:
        client = None
        compare_with = None
        if demo != "results":
            client = connect_engine(model, endpoint=endpoint, backend=backend, replicas=replicas, address=address,
                                    engine_options=options, adapter=adapter)  # fmt: skip
            clients.append(client)
            compare_endpoint = compare_endpoint or os.environ.get(ENDPOINT_B_ENV)
            compare_model = compare_model or os.environ.get(MODEL_B_ENV)
            if demo in ("compare", "all") and (compare_endpoint or compare_model):
                compare_with = connect_engine(compare_model, endpoint=compare_endpoint or "", backend=backend,
                                              replicas=replicas, address=address, engine_options=options)  # fmt: skip
                clients.append(compare_with)
        app = build_app(demo, client=client, compare_with=compare_with, runs_dir=runs, limits=limits,
                        privacy_filter=privacy_filter)  # fmt: skip
        url = launch(app, host=host, port=port, block=False, quiet=True)
        print_fn(f"hubkit: {demo} demo at {url} (Ctrl-C to stop)")
        try:
            app.block_thread()
        finally:
            app.close(verbose=False)
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()


def _model_label(model: str) -> str:
    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


__all__ = [
    "ADAPTER_ENV",
    "DEMOS",
    "ENDPOINT_ENV",
    "EXAMPLE_PROMPTS",
    "EXAMPLE_REVIEWS",
    "KOGPT_PROMPT",
    "MODEL_ENV",
    "RUNS_ENV",
    "DemoLimits",
    "EngineClient",
    "HTTPClient",
    "PoolClient",
    "RunView",
    "SentimentResult",
    "build_app",
    "build_compare_app",
    "build_demo_app",
    "build_generate_app",
    "build_results_app",
    "build_sentiment_app",
    "check_prompt_text",
    "check_reviews",
    "classify_reviews",
    "connect_engine",
    "find_runs",
    "generation_params",
    "launch",
    "load_run",
    "max_length_cap",
    "parse_stop",
    "read_reviews_file",
    "results_table",
    "run_demo",
    "runs_table",
    "sentiment_requests",
]
