"""``hubkit publish``: a model folder, its card and plots go to a Hub repo in ONE commit.

The target is the local Hub by default (``hubkit.hubserver``, started in this process when none runs, with
its data and token under ``~/.cache/hubkit/hub`` or ``$HUBKIT_HUB_ROOT``). With ``HF_ENDPOINT`` (or
``endpoint=``) and ``HF_TOKEN`` (or ``token=``) the same code publishes to any Hub, huggingface.co included:
only the stock ``huggingface_hub`` client talks to the remote.

What one publish does, in order: build the card into a staging folder (and a converted copy of the weights
when a dtype is asked, e.g. a float16 copy for a ``KoGPT6B-ryan1.5b-float16``-style revision),
``create_repo(exist_ok=True)``, ``create_branch`` when the revision is new, ONE ``create_commit`` that adds
every file and deletes the revision's stale ones (so the revision mirrors the folder), then ``create_tag``.
A failure after a repo or branch was created removes it again, so the remote is left as it was, and the
error is one line without the token.

A Space whose ``requirements.txt`` names ``hubkit`` (not on PyPI) gets hubkit's own wheel in its commit
(``wheels/hubkit-*.whl``, built from the checkout hubkit runs from, or ``$HUBKIT_WHEEL``), and that line
becomes ``hubkit @ <the Space's URL of the wheel>``: the Hub's builder installs ``requirements.txt`` before
it copies the rest of the repo, so a relative path would not be found there, while the URL is. (A private
Space's files need a token, which the builder's pip does not have: publish such a Space public, or host
the wheel where the builder can fetch it.)
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from hubkit.errors import HubkitError, InvalidRequestError

LOCAL_HUB_ROOT_ENV = "HUBKIT_HUB_ROOT"
LOCAL_HUB_PORT_ENV = "HUBKIT_HUB_PORT"
DEFAULT_LOCAL_HUB_ROOT = Path("~/.cache/hubkit/hub")
DEFAULT_LOCAL_HUB_PORT = 8500
LOCAL_TOKEN_FILE = "token"
HF_HUB_URL = "https://huggingface.co"
DTYPES = ("float32", "bfloat16", "float16")
#: A prebuilt hubkit wheel for published Spaces (needed when hubkit is not run from a source checkout).
WHEEL_ENV = "HUBKIT_WHEEL"
#: Where a Space commit keeps hubkit's wheel.
SPACE_WHEEL_DIR = "wheels"

# Never uploaded: resumable training state (optimizer moments are 2x the weights) and editor/tool debris.
_SKIP_DIRS = frozenset({"checkpoints", "__pycache__", ".git", ".cache", ".ipynb_checkpoints"})
_SKIP_SUFFIXES = (".tmp", ".lock", ".pyc")
_REF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_BEARER = re.compile(r"(?i)bearer\s+\S+")

_STARTED: dict[Path, tuple[str, Any]] = {}  # local hubs this process started: root -> (url, stop)
_WHEELS: dict[tuple[str, int, int], Path] = {}  # wheels built by this process: source fingerprint -> wheel
_WHEELS_LOCK = threading.Lock()
_STARTED_LOCK = threading.Lock()
_CLIENT_LOCK = threading.RLock()


class PublishError(HubkitError, RuntimeError):
    """A push that did not happen; the message is one line, names the fix, and never holds the token."""


@dataclass(frozen=True, kw_only=True)
class HubTarget:
    """Where a publish goes.

    Attributes:
        endpoint: base URL of the Hub (``HF_ENDPOINT``).
        token: the access token (never shown: ``repr`` hides it).
        local_root: storage folder when the target is hubkit's local Hub.
        started_here: True when this process started that local Hub (it stops when the process exits).
    """

    endpoint: str
    token: str | None = field(default=None, repr=False)
    local_root: Path | None = None
    started_here: bool = False

    @property
    def is_hf(self) -> bool:
        return urlparse(self.endpoint).hostname in ("huggingface.co", "hf.co")


@dataclass(frozen=True, kw_only=True)
class PublishResult:
    """What `publish` sent (or, with ``dry_run``, would send).

    Attributes:
        repo_id: full ``namespace/name``.
        repo_url: the repo's web URL on its Hub (None for a dry run).
        endpoint: the Hub (``HF_ENDPOINT``); for a dry run to the local Hub, its expected URL.
        revision: branch the commit went to ("main" by default).
        commit_id: the commit (None for a dry run).
        tag: the tag created on it, if any.
        files: paths in the repo, as sent in the commit.
        sizes: their sizes in bytes, in the same order.
        deleted: stale paths the commit removed from the revision.
        download_command: an ``hf download`` command that fetches this revision back.
        serve_command: how to serve the local Hub again once this process (which started it) has exited.
        space_url: the Space repo's URL when a Space was published too.
        dry_run: True when nothing was sent.
    """

    repo_id: str
    repo_url: str | None
    endpoint: str
    revision: str
    commit_id: str | None
    tag: str | None
    files: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    deleted: tuple[str, ...] = ()
    download_command: str = ""
    serve_command: str | None = None
    space_url: str | None = None
    dry_run: bool = False

    def summary(self) -> str:
        """A few lines for the terminal."""
        if self.dry_run:
            head = f"dry run: would publish {len(self.files)} files to {self.repo_id}@{self.revision} on {self.endpoint}"
            sizes = self.sizes or (0,) * len(self.files)
            total = f" ({sum(sizes) / 2**20:.1f} MiB)" if self.sizes else ""
            return "\n".join(
                [head + total, *(f"  {f}  {n:,} bytes" for f, n in zip(self.files, sizes, strict=True))]
            )
        lines = [
            f"published {len(self.files)} files to {self.repo_url} (revision {self.revision}, "
            f"commit {(self.commit_id or '')[:10]})"
        ]
        if self.deleted:
            lines.append(f"  removed {len(self.deleted)} stale files: {', '.join(self.deleted)}")
        if self.tag:
            lines.append(f"  tagged {self.tag}")
        if self.space_url:
            lines.append(f"  Space: {self.space_url}")
        if self.serve_command:
            lines.append(f"the local Hub stops with this process; serve it again with: {self.serve_command}")
        lines.append(f"fetch it back with: {self.download_command}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------- redaction


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without the given secrets, Hub-style tokens or Bearer credentials."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _BEARER.sub("Bearer ***", _TOKEN_LIKE.sub("hf_***", text))


def _one_line(exc: BaseException, target: HubTarget | None) -> str:
    from huggingface_hub.errors import HfHubHTTPError

    status = None
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        detail = exc.server_message or str(exc).strip().splitlines()[0]
        text = f"HTTP {status}: {detail}" if status else detail
    else:
        first = next((ln for ln in str(exc).strip().splitlines() if ln.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if target is not None:
        hint = {
            401: "check the token (HF_TOKEN"
            + (f", or the local Hub's {target.local_root / LOCAL_TOKEN_FILE}" if target.local_root else "")
            + ")",
            403: "the token cannot write there: use a write token of that namespace",
            412: "the revision moved while publishing: run the publish again",
        }.get(status or 0)
        if hint is None and _is_connection_error(exc):
            hint = f"is the Hub at {target.endpoint} running?"
        if hint:
            text += f"; {hint}"
    return redact(" ".join(text.split()), target.token if target else None)


def _is_connection_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(
        names & {"ConnectError", "ConnectionError", "ConnectTimeout", "URLError", "ConnectionRefusedError"}
    )


# --------------------------------------------------------------------------------------------- the local Hub


def local_hub_root() -> Path:
    """``$HUBKIT_HUB_ROOT`` or ``~/.cache/hubkit/hub``."""
    return Path(os.environ.get(LOCAL_HUB_ROOT_ENV) or DEFAULT_LOCAL_HUB_ROOT).expanduser().resolve()


def _local_token(root: Path) -> str:
    from hubkit.hubstore import create_token, read_token_file

    path = root / LOCAL_TOKEN_FILE
    if path.is_file():
        return read_token_file(path)
    return create_token(root, name="hubkit-publish", token_file=path)


def _accepts(url: str, token: str) -> bool:
    """True when a hubkit Hub answers at ``url`` and accepts ``token`` (so it serves our root's tokens)."""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
            if json.loads(r.read()).get("service") != "hubkit-hub":
                return False
        req = urllib.request.Request(f"{url}/api/whoami-v2", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def ensure_local_hub(root: str | os.PathLike[str] | None = None, *, port: int | None = None) -> HubTarget:
    """The local Hub: one already serving ``root`` (this process's or a ``hubkit hub serve``), else one
    started now in a background thread of this process.

    Args:
        root: storage folder (default `local_hub_root`); its write token is kept in ``ROOT/token``.
        port: port to look for and start on (default ``$HUBKIT_HUB_PORT`` or 8500; a busy port falls back to
            a free one).
    """
    from hubkit.hubserver import start_hub_in_thread
    from hubkit.hubstore import HubStoreError

    root_path = Path(root).expanduser().resolve() if root is not None else local_hub_root()
    root_path.mkdir(parents=True, exist_ok=True)
    token = _local_token(root_path)
    port = port if port is not None else int(os.environ.get(LOCAL_HUB_PORT_ENV) or DEFAULT_LOCAL_HUB_PORT)
    with _STARTED_LOCK:
        started = _STARTED.get(root_path)
        if started is not None and _accepts(started[0], token):
            return HubTarget(endpoint=started[0], token=token, local_root=root_path, started_here=True)
        candidate = f"http://127.0.0.1:{port}"
        if _accepts(candidate, token):
            return HubTarget(endpoint=candidate, token=token, local_root=root_path)
        try:
            url, stop = start_hub_in_thread(root_path, port=port, token=token)
        except HubStoreError:  # the port is taken by something else: any free port will do
            url, stop = start_hub_in_thread(root_path, port=0, token=token)
        _STARTED[root_path] = (url, stop)
        return HubTarget(endpoint=url, token=token, local_root=root_path, started_here=True)


def resolve_target(
    *, endpoint: str | None = None, token: str | None = None, start: bool = True, local: bool = False
) -> HubTarget:
    """``endpoint=`` or ``$HF_ENDPOINT`` with ``token=``/``$HF_TOKEN``/the stored login; else the local Hub.

    Args:
        endpoint: Hub URL; None reads ``HF_ENDPOINT``, and without it the local Hub is used.
        token: access token; None reads ``HF_TOKEN`` (or, for the local Hub, its token file).
        start: start the local Hub if it does not run (False: only say where it would be).
        local: the local Hub whatever ``HF_ENDPOINT`` says (``endpoint`` must then be None).
    """
    if local and endpoint:
        raise InvalidRequestError("pass either endpoint= or local=True, not both")
    endpoint = None if local else (endpoint or os.environ.get("HF_ENDPOINT"))
    if endpoint:
        endpoint = endpoint.rstrip("/")
        if token is None:
            token = os.environ.get("HF_TOKEN")
        if token is None and urlparse(endpoint).hostname in ("huggingface.co", "hf.co"):
            from huggingface_hub import get_token

            token = get_token()
        return HubTarget(endpoint=endpoint, token=token)
    if not start:
        port = int(os.environ.get(LOCAL_HUB_PORT_ENV) or DEFAULT_LOCAL_HUB_PORT)
        return HubTarget(endpoint=f"http://127.0.0.1:{port}", local_root=local_hub_root())
    target = ensure_local_hub()
    return (
        target
        if token is None
        else HubTarget(
            endpoint=target.endpoint,
            token=token,
            local_root=target.local_root,
            started_here=target.started_here,
        )
    )


@contextlib.contextmanager
def client_settings(target: HubTarget) -> Iterator[None]:
    """Makes the stock ``huggingface_hub`` client fit ``target`` inside the block: Xet off for Hubs other
    than huggingface.co, and offline mode lifted for a Hub on loopback.

    Raises:
        PublishError: ``HF_HUB_OFFLINE`` is set and the target is not on this machine.
    """
    from huggingface_hub import constants

    if not target.is_hf:
        # Only huggingface.co has Xet storage; other Hubs (hubkit's included) take classic LFS uploads. The
        # client read the variable at import, so its constant is set too.
        os.environ["HF_HUB_DISABLE_XET"] = "1"
        constants.HF_HUB_DISABLE_XET = True
    host = urlparse(target.endpoint).hostname or ""
    loopback = host in ("localhost", "::1") or host.startswith("127.")
    with _CLIENT_LOCK:
        offline = constants.HF_HUB_OFFLINE
        if offline and not loopback:
            raise PublishError(
                f"HF_HUB_OFFLINE is set, so nothing can be sent to {target.endpoint}; unset it to publish"
            )
        # Offline mode keeps clients off the network; a Hub on this machine's loopback is not the network.
        constants.HF_HUB_OFFLINE = False
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = offline


# --------------------------------------------------------------------------------------------- staging


def _validate_ref(name: str | None, what: str) -> None:
    if name is None:
        return
    if (
        not _REF_NAME.match(name)
        or ".." in name
        or name.endswith((".", "/", ".lock"))
        or re.fullmatch(r"[0-9a-f]{40}", name)
    ):
        raise InvalidRequestError(
            f"{what} {name!r} is not a valid ref name: use letters, digits, '.', '_', '-', e.g. "
            "KoGPT6B-ryan1.5b-float16"
        )


def _folder_files(folder: Path, *, skip: set[str] = frozenset()) -> dict[str, Path]:
    """Files to upload: path in repo -> local path, without training state, hidden files and debris."""
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(".") and (rel_dir / d).as_posix() not in skip
        )
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if name.startswith(".") or name.endswith(_SKIP_SUFFIXES) or rel in skip:
                continue
            out[rel] = Path(dirpath) / name
    return out


def convert_weights(model_dir: Path, out_dir: Path, dtype: str) -> dict[str, Path]:
    """Copies the folder's safetensors weights to ``out_dir`` in ``dtype`` (floating tensors only) and writes
    a ``config.json`` that says so. Returns path in repo -> converted file.

    Raises:
        PublishError: no safetensors weights to convert.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PublishError(
            f"{model_dir} has no *.safetensors weights to convert to {dtype}; save the model with "
            "safe_serialization=True or publish without --dtype"
        )
    target = getattr(torch, dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    converted: dict[str, Path] = {}
    for src in files:
        # One file at a time: a sharded checkpoint never needs more than one shard in memory.
        with safe_open(str(src), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {}
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(key)
                tensors[key] = t.to(target) if t.is_floating_point() else t
        dst = out_dir / src.name
        save_file(tensors, str(dst), metadata=metadata)
        converted[src.name] = dst
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = dtype
    if "torch_dtype" in config:  # transformers 4.x reads this key
        config["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    converted["config.json"] = out_dir / "config.json"
    return converted


def _stage(
    model_dir: Path,
    staging: Path,
    *,
    repo_id: str,
    revision: str | None,
    endpoint: str | None,
    dtype: str | None,
    card: bool,
    results: Sequence[str | os.PathLike[str]],
) -> dict[str, Path]:
    replaced: dict[str, Path] = {}
    if dtype is not None:
        replaced |= convert_weights(model_dir, staging / "weights", dtype)
    skip = set(replaced)
    if card:
        from hubkit.cards import build_card

        result = build_card(
            model_dir,
            out_dir=staging / "card",
            results=results,
            repo_id=repo_id,
            revision=revision,
            endpoint=endpoint,
            dtype=dtype,
        )
        card_files = {
            p.relative_to(staging / "card").as_posix(): p
            for p in [result.path, *result.plots]
            if p is not None
        }
        replaced |= card_files
        # The generated card and its plots replace the folder's own README.md and plots/.
        skip |= {"README.md"} | {rel for rel in _folder_files(model_dir) if rel.startswith("plots/")}
    files = _folder_files(model_dir, skip=skip)
    files |= replaced
    return dict(sorted(files.items()))


# --------------------------------------------------------------------------------------------- Space wheel


def source_root() -> Path | None:
    """The source checkout hubkit is imported from (with its ``pyproject.toml``), or None for an install."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and re.search(r'(?m)^name\s*=\s*"hubkit"', pyproject.read_text(encoding="utf-8")):
        return root
    return None


def build_hubkit_wheel(out_dir: str | os.PathLike[str]) -> Path:
    """Puts hubkit's wheel (``pip wheel --no-deps``, package data included) into ``out_dir``.

    The wheel is built from a copy of the source checkout hubkit runs from (an in-tree build would leave
    ``build/`` and ``*.egg-info`` behind), once per process and source state; ``$HUBKIT_WHEEL`` names a
    prebuilt wheel to use instead.

    Returns:
        The wheel's path in ``out_dir``.

    Raises:
        PublishError: no source checkout and no ``$HUBKIT_WHEEL``, or the build failed.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prebuilt = os.environ.get(WHEEL_ENV)
    if prebuilt:
        wheel = Path(prebuilt).expanduser()
        if not (wheel.is_file() and wheel.name.startswith("hubkit-") and wheel.suffix == ".whl"):
            raise PublishError(
                f"{WHEEL_ENV}={prebuilt} is not a hubkit-*.whl file; build one with `pip wheel --no-deps .` "
                "in a hubkit checkout"
            )
        return Path(shutil.copy2(wheel, out / wheel.name))
    root = source_root()
    if root is None:
        raise PublishError(
            "this Space needs hubkit's wheel, but hubkit is not run from a source checkout; set "
            f"{WHEEL_ENV} to a hubkit-*.whl (`pip wheel --no-deps .` in a checkout)"
        )
    sources = [root / "pyproject.toml", root / "README.md", *sorted((root / "hubkit").rglob("*"))]
    files = [f for f in sources if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"]
    key = (str(root), len(files), max(f.stat().st_mtime_ns for f in files))
    with _WHEELS_LOCK:
        cached = _WHEELS.get(key)
        if cached is None or not cached.is_file():
            work = Path(tempfile.mkdtemp(prefix="hubkit-wheel-"))
            atexit.register(shutil.rmtree, work, ignore_errors=True)
            cached = _build_wheel(root, work)
            _WHEELS[key] = cached
    return Path(shutil.copy2(cached, out / cached.name))


def _build_wheel(root: Path, work: Path) -> Path:
    src = work / "src"
    shutil.copytree(root / "hubkit", src / "hubkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    # No build isolation: the build backend (setuptools) comes from this environment, not from an index.
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
               "--quiet", "--wheel-dir", str(work / "dist"), str(src)]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted((work / "dist").glob("hubkit-*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        last = next(
            (ln for ln in reversed(proc.stderr.strip().splitlines()) if ln.strip()), "no wheel written"
        )
        raise PublishError(
            f"building hubkit's wheel for the Space failed ({last.strip()}); check that setuptools is "
            f"installed, or set {WHEEL_ENV} to a prebuilt hubkit-*.whl"
        )
    return wheels[0]


def _names_hubkit(line: str) -> bool:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    body = re.split(r"\s#", line, maxsplit=1)[0].strip()
    if not body or body.startswith(("#", "-")):
        return False
    try:
        return canonicalize_name(Requirement(body).name) == "hubkit"
    except InvalidRequirement:
        return False


def space_requirements(text: str, wheel_url: str) -> str:
    """``requirements.txt`` with each line naming hubkit turned into ``hubkit @ wheel_url`` (extras and
    environment markers kept); other lines as they are."""
    from packaging.requirements import Requirement

    out = []
    for line in text.splitlines():
        if _names_hubkit(line):
            req = Requirement(re.split(r"\s#", line, maxsplit=1)[0].strip())
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            line = f"hubkit{extras} @ {wheel_url}" + (f" ; {req.marker}" if req.marker else "")
        out.append(line)
    return "\n".join(out) + "\n"


def _space_needs_wheel(space: Path) -> bool:
    requirements = space / "requirements.txt"
    return requirements.is_file() and any(
        _names_hubkit(line) for line in requirements.read_text(encoding="utf-8").splitlines()
    )


# --------------------------------------------------------------------------------------------- publish


def publish(
    model_dir: str | os.PathLike[str],
    repo_id: str,
    *,
    revision: str | None = None,
    tag: str | None = None,
    dtype: str | None = None,
    space_dir: str | os.PathLike[str] | None = None,
    space_id: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    local: bool = False,
    private: bool = False,
    dry_run: bool = False,
    card: bool = True,
    results: Sequence[str | os.PathLike[str]] = (),
    commit_message: str | None = None,
) -> PublishResult:
    """Publishes a model folder (weights, tokenizer, card, plots) in one commit.

    Args:
        model_dir: Hugging Face model folder; ``checkpoints/`` and hidden files are left out.
        repo_id: ``namespace/name`` (or ``name`` for the token's own namespace).
        revision: branch to commit to, created from main when new (e.g. ``KoGPT6B-ryan1.5b-float16``);
            None for main.
        tag: tag to put on the new commit; it must not exist yet.
        dtype: publish a copy of the weights converted to float16, bfloat16 or float32.
        space_dir: a Space folder (``spaces/NAME``, with ``app.py``) to publish as a Space repo too.
        space_id: the Space's repo id (default: the model's namespace and the folder's name).
        endpoint: Hub URL (default ``$HF_ENDPOINT``, else hubkit's local Hub).
        token: access token (default ``$HF_TOKEN``; the local Hub's token file for the local Hub).
        local: publish to hubkit's local Hub even when ``HF_ENDPOINT`` is set.
        private: create the repo private.
        dry_run: only stage and list what would be sent; contacts no Hub.
        card: generate ``README.md`` and ``plots/`` with `hubkit.cards.build_card` (False: upload the
            folder's own README).
        results: scoring run folders the card reports.
        commit_message: the commit's title.

    Returns:
        What was sent, with the ``hf download`` command that fetches it back.

    Raises:
        InvalidRequestError: bad arguments (before anything is sent).
        PublishError: the push failed; the remote is as it was.
    """
    from hubkit.models import resolve_model

    given = Path(os.fspath(model_dir)).expanduser()
    # A PEFT adapter folder (`hubkit tune --method prompt`) has no config.json of its own: it publishes as is.
    folder = given.resolve() if (given / "adapter_config.json").is_file() else Path(resolve_model(model_dir))
    if not folder.is_dir():
        raise InvalidRequestError(
            f"{model_dir!r} is not a local model folder; publish needs the files on disk"
        )
    _check_repo_id(repo_id)
    _validate_ref(revision, "revision")
    _validate_ref(tag, "tag")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidRequestError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    space = Path(space_dir).expanduser().resolve() if space_dir is not None else None
    if space is not None and not (space / "app.py").is_file() and not (space / "README.md").is_file():
        raise InvalidRequestError(f"{space} is not a Space folder (no app.py or README.md); pass spaces/NAME")
    if space_id is not None:
        _check_repo_id(space_id)

    target = resolve_target(endpoint=endpoint, token=token, start=not dry_run, local=local)
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="hubkit-publish-") as tmp:
        staging = Path(tmp)
        files = _stage(
            folder,
            staging,
            repo_id=repo_id,
            revision=revision,
            endpoint=None if target.is_hf else target.endpoint,
            dtype=dtype,
            card=card,
            results=results,
        )
        if dry_run:
            return PublishResult(
                repo_id=repo_id,
                repo_url=None,
                endpoint=target.endpoint,
                revision=branch,
                commit_id=None,
                tag=tag,
                files=tuple(files),
                sizes=tuple(p.stat().st_size for p in files.values()),
                download_command=_download_command(target, repo_id, revision, private),
                dry_run=True,
            )
        sizes = tuple(p.stat().st_size for p in files.values())
        # Built before anything is pushed: a build failure must not leave a model without its Space.
        space_wheel = (
            build_hubkit_wheel(staging / "wheel") if space is not None and _space_needs_wheel(space) else None
        )
        message = commit_message or (f"Publish {folder.name} with hubkit" + (f" ({dtype})" if dtype else ""))
        try:
            with client_settings(target):
                result = _push(target, files, repo_id, branch, revision, tag, private, message)
                space_url = None
                if space is not None:
                    sid = space_id or f"{result['repo_id'].split('/')[0]}/{space.name}"
                    space_url = _push_space(target, space, sid, result["repo_id"], private, wheel=space_wheel)
        except PublishError as exc:
            raise PublishError(redact(str(exc), target.token)) from None
        except Exception as exc:  # the client's errors vary by version; all become one redacted line
            raise PublishError(
                f"publishing {repo_id} to {target.endpoint} failed: {_one_line(exc, target)}"
            ) from None
    return PublishResult(
        repo_id=result["repo_id"],
        repo_url=result["url"],
        endpoint=target.endpoint,
        revision=branch,
        commit_id=result["commit"],
        tag=tag,
        files=tuple(files),
        sizes=sizes,
        deleted=tuple(result["deleted"]),
        download_command=_download_command(target, result["repo_id"], revision, private),
        serve_command=(
            f"hubkit hub serve --root {target.local_root} --port {urlparse(target.endpoint).port}"
            if target.started_here and target.local_root is not None
            else None
        ),
        space_url=space_url,
    )


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise InvalidRequestError(
            f"repo id {repo_id!r} is invalid: use 'namespace/name' with letters, digits, '-', '_', '.'"
        ) from None


def _push(
    target: HubTarget,
    files: dict[str, Path],
    repo_id: str,
    branch: str,
    revision: str | None,
    tag: str | None,
    private: bool,
    message: str,
) -> dict[str, Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=target.endpoint, token=target.token)
    if "/" not in repo_id:
        # Resolve the namespace first: the rollback below must ask about the very repo it may delete.
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    existed = api.repo_exists(repo_id)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    full_id = url.repo_id
    created_branch = False
    try:
        refs = api.list_repo_refs(full_id)
        if tag is not None and any(t.name == tag for t in refs.tags):
            raise PublishError(
                f"tag {tag!r} already exists on {full_id}; tags do not move, pick another --tag"
            )
        heads = {b.name: b.target_commit for b in refs.branches}
        if revision is not None and revision not in heads:
            api.create_branch(full_id, branch=revision)
            created_branch = True
            heads = {b.name: b.target_commit for b in api.list_repo_refs(full_id).branches}
        present = set(api.list_repo_files(full_id, revision=branch))
        stale = sorted(p for p in present - set(files) if p != ".gitattributes")
        operations = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()
        ]
        operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
        # parent_commit: if someone else pushed to the branch since we listed it, this commit is refused
        # instead of silently mirroring a folder over their change.
        info = api.create_commit(
            full_id,
            operations=operations,
            commit_message=message,
            revision=branch,
            parent_commit=heads[branch],
        )
        if tag is not None:
            api.create_tag(full_id, tag=tag, revision=info.oid, tag_message=message)
    except BaseException as exc:
        _rollback(api, full_id, delete_repo=not existed, branch=revision if created_branch else None, exc=exc)
        raise
    return {"repo_id": full_id, "url": str(url), "commit": info.oid, "deleted": stale}


def _rollback(api, repo_id: str, *, delete_repo: bool, branch: str | None, exc: BaseException) -> None:
    """Undoes what this publish created before its commit failed, so the remote is as it was."""
    try:
        if delete_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif branch is not None:
            api.delete_branch(repo_id, branch=branch)
    except Exception as cleanup:  # report both: the cause, and that the cleanup did not finish
        exc.add_note(f"cleanup failed too: {type(cleanup).__name__}")


def _push_space(
    target: HubTarget, space: Path, space_id: str, model_id: str, private: bool, *, wheel: Path | None = None
) -> str:
    """The Space folder as a Space repo, in one commit that mirrors it (plus hubkit's ``wheel``, which its
    requirements.txt then installs by URL)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=target.endpoint, token=target.token)
    with tempfile.TemporaryDirectory(prefix="hubkit-space-") as tmp:
        files = _folder_files(space)
        sdk = "gradio"
        if "README.md" in files:
            from huggingface_hub import SpaceCard

            data = SpaceCard.load(files["README.md"]).data
            sdk = data.get("sdk") or sdk
        else:
            readme = Path(tmp) / "README.md"
            readme.write_text(_space_readme(space.name, model_id), encoding="utf-8")
            files["README.md"] = readme
        existed = api.repo_exists(space_id, repo_type="space")
        url = api.create_repo(space_id, repo_type="space", space_sdk=sdk, private=private, exist_ok=True)
        try:
            if wheel is not None:
                rel = f"{SPACE_WHEEL_DIR}/{wheel.name}"
                wheel_url = f"{target.endpoint}/spaces/{url.repo_id}/resolve/main/{rel}"
                requirements = Path(tmp) / "requirements.txt"
                requirements.write_text(
                    space_requirements(files["requirements.txt"].read_text(encoding="utf-8"), wheel_url),
                    encoding="utf-8",
                )
                files["requirements.txt"] = requirements
                files[rel] = wheel
            present = set(api.list_repo_files(url.repo_id, repo_type="space"))
            ops = [
                CommitOperationAdd(path_in_repo=r, path_or_fileobj=str(p)) for r, p in sorted(files.items())
            ]
            ops += [CommitOperationDelete(p) for p in sorted(present - set(files)) if p != ".gitattributes"]
            api.create_commit(
                url.repo_id, repo_type="space", operations=ops, commit_message=f"Publish Space {space.name}"
            )
        except BaseException as exc:
            if not existed:
                with contextlib.suppress(Exception):
                    api.delete_repo(url.repo_id, repo_type="space", missing_ok=True)
            exc.add_note("space publish failed")
            raise
    return str(url)


def _space_readme(name: str, model_id: str) -> str:
    from huggingface_hub import SpaceCard, SpaceCardData

    from hubkit.cards import TEMPLATES_DIR

    data = SpaceCardData(title=name, sdk="gradio", app_file="app.py", models=[model_id], license="apache-2.0")
    template = Path(os.environ.get("HUBKIT_CARD_TEMPLATES") or TEMPLATES_DIR) / "space_card.md.j2"
    if template.is_file():
        return str(SpaceCard.from_template(data, template_path=str(template), name=name, model_id=model_id))
    return f"---\n{data.to_yaml()}\n---\n\n# {name}\n\nA demo of [{model_id}]({model_id}).\n"


def _download_command(target: HubTarget, repo_id: str, revision: str | None, private: bool) -> str:
    parts = []
    if not target.is_hf:
        parts += [f"HF_ENDPOINT={target.endpoint}", "HF_HUB_DISABLE_XET=1"]
    if private and target.local_root is not None:
        parts.append(f"HF_TOKEN=$(cat {target.local_root / LOCAL_TOKEN_FILE})")
    from hubkit.cards import local_dir_name

    local_dir = local_dir_name(repo_id, revision)
    parts += ["hf", "download", repo_id]
    if revision:
        parts += ["--revision", revision]
    parts += ["--local-dir", local_dir]
    return " ".join(parts)


def stop_local_hubs() -> None:
    """Stops the local Hubs this process started (tests; a CLI process simply exits)."""
    with _STARTED_LOCK:
        for _url, stop in _STARTED.values():
            stop()
        _STARTED.clear()


__all__ = [
    "HubTarget",
    "PublishError",
    "PublishResult",
    "build_hubkit_wheel",
    "client_settings",
    "convert_weights",
    "ensure_local_hub",
    "local_hub_root",
    "publish",
    "redact",
    "resolve_target",
    "source_root",
    "space_requirements",
    "stop_local_hubs",
]
