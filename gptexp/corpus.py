"""Training text: named corpora from data/registry.yaml, or .txt files and folders given by path."""

from __future__ import annotations

import hashlib
import http.client
import os
import stat
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import yaml

from gptexp.errors import CorpusError

MIRROR_ENV = "GPTEXP_DATA_MIRROR"
DATA_DIR_ENV = "GPTEXP_DATA_DIR"
MAX_BYTES_ENV = "GPTEXP_MAX_CORPUS_BYTES"
# load_corpus holds the whole text in memory, so a corpus above ~1 GiB needs far more RAM than a
# laptop has; raise it on a bigger machine. Training never loads it: streaming.py reads any size.
MAX_CORPUS_BYTES = 2**30
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

    @property
    def characters(self) -> int:
        return len(self.text)


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


def _collapse_whitespace(error: object) -> str:
    """The message on one line: every run of whitespace, newlines included, as one space."""
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
        raise CorpusError(f"corpus registry {path} cannot be read ({_collapse_whitespace(e)}); {fix}") from None
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
    if target.exists() and not target.is_file():
        raise CorpusError(f"{target} is {_kind(target.stat().st_mode)}, not corpus {name!r}'s file: remove it")
    if target.is_file():
        actual = _sha256_file(target)
        if actual == entry.sha256:
            return target
        stale = f"{target} has sha256 {actual} but the registry expects {entry.sha256}, so it was not used; delete it. "

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
        raise CorpusError(
            f"{offline} (download from {entry.url} failed: {_collapse_whitespace(e)}{mirror_note})"
        ) from None
    return target


def max_corpus_bytes() -> int:
    """The corpus size limit: $GPTEXP_MAX_CORPUS_BYTES, read at call time, else MAX_CORPUS_BYTES."""
    raw = os.environ.get(MAX_BYTES_ENV, "").strip()
    if not raw:
        return MAX_CORPUS_BYTES
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise CorpusError(f"{MAX_BYTES_ENV}={raw!r} must be a positive number of bytes (default {MAX_CORPUS_BYTES})")
    return limit


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _too_big(what: str, limit: int) -> CorpusError:
    return CorpusError(
        f"{what} is larger than the {_size(limit)} limit for a corpus held in memory; "
        f"use a smaller corpus, or set {MAX_BYTES_ENV} to a higher number of bytes if this machine has the memory"
    )


def open_corpus_file(path: Path) -> BinaryIO:
    """The regular file `path`, opened for reading; anything else is refused before it is opened.

    Opening a FIFO blocks until a writer comes and /dev/zero never ends, so the kind of file is
    checked with stat first; the descriptor is opened non-blocking and checked again (the path may
    have changed in between). OSError is left to the caller, which names what it was reading.
    """
    mode = path.stat().st_mode  # follows symlinks: a link to /dev/zero is /dev/zero
    if not stat.S_ISREG(mode):
        raise CorpusError(
            f"corpus file {path} is {_kind(mode)}: only regular files (and folders of .txt files) "
            "are corpora; give a text file"
        )
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    f = os.fdopen(fd, "rb")
    mode = os.fstat(f.fileno()).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise CorpusError(f"corpus file {path} is {_kind(mode)}: only regular files are corpora")
    return f


def cannot_read(path: Path, error: OSError) -> CorpusError:
    return CorpusError(f"cannot read corpus file {path}: {_collapse_whitespace(error.strerror or error)}")


def _read_bytes(path: Path, budget: int, limit: int, whole: str) -> bytes:
    """At most `budget` bytes of the regular file `path` (see open_corpus_file).

    The read stops one byte past the budget (the file may grow). `whole` names what the `limit`
    applies to, for the error.
    """
    try:
        with open_corpus_file(path) as f:
            size = os.fstat(f.fileno())
            if size.st_size > budget:
                raise _too_big(whole, limit)
            # Sized by stat, since read(n) sets n bytes aside; a file that grew (or a /proc file,
            # which says 0) is read on, still bounded.
            want = size.st_size + 1
            data = f.read(want)
            if len(data) == want:
                data += f.read(budget + 1 - len(data))
    except OSError as e:
        raise cannot_read(path, e) from None
    if len(data) > budget:
        raise _too_big(whole, limit)
    return data


def _read_text(path: Path) -> str:
    limit = max_corpus_bytes()
    return _decode(path, _read_bytes(path, limit, limit, f"corpus file {path}"))


def _decode(path: Path, data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, data[e.start], e.start) from None
    if not text.strip():
        raise blank_file(path)
    return text


def not_utf8(path: Path, byte: int, offset: int) -> CorpusError:
    return CorpusError(
        f"corpus file {path} is not UTF-8 (byte 0x{byte:02x} at offset {offset}); "
        "convert it to UTF-8, e.g. with iconv -t UTF-8"
    )


def blank_file(path: Path) -> CorpusError:
    return CorpusError(f"corpus file {path} is empty or only whitespace; give a file that holds text")


def _folder_files(path: Path) -> tuple[Path, ...]:
    """The folder's .txt files, sorted so the same folder always yields the same text and checksum."""
    files = []
    for p in sorted(path.glob("*.txt"), key=lambda p: p.name):
        try:
            mode = p.stat().st_mode
        except OSError as e:
            raise cannot_read(p, e) from None
        if stat.S_ISDIR(mode):
            continue  # subfolders are not searched, whatever their name
        if not stat.S_ISREG(mode):
            raise CorpusError(
                f"{p} in corpus folder {path} is {_kind(mode)}: a corpus folder may only hold "
                "regular .txt files; remove it or rename it"
            )
        files.append(p)
    if not files:
        raise CorpusError(f"folder {path} holds no .txt files (subfolders are not searched); add some")
    return tuple(files)


def _read_folder(path: Path, files: tuple[Path, ...]) -> str:
    """The files' texts joined by DOC_SEPARATOR, the size limit applying to all of them together."""
    limit = budget = max_corpus_bytes()
    texts = []
    for f in files:
        data = _read_bytes(f, budget, limit, f"the .txt files of corpus folder {path}")
        budget -= len(data)
        texts.append(_decode(f, data))
    return DOC_SEPARATOR.join(texts)


def corpus_files(source: str | os.PathLike[str], data_dir: Path | None = None, **resolve_kwargs) -> tuple[Path, ...]:
    """The file(s) a source names, in corpus order: a registry corpus's verified file, a text
    file, or a folder's .txt files."""
    path = Path(source)
    if not path.exists():
        registry = load_registry(data_dir)
        if str(source) not in registry:
            raise CorpusError(
                f"{str(source)!r} is neither an existing file or directory nor a registry corpus "
                f"(known: {', '.join(sorted(registry)) or 'none'}); give a path to a text file, "
                "a folder of .txt files, or a known name"
            )
        return (resolve_registry_file(str(source), data_dir, **resolve_kwargs),)
    if path.is_dir():
        return _folder_files(path)
    return (path,)


def load_corpus(source: str | os.PathLike[str], data_dir: Path | None = None, **resolve_kwargs) -> Corpus:
    """The whole text in memory (up to max_corpus_bytes()); training streams it instead (streaming.py)."""
    files = corpus_files(source, data_dir, **resolve_kwargs)
    path = Path(source)
    text = _read_folder(path, files) if path.is_dir() else _read_text(files[0])
    return Corpus(str(source), text, sha256_text(text), files)
