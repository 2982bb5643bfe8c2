"""Training text: named corpora from data/registry.yaml, or .txt files and folders given by path."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from gptexp.errors import CorpusError

MIRROR_ENV = "GPTEXP_DATA_MIRROR"
DATA_DIR_ENV = "GPTEXP_DATA_DIR"
# GPT-2 was trained with this token between documents, so joined files must not run together.
DOC_SEPARATOR = "<|endoftext|>"
_REQUIRED_FIELDS = ("file", "url", "sha256", "licence")


class _FromEnv:
    """Default for `mirror`: read the variable at call time, so tests and users can change it."""

    def __repr__(self) -> str:
        return f"<${MIRROR_ENV}>"


FROM_ENV = _FromEnv()


@dataclass(frozen=True)
class Corpus:
    name: str  # registry name, or the path as given
    text: str
    sha256: str  # hex sha256 of text.encode("utf-8")
    files: tuple[Path, ...]  # the file(s) the text came from


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    file: str
    url: str
    sha256: str
    licence: str
    description: str


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(error: object) -> str:
    return " ".join(str(error).split())


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "data")


def load_registry(data_dir: Path | None = None) -> dict[str, RegistryEntry]:
    path = Path(data_dir or default_data_dir()) / "registry.yaml"
    fix = f"restore it or set {DATA_DIR_ENV} to a folder with a valid registry.yaml"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CorpusError(f"corpus registry {path} does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise CorpusError(f"corpus registry {path} cannot be read ({_one_line(e)}); {fix}") from None
    if not isinstance(raw, dict):
        raise CorpusError(f"corpus registry {path} must map corpus names to entries; {fix}")
    entries = {}
    for name, fields in raw.items():
        if not isinstance(fields, dict) or any(not isinstance(fields.get(k), str) for k in _REQUIRED_FIELDS):
            raise CorpusError(
                f"corpus registry {path}: entry {name!r} needs string fields {', '.join(_REQUIRED_FIELDS)}; {fix}"
            )
        sha = fields["sha256"].lower()
        # The file name becomes a path under data/raw, so it must not climb out of it.
        if Path(fields["file"]).name != fields["file"] or len(sha) != 64 or set(sha) - set("0123456789abcdef"):
            raise CorpusError(
                f"corpus registry {path}: entry {name!r} needs a bare file name and a 64-digit hex sha256; {fix}"
            )
        entries[str(name)] = RegistryEntry(
            str(name), fields["file"], fields["url"], sha, fields["licence"], str(fields.get("description", ""))
        )
    return entries


def _write_verified(source: BinaryIO, target: Path, expected: str, origin: str, name: str) -> None:
    """Copy `source` to `target` only if its sha256 is `expected`, so a bad or partial copy is never seen."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise CorpusError(
                f"corpus {name!r}: {origin} has sha256 {digest.hexdigest()} but the registry expects {expected}; "
                f"refused it and wrote nothing to {target.parent}; replace it with the right file"
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_registry_file(
    name: str,
    data_dir: Path | None = None,
    *,
    mirror: str | os.PathLike[str] | None | _FromEnv = FROM_ENV,
    download: bool = True,
    timeout: float = 30,
) -> Path:
    data_dir = Path(data_dir or default_data_dir())
    registry = load_registry(data_dir)
    if name not in registry:
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(sorted(registry)) or 'none'}")
    entry = registry[name]
    target = data_dir / "raw" / entry.file

    stale = ""
    if target.is_file():
        actual = _sha256_file(target)
        if actual == entry.sha256:
            return target
        stale = (
            f"{target} has sha256 {actual} but the registry expects {entry.sha256}, so it was not used; delete it. "
        )

    if isinstance(mirror, _FromEnv):
        mirror = os.environ.get(MIRROR_ENV) or None
    mirror_note = ""
    if mirror:
        mirrored = Path(mirror) / entry.file
        if mirrored.is_file():
            with mirrored.open("rb") as f:
                _write_verified(f, target, entry.sha256, str(mirrored), name)
            return target
        mirror_note = f"; {MIRROR_ENV}={mirror} has no {entry.file}"

    offline = (
        f"{stale}corpus {name!r} is not available offline: put {entry.file} at {target} "
        f"or set {MIRROR_ENV} to a folder that holds it"
    )
    if not download:
        raise CorpusError(f"{offline} (downloads are turned off{mirror_note})")
    try:
        with urllib.request.urlopen(entry.url, timeout=timeout) as response:
            _write_verified(response, target, entry.sha256, f"the download from {entry.url}", name)
    except CorpusError:
        raise  # a wrong checksum already says what is wrong; the ValueError clause below must not re-wrap it
    # URLError, HTTPError and timeouts are all OSError; a truncated response is an HTTPException.
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise CorpusError(f"{offline} (download from {entry.url} failed: {_one_line(e)}{mirror_note})") from None
    return target


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {path}: {_one_line(e.strerror or e)}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"corpus file {path} is not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "convert it to UTF-8, e.g. with iconv -t UTF-8"
        ) from None
    if not text.strip():
        raise CorpusError(f"corpus file {path} is empty or only whitespace; give a file that holds text")
    return text


def load_corpus(source: str | os.PathLike[str], data_dir: Path | None = None, **resolve_kwargs) -> Corpus:
    path = Path(source)
    if not path.exists():
        registry = load_registry(data_dir)
        if str(source) not in registry:
            raise CorpusError(
                f"{str(source)!r} is neither an existing file or directory nor a registry corpus "
                f"(known: {', '.join(sorted(registry)) or 'none'}); give a path to a text file, "
                "a folder of .txt files, or a known name"
            )
        file = resolve_registry_file(str(source), data_dir, **resolve_kwargs)
        text = _read_text(file)
        return Corpus(str(source), text, sha256_text(text), (file,))
    if path.is_dir():
        # Sorted so the same folder always yields the same text, and the same checksum.
        files = tuple(sorted((p for p in path.glob("*.txt") if p.is_file()), key=lambda p: p.name))
        if not files:
            raise CorpusError(f"folder {path} holds no .txt files (subfolders are not searched); add some")
    else:
        files = (path,)
    text = DOC_SEPARATOR.join(_read_text(f) for f in files)
    return Corpus(str(source), text, sha256_text(text), files)
