"""Where models come from: the embedded default, a local folder, or a Hub id."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from hubkit.errors import ModelNotFoundError
from hubkit.runs import hash_file

#: The Korean model that ships inside the package (trained by ``hubkit train-lm`` on NSMC reviews;
#: see its TRAINING.md for the exact command).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "ko-nsmc-neox"
DEFAULT_MODEL_ALIASES = {"default", "hubkit/ko-nsmc-neox"}
#: Other models shipped in the package, by the names a user types. A folder of the same name in the
#: working directory wins over them.
BUNDLED_MODELS = {
    name: Path(__file__).resolve().parent / "assets" / "ko-nsmc-byt5"
    for name in ("ko-nsmc-byt5", "hubkit/ko-nsmc-byt5")
}

#: Files of a model folder that decide its outputs; training logs, cards and plots do not.
_MODEL_FILES = {
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Up to this many bytes of weights are hashed whole; beyond it, by size and modification time (a retrained
#: or re-downloaded file is rewritten, so its time changes; hashing gigabytes on every run would not pay).
CONTENT_HASH_LIMIT = 256 * 1024 * 1024

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_model(model: str | os.PathLike[str] | None) -> str:
    """Turns what a user typed into something ``from_pretrained`` and vLLM accept.

    Args:
        model: None or "default" for the embedded default model, a local folder, a bundled model's name
            (``ko-nsmc-byt5``, the byte-level T5), or a Hub id such as ``EleutherAI/polyglot-ko-1.3b``.

    Returns:
        An absolute folder path, or the Hub id unchanged.

    Raises:
        ModelNotFoundError: a path that does not exist or is not a model folder.
    """
    if model is None or str(model) in DEFAULT_MODEL_ALIASES:
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ModelNotFoundError(
                f"the default model is missing from {DEFAULT_MODEL_DIR}; reinstall hubkit or pass a model folder"
            )
        return str(DEFAULT_MODEL_DIR)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{text!r} has no config.json; pass a Hugging Face model folder (config.json + weights + tokenizer)"
            )
        return str(path.resolve())
    bundled = BUNDLED_MODELS.get(text)
    if bundled is not None and (bundled / "config.json").is_file():
        return str(bundled)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_ID.match(text):
        raise ModelNotFoundError(
            f"model {text!r} not found: pass an existing model folder, a Hub id like 'org/name', or 'default'"
        )
    return text


def model_fingerprint(model: str | os.PathLike[str] | None) -> str | None:
    """A short digest of what decides a local model's outputs: its weights, config and tokenizer files.

    Run folders record it, so that scoring a retrained model into the folder of its earlier weights is
    refused instead of resumed with stale rows. A copy of a folder of up to `CONTENT_HASH_LIMIT` bytes of
    weights has the same digest (contents are hashed); a larger one is told by sizes and modification times.

    Args:
        model: Anything `resolve_model` accepts.

    Returns:
        16 hex digits, or None for a Hub id (its files are not here to read).
    """
    resolved = Path(resolve_model(model))
    if not resolved.is_dir():
        return None
    files = sorted(
        f
        for f in resolved.iterdir()
        if f.is_file() and (f.name in _MODEL_FILES or f.name.endswith(_WEIGHT_SUFFIXES))
    )
    whole = sum(f.stat().st_size for f in files if f.name.endswith(_WEIGHT_SUFFIXES)) <= CONTENT_HASH_LIMIT
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        if whole or not f.name.endswith(_WEIGHT_SUFFIXES):
            hash_file(f, digest)
        else:
            stat = f.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
