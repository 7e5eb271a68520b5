"""Where models come from: the embedded default, a local folder, or a Hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path

from hubkit.errors import ModelNotFoundError

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
