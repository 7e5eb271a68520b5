"""Fast checks of the package surface: light import, model resolution, request validation, CLI errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubkit import InvalidRequestError, ModelNotFoundError, SamplingParams
from hubkit.cli import main
from hubkit.engine import check_prompt, check_prompt_length
from hubkit.models import DEFAULT_MODEL_DIR, resolve_model


def test_import_hubkit_stays_light() -> None:
    code = (
        "import sys, hubkit, hubkit.cli, hubkit.models, hubkit.engine, hubkit.quickstart\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'ray', 'transformers', 'gradio') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import hubkit pulled in heavy modules: {out.stdout.strip()}"


def test_default_model_resolves_and_is_small() -> None:
    path = Path(resolve_model("default"))
    assert path == DEFAULT_MODEL_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total <= 25 * 1024 * 1024, f"default model is {total / 2**20:.1f} MB, limit 25 MB"


def test_resolve_model_paths_and_hub_ids(tmp_path: Path) -> None:
    assert resolve_model("EleutherAI/polyglot-ko-1.3b") == "EleutherAI/polyglot-ko-1.3b"
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path.resolve())


def test_model_fingerprint_follows_weights_and_tokenizer_not_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from hubkit import models

    folder = tmp_path / "m"
    shutil.copytree(DEFAULT_MODEL_DIR, folder)
    first = models.model_fingerprint(folder)
    assert first == models.model_fingerprint("default")  # contents, not paths or times, for a small model
    (folder / "TRAINING.md").write_text("rewritten", encoding="utf-8")
    (folder / "train_log.jsonl").unlink()
    assert models.model_fingerprint(folder) == first
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last tensor: "retrained"
    weights.write_bytes(bytes(data))
    retrained = models.model_fingerprint(folder)
    assert retrained not in {first, None}
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    assert models.model_fingerprint(folder) not in {first, retrained}
    # Past the content-hash limit a rewritten weights file is told by its size and modification time.
    monkeypatch.setattr(models, "CONTENT_HASH_LIMIT", 0)
    before = models.model_fingerprint(folder)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert models.model_fingerprint(folder) != before
    assert models.model_fingerprint("EleutherAI/polyglot-ko-1.3b") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "limit"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -5}, "top_k"),
    ],
)
def test_sampling_params_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs).validate(max_tokens_limit=512)


def test_sampling_params_normalises_stop() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert hash(SamplingParams(stop=["a"]))  # type: ignore[arg-type]


def test_prompt_checks() -> None:
    with pytest.raises(InvalidRequestError, match="empty"):
        check_prompt("   ")
    with pytest.raises(InvalidRequestError, match="shorten"):
        check_prompt_length(600, SamplingParams(max_tokens=1), 512)
    with pytest.raises(InvalidRequestError, match="lower max_tokens to 12"):
        check_prompt_length(500, SamplingParams(max_tokens=20), 512)
    check_prompt_length(500, SamplingParams(max_tokens=12), 512)


def test_cli_reports_user_errors_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["generate", str(tmp_path / "missing-model"), "안녕"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hubkit: error:") and "\n" not in err and "missing-model" in err
