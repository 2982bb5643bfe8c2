"""What a reader needs to re-run a job: code version, environment, hardware; secrets redacted."""

from __future__ import annotations

import importlib.metadata
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# user:password@ in any URL (postgresql://u:p@host/db, https://u:p@host/...).
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]*)@")


def redact(value):
    """`value` with any password inside a URL replaced by ***; non-strings unchanged."""
    if not isinstance(value, str):
        return value
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@dataclass(frozen=True)
class GitState:
    commit: str | None
    dirty: bool
    diff: str  # `git diff HEAD` when dirty (tracked files), else ""


def git_state() -> GitState:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return GitState(None, False, "")
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    dirty = bool(status.strip())
    return GitState(commit.strip(), dirty, (_git("diff", "HEAD") or "") if dirty else "")


def pip_freeze() -> str:
    """`pip freeze`-style lines from the installed distributions (no subprocess, no pip needed)."""
    lines = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            lines.add(f"{name}=={dist.version}")
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags(device: torch.device, precision: str, threads: int) -> dict[str, str]:
    tags = {
        "gptexp.python_version": platform.python_version(),
        "gptexp.torch_version": torch.__version__,
        "gptexp.cuda_version": str(torch.version.cuda),
        "gptexp.device": str(device),
        "gptexp.precision": precision,
        "gptexp.threads": str(threads),
        "gptexp.cpu": cpu_model(),
        "gptexp.platform": platform.platform(),
        "gptexp.command": redact(" ".join(sys.argv)),
    }
    if device.type == "cuda":
        tags["gptexp.gpu"] = torch.cuda.get_device_name(device)
    return tags
