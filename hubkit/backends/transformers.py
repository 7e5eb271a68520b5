"""The transformers backend: the reference implementation, and the path for models vLLM cannot run.

Scoring follows lm-evaluation-harness's ``HFLM`` line by line (``_encode_pair`` and
``_loglikelihood_tokens``) so its numbers are the ones lm-eval would report. Generation uses
``model.generate``. Causal LMs (``AutoModelForCausalLM``) and encoder-decoders such as the byte-level T5
preset (``AutoModelForSeq2SeqLM``) are both supported.

Torch work is blocking, so the async verbs run it in a worker thread (``asyncio.to_thread``) under one
lock: the event loop stays responsive and the model sees one batch at a time.

The module-level helpers (:func:`check_model`, :func:`load_tokenizer`, :func:`encode_pair`,
:func:`context_length`) are shared with the vLLM backend so both tokenize exactly alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

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
from hubkit.errors import EngineError, InvalidRequestError, ModelNotFoundError
from hubkit.models import resolve_model

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

#: lm-eval's fallback context length when neither the config nor the tokenizer names one.
DEFAULT_CONTEXT_LENGTH = 2048
_TOKENIZER_INFINITY = 10**20

FinishReason = Literal["stop", "length"]


# ----------------------------------------------------------------------------------------------------
# Helpers shared with the vLLM backend.
# ----------------------------------------------------------------------------------------------------


def check_model(model: str) -> tuple[str, PretrainedConfig]:
    """Resolves ``model`` and loads its config, so a bad model fails before any engine starts.

    Args:
        model: A local model folder, a Hub id (found in the local HF cache when offline), or "default".

    Returns:
        The resolved path or Hub id and the model's config.

    Raises:
        ModelNotFoundError: the folder, the Hub id or its config cannot be found or read.
    """
    from transformers import AutoConfig

    resolved = resolve_model(model)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot load model {model!r} ({reason}); pass a model folder, or a Hub id already in the "
            "local Hugging Face cache (download it first with `hf download <id>`)"
        ) from exc
    return resolved, config


def load_tokenizer(resolved: str, model: str) -> PreTrainedTokenizerBase:
    """Loads the model's tokenizer, raising ModelNotFoundError (naming the fix) if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolved)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(
            f"cannot load the tokenizer of {model!r}; save one next to the weights with "
            "tokenizer.save_pretrained(<model folder>)"
        ) from exc


def context_length(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> int:
    """The model's context length, found the way lm-eval's ``resolve_max_length`` looks for it."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _TOKENIZER_INFINITY:
        return limit
    return DEFAULT_CONTEXT_LENGTH


def choose_max_model_len(requested: int | None, derived: int, model: str) -> int:
    """Returns the requested context length, or the model's own, refusing one the model cannot do."""
    if requested is None:
        return derived
    if not isinstance(requested, int) or requested < 2:
        raise InvalidRequestError(f"max_model_len must be an integer >= 2, got {requested!r}")
    if requested > derived:
        raise InvalidRequestError(
            f"max_model_len={requested} is above {model!r}'s context of {derived}; pass {derived} or less"
        )
    return requested


def prefix_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token lm-eval puts before a continuation that has no context: BOS, else EOS."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise InvalidRequestError(
        "the tokenizer has neither a BOS nor an EOS token; give every request a context"
    )


def check_loglikelihood_requests(requests: object) -> list[LoglikelihoodRequest]:
    """Accepts LoglikelihoodRequest objects or (context, continuation) pairs; raises InvalidRequestError."""
    if isinstance(requests, LoglikelihoodRequest | str) or not isinstance(requests, Sequence):
        raise InvalidRequestError("loglikelihood takes a list of (context, continuation) requests")
    out: list[LoglikelihoodRequest] = []
    for i, req in enumerate(requests):
        if isinstance(req, LoglikelihoodRequest):
            context, continuation = req.context, req.continuation
        elif isinstance(req, Sequence) and not isinstance(req, str) and len(req) == 2:
            context, continuation = req
        else:
            raise InvalidRequestError(f"request {i} is not a (context, continuation) pair")
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise InvalidRequestError(f"request {i}: context and continuation must be strings")
        if not continuation:
            raise InvalidRequestError(
                f"request {i}: continuation is empty; give the text to score, e.g. ' 긍정'"
            )
        out.append(LoglikelihoodRequest(context, continuation))
    return out


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str, *, seq2seq: bool = False
) -> tuple[list[int], list[int]]:
    """Tokenizes a (context, continuation) pair exactly like lm-eval 0.4's ``loglikelihood``.

    Follows ``TemplateLM.loglikelihood`` + ``_encode_pair`` and ``HFLM.tok_encode``: trailing
    whitespace of the context moves onto the continuation; text is encoded with the tokenizer's own
    special tokens (a BOS-adding tokenizer adds BOS) unless it already starts with the prefix token;
    causal models encode the whole string and split it at the context's token count (so a merge across
    the boundary belongs to the continuation), seq2seq models encode the two parts separately; an
    empty context becomes lm-eval's prefix token (BOS, else EOS).

    Returns:
        (context token ids, continuation token ids).
    """
    prefix = prefix_token_id(tokenizer)
    return _encode_pair(tokenizer, prefix, tokenizer.decode([prefix]), context, continuation, seq2seq)


def _encode_pair(
    tokenizer: Any,
    prefix: int,
    prefix_text: str,
    context: str,
    continuation: str,
    seq2seq: bool,
    joins: bool = False,
) -> tuple[list[int], list[int]]:
    # encode_pair with the prefix token and its text looked up once by the caller (encode_pairs runs
    # this per request). `joins`: the tokenizer passed _joins_at_word_starts, so a continuation that
    # starts a new word encodes the same alone as after its context.
    def encode(text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(prefix_text)
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    if context == "":
        continuation_enc = encode(continuation, add_special_tokens=False)
        if not continuation_enc:
            raise InvalidRequestError(
                f"continuation {continuation!r} encodes to no tokens; give non-empty text"
            )
        if continuation_enc[0] == prefix:  # the continuation already starts with the prefix token
            return continuation_enc[:1], _nonempty(continuation_enc[1:], continuation)
        return [prefix], continuation_enc
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if seq2seq or (joins and context and _starts_word(continuation)):
        context_enc = encode(context)
        continuation_enc = encode(continuation, add_special_tokens=False)
    else:
        whole_enc = encode(context + continuation)
        context_enc = encode(context)
        continuation_enc = whole_enc[len(context_enc) :]
    if not context_enc:
        # A whitespace-only context (lm-eval would trip its own assert): score like an empty context.
        context_enc = [prefix]
    return context_enc, _nonempty(continuation_enc, continuation)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], *, seq2seq: bool = False
) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` over many pairs, with the same ids, in a fraction of the time.

    The texts :func:`encode_pair` will ask for go to the tokenizer in one batch call each (fast
    tokenizers encode a batch in Rust), and a context shared by several choices is encoded once. Any
    text the batch did not foresee is encoded on its own, so the result never depends on the guess.
    """
    memo = _MemoTokenizer(tokenizer)
    prefix = prefix_token_id(tokenizer)
    prefix_text = memo.decode([prefix])
    joins = not seq2seq and _joins_at_word_starts(tokenizer, pairs)
    wanted: dict[bool, dict[str, None]] = {True: {}, False: {}}
    for context, continuation in pairs:
        if not context or seq2seq:
            continue
        stripped = context.rstrip()
        rest = context[len(stripped) :] + continuation
        wanted[not stripped.startswith(prefix_text)][stripped] = None
        if joins and stripped and _starts_word(rest):
            wanted[False][rest] = None  # lm-eval's " 긍정": a handful of texts for the whole batch
        else:
            wanted[not (stripped + rest).startswith(prefix_text)][stripped + rest] = None
    for special, texts in wanted.items():
        memo.prefill(list(texts), add_special_tokens=special)
    return [_encode_pair(memo, prefix, prefix_text, c, x, seq2seq, joins) for c, x in pairs]


def _rust_tokenizer(tokenizer: Any) -> Any:
    """The Rust ``tokenizers.Tokenizer`` behind a fast transformers tokenizer; None for a slow one."""
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


def _starts_word(text: str) -> bool:
    """One space, then a character that is not whitespace: where a GPT-2 style pre-tokenizer splits."""
    return len(text) > 1 and text[0] == " " and not text[1].isspace()


def _joins_at_word_starts(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> bool:
    """Whether ``encode(context + continuation)`` is ``encode(context) + encode(continuation)`` (the
    latter without special tokens) whenever the context ends in non-whitespace and the continuation
    starts a word (:func:`_starts_word`).

    It holds for byte-level BPE behind GPT-2's pre-tokenizer regex (GPT-NeoX, Polyglot-Ko, KoGPT):
    no normalizer, and the regex's only patterns that take a space take it as a word's first
    character, so the text splits at the boundary and BPE never merges across a split. Then lm-eval's
    split of the whole string needs neither the whole string nor its second encoding, which halves the
    text scoring tokenizes (per 2,500 NSMC rows: 0-shot 0.20 -> 0.09 s, 5-shot 1.5 -> 0.48 s). Added
    tokens must match exactly (no stripping, no whitespace inside) and special tokens go only in front.
    Anything else, or a disagreement on the first requests, keeps lm-eval's way.
    """
    backend = _rust_tokenizer(tokenizer)
    if backend is None or backend.normalizer is not None:
        return False
    pre, model = backend.pre_tokenizer, backend.model
    if type(pre).__name__ != "ByteLevel" or not pre.use_regex or pre.add_prefix_space:
        return False
    if type(model).__name__ != "BPE" or model.dropout is not None:
        return False
    for added in backend.get_added_tokens_decoder().values():
        if added.lstrip or added.rstrip or added.single_word or any(c.isspace() for c in added.content):
            return False
    probe = "영화 정말 최고, ok 123"
    with_specials, without = tokenizer.encode(probe), tokenizer.encode(probe, add_special_tokens=False)
    if with_specials[len(with_specials) - len(without) :] != without:
        return False  # the tokenizer appends special tokens (e.g. EOS): the continuation would own them
    samples = [(c.rstrip(), c[len(c.rstrip()) :] + x) for c, x in pairs[:8]]
    for context, continuation in samples:
        if context and _starts_word(continuation):
            whole = tokenizer.encode(context + continuation)
            if whole != tokenizer.encode(context) + tokenizer.encode(continuation, add_special_tokens=False):
                return False
    return True


class _MemoTokenizer:
    """A tokenizer whose ``encode`` and ``decode`` remember their answers (for :func:`encode_pairs`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._encoded: dict[tuple[str, bool], list[int]] = {}
        self._decoded: dict[tuple[int, ...], str] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def prefill(self, texts: list[str], *, add_special_tokens: bool) -> None:
        if texts:
            batch = _encode_batch(self._tokenizer, texts, add_special_tokens=add_special_tokens)
            self._encoded.update(((t, add_special_tokens), ids) for t, ids in zip(texts, batch, strict=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        key = (text, add_special_tokens)
        if key not in self._encoded:
            self._encoded[key] = list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return self._encoded[key]

    def decode(self, ids: Sequence[int]) -> str:
        key = tuple(ids)
        if key not in self._decoded:
            self._decoded[key] = self._tokenizer.decode(list(ids))
        return self._decoded[key]


def _encode_batch(tokenizer: Any, texts: list[str], *, add_special_tokens: bool) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``, straight from the Rust tokenizer when that gives the same ids.

    transformers' batch call builds a Python dict per text (attention masks, offsets, word ids) that
    scoring never reads: measured on NSMC prompts it took 60% of the tokenizing time, and tokenizing
    took a sixth of a scoring actor's time on the default model. The Rust ``encode_batch_fast`` skips
    the offsets as well. Taken only when the tokenizer has no truncation or padding of its own set,
    which transformers would switch off for the call.
    """
    backend = _rust_tokenizer(tokenizer)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]


def _nonempty(ids: list[int], text: str) -> list[int]:
    if not ids:
        raise InvalidRequestError(f"continuation {text!r} encodes to no tokens; give non-empty text")
    return ids


class TextAssembler:
    """Turns generated token ids into text the way a finished generation reports it.

    Decodes the whole sequence each time (so streamed deltas always join to the final text), cuts at
    the first stop string, and while streaming holds back text that may still change: a trailing
    incomplete UTF-8 character (decoded as U+FFFD) or a possible prefix of a stop string.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str], eos_ids: set[int]) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._eos_ids = eos_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._sent = 0

    def add(self, token_id: int) -> str:
        """Adds one generated token; returns the text that is now safe to emit (may be empty)."""
        if self.finish_reason is not None:
            return ""
        self.token_ids.append(token_id)
        if token_id in self._eos_ids:
            self.finish_reason = "stop"
            return self._flush()
        self.text = self._tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._find_stop(self.text)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
            return self._flush()
        safe = len(self.text) - self._holdback
        while safe > self._sent and self.text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= self._sent:
            return ""
        delta = self.text[self._sent : safe]
        self._sent = safe
        return delta

    def finish(self, *, length_reached: bool = True) -> str:
        """Ends the generation; returns the text not emitted yet."""
        if self.finish_reason is None:
            self.finish_reason = "length" if length_reached else "stop"
        return self._flush()

    def _flush(self) -> str:
        delta = self.text[self._sent :]
        self._sent = len(self.text)
        return delta

    def _find_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None


def eos_token_ids(config: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id that ends a generation: the generation config's EOS (one or a list) and the tokenizer's."""
    ids: set[int] = set()
    value = getattr(config, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list | tuple):
        ids.update(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


# ----------------------------------------------------------------------------------------------------
# The backend.
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Prepared:
    prompt: str
    token_ids: list[int]
    params: SamplingParams


class TransformersBackend:
    """Runs a Hugging Face model with plain transformers.

    Args:
        model: Local model folder, Hub id (from the local cache when offline) or "default".
        dtype: "auto" (the checkpoint's dtype; float32 on a CPU without native bfloat16, see
            :func:`hubkit.engine.choose_dtype`), "float32", "bfloat16" or "float16".
        max_model_len: Context length to enforce; defaults to the model's own.
        seed: Seeds the draws for requests that do not carry their own seed.
        batch_size: Requests per forward pass when scoring log-likelihoods.
        device: Torch device, "cpu" by default.
        adapter: A PEFT prompt-tuning folder (see :mod:`hubkit.adapters`); the model is wrapped with
            ``peft.PeftModel.from_pretrained``, which prepends the soft prompt to every input.

    Raises:
        ModelNotFoundError: the model, its config or its tokenizer cannot be loaded.
        InvalidRequestError: a bad option, or an adapter folder that cannot be used with this model.

    Attributes:
        max_model_len: Tokens of text that fit the context (an adapter's soft prompt takes the rest).
        adapter: The prompt-tuning adapter, or None.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        batch_size: int = 16,
        device: str = "cpu",
        adapter: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        if not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidRequestError(f"batch_size must be a positive integer, got {batch_size!r}")
        dtype = choose_dtype(dtype, device=device)  # checked, aliases resolved, "auto" per CPU
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        resolved, config = check_model(model)
        tokenizer = load_tokenizer(resolved, model)
        self.model = resolved
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        self.max_model_len = choose_max_model_len(max_model_len, context_length(config, tokenizer), model)
        self.batch_size = batch_size
        self.adapter = None
        if adapter is not None:
            from hubkit.adapters import load_prompt_adapter

            self.adapter = load_prompt_adapter(adapter)  # checked before the weights are loaded
            self.adapter.check_model(config, model=model, max_model_len=self.max_model_len)
        auto_cls = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        try:
            hf_model = auto_cls.from_pretrained(resolved, dtype=torch_dtype)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(
                f"cannot load the weights of {model!r} as {auto_cls.__name__} ({str(exc).splitlines()[0]}); "
                "pass a folder with config.json and model.safetensors"
            ) from exc
        self._model: PreTrainedModel | None = hf_model.to(device).eval()
        #: The dtype the weights run in ("float32", "bfloat16", ...).
        self.dtype = str(hf_model.dtype).removeprefix("torch.")
        if self.adapter is not None:
            self._model = _with_adapter(self._model, self.adapter.path)
            self.max_model_len -= self.adapter.num_virtual_tokens
        self._device = torch.device(device)
        self._tokenizer = tokenizer
        gen = hf_model.generation_config
        self._eos_ids = eos_token_ids(gen, tokenizer) | eos_token_ids(config, tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.pad_token_id
        self._pad_id = int(pad if pad is not None else min(self._eos_ids, default=0))
        self._decoder_start_id = getattr(gen, "decoder_start_token_id", None)
        if self.seq2seq and self._decoder_start_id is None:
            self._decoder_start_id = getattr(config, "decoder_start_token_id", None)
            if self._decoder_start_id is None:
                self._decoder_start_id = self._pad_id
        self._lock = threading.Lock()
        # Requests without a seed draw one from this stream, so a backend built with the same seed
        # replays the same samples without touching torch's global RNG outside generation.
        self._seeds = random.Random(seed)

    # -- public API ----------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's Hugging Face tokenizer."""
        return self._tokenizer

    async def generate(self, prompt: str, params: SamplingParams) -> Completion:
        """Generates one continuation of ``prompt`` (see :meth:`generate_batch`)."""
        prepared = self._prepare(prompt, params)
        (completion,) = await asyncio.to_thread(self._locked, self._generate_prepared, [prepared], params)
        return completion

    def stream(self, prompt: str, params: SamplingParams) -> AsyncIterator[CompletionChunk]:
        """Generates one continuation and yields text deltas as tokens arrive.

        Bad input raises InvalidRequestError here, before anything is generated.
        """
        prepared = self._prepare(prompt, params)
        return self._stream(prepared)

    async def loglikelihood(
        self, requests: Sequence[LoglikelihoodRequest], *, greedy: bool = True
    ) -> list[Loglikelihood]:
        """Scores each (context, continuation) pair as lm-eval's HFLM does; results in request order.

        ``greedy=False`` reports ``is_greedy`` as None (it costs this backend nothing either way).
        """
        encoded = self._encode_requests(requests)
        if not encoded:
            return []
        results = await asyncio.to_thread(self._locked, self._score, encoded)
        return results if greedy else [replace(r, is_greedy=None) for r in results]

    async def prompt_logprobs(
        self, token_ids: Sequence[int], *, top: int = 0, max_tokens: int = 0
    ) -> PromptLogprobs:
        """Per-token log-probs of a tokenized prompt (OpenAI's ``echo`` + ``logprobs``) from one forward
        pass; with ``max_tokens=1`` also the greedy next token. Decoder-only models only.

        Args:
            token_ids: The prompt's token ids.
            top: Alternatives reported per position (besides the token itself), 0 to 20.
            max_tokens: 0 or 1 greedy tokens generated after the prompt.
        """
        if self.seq2seq:
            raise InvalidRequestError(
                "echo scoring reads a decoder-only model's prompt log-probs; use /v1/loglikelihood for this model"
            )
        ids = check_prompt_logprobs_args(
            token_ids, top=top, max_tokens=max_tokens, vocab_size=len(self._tokenizer),
            max_model_len=self.max_model_len,
        )  # fmt: skip
        return await asyncio.to_thread(self._locked, self._prompt_logprobs, ids, top, max_tokens)

    def generate_batch(self, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
        """Generates continuations of many prompts in one padded ``model.generate`` call (blocking).

        Args:
            prompts: Prompts to continue; all share ``params`` (and its seed).
            params: Sampling parameters.

        Returns:
            One Completion per prompt, in order.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise InvalidRequestError("generate_batch takes a list of prompts")
        prepared = [self._prepare(p, params) for p in prompts]
        if not prepared:
            return []
        return self._locked(self._generate_prepared, prepared, params)

    def shutdown(self) -> None:
        """Drops the model so its memory can be freed."""
        with self._lock:
            self._model = None

    @property
    def _soft_positions(self) -> int:
        return self.adapter.num_virtual_tokens if self.adapter is not None else 0

    @property
    def _hf(self) -> PreTrainedModel:
        if self._model is None:
            raise EngineError("this backend was shut down; create a new one")
        return self._model

    # -- validation ----------------------------------------------------------------------------------

    def _prepare(self, prompt: object, params: SamplingParams) -> _Prepared:
        text = check_prompt(prompt)
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a hubkit SamplingParams")
        params.validate(max_tokens_limit=self.max_model_len)
        ids = list(self._tokenizer.encode(text))
        if self.seq2seq:
            # Encoder and decoder have separate windows: only the prompt has to fit the encoder.
            if len(ids) > self.max_model_len:
                raise InvalidRequestError(
                    f"prompt is {len(ids)} tokens but the model's context is {self.max_model_len}; "
                    "shorten the prompt"
                )
        else:
            check_prompt_length(len(ids), params, self.max_model_len)
        return _Prepared(text, ids, params)

    def _encode_requests(self, requests: Sequence[LoglikelihoodRequest]) -> list[tuple[list[int], list[int]]]:
        encoded = []
        for i, req in enumerate(check_loglikelihood_requests(requests)):
            ctx, cont = encode_pair(self._tokenizer, req.context, req.continuation, seq2seq=self.seq2seq)
            if len(cont) > self.max_model_len:
                raise InvalidRequestError(
                    f"request {i}: continuation is {len(cont)} tokens but the model's context is "
                    f"{self.max_model_len}; score a shorter continuation"
                )
            encoded.append((ctx, cont))
        return encoded

    # -- torch work (worker threads, under the lock) -------------------------------------------------

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._model is None:
                raise EngineError("this backend was shut down; create a new one")
            return fn(*args)

    def _stop_ids(self, params: SamplingParams) -> set[int]:
        return set() if params.ignore_eos else self._eos_ids

    def _generation_config(self, params: SamplingParams, *, max_new_tokens: int | None = None) -> Any:
        from transformers import GenerationConfig

        # A fresh config, not the checkpoint's: hubkit's SamplingParams are the whole truth (vLLM
        # ignores generation_config.json for requests built in code too), so both backends agree.
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or params.max_tokens,
            "eos_token_id": sorted(self._eos_ids),
            "pad_token_id": self._pad_id,
        }
        if params.ignore_eos:
            # transformers fills an unset eos_token_id from the checkpoint's generation config, so
            # forbid an early end instead: every request then yields exactly max_tokens tokens.
            kwargs["min_new_tokens"] = kwargs["max_new_tokens"]
        if self.seq2seq:
            kwargs["decoder_start_token_id"] = self._decoder_start_id
        if params.temperature == 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=float(params.temperature),
                top_p=float(params.top_p),
                top_k=params.top_k if params.top_k > 0 else 0,
            )
        return GenerationConfig(**kwargs)

    def _batch_tensors(self, batch: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            if self.seq2seq:  # the encoder sees the mask; right padding is its natural layout
                input_ids[row, : len(ids)] = torch.tensor(ids)
                mask[row, : len(ids)] = 1
            else:  # decoders generate after the last column, so pad on the left
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                mask[row, width - len(ids) :] = 1
        return input_ids.to(self._device), mask.to(self._device)

    @contextlib.contextmanager
    def _seeded(self, seed: int | None):
        import torch

        # fork_rng restores torch's global RNG afterwards: per-request seeds leave no trace.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed if seed is not None else self._seeds.getrandbits(63))
            yield

    def _generate_prepared(self, prepared: Sequence[_Prepared], params: SamplingParams) -> list[Completion]:
        import torch
        from transformers import StoppingCriteriaList

        if self.adapter is not None and len(prepared) > 1:
            # PEFT puts the soft prompt in front of the left padding, which changes a padded row's
            # greedy tokens (measured); one prompt at a time is exact.
            return [c for p in prepared for c in self._generate_prepared([p], params)]
        input_ids, mask = self._batch_tensors([p.token_ids for p in prepared])
        criteria = StoppingCriteriaList()
        if params.stop:
            criteria.append(_StopOnText(self._tokenizer, params.stop, input_ids.shape[1], self.seq2seq))
        with self._seeded(params.seed), torch.inference_mode():
            out = self._hf.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=self._generation_config(params),
                stopping_criteria=criteria,
            )
        start = 1 if self.seq2seq else input_ids.shape[1]  # seq2seq output starts with decoder_start
        completions = []
        for row, p in enumerate(prepared):
            assembler = TextAssembler(self._tokenizer, params.stop, self._stop_ids(params))
            for token in out[row, start:].tolist():
                assembler.add(token)
                if assembler.finish_reason is not None:
                    break
            assembler.finish(length_reached=len(assembler.token_ids) >= params.max_tokens)
            completions.append(
                Completion(
                    text=assembler.text,
                    token_ids=tuple(assembler.token_ids),
                    prompt_tokens=len(p.token_ids),
                    finish_reason=assembler.finish_reason or "length",
                )
            )
        return completions

    async def _stream(self, prepared: _Prepared) -> AsyncIterator[CompletionChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(kind: str, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the consumer's loop may be gone
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                self._locked(self._stream_blocking, prepared, emit, cancel)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                emit("error", exc)

        task = asyncio.ensure_future(asyncio.to_thread(work))
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    raise value
                yield value
                if value.finish_reason is not None:
                    return
        finally:
            # An early exit (client gone) stops generation at the next token.
            cancel.set()
            if not task.done():
                task.add_done_callback(lambda t: t.exception())

    def _stream_blocking(
        self, prepared: _Prepared, emit: Callable[[str, Any], None], cancel: threading.Event
    ) -> None:
        import torch
        from transformers import StoppingCriteriaList

        params = prepared.params
        assembler = TextAssembler(self._tokenizer, params.stop, self._stop_ids(params))
        streamer = _ChunkStreamer(assembler, emit)
        input_ids, mask = self._batch_tensors([prepared.token_ids])
        criteria = StoppingCriteriaList(
            [_StopWhen(lambda: cancel.is_set() or assembler.finish_reason is not None)]
        )
        with self._seeded(params.seed), torch.inference_mode():
            self._hf.generate(
                input_ids=input_ids,
                attention_mask=mask,
                generation_config=self._generation_config(params),
                stopping_criteria=criteria,
                streamer=streamer,
            )
        if assembler.finish_reason is None:
            delta = assembler.finish(length_reached=len(assembler.token_ids) >= params.max_tokens)
        else:
            delta = ""
        if not streamer.finished_sent:
            emit(
                "chunk",
                CompletionChunk(
                    delta=delta, token_ids=streamer.take_pending(), finish_reason=assembler.finish_reason
                ),
            )

    def _score(self, encoded: list[tuple[list[int], list[int]]]) -> list[Loglikelihood]:
        import torch
        import torch.nn.functional as F

        # lm-eval's Collator order: longest first, so each batch's first row sets its padded width.
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i][0] + encoded[i][1]), i))
        results: list[Loglikelihood | None] = [None] * len(encoded)
        width_cap = self.max_model_len
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inps, inplens, conts = [], [], []
            for i in chunk:
                ctx, cont = encoded[i]
                # Causal: lm-eval feeds all but the last token and reads predictions of the rest.
                inp = ctx[-width_cap:] if self.seq2seq else (ctx + cont)[-(width_cap + 1) :][:-1]
                inps.append(inp)
                inplens.append(len(inp))
                conts.append(cont[-width_cap:] if self.seq2seq else cont)
            pad_inp = max(inplens)
            # lm-eval pads with token 0: causal models never look right, encoders get a mask.
            batch = torch.zeros((len(chunk), pad_inp), dtype=torch.long)
            enc_mask = torch.zeros((len(chunk), pad_inp), dtype=torch.long)
            for row, inp in enumerate(inps):
                batch[row, : len(inp)] = torch.tensor(inp)
                enc_mask[row, : len(inp)] = 1
            with torch.inference_mode():
                if self.seq2seq:
                    pad_cont = max(len(c) for c in conts)
                    labels = torch.zeros((len(chunk), pad_cont), dtype=torch.long)
                    for row, cont in enumerate(conts):
                        labels[row, : len(cont)] = torch.tensor(cont)
                    logits = self._hf(
                        input_ids=batch.to(self._device),
                        attention_mask=enc_mask.to(self._device),
                        labels=labels.to(self._device),
                    ).logits
                else:
                    # An adapter's soft-prompt positions come first; lm-eval's offsets count from after them.
                    logits = self._hf(batch.to(self._device)).logits[:, self._soft_positions :]
                multi_logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                cont_toks = conts[row]
                contlen = len(cont_toks)
                if self.seq2seq:
                    lp = multi_logprobs[row, :contlen]
                else:
                    lp = multi_logprobs[row, inplens[row] - contlen : inplens[row]]
                target = torch.tensor(cont_toks, dtype=torch.long, device=lp.device)
                is_greedy = bool((lp.argmax(dim=-1) == target).all())
                logprob = float(lp.gather(-1, target.unsqueeze(-1)).sum())
                results[i] = Loglikelihood(logprob=logprob, is_greedy=is_greedy, num_tokens=contlen)
        return [r for r in results if r is not None]

    def _prompt_logprobs(self, ids: list[int], top: int, max_tokens: int) -> PromptLogprobs:
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            logits = self._hf(torch.tensor([ids], device=self._device)).logits[0, self._soft_positions :]
            lp = F.log_softmax(logits.float(), dim=-1)
        tokens, logprobs, tops = list(ids), [None], [None]

        def at(row: int, token: int) -> dict[int, float]:
            out: dict[int, float] = {}
            if top:
                values, indices = lp[row].topk(top)
                out = {int(i): float(v) for i, v in zip(indices.tolist(), values.tolist(), strict=True)}
            out[token] = float(lp[row, token])
            return out

        # Row p holds the distribution of token p + 1.
        for pos in range(1, len(ids)):
            logprobs.append(float(lp[pos - 1, ids[pos]]))
            tops.append(at(pos - 1, ids[pos]))
        if max_tokens:
            token = int(lp[-1].argmax())
            tokens.append(token)
            logprobs.append(float(lp[-1, token]))
            tops.append(at(len(ids) - 1, token))
        return PromptLogprobs(
            token_ids=tuple(tokens),
            logprobs=tuple(logprobs),
            top_logprobs=tuple(tops),
            num_prompt_tokens=len(ids),
        )


def _with_adapter(model: Any, adapter_path: str) -> Any:
    """Wraps a causal LM with its prompt-tuning adapter through PEFT, the reference implementation."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise InvalidRequestError(
            "serving an adapter with transformers needs peft; pip install peft"
        ) from exc
    # PEFT warns on every generate() that it drops the position ids transformers passes; single prompts
    # are exact without them (checked against a plain forward pass), so the warning is noise.
    warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient tuning")
    try:
        return PeftModel.from_pretrained(model, adapter_path).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequestError(
            f"peft cannot load adapter {adapter_path} ({first}); pass the folder PeftModel.save_pretrained wrote"
        ) from exc


class _ChunkStreamer:
    """A ``generate(streamer=...)`` hook: turns each new token into a CompletionChunk."""

    def __init__(self, assembler: TextAssembler, emit: Callable[[str, Any], None]) -> None:
        self._assembler = assembler
        self._emit = emit
        self._seen_prompt = False
        self._pending: list[int] = []  # tokens whose text is still held back
        self.finished_sent = False

    def put(self, value: Any) -> None:
        # generate() first hands over the prompt (decoders) or the decoder start token (seq2seq).
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        for token in value.reshape(-1).tolist():
            if self._assembler.finish_reason is not None:
                return
            delta = self._assembler.add(int(token))
            self._pending.append(int(token))
            finish = self._assembler.finish_reason
            if delta or finish is not None:
                self._emit(
                    "chunk",
                    CompletionChunk(delta=delta, token_ids=tuple(self._pending), finish_reason=finish),
                )
                self._pending.clear()
                self.finished_sent = finish is not None

    def end(self) -> None:
        pass

    def take_pending(self) -> tuple[int, ...]:
        pending = tuple(self._pending)
        self._pending.clear()
        return pending


class _StopWhen:
    """Stops every row of a generation once ``predicate()`` is true (cancel, or a stop string seen)."""

    def __init__(self, predicate: Callable[[], bool]) -> None:
        self._predicate = predicate

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self._predicate(), dtype=torch.bool, device=input_ids.device)


class _StopOnText:
    """Marks a row done once its generated text contains a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], prompt_width: int, seq2seq: bool) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._start = 1 if seq2seq else prompt_width

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        texts = self._tokenizer.batch_decode(input_ids[:, self._start :], skip_special_tokens=True)
        done = [any(s in t for s in self._stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
