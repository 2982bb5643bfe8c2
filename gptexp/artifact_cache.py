"""A local copy of a remote run's artifacts, keyed by run id: ~/.cache/gptexp/runs/RUN_ID/.

With a tracking server that proxies artifacts (`gptexp server`), a run's files are not on this
machine: commands that read them (eval, generate, rerun, resume, `train --config runs:/...`)
download what they need here first. Each download lands in a temp folder beside its place and is
renamed into it, so a copy that exists is whole, whoever else downloads the same run at once.

What a run writes once (its config, a finished epoch's checkpoint) is downloaded once; what
changes while it runs (the checkpoint index) is downloaded afresh. A checkpoint folder is taken
only once the index names it: the uploader sends a folder before the index that names it, so a
folder the index names is complete on the server, and an upload cut short leaves the previous
checkpoint in use.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import GptexpError

_RUN_ID = re.compile(r"[0-9a-f]{32}")
_RUNS_URI = re.compile(r"runs:/(?P<run>[0-9a-f]{32})/(?P<path>.+)")


def cache_root() -> Path:
    """$GPTEXP_CACHE_DIR, else $XDG_CACHE_HOME/gptexp, else ~/.cache/gptexp."""
    explicit = os.environ.get("GPTEXP_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gptexp"


def run_dir(run_id: str) -> Path:
    if not _RUN_ID.fullmatch(run_id):  # a run id becomes a folder name: never a path
        raise GptexpError(f"{run_id!r} is not an MLflow run id (32 hex digits)")
    return cache_root() / "runs" / run_id


def fetch(client, run_id: str, path: str, *, fresh: bool = False) -> Path:
    """The local copy of artifact `path` (a file or folder) of run `run_id`, downloaded when it is
    not here yet, or always when `fresh`. Raises what MLflow raises when the run has no such artifact."""
    target = run_dir(run_id) / path
    if target.exists() and not fresh:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        got = Path(client.download_artifacts(run_id, path, str(tmp)))
        if fresh and got.is_file():
            os.replace(got, target)  # atomic over the old copy
        else:
            with contextlib.suppress(FileExistsError, OSError):
                # A folder another process has put there first is as good as this one.
                os.rename(got, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not target.exists():
        raise FileNotFoundError(f"run {run_id} has no artifact {path}")
    return target


def checkpoints(client, run_id: str) -> Path:
    """The run's checkpoints/ folder here: its index as on the server now, and the epoch folders
    the index names (the runner can then resume from, evaluate or sample the one it needs)."""
    from . import checkpoint as ckpt

    root = run_dir(run_id) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(Exception):  # no index (no checkpoint yet): the folder says so to callers
        fetch(client, run_id, f"checkpoints/{ckpt.INDEX}", fresh=True)
    index = ckpt.read_index(root)
    for which in ("last", "best"):
        name = index.get(which)
        if name and not (root / name / ckpt.WEIGHTS).is_file():
            with contextlib.suppress(Exception):
                fetch(client, run_id, f"checkpoints/{name}")
    return root


def resolve_runs_uri(client, uri: str) -> Path:
    """A `runs:/RUN_ID/path` URI as a local file (downloaded into the cache)."""
    m = _RUNS_URI.fullmatch(uri)
    if m is None:
        raise GptexpError(f"{uri!r} is not a runs:/RUN_ID/path URI (RUN_ID: the run's 32-character id)")
    try:
        return fetch(client, m["run"], m["path"].strip("/"))
    except GptexpError:
        raise
    except Exception:
        raise GptexpError(f"run {m['run']} has no artifact {m['path']}: check the URI") from None
