"""vLLM's engine inside the calling process, driven from one asyncio loop.

vLLM's ``AsyncLLM`` always runs its engine core in a separate process, and on CPU the model in a third
(its ``mp`` executor), which talk over shared-memory queues that poll. On a small CPU machine those
processes compete with the model's compute threads for the same cores: two pool actors are six busy
processes on two cores. :class:`InProcessEngine` runs the engine core and the model (vLLM's ``uni``
executor) in this process and steps it from the loop that calls :meth:`InProcessEngine.generate`, so
the engine is one thread of one process. Measured on 2 cores with the default model and two pool actors
(``benchmarks/``): NSMC 0-shot scoring 720.8 -> 930.9 rows/s; outside Ray, two single-core engines scored
530 rows/s each in process against about 330 with ``AsyncLLM``.

vLLM 0.32 refuses an in-process ``AsyncLLM``, so this is a small driver over its synchronous
``LLMEngine`` with the slice of ``AsyncLLM``'s interface hubkit's backend uses: ``generate`` (an async
iterator of ``RequestOutput``; closing it aborts the request), ``model_config``, ``vllm_config``,
``shutdown``.

The engine then owns process-wide settings: vLLM's CPU worker makes ``torch.set_num_threads`` a no-op,
and vLLM keeps per-process state for the running forward pass. So
it suits processes that hold nothing else (the engine pool's Ray actors); steps of several in-process
engines in one process are serialised by a lock.

This module imports vLLM; only :mod:`hubkit.backends.vllm` imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

from vllm.v1.engine.llm_engine import LLMEngine

#: vLLM keeps the running forward pass's context in module globals: one engine steps at a time.
_STEP_LOCK = threading.Lock()


class InProcessEngine:
    """One vLLM engine in this process, stepped by a task on the event loop that created it.

    Build it with :meth:`start` on the loop that will use it: the engine's compute threads are pinned
    to the cores of the thread that builds it (``VLLM_CPU_OMP_THREADS_BIND``), and every step runs on
    that loop's thread.
    """

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.model_config = engine.model_config
        self.vllm_config = engine.vllm_config
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._wake = asyncio.Event()
        self._error: BaseException | None = None
        self._stepper = asyncio.get_running_loop().create_task(self._run(), name="hubkit-vllm-steps")

    @classmethod
    async def start(cls, args: Any) -> InProcessEngine:
        """Builds the engine from ``vllm.EngineArgs`` on the running loop's thread."""
        _pin_this_thread(os.environ.get("VLLM_CPU_OMP_THREADS_BIND"))
        from hubkit.backends.vllm import scoped_environ

        # vLLM reads it while building the engine: no engine-core process (and, with the "uni" executor
        # the backend sets, no worker process).
        with _STEP_LOCK, scoped_environ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
            engine = LLMEngine.from_engine_args(args, enable_multiprocessing=False)
        return cls(engine)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str) -> AsyncIterator[Any]:
        """Yields the request's outputs as the engine produces them, like ``AsyncLLM.generate``.

        Raises:
            Exception: vLLM's validation error for a bad request, or the error that stopped the engine.
        """
        if self._error is not None:
            raise EngineDeadError(self._error)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._engine.add_request(request_id, prompt, sampling_params)
        self._queues[request_id] = queue
        self._wake.set()
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                finished = bool(out.finished)
                yield out
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._error is None:
                # Closed early (the caller cancelled, or stopped reading a stream): free its KV blocks.
                self._engine.abort_request([request_id])

    @property
    def errored(self) -> bool:
        """True once the engine stopped (its step failed, or it was shut down), like ``AsyncLLM.errored``."""
        return self._error is not None

    def shutdown(self) -> None:
        """Stops stepping, fails the requests still waiting, and frees the engine. Safe to call twice."""
        self._stepper.cancel()
        self._fail(RuntimeError("the engine was shut down"))
        with contextlib.suppress(Exception):
            self._engine.engine_core.shutdown()

    async def _run(self) -> None:
        engine = self._engine
        while True:
            await self._wake.wait()
            self._wake.clear()
            while engine.has_unfinished_requests():
                try:
                    with _STEP_LOCK:
                        outputs = engine.step()
                except Exception as exc:  # the engine is unusable now: every waiter learns why
                    self._fail(exc)
                    return
                for out in outputs:
                    queue = self._queues.get(out.request_id)
                    if queue is not None:
                        queue.put_nowait(out)
                # New requests and readers run between steps; a step blocks this loop while it computes.
                await asyncio.sleep(0)

    def _fail(self, cause: BaseException) -> None:
        if self._error is None:
            self._error = cause
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(self._error))


class EngineDeadError(RuntimeError):
    """The in-process engine stopped (its step failed, or it was shut down)."""

    def __init__(self, cause: BaseException) -> None:
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"the in-process vLLM engine stopped: {type(cause).__name__}: {first}")
        self.__cause__ = cause


def parse_cpu_list(value: str | None) -> list[int]:
    """The cores of a ``VLLM_CPU_OMP_THREADS_BIND`` value ("0,1", "0-3", "0-1,4"; the first rank's
    list if several are given with "|"); empty for "auto", "nobind" or nothing."""
    if not value or value.strip() in ("auto", "nobind"):
        return []
    cores: list[int] = []
    for part in value.split("|")[0].split(","):
        lo, _, hi = part.strip().partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def _pin_this_thread(binding: str | None) -> None:
    """Pins the calling thread to the binding's cores and gives torch one thread per core there.

    vLLM binds only the worker processes it spawns (through OpenMP environment variables); in process,
    hubkit does it for the engine's thread. The OpenMP threads it starts later inherit its cores, so
    engines of different pool actors compute on different cores. Thread-local on Linux, so the rest
    of the process keeps its cores.
    """
    import torch

    cores = parse_cpu_list(binding)
    if not cores:
        return
    with contextlib.suppress(OSError, AttributeError):  # a core outside this container, or not Linux
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(len(cores))
