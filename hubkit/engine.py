"""The backend protocol: the two verbs that cross the engine boundary.

Everything above the engine pool (CLI, HTTP, Spaces, Ray jobs) speaks only ``generate`` and
``loglikelihood``; everything below it (vLLM, transformers) implements only those, following
lm-evaluation-harness's definitions:

* ``generate(prompt, params)`` samples a continuation (optionally streamed chunk by chunk).
* ``loglikelihood(context, continuation)`` returns the sum of the continuation tokens' log-probs
  given the context and whether greedy decoding would have produced exactly those tokens.

This module imports nothing heavy: backends import torch / vllm themselves.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from hubkit.errors import InvalidRequestError

BackendName = Literal["vllm", "transformers"]
#: What callers may ask for: a backend by name, or "auto" (see :func:`choose_backend`).
BackendChoice = Literal["auto", "vllm", "transformers"]
BACKEND_CHOICES: tuple[str, ...] = ("auto", "vllm", "transformers")

#: Upper bound on ``max_tokens`` when a model does not say otherwise (its context length wins).
DEFAULT_MAX_TOKENS_LIMIT = 4096


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample a continuation.

    Args:
        temperature: 0 means greedy decoding.
        top_p: Nucleus sampling mass in (0, 1].
        top_k: Keep the k most likely tokens; -1 (or 0) keeps all.
        max_tokens: Number of new tokens to generate, at least 1.
        stop: Strings that end the generation (not included in the text).
        seed: Seed for reproducible sampling; None draws a fresh one.
        ignore_eos: Keep generating past the end-of-text token (benchmarks use it so every system
            produces exactly ``max_tokens`` tokens).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Normalise a single stop string or list so the dataclass stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,) if self.stop else ())
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))

    def validate(self, *, max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT) -> SamplingParams:
        """Raises InvalidRequestError, naming the fix, if a value is out of range; returns self."""
        if (
            not isinstance(self.temperature, int | float)
            or math.isnan(self.temperature)
            or self.temperature < 0
        ):
            raise InvalidRequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 0 and self.top_k != -1):
            raise InvalidRequestError(
                f"top_k must be -1 (all tokens) or a positive integer, got {self.top_k!r}"
            )
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.max_tokens > max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens={self.max_tokens} is above this model's limit of {max_tokens_limit}; ask for fewer tokens"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        return self


GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True, kw_only=True)
class Completion:
    """One finished generation.

    Attributes:
        text: The generated continuation (prompt excluded).
        token_ids: Generated token ids.
        prompt_tokens: Number of prompt tokens.
        finish_reason: "stop" (EOS or a stop string) or "length" (max_tokens reached).
    """

    text: str
    token_ids: tuple[int, ...] = ()
    prompt_tokens: int = 0
    finish_reason: Literal["stop", "length"] = "length"

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, kw_only=True)
class CompletionChunk:
    """A piece of a streamed generation: the text added since the previous chunk."""

    delta: str
    token_ids: tuple[int, ...] = ()
    finish_reason: Literal["stop", "length"] | None = None


@dataclass(frozen=True)
class LoglikelihoodRequest:
    """Score ``continuation`` after ``context``. lm-eval's convention: the choice usually starts with " "."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Loglikelihood:
    """Sum of the continuation tokens' log-probs (nats) and whether greedy decoding yields them.

    ``is_greedy`` is None when the caller did not ask for it (``loglikelihood(..., greedy=False)``).
    """

    logprob: float
    is_greedy: bool | None
    num_tokens: int = field(default=0)


@dataclass(frozen=True, kw_only=True)
class PromptLogprobs:
    """Per-token log-probs of a tokenized prompt, and of the greedy tokens generated after it: what
    OpenAI's legacy ``/v1/completions`` reports for ``echo=true, logprobs=N`` (lm-eval's API scoring form).

    An optional backend verb (``prompt_logprobs``) beside the two of the protocol: the HTTP API needs it
    for clients that score through ``echo``; everything else scores with ``loglikelihood``.

    Attributes:
        token_ids: The prompt's tokens, then the generated ones.
        logprobs: Each token's log-prob given the tokens before it; None for the first prompt token.
        top_logprobs: Per token, the ``top`` most likely token ids at its position with their log-probs,
            plus the token itself; None for the first prompt token.
        num_prompt_tokens: How many of ``token_ids`` are the prompt.
    """

    token_ids: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top_logprobs: tuple[dict[int, float] | None, ...]
    num_prompt_tokens: int


#: Most alternatives per position ``prompt_logprobs`` returns (vLLM's default ``max_logprobs``).
MAX_TOP_LOGPROBS = 20


def check_prompt_logprobs_args(
    token_ids: object, *, top: object, max_tokens: object, vocab_size: int, max_model_len: int
) -> list[int]:
    """Validates ``prompt_logprobs`` arguments; returns the token ids as a list of ints.

    Raises:
        InvalidRequestError: naming the fix.
    """
    if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence) or not token_ids:
        raise InvalidRequestError("prompt token ids must be a non-empty list of integers")
    ids = list(token_ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidRequestError("prompt token ids must be integers")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequestError(
            f"token id {bad} is out of this model's vocabulary (0..{vocab_size - 1}); tokenize with its tokenizer"
        )
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    if max_tokens not in (0, 1) or isinstance(max_tokens, bool):
        raise InvalidRequestError(
            f"max_tokens must be 0 or 1 when scoring a prompt (echo with logprobs), got {max_tokens!r}"
        )
    # The engine generates one token even for max_tokens=0, so the prompt must leave room for it.
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"prompt is {len(ids)} tokens but at most {max_model_len - 1} can be scored with this model's "
            f"context of {max_model_len}; shorten the prompt"
        )
    return ids


@runtime_checkable
class Backend(Protocol):
    """What an engine backend implements. All methods are async so one backend serves many callers.

    Backends are constructed with ``Backend(model, **options)`` where ``model`` is a local folder or a
    Hub id, and raise ModelNotFoundError when it cannot be loaded.
    """

    name: str
    model: str
    max_model_len: int

    async def generate(self, prompt: str, params: SamplingParams) -> Completion:
        """Generates one continuation of ``prompt``."""
        ...

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Generates one continuation of ``prompt`` and yields it as it is produced."""
        ...

    async def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True
    ) -> list[Loglikelihood]:
        """Scores each request; the results are in request order.

        ``greedy=False`` leaves ``is_greedy`` out (None), which an engine may answer faster: ranking
        choices by log-likelihood (acc, acc_norm) never reads it.
        """
        ...

    def shutdown(self) -> None:
        """Frees the engine's memory and processes."""
        ...


def check_prompt(prompt: object) -> str:
    """Returns ``prompt`` if it is a non-empty string, else raises InvalidRequestError."""
    if not isinstance(prompt, str):
        raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise InvalidRequestError("prompt is empty; send some text to continue")
    return prompt


def check_prompt_length(num_prompt_tokens: int, params: SamplingParams, max_model_len: int) -> None:
    """Raises InvalidRequestError when prompt plus max_tokens do not fit the model's context."""
    if num_prompt_tokens >= max_model_len:
        raise InvalidRequestError(
            f"prompt is {num_prompt_tokens} tokens but the model's context is {max_model_len}; shorten the prompt"
        )
    if num_prompt_tokens + params.max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
            f"context of {max_model_len}; lower max_tokens to {max_model_len - num_prompt_tokens} or less"
        )


#: model_type values of encoder-decoder families, for configs that do not say ``is_encoder_decoder``.
_ENCODER_DECODER_TYPES = frozenset(
    ("t5", "mt5", "umt5", "longt5", "bart", "mbart", "pegasus", "marian", "switch_transformers", "led")
)


def model_config_dict(model: str) -> dict | None:
    """The ``config.json`` of a model folder, of "default", or of a Hub id in the local HF cache; None if
    it cannot be read (the backend will then report why when it loads the model).

    Reads the JSON file only: no transformers, no network.
    """
    import json
    from pathlib import Path

    from hubkit.errors import HubkitError
    from hubkit.models import resolve_model

    try:
        resolved = resolve_model(model)
    except HubkitError:
        return None
    path = Path(resolved) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(resolved, "config.json")
        except Exception:  # not a valid repo id, no cache: nothing to decide from
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_encoder_decoder(model: str) -> bool | None:
    """True for an encoder-decoder (T5, ByT5, KEByT5, BART...), False for a decoder, None if unknown."""
    config = model_config_dict(model)
    if config is None:
        return None
    if "is_encoder_decoder" in config:
        return bool(config["is_encoder_decoder"])
    return config.get("model_type") in _ENCODER_DECODER_TYPES


def choose_backend(model: str, backend: str = "auto") -> BackendName:
    """The backend that runs ``model``: "auto" picks transformers for encoder-decoders and vLLM otherwise.

    vLLM (0.32, CPU) runs decoders only, so a byte-level T5 such as KEByT5 goes to the transformers
    backend; callers then see the same ``generate`` / ``loglikelihood`` verbs either way. A model whose
    config cannot be read yet (a Hub id not downloaded) gets vLLM, which reports what is missing.

    Args:
        model: A model folder, "default", or a Hub id.
        backend: "auto", "vllm" or "transformers".

    Raises:
        InvalidRequestError: an unknown backend name, or "vllm" asked for an encoder-decoder (naming the fix).
        ModelNotFoundError: a model that needs remote code (e.g. GBST-KEByT5's gbswt5), which hubkit does
            not run.
    """
    if backend not in BACKEND_CHOICES:
        raise InvalidRequestError(f"unknown backend {backend!r}; use 'auto', 'vllm' or 'transformers'")
    _refuse_remote_code(model)
    if backend == "transformers":
        return "transformers"
    seq2seq = is_encoder_decoder(model)
    if backend == "vllm" and seq2seq:
        config = model_config_dict(model) or {}
        kind = ", ".join(config.get("architectures") or []) or config.get("model_type") or "encoder-decoder"
        raise InvalidRequestError(
            f"vLLM cannot run encoder-decoder model {model!r} ({kind}); use --backend transformers "
            "(or --backend auto, which picks it)"
        )
    return "transformers" if seq2seq else "vllm"


#: The dtypes the backends take (``"auto"``: see :func:`choose_dtype`).
DTYPE_CHOICES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX; Arm's BF16 extension).

    Elsewhere PyTorch and vLLM still run bfloat16, but by converting to float32 around every product: on
    an AMD EPYC without those instructions vLLM generated with the default model 5.3x slower in bfloat16
    than in float32.
    """
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in info.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def choose_dtype(dtype: str = "auto", *, device: str = "cpu", native_bf16: bool | None = None) -> str:
    """The dtype a backend loads a model in: as asked, but ``"auto"`` is float32 on a CPU without bfloat16.

    ``"auto"`` otherwise lets the backend choose (transformers: the checkpoint's dtype; vLLM on CPU:
    bfloat16, even for a float32 checkpoint), and bfloat16 on such a CPU is emulated and several times
    slower, while float32 loses nothing: a bfloat16 checkpoint widens exactly.

    Args:
        dtype: "auto", "float32", "bfloat16" or "float16" ("float" and "half" are taken as aliases).
        device: Where the model runs; only "cpu" can change "auto".
        native_bf16: Whether the CPU has native bfloat16; None reads it (:func:`cpu_has_native_bf16`).

    Raises:
        InvalidRequestError: an unknown dtype (naming the choices).
    """
    aliases = {"float": "float32", "half": "float16"}
    dtype = aliases.get(dtype, dtype)
    if dtype not in DTYPE_CHOICES:
        raise InvalidRequestError(f"dtype {dtype!r} is not supported; use auto, float32, bfloat16 or float16")
    if dtype != "auto" or not device.startswith("cpu"):
        return dtype
    if native_bf16 is None:
        native_bf16 = cpu_has_native_bf16()
    return "auto" if native_bf16 else "float32"


def compile_options(backend: str, compile: bool) -> dict[str, bool]:
    """The engine options that make ``backend`` compile its model when ``compile`` is set.

    hubkit starts vLLM engines eager; compiling is vLLM's ``enforce_eager=False`` (torch.compile: a slower
    first start, faster steps). The transformers backend has no such option and gets none.
    """
    return {"enforce_eager": False} if compile and backend == "vllm" else {}


def _refuse_remote_code(model: str) -> None:
    """Refuses, in one line, a model whose config needs the model author's own Python code.

    GBST-KEByT5 is one: its learned byte downsampling (GBST) lives in the ``gbswt5`` package, loaded with
    ``trust_remote_code``. hubkit runs only architectures that transformers or vLLM implement themselves.
    """
    from hubkit.errors import ModelNotFoundError

    config = model_config_dict(model) or {}
    if not config.get("auto_map"):
        return
    kind = config.get("model_type") or ", ".join(config.get("architectures") or []) or "custom"
    gbst = "gbst" in str(kind).lower() or "gbsw" in str(kind).lower()
    raise ModelNotFoundError(
        f"{model!r} needs remote code ({kind}"
        + (": GBST's learned byte downsampling from the gbswt5 package" if gbst else "")
        + "), which hubkit does not run; use a checkpoint of an architecture transformers implements"
        + (" (plain ByT5/KEByT5 without GBST)" if gbst else "")
    )


def load_backend(model: str, *, backend: BackendChoice = "auto", **options: object) -> Backend:
    """Builds a backend by name ("auto": see :func:`choose_backend`). Heavy imports happen here, not at
    ``import hubkit``."""
    backend = choose_backend(model, backend)
    if backend == "vllm":
        from hubkit.backends.vllm import VLLMBackend

        return VLLMBackend(model, **options)  # type: ignore[arg-type]
    if backend == "transformers":
        from hubkit.backends.transformers import TransformersBackend

        return TransformersBackend(model, **options)  # type: ignore[arg-type]
    raise InvalidRequestError(f"unknown backend {backend!r}; use 'vllm' or 'transformers'")
