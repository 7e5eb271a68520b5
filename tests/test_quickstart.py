"""The main job, as a new user runs it: `hubkit quickstart` on the embedded default model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

HANGUL = re.compile(r"[\uac00-\ud7a3]")


@pytest.mark.slow
def test_quickstart_generates_korean_scores_nsmc_and_publishes_a_card(tmp_path: Path) -> None:
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
    # dtype "auto": the shipped bfloat16 weights run in bfloat16 only where the CPU has it natively; elsewhere
    # it would be emulated (5x slower here on an AMD EPYC), so float32.
    from hubkit.engine import cpu_has_native_bf16

    assert f"(weights in {'bfloat16' if cpu_has_native_bf16() else 'float32'})" in out, out[:2000]
    # The continuations are Korean review text, not byte soup: the table rows hold Hangul beyond the prompts.
    table = out[out.index("Korean continuations") :]
    prompts = "이 영화 정말 배우들 연기가 스토리가 너무 오랜만에 가족들과 함께 기대하고 봤는데 인간처럼 생각하고, 행동하는"
    new_hangul = [c for c in HANGUL.findall(table) if c not in prompts]
    assert len(new_hangul) >= 30, table
    # Sampling takes other paths on other CPUs; a stray byte (U+FFFD) is rare (none in 600 rows with the
    # quickstart's settings), byte soup would show many.
    assert table.count("\ufffd") <= 1, table
    # The scoring stage wrote a run folder like `hubkit score`'s: every shipped review once per shot count,
    # no error rows, and the metrics it printed.
    run = tmp_path / "runs" / "quickstart" / "nsmc"
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    assert [r["shots"] for r in metrics["results"]] == [0, 5]
    frame = pd.read_parquet(run / "predictions.parquet")
    assert len(frame) == 2 * 200 and frame["error"].isna().all()
    assert sorted(p.name for p in (run / "plots").glob("*.png")) == [
        "confusion_0shot.png",
        "confusion_5shot.png",
        "nshot.png",
        "scores_0shot.png",
        "scores_5shot.png",
    ]
    acc = f"{metrics['results'][0]['metrics']['acc']:.4f}"
    assert re.search(rf"│ 0\s+│ {acc} ", out), out[-3000:]
    # The last stage publishes the model and a card reporting those scores to the local Hub, and says how
    # to fetch them back: fetch the card with the stock client.
    assert "hf download" in out
    assert "hubkit demo default" in out  # where to go next
    from huggingface_hub import HfApi

    from hubkit.publish import client_settings, ensure_local_hub

    target = ensure_local_hub(tmp_path / "hub", port=0)
    with client_settings(target):
        api = HfApi(endpoint=target.endpoint, token=target.token)
        files = api.list_repo_files("hubkit/ko-nsmc-neox")
        card = Path(api.hf_hub_download("hubkit/ko-nsmc-neox", "README.md", cache_dir=tmp_path / "cache"))
    assert {"model.safetensors", "README.md"} <= set(files)
    assert any(f.startswith("plots/") and "confusion" in f for f in files), files
    text = card.read_text(encoding="utf-8")
    assert "nsmc" in text and acc in text, text[:3000]
