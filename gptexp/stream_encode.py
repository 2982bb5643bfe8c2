"""Token ids of a text that arrives in blocks, identical to encoding the whole text at once.

`tokenizer.encode(text, allowed_special={"<|endoftext|>"})` (the book's call) splits the text at
each `<|endoftext|>`, then GPT-2's pre-tokenizer regex

    's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+

cuts each piece into words, and BPE encodes every word on its own. So a text may be encoded in
chunks wherever no word (and no `<|endoftext|>`) spans the cut and the matching on either side
does not change. Such a cut is the place between a non-whitespace character and a whitespace
character: no alternative of the regex matches whitespace after non-whitespace (a space is only
ever a word's first character), so a word ends there in the whole text; the text before the cut
ends in non-whitespace, so the one look-ahead, `(?!\\S)`, never reaches its end; and the regex
has no look-behind, so the text after the cut is matched as it is in the whole. `<|endoftext|>`
holds no whitespace, so such a cut never splits one; the place right after a complete one is a
cut as well. Inside a stretch with neither (a run of whitespace, a text with no spaces), the
stretch is kept whole: memory then grows with the longest such stretch, never with the corpus.

"Whitespace" is taken narrowly where the cut needs it (the ASCII whitespace characters, which
are whitespace in every Unicode definition) and broadly where the cut needs its absence
(str.isspace, a superset of the regex's Unicode White_Space), so the rule holds for any text.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .corpus import DOC_SEPARATOR
from .token_cache import token_dtype

# Characters per chunk handed to one encoder thread; memory is a few such chunks per thread.
CHUNK_CHARS = 2**20
# A cut: after a non-whitespace character (Python's \S is "not str.isspace()") that an ASCII
# whitespace character follows, or after a complete <|endoftext|>.
_CUT = re.compile(r"\S[\t\n\x0b\x0c\r ]|(" + re.escape(DOC_SEPARATOR) + ")")


def safe_chunks(pieces: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """The text of `pieces` again, regrouped into chunks of about `chunk_chars` characters (at the
    first cut from there on), cut only where encoding them one by one gives the whole text's ids."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be at least 1, got {chunk_chars}")
    buffer, start, look = "", 0, 0  # buffer[start:] is pending; no cut starts in [.., look)
    for piece in pieces:
        if not piece:
            continue
        if start:
            buffer, look = buffer[start:], max(0, look - start)
            start = 0
        buffer += piece
        while True:
            frm = max(start + chunk_chars - 1, look)
            if frm >= len(buffer):
                break
            m = _CUT.search(buffer, frm)
            if m is None:
                # A cut may start in the last few characters once more text comes.
                look = max(frm, len(buffer) - len(DOC_SEPARATOR))
                break
            cut = m.end() if m.group(1) else m.start() + 1
            yield buffer[start:cut]
            start = look = cut
    if start < len(buffer):
        yield buffer[start:]


def encode_chunks(chunks: Iterable[str], tokenizer, threads: int) -> Iterator[np.ndarray]:
    """The ids of each chunk, in order, encoded on `threads` threads as tiktoken's encode_batch does.

    encode_batch is a thread pool over encode, which runs in Rust without the GIL; a pool kept for
    the whole stream lets reading and writing go on while the threads encode, with a bounded
    number of chunks in flight, and encode_to_numpy hands the ids over without a Python int each.
    """
    threads = max(1, threads)
    dtype = token_dtype(tokenizer.n_vocab)
    allowed = {DOC_SEPARATOR}

    def encode(chunk: str) -> np.ndarray:
        return tokenizer.encode_to_numpy(chunk, allowed_special=allowed).astype(dtype)

    pending: deque = deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="gptexp-encode")
    try:
        for chunk in chunks:
            pending.append(pool.submit(encode, chunk))
            if len(pending) >= 2 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)


def stream_encode(
    pieces: Iterable[str], tokenizer, threads: int = 1, chunk_chars: int = CHUNK_CHARS
) -> Iterator[np.ndarray]:
    """Ids of the text of `pieces`: concatenated, tokenizer.encode(text, allowed_special={eot})."""
    return encode_chunks(safe_chunks(pieces, chunk_chars), tokenizer, threads)
