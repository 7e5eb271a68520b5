"""The main job, as a new user runs it: `hubkit quickstart` on the embedded default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.mark.slow
def test_quickstart_generates_korean_and_publishes(tmp_path: Path) -> None:
    env = {**os.environ, "HUBKIT_HUB_ROOT": str(tmp_path / "hub"), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "hubkit.cli", "quickstart"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        cwd=tmp_path,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"quickstart failed:\n{out[-3000:]}\n{proc.stderr[-3000:]}"
    match = re.search(r"(\d+) tokens in [\d.]+ s = ([\d.]+) tokens/s", out)
    assert match and int(match.group(1)) > 0 and float(match.group(2)) > 0, out[-2000:]
    # The continuations are Korean review text, not byte soup: the table rows hold Hangul beyond the prompts.
    table = out[out.index("Korean continuations") :]
    prompts = "이 영화 정말 배우들 연기가 스토리가 너무 오랜만에 가족들과 함께 기대하고 봤는데 인간처럼 생각하고, 행동하는"
    new_hangul = [c for c in HANGUL.findall(table) if c not in prompts]
    assert len(new_hangul) >= 30, table
    # Sampling takes other paths on other CPUs; a stray byte (U+FFFD) is rare (none in 600 rows with the
    # quickstart's settings), byte soup would show many.
    assert table.count("\ufffd") <= 1, table
    # The last stage publishes the model and card to the local Hub and says how to fetch them back.
    assert "hf download" in out
    assert (tmp_path / "hub").exists()
