"""Token ids: encoded once per (text sha256, tokenizer), kept on disk as one flat integer array.

The array is uint16 for GPT-2's 50,257-token vocabulary (uint32 beyond 65,536) and is
memory-mapped when large, so a corpus never lives in the process as Python ints.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

# Above this size the cache file is memory-mapped rather than read into memory.
MMAP_BYTES = 64 * 2**20


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
    """encode(text) through an on-disk cache; cache_dir None encodes in memory."""
    if cache_dir is None:
        return encode(text, tokenizer)
    sha = text_sha256 or hashlib.sha256(text.encode("utf-8")).hexdigest()
    path = cache_path(cache_dir, sha, tokenizer)
    dtype = token_dtype(tokenizer.n_vocab)
    if path.exists():
        return _read(path, dtype)
    ids = encode(text, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temp name and renamed, so a crash never leaves a truncated cache behind.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(ids.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return ids


def _read(path: Path, dtype: np.dtype) -> np.ndarray:
    if path.stat().st_size >= MMAP_BYTES:
        return np.memmap(path, dtype=dtype, mode="r")
    return np.fromfile(path, dtype=dtype)
