"""A corpus read as a stream of text, in bounded blocks, never whole.

The text is the one `corpus.load_corpus` would build (the files' texts joined by
`<|endoftext|>`), but it is only ever seen a block at a time: `scan_corpus` reads it once for its
identity (sha256, characters, per-file sizes), and `corpus_parts` reads it again as the book's
train and validation texts, cut at the train_ratio character as `split_text` cuts the whole text.
Memory is bounded by the block size, whatever the corpus size, so there is no size limit here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .corpus import (
    DOC_SEPARATOR,
    blank_file,
    cannot_read,
    corpus_files,
    not_utf8,
    open_corpus_file,
)
from .errors import CorpusError

# Bytes read from a file at a time; the text of one block is the largest string the reading holds.
BLOCK_BYTES = 4 * 2**20
_SEPARATOR_BYTES = DOC_SEPARATOR.encode("utf-8")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    bytes: int
    characters: int
    mtime_ns: int  # with the size, tells a file that changed between two reads


@dataclass(frozen=True)
class StreamedCorpus:
    """A corpus's identity, without its text: `name`, `sha256` and `files` as `corpus.Corpus` has them."""

    name: str  # registry name, or the path as given
    sha256: str  # hex sha256 of the joined text's UTF-8, the same digest as load_corpus(...).sha256
    characters: int  # len() of the joined text
    entries: tuple[CorpusFile, ...]

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(f.path for f in self.entries)

    @property
    def file_bytes(self) -> int:
        return sum(f.bytes for f in self.entries)

    @property
    def text_bytes(self) -> int:
        """UTF-8 bytes of the joined text: the files and the separators between them."""
        return self.file_bytes + len(_SEPARATOR_BYTES) * (len(self.entries) - 1)

    def split_at(self, train_ratio: float) -> int:
        """The book's split character, as `datasets.split_text` computes it on the whole text."""
        return int(train_ratio * self.characters)


def _complete_prefix(data: bytes) -> int:
    """Length of `data` without a UTF-8 sequence cut off at its end (kept for the next block).

    Anything invalid is left in, for the decoder to report at its true offset.
    """
    end = len(data)
    i = end - 1
    while i >= max(0, end - 4) and data[i] & 0xC0 == 0x80:
        i -= 1
    if i < 0 or data[i] & 0xC0 == 0x80:
        return end
    lead = data[i]
    need = (
        1
        if lead < 0x80
        else 2
        if lead >> 5 == 0b110
        else 3
        if lead >> 4 == 0b1110
        else 4
        if lead >> 3 == 0b11110
        else 1
    )
    return i if end - i < need else end


def decoded_blocks(f: BinaryIO, path: Path, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, bytes]]:
    """(text, its UTF-8 bytes) of the file `f` a block at a time, never splitting a character.

    A file that is not UTF-8 raises the error load_corpus gives, at the same offset.
    """
    carry, offset = b"", 0  # offset: where `carry` starts in the file
    while True:
        try:
            block = f.read(block_bytes)
        except OSError as e:
            raise cannot_read(path, e) from None
        if not block:
            break
        data = carry + block if carry else block
        cut = _complete_prefix(data)
        raw = data[:cut] if cut < len(data) else data
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, raw[e.start], offset + e.start) from None
        yield text, raw
        offset += cut
        carry = data[cut:]
    if carry:  # a character cut off by the end of the file
        try:
            carry.decode("utf-8")
        except UnicodeDecodeError as e:
            raise not_utf8(path, carry[e.start], offset + e.start) from None


def _open(path: Path) -> BinaryIO:
    try:
        return open_corpus_file(path)
    except OSError as e:
        raise cannot_read(path, e) from None


def scan_corpus(
    source: str | os.PathLike[str],
    data_dir: Path | None = None,
    *,
    block_bytes: int = BLOCK_BYTES,
    progress: Callable[[int], None] | None = None,
    **resolve_kwargs,
) -> StreamedCorpus:
    """One read of the corpus `source` (see corpus.corpus_files): its sha256 and length."""
    return scan_files(
        str(source), corpus_files(source, data_dir, **resolve_kwargs), block_bytes=block_bytes, progress=progress
    )


def scan_files(
    name: str, files: tuple[Path, ...], *, block_bytes: int = BLOCK_BYTES, progress: Callable[[int], None] | None = None
) -> StreamedCorpus:
    """One read of `files`, joined as a corpus: its sha256 and length, each file checked as
    load_corpus checks it. `progress(n)` is called with the bytes of each block read."""
    digest = hashlib.sha256()
    entries = []
    for i, path in enumerate(files):
        if i:
            digest.update(_SEPARATOR_BYTES)
        with _open(path) as f:
            st = os.fstat(f.fileno())
            characters, size, has_text = 0, 0, False
            for text, raw in decoded_blocks(f, path, block_bytes):
                digest.update(raw)
                characters += len(text)
                size += len(raw)
                # "".isspace() is False; a blank file is what load_corpus's text.strip() refuses.
                has_text = has_text or not text.isspace()
                if progress is not None:
                    progress(len(raw))
        if not has_text:
            raise blank_file(path)
        entries.append(CorpusFile(path, size, characters, st.st_mtime_ns))
    characters = sum(e.characters for e in entries) + len(DOC_SEPARATOR) * (len(entries) - 1)
    return StreamedCorpus(name, digest.hexdigest(), characters, tuple(entries))


def _changed(path: Path) -> CorpusError:
    return CorpusError(f"corpus file {path} changed while it was being read; run again once nothing writes to it")


def corpus_text(corpus: StreamedCorpus, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, bytes]]:
    """The joined text again, as (text, UTF-8 bytes) blocks; a file that changed since the scan raises."""
    for i, entry in enumerate(corpus.entries):
        if i:
            yield DOC_SEPARATOR, _SEPARATOR_BYTES
        with _open(entry.path) as f:
            st = os.fstat(f.fileno())
            if (st.st_size, st.st_mtime_ns) != (entry.bytes, entry.mtime_ns):
                raise _changed(entry.path)
            characters = 0
            for text, raw in decoded_blocks(f, entry.path, block_bytes):
                characters += len(text)
                yield text, raw
        if characters != entry.characters:
            raise _changed(entry.path)


def corpus_parts(
    corpus: StreamedCorpus, split_at: int, block_bytes: int = BLOCK_BYTES
) -> Iterator[tuple[int, str, bytes]]:
    """(part, text, bytes) blocks of the joined text: part 0 is its first `split_at` characters
    (the train text), part 1 the rest (the validation text)."""
    seen = 0
    for text, raw in corpus_text(corpus, block_bytes):
        if seen >= split_at:
            yield 1, text, raw
        elif seen + len(text) <= split_at:
            yield 0, text, raw
        else:
            k = split_at - seen
            head = text[:k]
            head_raw = head.encode("utf-8")
            yield 0, head, head_raw
            yield 1, text[k:], raw[len(head_raw) :]
        seen += len(text)
