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

from .tags import (
    TAG_COMMAND,
    TAG_CPU,
    TAG_CUDA_VERSION,
    TAG_DETERMINISTIC,
    TAG_DEVICE,
    TAG_GPU,
    TAG_PLATFORM,
    TAG_PRECISION,
    TAG_PYTHON_VERSION,
    TAG_THREADS,
    TAG_TORCH_VERSION,
)

REPO = Path(__file__).resolve().parents[1]
# The start of a URL: a scheme that is not the tail of a longer word (so `--storage=postgresql://`
# finds `postgresql`), then the user up to the first ':' as SQLAlchemy reads it (it may hold '@').
_URL_USER = re.compile(r"(?<![\w+.\-])[A-Za-z][\w+.\-]*://(?P<user>[^:/\s]*):")
# `password=...` in a URL query (ends at '&') or a libpq keyword DSN (ends at a blank, or quoted);
# also sslpassword, passwd, pwd and prefixed names such as PGPASSWORD= or --db-password=.
_KEY_PASSWORD = re.compile(
    r"(?P<key>(?:^|(?<=[\s?&;]))[\w.\-]*(?:password|passwd|pwd)\s*=\s*)"
    r"(?P<value>'(?:[^'\\]|\\.)*'?|\"(?:[^\"\\]|\\.)*\"?|[^\s&#]*)",
    re.IGNORECASE,
)
_AT_OR_BLANK = re.compile(r"[@\s]")
_HOST_PART = re.compile(r"[^/?#@\s]*@")


def _password_end(text: str, start: int) -> int:
    """Where the password starting at text[start] ends (at an '@'), or -1 when there is none.

    Drivers disagree on where a raw password ends, so this covers every reading. SQLAlchemy (which
    Optuna and MLflow parse RDB URLs with) ends it at the first '@', so '/', ':', '?' and '#' may
    appear raw in it; urllib (redis-py) ends the userinfo at the last '@' of the authority, so
    '@' may appear raw too. The password therefore runs to the last '@' before the host part:
    further '@'s count while no '/', '?' or '#' separates them. A URL ends at whitespace.
    """
    at = _AT_OR_BLANK.search(text, start)
    if at is None or at.group() != "@":
        return -1
    end = at.start()
    while more := _HOST_PART.match(text, end + 1):
        end = more.end() - 1
    return end


def _redact_urls(text: str) -> str:
    out, pos, no_password_before = [], 0, 0
    for m in _URL_USER.finditer(text):
        # Skip a match inside a password already redacted, or in a stretch already seen to hold none
        # (which also keeps this linear on long texts).
        if m.start() < pos or m.end() < no_password_before:
            continue
        end = _password_end(text, m.end())
        if end < 0:
            blank = _AT_OR_BLANK.search(text, m.end())
            no_password_before = blank.start() if blank else len(text)
            continue
        out.append(text[pos : m.end()] + "***")
        pos = end
    return "".join(out) + text[pos:]


def redact(value):
    """`value` with every password in it replaced by ***; user names and hosts stay readable.

    Finds URL passwords (`postgresql://user:pw@host/db`, `redis://:pw@host:6379/0`, raw or
    percent-encoded, in a bare URL or anywhere in a longer text such as a command line or an
    error message) and `password=` values of URL queries and libpq keyword DSNs.
    Non-strings are returned unchanged.
    """
    if not isinstance(value, str):
        return value
    return _KEY_PASSWORD.sub(lambda m: m["key"] + "***", _redact_urls(value))


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
        TAG_PYTHON_VERSION: platform.python_version(),
        TAG_TORCH_VERSION: torch.__version__,
        TAG_CUDA_VERSION: str(torch.version.cuda),
        TAG_DEVICE: str(device),
        TAG_PRECISION: precision,
        TAG_THREADS: str(threads),
        TAG_CPU: cpu_model(),
        TAG_PLATFORM: platform.platform(),
        TAG_COMMAND: redact(" ".join(sys.argv)),
        # As in force when the run starts (the runner sets it from train.deterministic first).
        TAG_DETERMINISTIC: str(torch.are_deterministic_algorithms_enabled()).lower(),
    }
    if device.type == "cuda":
        tags[TAG_GPU] = torch.cuda.get_device_name(device)
    return tags
