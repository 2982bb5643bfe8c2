"""A corpus made ready to train on: the book's train and validation token ids, cached on disk.

`prepare_corpus` streams the corpus (corpus_stream.py) and its ids (stream_encode.py) in bounded
memory, whatever the corpus size:

1. one read for the corpus's identity and length (sha256, characters), each file checked;
2. one read for the sha256 of the train text and of the validation text (the book's character
   split, at int(train_ratio * characters)): the token caches are named by them, as
   `token_cache.cached_token_ids` names them, so a cache either path wrote serves both;
3. only for a split whose cache is missing or does not verify: one read that encodes it on all
   cores and appends the ids to the cache file as they come (tokens.CacheWriter).

The ids are those of `tokenizer.encode(split_text, allowed_special={"<|endoftext|>"})`, bit for
bit, so the book's numbers do not change; a run reads them memory-mapped when large.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import interrupts
from .corpus import corpus_files, default_data_dir
from .corpus_stream import BLOCK_BYTES, StreamedCorpus, corpus_parts, scan_files
from .errors import RunFailed
from .stream_encode import CHUNK_CHARS, stream_encode
from .token_cache import CacheWriter, cache_path, read_cache
from .tokenizer import get_tokenizer

SPLIT_NAMES = ("train", "validation")


def default_threads() -> int:
    """Every CPU this process may run on: tiktoken's threads encode without the GIL."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class PreparedSplit:
    name: str  # "train" or "validation"
    characters: tuple[int, int]  # [start, end) in the corpus text
    text_sha256: str
    path: Path  # its token cache
    tokens: int
    encoded: bool  # False when the cache was already there and verified
    ids: np.ndarray | None  # memory-mapped when large; None when not asked for


@dataclass(frozen=True)
class PreparedCorpus:
    corpus: StreamedCorpus
    train_ratio: float
    train: PreparedSplit
    validation: PreparedSplit
    threads: int
    encode_seconds: float  # 0 when both caches were there

    @property
    def splits(self) -> tuple[PreparedSplit, PreparedSplit]:
        return self.train, self.validation


class Progress:
    """A tqdm bar per phase on a terminal (bytes, rate, ETA; tokens when encoding), else silent.

    Phases smaller than `min_bytes` get no bar, so a small corpus prepares without a flicker; a
    bar is redrawn at most every `refresh_s` seconds, and once more, complete, when it closes.
    """

    def __init__(self, stream=None, bars: bool | None = None, min_bytes: int = 0, refresh_s: float = 0.1):
        self.stream = stream or sys.stderr
        self.bars = self.stream.isatty() if bars is None else bars
        self.min_bytes = min_bytes
        self.refresh_s = refresh_s
        self.bar = None
        self.tokens = 0
        self.started = 0.0

    def phase(self, description: str, total_bytes: int) -> None:
        self.close()
        self.tokens, self.started = 0, time.perf_counter()
        if self.bars and total_bytes >= self.min_bytes:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_bytes,
                desc=description,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                mininterval=self.refresh_s,
            )

    def advance(self, n_bytes: int = 0, n_tokens: int = 0) -> None:
        self.tokens += n_tokens
        if self.bar is not None:
            self.bar.update(n_bytes)
            if n_tokens:
                rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
                self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None


def _split_digests(corpus: StreamedCorpus, at: int, block_bytes: int, progress: Progress) -> list[str]:
    digests = [hashlib.sha256(), hashlib.sha256()]
    progress.phase("hashing the splits", corpus.text_bytes)
    for part, _, raw in corpus_parts(corpus, at, block_bytes):
        interrupts.check()
        digests[part].update(raw)
        progress.advance(len(raw))
    return [d.hexdigest() for d in digests]


def _stale_temp_prefix(path: Path) -> str:
    return f"{path.name}.{socket.gethostname()}-"


def _remove_stale_temps(path: Path) -> None:
    """Temp files a prepare on this host left when it was killed (its process is gone): they are
    never read, but may be gigabytes."""
    prefix = _stale_temp_prefix(path)
    for tmp in path.parent.glob(f"{path.name}.*.tmp"):
        if not tmp.name.startswith(prefix):
            continue
        pid = tmp.name[len(prefix) :].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # alive, another user's: leave it


def _encode_splits(
    corpus: StreamedCorpus,
    at: int,
    writers: dict[int, CacheWriter],
    tokenizer,
    threads: int,
    chunk_chars: int,
    block_bytes: int,
    progress: Progress,
) -> None:
    progress.phase(f"encoding on {threads} threads", corpus.text_bytes)
    for part, blocks in itertools.groupby(corpus_parts(corpus, at, block_bytes), key=lambda b: b[0]):
        texts = _texts(blocks, progress)
        if part not in writers:
            for _ in texts:  # its cache is there: read past it
                pass
            continue
        writer = writers[part]
        for ids in stream_encode(texts, tokenizer, threads, chunk_chars):
            writer.append(ids)
            progress.advance(n_tokens=len(ids))


def _texts(blocks, progress: Progress) -> Iterator[str]:
    for _, text, raw in blocks:
        interrupts.check()  # a stop requested inside a job (a sweep worker) is honoured block by block
        progress.advance(len(raw))
        yield text


def prepare_corpus(
    source: str | os.PathLike[str],
    train_ratio: float,
    data_dir: Path | None = None,
    *,
    tokenizer=None,
    threads: int = 0,
    load: bool = True,
    progress: Progress | None = None,
    chunk_chars: int = CHUNK_CHARS,
    block_bytes: int = BLOCK_BYTES,
) -> PreparedCorpus:
    """The corpus's train and validation token ids, from their caches under data_dir/cache, encoding
    (on `threads` threads, 0 = every CPU) only what is not cached. `load=False` leaves the ids on disk."""
    data_dir = Path(data_dir or default_data_dir())
    tokenizer = tokenizer or get_tokenizer("gpt2")
    threads = threads or default_threads()
    progress = progress or Progress(bars=False)
    try:
        corpus = _scan(source, data_dir, block_bytes, progress)
        at = corpus.split_at(train_ratio)
        ranges = [(0, at), (at, corpus.characters)]
        digests = _split_digests(corpus, at, block_bytes, progress)
        paths = [cache_path(data_dir / "cache", d, tokenizer) for d in digests]
        found: dict[int, np.ndarray] = {}
        for part, (path, digest) in enumerate(zip(paths, digests, strict=True)):
            if path.exists():
                ids, problem = read_cache(path, tokenizer, digest)
                if ids is not None:
                    found[part] = ids
                    continue
                warnings.warn(f"token cache {path} {problem}; re-encoded the text and rewrote it", stacklevel=2)
        seconds = 0.0
        missing = [part for part in (0, 1) if part not in found]
        counts = {part: len(ids) for part, ids in found.items()}
        if missing:
            t0 = time.perf_counter()
            writers: dict[int, CacheWriter] = {}
            try:
                for part in missing:
                    _remove_stale_temps(paths[part])
                    writers[part] = CacheWriter(
                        paths[part],
                        tokenizer,
                        digests[part],
                        temp_prefix=_stale_temp_prefix(paths[part]) + f"{os.getpid()}.",
                    )
                _encode_splits(corpus, at, writers, tokenizer, threads, chunk_chars, block_bytes, progress)
                for part, writer in writers.items():
                    writer.commit()
                    counts[part] = writer.count
            except BaseException as exc:
                for writer in writers.values():
                    writer.abort()
                if isinstance(exc, OSError):  # reading errors are CorpusErrors by now: this is the cache
                    raise RunFailed(
                        f"cannot write the token cache in {paths[0].parent}: "
                        f"{exc.strerror or exc}; free disk space or make it writable"
                    ) from None
                raise
            seconds = time.perf_counter() - t0
            if load:
                for part in missing:
                    ids, problem = read_cache(paths[part], tokenizer, digests[part])
                    if ids is None:  # written and synced just now: only a faulty disk gets here
                        raise RunFailed(f"token cache {paths[part]} {problem} right after it was written")
                    found[part] = ids
    finally:
        progress.close()
    splits = [
        PreparedSplit(
            SPLIT_NAMES[p], ranges[p], digests[p], paths[p], counts[p], p in missing, found.get(p) if load else None
        )
        for p in (0, 1)
    ]
    return PreparedCorpus(corpus, train_ratio, splits[0], splits[1], threads, seconds)


def _scan(source, data_dir: Path, block_bytes: int, progress: Progress) -> StreamedCorpus:
    files = corpus_files(source, data_dir)
    total = 0
    for f in files:
        with contextlib.suppress(OSError):  # scanning the files reports it
            total += f.stat().st_size
    progress.phase("reading the corpus", total)

    def advance(n: int) -> None:
        interrupts.check()
        progress.advance(n)

    return scan_files(str(source), files, block_bytes=block_bytes, progress=advance)
