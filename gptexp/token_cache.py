"""Token ids: encoded once per (text sha256, tokenizer), kept on disk as one flat integer array.

The array is uint16 for GPT-2's 50,257-token vocabulary (uint32 beyond 65,536) and is
memory-mapped when large, so a corpus never lives in the process as Python ints.

A cache file is a fixed header (magic, format version, dtype, token count, the text's sha256 and
a blake2b digest of the ids) followed by the ids, little-endian. It is verified on every read: a
truncated, damaged, foreign or old-format (headerless) file is re-encoded and rewritten, with a
warning, so a run never trains on part of its corpus while recording the whole corpus's sha256.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import warnings
from pathlib import Path

import numpy as np

# Above this size the cache file is memory-mapped rather than read into memory.
MMAP_BYTES = 64 * 2**20
MAGIC = b"GPTEXPTK"
VERSION = 1
# magic, version, dtype ('<u2 ' or '<u4 '), token count, text sha256, blake2b-256 of the ids; padded to 96
# bytes so that the ids that follow stay aligned for any dtype.
_HEADER = struct.Struct("<8sI4sQ32s32s8x")
HEADER_BYTES = _HEADER.size
# The digest of a memory-mapped cache is computed in blocks of this many bytes, never all at once.
_DIGEST_BLOCK = 16 * 2**20


def token_dtype(n_vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if n_vocab <= 2**16 else np.dtype(np.uint32)


def encode(text: str, tokenizer) -> np.ndarray:
    """text -> flat token-id array, `<|endoftext|>` allowed as the book's GPTDatasetV1 does."""
    ids = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return np.asarray(ids, dtype=token_dtype(tokenizer.n_vocab))


def cache_path(cache_dir: Path, text_sha256: str, tokenizer) -> Path:
    dtype = token_dtype(tokenizer.n_vocab)
    return Path(cache_dir) / f"{text_sha256}.{tokenizer.name}.{dtype.name}"


def cached_token_ids(text: str, tokenizer, cache_dir: Path | None, text_sha256: str | None = None) -> np.ndarray:
    """encode(text) through an on-disk cache that verifies itself; cache_dir None encodes in memory."""
    if cache_dir is None:
        return encode(text, tokenizer)
    sha = text_sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = cache_path(cache_dir, sha, tokenizer)
    dtype = _disk_dtype(token_dtype(tokenizer.n_vocab))
    if path.exists():
        ids, problem = _read(path, dtype, sha)
        if ids is not None:
            return ids
        warnings.warn(f"token cache {path} {problem}; re-encoded the text and rewrote it", stacklevel=2)
    ids = encode(text, tokenizer).astype(dtype, copy=False)
    _write(path, ids, sha)
    return ids


def _disk_dtype(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<")


def _digest(ids: np.ndarray) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    step = max(1, _DIGEST_BLOCK // ids.itemsize)
    for start in range(0, len(ids), step):
        digest.update(ids[start : start + step].data)
    return digest.digest()


def _header(ids: np.ndarray, text_sha256: str) -> bytes:
    return _HEADER.pack(
        MAGIC, VERSION, ids.dtype.str.encode().ljust(4), len(ids), bytes.fromhex(text_sha256), _digest(ids)
    )


def _write(path: Path, ids: np.ndarray, text_sha256: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temp name and renamed, so a crash never leaves a truncated cache behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_header(ids, text_sha256))
            f.write(np.ascontiguousarray(ids).data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: Path, dtype: np.dtype, text_sha256: str) -> tuple[np.ndarray | None, str]:
    """(ids, "") when the cache at `path` verifies, else (None, what is wrong with it)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(HEADER_BYTES)
            if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
                return None, "has no checksum header (an older gptexp's format, or not a token cache)"
            magic, version, dtype_code, count, text_digest, ids_digest = _HEADER.unpack(raw)
            if version != VERSION or dtype_code.strip() != dtype.str.encode() or text_digest.hex() != text_sha256:
                return None, "was written for another format, dtype or text"
            expected = HEADER_BYTES + count * dtype.itemsize
            if size != expected:
                state = "truncated" if size < expected else "too long"
                return None, f"is {state} ({size:,} bytes where its header says {expected:,} for {count:,} tokens)"
            ids: np.ndarray
            if size >= MMAP_BYTES:
                # Digested through reads, not the mapping: a mapping's pages would stay in this
                # process's resident memory, the whole file of them.
                if _file_digest(f) != ids_digest:
                    return None, "is damaged (its ids do not match their checksum)"
                return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,)), ""
            ids = np.fromfile(f, dtype=dtype, count=count)
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if len(ids) != count:
        return None, f"is truncated (it holds {len(ids):,} of its {count:,} tokens)"
    if _digest(ids) != ids_digest:
        return None, "is damaged (its ids do not match their checksum)"
    return ids, ""


def _file_digest(f) -> bytes:
    digest = hashlib.blake2b(digest_size=32)
    for block in iter(lambda: f.read(_DIGEST_BLOCK), b""):
        digest.update(block)
    return digest.digest()


def read_cache(path: Path, tokenizer, text_sha256: str) -> tuple[np.ndarray | None, str]:
    """The ids in the cache at `path` when it verifies for this text and tokenizer, else (None, why not)."""
    return _read(path, _disk_dtype(token_dtype(tokenizer.n_vocab)), text_sha256)


class CacheWriter:
    """A token cache written as the ids come, in the format `_read` verifies.

    The ids go to a temp file after a blank header; `commit` writes the header (count, digest)
    last, syncs and renames, so a cache interrupted at any point is never found under its name.
    Used as a context manager, an exception (or Ctrl-C) removes the temp file.
    """

    def __init__(self, path: Path, tokenizer, text_sha256: str, *, temp_prefix: str | None = None):
        self.path, self.text_sha256 = Path(path), text_sha256
        self.dtype = _disk_dtype(token_dtype(tokenizer.n_vocab))
        self.count = 0
        self._digest = hashlib.blake2b(digest_size=32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=temp_prefix or self.path.name, suffix=".tmp")
        self.tmp = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self._file.write(bytes(HEADER_BYTES))

    def append(self, ids: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        self._digest.update(ids.data)
        self._file.write(ids.data)
        self.count += len(ids)

    def commit(self) -> Path:
        f = self._file
        f.seek(0)
        f.write(
            _HEADER.pack(
                MAGIC,
                VERSION,
                self.dtype.str.encode().ljust(4),
                self.count,
                bytes.fromhex(self.text_sha256),
                self._digest.digest(),
            )
        )
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
