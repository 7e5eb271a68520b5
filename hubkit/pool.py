"""The engine pool: N Ray actors, each holding one backend, behind the two verbs.

``EnginePool`` starts ``replicas`` :class:`EngineActor` actors (each builds its backend with
:func:`hubkit.engine.load_backend`), spreads requests over them by least outstanding work, and hides
actor deaths from callers: a dead actor is replaced once, and the requests it was serving are retried
on a live actor. Errors a caller caused (:class:`~hubkit.errors.InvalidRequestError`) are raised as
they are and never retried.

Every verb has a sync form (``generate``, ``stream``, ``loglikelihood``; run on a private event-loop
thread, so they work from scripts, notebooks and threads alike) and an async form (``agenerate``,
``astream``, ``aloglikelihood``; run on the caller's loop, e.g. inside a Ray Serve replica).

This module imports Ray; ``import hubkit`` does not import it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from hubkit.backends.vllm import cpu_binding, node_cpus
from hubkit.engine import (
    GREEDY,
    BackendChoice,
    BackendName,
    Completion,
    CompletionChunk,
    Loglikelihood,
    LoglikelihoodRequest,
    PromptLogprobs,
    SamplingParams,
    check_prompt,
    choose_backend,
    load_backend,
)
from hubkit.errors import EngineError, HubkitError, InvalidRequestError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Environment variables copied from the driver into every engine actor when set there, so that a
#: shell's configuration reaches engines on an existing cluster too (a local Ray inherits them anyway).
_FORWARDED_ENV_PREFIXES = (
    "VLLM_",
    "HF_HUB_OFFLINE",
    "HF_HOME",
    "HF_ENDPOINT",
    "TRANSFORMERS_OFFLINE",
    "TOKENIZERS_PARALLELISM",
)
#: Defaults for engine actors, unless the driver's environment says otherwise. Without a KV cache size
#: a CPU vLLM engine claims 92% of the node's RAM, and refuses to start when other processes (another
#: replica, say) already hold more than 8%; 1 GiB is plenty for small models.
_ACTOR_ENV_DEFAULTS = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
    # Weight-loading progress bars from inside actors only clutter the driver's terminal.
    "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

#: Most prompts per Ray call in ``generate``. A Ray call costs ~1-1.5 ms of CPU that the engine on the
#: same cores then lacks: one call per prompt cost a tiny model ~15% of its throughput (2 CPUs), while
#: chunks of 16-64 were within noise of each other. Small enough to balance actors and move a progress bar.
_GENERATE_CHUNK = 32
#: Most log-likelihood requests per Ray call. Scoring requests are short, so a call of 32 was mostly Ray
#: overhead; 256 scored NSMC 0-shot ~7% faster with two in-process actors on 2 CPUs.
_LOGLIKELIHOOD_CHUNK = 256
#: How long ``info()`` waits for each actor to answer before counting it as not alive.
_PING_TIMEOUT_S = 10.0
#: How long a new pool waits for CPUs that recently killed actors are still giving back.
_RESOURCE_WAIT_S = 10.0
#: A slot whose new actors keep dying while they load (say, out of memory) is given up after this many.
_MAX_STARTUP_FAILURES = 3


# --------------------------------------------------------------------------------------------------
# Connecting to Ray
# --------------------------------------------------------------------------------------------------


def connect(address: str | None = None) -> None:
    """Connects this process to Ray; idempotent.

    Args:
        address: A cluster address (``host:port``, ``auto`` or ``ray://host:port``). Without one,
            ``$RAY_ADDRESS`` is used, and without that a new local Ray is started for this process
            (never silently joining some other local cluster).

    Raises:
        InvalidRequestError: already connected to a different cluster than ``address``.
        EngineError: the cluster cannot be reached or refused the connection.
    """
    global _started_local_ray
    if ray.is_initialized():
        if address and not _same_cluster(address):
            raise InvalidRequestError(
                f"this process is already connected to Ray at {ray.get_runtime_context().gcs_address}, "
                f"not {address}; use that address or call ray.shutdown() first"
            )
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict[str, Any] = {
        "logging_level": logging.ERROR,
        "configure_logging": True,
        # Engine actors' stdout (vLLM's start-up chatter) would interleave with what hubkit prints
        # (chat, generate, quickstart tables). Errors still reach callers as exceptions, and actor logs
        # stay in Ray's session folder; HUBKIT_RAY_LOGS=1 forwards them again.
        "log_to_driver": os.environ.get("HUBKIT_RAY_LOGS", "0") == "1",
    }
    if target == "local":
        # The dashboard costs seconds of start-up and a few hundred MB that a local pool does not need.
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as exc:
        if "InvalidAuthToken" in _error_chain_text(exc):
            raise EngineError(
                f"Ray at {target} requires token authentication; set RAY_AUTH_MODE=token and provide the "
                "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            ) from exc
        raise EngineError(
            f"cannot connect to Ray at {target}: {_first_line(str(exc))}; check the address or start a cluster "
            "with `ray start --head`"
        ) from exc
    _started_local_ray = target == "local"


#: True when connect() started the Ray this process uses: its size is fixed, so a pool that does not
#: fit can be refused up front instead of waiting forever for CPUs.
_started_local_ray = False


def _same_cluster(address: str) -> bool:
    if address in ("auto", "local") or address.startswith("ray://"):
        return True  # nothing precise to compare against; trust the existing connection
    from ray._private.services import canonicalize_bootstrap_address

    try:
        wanted = canonicalize_bootstrap_address(address)
        current = canonicalize_bootstrap_address(ray.get_runtime_context().gcs_address)
    except Exception:  # an address Ray cannot parse: let the caller's own use of it fail clearly
        return True
    return wanted == current


def _error_chain_text(exc: BaseException) -> str:
    parts = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------------


_SLOT_ENV = "HUBKIT_REPLICA_SLOT"
_REPLICAS_ENV = "HUBKIT_REPLICAS"


@ray.remote(max_concurrency=1000)
class EngineActor:
    """One backend in a Ray actor. Async: one actor serves many concurrent requests.

    A backend that fails to load does not kill the actor; ``ready()`` raises the error instead, so the
    pool reports it as the one-line error it is (e.g. ModelNotFoundError) rather than a Ray traceback.
    """

    async def __init__(self, model: str, backend: BackendName, options: Mapping[str, Any]) -> None:
        self._model = model
        self._backend_name = backend
        self._error: BaseException | None = None
        self._requests = 0
        self._backend: Any = None
        if backend == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            binding = cpu_binding(
                int(os.environ.get(_SLOT_ENV, "0")), int(os.environ.get(_REPLICAS_ENV, "1")), node_cpus()
            )
            if binding is not None:  # read by the engine, in this process or the ones vLLM spawns
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
        if backend == "vllm":
            # The actor process holds nothing but its engine, so the engine runs in it (VLLMBackend's
            # in_process): no engine-core and worker processes competing with other actors for cores.
            options = {"in_process": True, **options}
        try:
            # Built off the event loop: engines start in a sync context, as they do outside Ray, and the
            # loop stays free to answer pings while a large model loads.
            self._backend = await asyncio.to_thread(load_backend, model, backend=backend, **dict(options))
        except Exception as exc:  # reported by ready() and every later call
            self._error = exc

    def _check(self, requests: int = 0) -> Any:
        if self._error is not None:
            raise self._error
        self._requests += requests
        return self._backend

    async def ready(self) -> dict[str, Any]:
        """Returns ``info()`` once the backend is loaded; raises the load error if it failed."""
        self._check()
        return await self.info()

    async def info(self) -> dict[str, Any]:
        """Model, backend, context length and where this actor runs."""
        ctx = ray.get_runtime_context()
        adapter = getattr(self._backend, "adapter", None)
        return {
            "model": self._model,
            "backend": self._backend_name,
            "adapter": adapter.path if adapter is not None else None,
            "max_model_len": getattr(self._backend, "max_model_len", None),
            "dtype": getattr(self._backend, "dtype", None),
            "loaded": self._backend is not None,
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "actor_id": ctx.get_actor_id(),
            "requests": self._requests,
            # The cores this actor's vLLM engine computes on (cpu_binding), or None for vLLM's own choice.
            "cpu_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        }

    @contextlib.contextmanager
    def _exit_if_engine_dies(self) -> Iterator[None]:
        """Ends this actor's process when an engine error came from an engine that stopped by itself, so
        that the pool, seeing the actor die, replaces it and retries its requests: a dead engine does not
        come back, and an actor that only answered errors would never be replaced."""
        try:
            yield
        except EngineError:
            if getattr(self._backend, "is_dead", False):
                logger.error("the engine of this actor stopped; exiting so that the pool replaces the actor")
                os._exit(1)
            raise

    async def generate(self, prompt: str, params: SamplingParams) -> Completion:
        with self._exit_if_engine_dies():
            return await self._check(1).generate(prompt, params)

    async def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """Generates all prompts concurrently so the engine batches them; results in prompt order."""
        backend = self._check(len(prompts))
        with self._exit_if_engine_dies():
            if hasattr(backend, "generate_many"):  # vLLM: one hop to its engine loop for the whole chunk
                return await backend.generate_many(prompts, params)
            return await _gather_or_cancel([backend.generate(p, params) for p in prompts])

    async def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Yields chunks as the engine produces them (a Ray streaming generator for the caller)."""
        with self._exit_if_engine_dies():
            async for chunk in self._check(1).stream(prompt, params):
                yield chunk

    async def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], greedy: bool
    ) -> list[Loglikelihood]:
        with self._exit_if_engine_dies():
            return await self._check(len(requests)).loglikelihood(list(requests), greedy=greedy)

    async def prompt_logprobs(self, token_ids: Sequence[int], top: int, max_tokens: int) -> PromptLogprobs:
        backend = self._check(1)
        if not hasattr(backend, "prompt_logprobs"):
            raise InvalidRequestError(
                f"the {self._backend_name} backend cannot report prompt log-probs; use /v1/loglikelihood"
            )
        with self._exit_if_engine_dies():
            return await backend.prompt_logprobs(list(token_ids), top=top, max_tokens=max_tokens)

    def shutdown(self) -> None:
        """Frees the engine (its processes and memory); the actor is killed after this."""
        if self._backend is not None:
            self._backend.shutdown()
            self._backend = None


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    # Like asyncio.gather, but a failure cancels the siblings so the engine does not keep generating
    # for a batch whose caller already got an error.
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


# --------------------------------------------------------------------------------------------------
# The pool
# --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Replica:
    """One slot of the pool: the current actor in it and the driver's view of that actor."""

    slot: int
    generation: int
    actor: Any
    ready_ref: Any
    ready: bool = False
    dead: bool = False
    outstanding: int = 0
    #: Deaths of this slot's actors before they ever became ready (reset once one does).
    startup_failures: int = 0
    given_up: bool = False


class EnginePool:
    """``replicas`` engine actors on Ray, used through ``generate`` / ``stream`` / ``loglikelihood``.

    Example:
        >>> with EnginePool("default", replicas=2) as pool:  # doctest: +SKIP
        ...     print(pool.generate(["오늘 영화는"], SamplingParams(max_tokens=20))[0].text)

    Args:
        model: A local model folder or a Hub id (see :func:`hubkit.models.resolve_model`).
        backend: ``"auto"`` (default: transformers for encoder-decoders such as byte-level T5, vLLM
            otherwise; see :func:`hubkit.engine.choose_backend`), ``"vllm"`` or ``"transformers"``.
            ``pool.backend`` is the one chosen.
        replicas: Number of engine actors.
        address: Ray cluster address; defaults to ``$RAY_ADDRESS``, else a local Ray is started.
        engine_options: Keyword options for the backend, e.g. ``{"dtype": "float32"}``.
        num_cpus: Ray CPUs reserved per actor (the engine's own processes are not counted by Ray).
        max_retries: How many times a request is retried on another actor after its actor died.
        name: Prefix for the actors' Ray names (``{name}-{slot}-{generation}``); unnamed if None.
        adapter: A PEFT prompt-tuning folder every engine applies (the backends' ``adapter`` option);
            checked here, before Ray starts. ``max_model_len`` then counts text tokens only.

    Raises:
        InvalidRequestError: bad arguments, or a local Ray without enough CPUs for the replicas.
        HubkitError: the backend's own load error, e.g. ModelNotFoundError.
        EngineError: an engine failed to start for another reason.
    """

    def __init__(
        self,
        model: str,
        *,
        backend: BackendChoice = "auto",
        replicas: int = 1,
        address: str | None = None,
        engine_options: Mapping[str, Any] | None = None,
        num_cpus: float = 1,
        max_retries: int = 1,
        name: str | None = None,
        adapter: str | None = None,
    ) -> None:
        backend = choose_backend(model, backend)  # before Ray starts: vllm on a T5 fails here, in one line
        if not isinstance(replicas, int) or replicas < 1:
            raise InvalidRequestError(f"replicas must be a positive integer, got {replicas!r}")
        if num_cpus < 0:
            raise InvalidRequestError(f"num_cpus must be >= 0, got {num_cpus!r}")
        if max_retries < 0:
            raise InvalidRequestError(f"max_retries must be >= 0, got {max_retries!r}")
        self.model = model
        self.backend: BackendName = backend
        self.replicas = replicas
        self.max_retries = max_retries
        self.name = name
        self._engine_options = dict(engine_options or {})
        self.adapter: str | None = None
        if adapter is not None:
            from hubkit.adapters import load_prompt_adapter

            # A bad folder fails here in one line, not in every actor; actors get the absolute path.
            self.adapter = load_prompt_adapter(adapter).path
            self._engine_options["adapter"] = self.adapter
        self._num_cpus = num_cpus
        # Re-entrant: a ready-callback may fire on the thread that is starting a replacement.
        self._lock = threading.RLock()
        self._replicas: list[_Replica] = []
        self._restarts = 0
        self._round_robin = itertools.count()
        self._closed = False
        self._serving = False  # replacements start only once the pool came up as a whole
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None

        connect(address)
        self._check_resources()
        self._replicas = [self._start_replica(slot, 0) for slot in range(replicas)]
        try:
            infos = self._wait_ready(self._replicas)
        except BaseException:
            self._closed = True
            self._kill_all()
            raise
        self.max_model_len: int = int(infos[0]["max_model_len"])
        for rep in self._replicas:  # their ready-callbacks may not have run yet
            rep.ready = True
        self._serving = True

    # ---- construction -------------------------------------------------------------------------------

    def _check_resources(self) -> None:
        """Refuses a pool that cannot be scheduled, instead of waiting forever for CPUs.

        Only a local Ray is refused (its size is fixed); on a cluster, which may autoscale, a warning.
        """
        need = self.replicas * self._num_cpus
        total = ray.cluster_resources().get("CPU", 0.0)
        if need > total:
            message = (
                f"{self.replicas} replicas x num_cpus={self._num_cpus:g} need {need:g} CPUs but the Ray "
                f"cluster has {total:g}; lower replicas or num_cpus (e.g. num_cpus={total / self.replicas:g})"
            )
            if _started_local_ray:
                raise InvalidRequestError(message)
            logger.warning(message)
            return
        # CPUs of actors that were just killed come back within a moment; give them a few seconds.
        deadline = time.monotonic() + _RESOURCE_WAIT_S
        while (free := ray.available_resources().get("CPU", 0.0)) < need and time.monotonic() < deadline:
            time.sleep(0.5)
        if free < need:
            message = (
                f"{self.replicas} replicas x num_cpus={self._num_cpus:g} need {need:g} CPUs but only {free:g} "
                f"of {total:g} are free (other actors, e.g. another EnginePool, hold the rest); shut those "
                "down or lower num_cpus"
            )
            if _started_local_ray:
                raise InvalidRequestError(message)
            logger.warning(message + "; waiting for the cluster to make room")

    def _actor_env(self, slot: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV_PREFIXES)}
        for key, value in _ACTOR_ENV_DEFAULTS.items():
            env.setdefault(key, value)
        # The actor picks its CPU binding from these on its own node (see cpu_binding).
        env[_SLOT_ENV], env[_REPLICAS_ENV] = str(slot), str(self.replicas)
        return env

    def _start_replica(self, slot: int, generation: int, *, startup_failures: int = 0) -> _Replica:
        options: dict[str, Any] = {
            "num_cpus": self._num_cpus,
            "runtime_env": {"env_vars": self._actor_env(slot)},
            # Replicas on different nodes when the cluster has several: one node failing takes fewer down.
            "scheduling_strategy": "SPREAD",
            # The pool replaces dead actors itself (and knows which requests to retry); Ray must not.
            "max_restarts": 0,
        }
        if self.name:
            options["name"] = f"{self.name}-{slot}-{generation}"
        actor = EngineActor.options(**options).remote(self.model, self.backend, self._engine_options)
        rep = _Replica(
            slot=slot, generation=generation, actor=actor, ready_ref=actor.ready.remote(),
            startup_failures=startup_failures,
        )  # fmt: skip
        rep.ready_ref.future().add_done_callback(lambda fut: self._on_ready(rep, fut))
        return rep

    def _on_ready(self, rep: _Replica, fut: concurrent.futures.Future) -> None:
        """Runs on a Ray thread when an actor finished loading its engine, or failed to."""
        if not fut.cancelled() and fut.exception() is None:
            rep.ready = True
            rep.startup_failures = 0
            return
        # Calling Ray from its own callback thread can deadlock: act on the failure from another thread.
        exc = fut.exception() if not fut.cancelled() else EngineError("engine start was cancelled")
        threading.Thread(
            target=self._start_failed, args=(rep, exc), name="hubkit-pool-restart", daemon=True
        ).start()

    def _start_failed(self, rep: _Replica, exc: BaseException) -> None:
        if isinstance(exc, RayActorError):
            # The process died while loading (OOM, node lost, killed): start another, within limits.
            self._replace(rep, exc)
            return
        # The backend refused to load (the model folder vanished, say): retrying would not help.
        rep.dead = True
        _kill(rep.actor)
        if self._serving:
            logger.warning(
                "engine actor in slot %d failed to load its engine: %s", rep.slot, _first_line(str(exc))
            )

    def _wait_ready(self, reps: Sequence[_Replica]) -> list[dict[str, Any]]:
        try:
            return ray.get([r.ready_ref for r in reps])
        except RayTaskError as exc:
            raise _unwrap(exc, "an engine failed to start") from None
        except RayActorError as exc:
            raise EngineError(f"an engine actor died while starting: {_first_line(str(exc))}") from exc

    # ---- public API ---------------------------------------------------------------------------------

    @property
    def actors(self) -> list[Any]:
        """The current actor handles, one per slot (replacements included)."""
        with self._lock:
            return [r.actor for r in self._replicas]

    def info(self) -> dict[str, Any]:
        """Model, backend, dtype, replicas, max_model_len, alive actors and restarts so far.

        Pings every ready actor (up to 10 s); one found dead is replaced, as a request would do. Actors
        still loading their engine (e.g. replacements) count as ``starting``, not ``alive``.
        """
        self._ensure_open()
        with self._lock:
            reps = list(self._replicas)
        pings = {r: r.actor.info.remote() for r in reps if r.ready and not r.dead}
        ready_refs, _ = ray.wait(list(pings.values()), num_returns=len(pings), timeout=_PING_TIMEOUT_S)
        done = set(ready_refs)
        actors = []
        for rep, ref in pings.items():
            if ref not in done:
                continue
            try:
                actor_info = ray.get(ref)
            except RayActorError as exc:
                self._replace(rep, exc)
                continue
            if actor_info.get("loaded"):
                actors.append({"slot": rep.slot, "outstanding": rep.outstanding, **actor_info})
        with self._lock:
            restarts = self._restarts
        return {
            "model": self.model,
            "backend": self.backend,
            "adapter": self.adapter,
            "replicas": self.replicas,
            "max_model_len": self.max_model_len,
            # The weights' dtype as the engines run them ("auto" resolved; see hubkit.engine.choose_dtype).
            "dtype": next((a["dtype"] for a in actors if a.get("dtype")), None),
            "alive": len(actors),
            "starting": sum(not r.ready and not r.dead for r in reps),
            "restarts": restarts,
            "actors": actors,
        }

    def generate(
        self, prompts: str | Sequence[str], params: SamplingParams = GREEDY, *, progress: bool = False
    ) -> list[Completion]:
        """Generates a continuation of each prompt, all concurrently across the actors.

        Args:
            prompts: One prompt or a list of prompts.
            params: Sampling parameters shared by all prompts.
            progress: Show a tqdm progress bar.

        Returns:
            One Completion per prompt, in prompt order.

        Raises:
            InvalidRequestError: an empty prompt, a bad sampling value, a prompt that does not fit.
            EngineError: an engine failed and the retry did not help.
        """
        return self._run_sync(self._generate_many(prompts, params, progress=progress))

    def stream(self, prompt: str, params: SamplingParams = GREEDY) -> Iterator[CompletionChunk]:
        """Generates one continuation and yields it chunk by chunk as the engine produces it."""
        agen = self.astream(prompt, params)
        try:
            while True:
                try:
                    chunk = self._run_sync(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            # Closing the async generator cancels the remote stream if the caller stopped early.
            if self._loop is not None and not self._loop.is_closed():
                self._run_sync(agen.aclose())

    def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True, progress: bool = False
    ) -> list[Loglikelihood]:
        """Scores each (context, continuation) request; results in request order.

        Args:
            requests: The (context, continuation) pairs.
            greedy: Also tell whether greedy decoding yields each continuation (``is_greedy``);
                False leaves it None and saves the vLLM backend a decode step per branching choice.
            progress: Show a tqdm progress bar.
        """
        return self._run_sync(self._loglikelihood_many(requests, greedy=greedy, progress=progress))

    async def agenerate(self, prompt: str, params: SamplingParams = GREEDY) -> Completion:
        """Async ``generate`` of one prompt, on the caller's event loop."""
        self._validate(params, [prompt])
        return await self._call("generate", prompt, params)

    async def astream(self, prompt: str, params: SamplingParams = GREEDY) -> AsyncIterator[CompletionChunk]:
        """Async ``stream``. If the actor dies mid-stream, the request restarts on a live actor and the
        text already delivered is skipped when sampling is deterministic (greedy or seeded); otherwise
        EngineError is raised. A stream that dies before its first chunk is simply retried."""
        self._validate(params, [prompt])
        deterministic = params.temperature == 0 or params.seed is not None
        delivered_text = 0
        delivered_tokens = 0
        failures = 0
        while True:
            rep = self._acquire(1)
            gen = rep.actor.stream.remote(prompt, params)
            # On a replay, the first `skip_*` characters/tokens were already delivered by the dead actor.
            skip_text, skip_tokens = delivered_text, delivered_tokens
            try:
                async for ref in gen:
                    chunk: CompletionChunk = await ref
                    if skip_text or skip_tokens:
                        cut_text = min(skip_text, len(chunk.delta))
                        cut_tokens = min(skip_tokens, len(chunk.token_ids))
                        skip_text -= cut_text
                        skip_tokens -= cut_tokens
                        chunk = replace(
                            chunk, delta=chunk.delta[cut_text:], token_ids=chunk.token_ids[cut_tokens:]
                        )
                        if not chunk.delta and not chunk.token_ids and chunk.finish_reason is None:
                            continue
                    delivered_text += len(chunk.delta)
                    delivered_tokens += len(chunk.token_ids)
                    yield chunk
                return
            except RayTaskError as exc:
                raise _unwrap(exc, "streaming failed") from None
            except RayActorError as exc:
                self._replace(rep, exc)
                failures += 1
                if failures > self.max_retries:
                    raise EngineError(
                        f"the stream lost {failures} engine actor(s) and was not retried further; check "
                        "`ray status` and the actor logs"
                    ) from exc
                if (delivered_text or delivered_tokens) and not deterministic:
                    raise EngineError(
                        "the engine died mid-stream and a sampled stream cannot be resumed; retry the request "
                        "(or set temperature=0 or a seed to make streams resumable)"
                    ) from exc
                logger.warning("engine actor died mid-stream; resuming on another actor")
            except (asyncio.CancelledError, GeneratorExit):
                _cancel(gen)
                raise
            finally:
                self._release(rep, 1)

    async def aloglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True
    ) -> list[Loglikelihood]:
        """Async ``loglikelihood``, on the caller's event loop."""
        return await self._loglikelihood_many(requests, greedy=greedy, progress=False)

    async def aprompt_logprobs(
        self, token_ids: Sequence[int], *, top: int = 0, max_tokens: int = 0
    ) -> PromptLogprobs:
        """Per-token log-probs of a tokenized prompt (OpenAI's ``echo`` + ``logprobs``), on the caller's loop.

        Args:
            token_ids: The prompt's token ids.
            top: Alternatives reported per position (besides the token itself), 0 to 20.
            max_tokens: 0 or 1 greedy tokens generated after the prompt.
        """
        self._ensure_open()
        return await self._call("prompt_logprobs", list(token_ids), top, max_tokens)

    def shutdown(self) -> None:
        """Stops the engines (freeing their memory) and the pool's event-loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            reps = list(self._replicas)
        # Let each backend stop its engine processes cleanly, then make sure the actors are gone.
        refs = [r.actor.shutdown.remote() for r in reps if not r.dead]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=30)
        self._kill_all()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(timeout=10)
            self._loop.close()
            self._loop = None

    def __enter__(self) -> EnginePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"EnginePool(model={self.model!r}, backend={self.backend!r}, replicas={self.replicas})"

    # ---- batching -----------------------------------------------------------------------------------

    async def _generate_many(
        self, prompts: str | Sequence[str], params: SamplingParams, *, progress: bool
    ) -> list[Completion]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, Sequence):
            raise InvalidRequestError(
                f"prompts must be a string or a list of strings, got {type(prompts).__name__}"
            )
        prompts = list(prompts)
        self._validate(params, prompts)
        chunks = _split(prompts, self._chunk_size(len(prompts), _GENERATE_CHUNK))
        results = await self._fan_out("generate_batch", chunks, (params,), progress=progress, unit="prompt")
        return [c for part in results for c in part]

    async def _loglikelihood_many(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True, progress: bool
    ) -> list[Loglikelihood]:
        self._ensure_open()
        reqs = [_as_loglikelihood_request(r) for r in requests]
        chunks = _split(reqs, self._chunk_size(len(reqs), _LOGLIKELIHOOD_CHUNK))
        results = await self._fan_out("loglikelihood", chunks, (greedy,), progress=progress, unit="request")
        return [r for part in results for r in part]

    def _chunk_size(self, n: int, limit: int) -> int:
        # At least a few chunks per actor so a slow actor does not hold back the whole batch, and small
        # enough that the progress bar moves; big enough that Ray's per-call overhead stays negligible.
        return max(1, min(limit, math.ceil(n / (4 * self.replicas))))

    async def _fan_out(
        self, method: str, chunks: list[list[Any]], extra: tuple[Any, ...], *, progress: bool, unit: str
    ) -> list[list[Any]]:
        if not chunks:
            return []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(c) for c in chunks), unit=unit, desc=f"{self.backend} x{self.replicas}")

        async def one(chunk: list[Any]) -> list[Any]:
            out = await self._call(method, chunk, *extra, weight=len(chunk))
            if bar is not None:
                bar.update(len(chunk))
            return out

        try:
            return await _gather_or_cancel([one(c) for c in chunks])
        finally:
            if bar is not None:
                bar.close()

    # ---- routing and fault tolerance ----------------------------------------------------------------

    def _validate(self, params: SamplingParams, prompts: Sequence[object]) -> None:
        self._ensure_open()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be hubkit.SamplingParams, got {type(params).__name__}")
        params.validate(max_tokens_limit=self.max_model_len)
        for prompt in prompts:
            check_prompt(prompt)

    def _ensure_open(self) -> None:
        if self._closed:
            raise EngineError("this EnginePool was shut down; create a new one")

    def _acquire(self, weight: int) -> _Replica:
        """Picks the live actor with the least outstanding work; ready actors before starting ones."""
        with self._lock:
            live = [r for r in self._replicas if not r.dead]
            if not live:
                raise EngineError("no engine actor is alive; create a new EnginePool")
            ready = [r for r in live if r.ready] or live
            # Rotate the start so that ties (e.g. an idle pool) go round-robin rather than to slot 0.
            start = next(self._round_robin) % len(ready)
            rep = min(ready[start:] + ready[:start], key=lambda r: r.outstanding)
            rep.outstanding += weight
            return rep

    def _release(self, rep: _Replica, weight: int) -> None:
        with self._lock:
            rep.outstanding -= weight

    def _replace(self, rep: _Replica, exc: BaseException) -> None:
        """Replaces a dead actor with a new one, once per death however many callers report it."""
        with self._lock:
            current = self._replicas[rep.slot]
            if current is not rep or rep.given_up or self._closed or not self._serving:
                return  # another caller already replaced it (or the pool is starting or closing)
            rep.dead = True
            failures = 0 if rep.ready else rep.startup_failures + 1
            if failures > _MAX_STARTUP_FAILURES:
                logger.warning(
                    "engine actors in slot %d died %d times while loading (%s); giving up on this slot",
                    rep.slot, failures, _first_line(str(exc)),
                )  # fmt: skip
                rep.given_up = True  # later reports of the same death do nothing
                return
            self._restarts += 1
            self._replicas[rep.slot] = self._start_replica(
                rep.slot, rep.generation + 1, startup_failures=failures
            )
        logger.warning(
            "engine actor in slot %d died (%s); started a replacement", rep.slot, _first_line(str(exc))
        )
        if isinstance(exc, ActorUnavailableError):
            # Unavailable may mean partitioned rather than dead; make sure it cannot come back as a zombie.
            _kill(rep.actor)

    async def _call(self, method: str, *args: Any, weight: int = 1) -> Any:
        """Calls ``method`` on a live actor; retries on another actor if that one dies."""
        failures = 0
        while True:
            rep = self._acquire(weight)
            ref = getattr(rep.actor, method).remote(*args)
            try:
                return await ref
            except RayTaskError as exc:
                raise _unwrap(exc, f"{method} failed") from None
            except RayActorError as exc:
                self._replace(rep, exc)
                failures += 1
                if failures > self.max_retries:
                    raise EngineError(
                        f"the request lost {failures} engine actor(s) and was not retried further; check "
                        "`ray status` and the actor logs"
                    ) from exc
                logger.warning("engine actor died during %s; retrying on another actor", method)
            except asyncio.CancelledError:
                _cancel(ref)
                raise
            finally:
                self._release(rep, weight)

    # ---- the private loop behind the sync API -------------------------------------------------------

    def _run_sync(self, coro: Awaitable[T]) -> T:
        loop = self._ensure_loop()
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), loop)
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()
            raise

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="hubkit-pool-loop", daemon=True)
                thread.start()
                self._loop, self._loop_thread = loop, thread
            return self._loop

    def _kill_all(self) -> None:
        with self._lock:
            reps = list(self._replicas)
        for rep in reps:
            rep.dead = True
            _kill(rep.actor)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _split(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _as_loglikelihood_request(item: object) -> LoglikelihoodRequest:
    if isinstance(item, LoglikelihoodRequest):
        return item
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return LoglikelihoodRequest(*item)
    raise InvalidRequestError(
        f"loglikelihood requests must be LoglikelihoodRequest(context, continuation), got {type(item).__name__}"
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _unwrap(exc: RayTaskError, what: str) -> BaseException:
    """The error the actor raised: hubkit's own errors as they are (one line), others as EngineError."""
    cause = exc.cause
    if isinstance(cause, HubkitError):
        return cause
    error = EngineError(f"{what}: {type(cause).__name__}: {_first_line(str(cause))}")
    error.__cause__ = exc  # keep the remote traceback for debugging
    return error


def _cancel(ref: Any) -> None:
    # Already finished, or the actor is gone: nothing left to cancel.
    with contextlib.suppress(Exception):
        ray.cancel(ref)


def _kill(actor: Any) -> None:
    with contextlib.suppress(Exception):  # already dead
        ray.kill(actor, no_restart=True)


__all__ = ["EngineActor", "EnginePool", "connect"]
