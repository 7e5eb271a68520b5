"""Run folders: the layout ``hubkit train-lm`` and ``hubkit tune`` share, and the provenance they record.

A run folder holds ``checkpoints/step-N/`` (each with a ``state.json`` written last, so a folder without
one is an interrupted save and is ignored), a JSON-lines log (one row per logging step or evaluation,
appended as it happens, so a crash keeps every row written before it), and at the end a record of the
command line and library versions that made it. Rerunning the same command resumes from the newest
complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

#: Where a run folder keeps its checkpoints.
CHECKPOINTS = "checkpoints"


def list_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of run folder ``out``, oldest first, as (step, folder)."""
    root = out / CHECKPOINTS
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if (
                d.is_dir()
                and d.name.startswith("step-")
                and d.name[5:].isdigit()
                and (d / "state.json").is_file()
            ):
                found.append((int(d.name[5:]), d))
    return sorted(found)


def hash_file(path: str | os.PathLike[str], digest: Any = None) -> Any:
    """Feeds a file's bytes, 1 MiB at a time, into ``digest`` (a new SHA-256 when None) and returns it."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Appends one row to a JSON-lines log (UTF-8, Korean kept readable)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def command_line() -> str:
    """The command that started this process, as a user would type it again (``hubkit ...``)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "hubkit":
        return shlex.join(["hubkit", *argv[1:]])
    return shlex.join([Path(sys.executable).name, *argv])


def library_versions() -> dict[str, str]:
    """Versions of the libraries a trained folder depends on (imports torch and transformers)."""
    import tokenizers
    import torch
    import transformers

    from hubkit import __version__

    return {
        "hubkit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
