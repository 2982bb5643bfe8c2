"""Data figures: the book's GPTDatasetV1 against ours, building the windows of a synthetic corpus,
from text and from token ids, timed and with their peak memory (each build in a fresh child)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np

from ..tokenizer import get_tokenizer
from .fork_server import DataChildren
from .sizes import Sizes
from .timing import median

PAGE = 4096  # the floor of a peak: a build that fits in memory freed before still used some


def _word_tokens(tokenizer) -> np.ndarray:
    """Ids of tokens that are ' ' + 2-10 lowercase letters: each such word re-encodes to itself."""
    pat = re.compile(rb" [a-z]{2,10}")
    ids = [
        i
        for i in range(tokenizer.n_vocab)
        if i != tokenizer.eot_token and pat.fullmatch(_token_bytes(tokenizer, i) or b"")
    ]
    return np.asarray(ids, dtype=np.int64)


def _token_bytes(tokenizer, i: int) -> bytes | None:
    try:
        return tokenizer.decode_single_token_bytes(i)
    except KeyError:
        return None


def synthetic_corpus(tokenizer, n_tokens: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """A text of n_tokens random words whose GPT-2 encoding is exactly the returned ids."""
    words = _word_tokens(tokenizer)
    ids = np.random.default_rng(seed).choice(words, size=n_tokens).astype(np.uint16)
    table = {int(i): tokenizer.decode_single_token_bytes(int(i)) for i in words}
    text = b"".join(table[int(i)] for i in ids).decode("ascii")
    return text, ids


def data_figures(sizes: Sizes, threads: int, notes: list) -> dict:
    """Seconds and peak memory of building the windows of a synthetic corpus, the book's and ours,
    from text and from ids, at stride 1 and at stride = context length."""
    tokenizer = get_tokenizer("gpt2")
    ctx = sizes.model["context_length"]
    cases = {"stride1": (sizes.data_s1_tokens, 1), f"stride{ctx}": (sizes.data_big_tokens, ctx)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="gptexp-bench-") as tmp, DataChildren() as children:
        for case, (n_tokens, stride) in cases.items():
            text, ids = synthetic_corpus(tokenizer, n_tokens, seed=5)
            text_path, ids_path = Path(tmp) / f"{case}.txt", Path(tmp) / f"{case}.npy"
            text_path.write_text(text, encoding="ascii")
            np.save(ids_path, ids)
            del text
            fig = {"tokens": n_tokens, "stride": stride, "max_length": ctx}
            for impl in ("book", "ours"):
                for source in ("text", "ids"):
                    runs = children.run(
                        {
                            "impl": impl,
                            "source": source,
                            "text_path": str(text_path),
                            "ids_path": str(ids_path),
                            "max_length": ctx,
                            "stride": stride,
                            "reps": sizes.data_reps,
                            "budget_s": sizes.data_budget_s,
                            "threads": threads,
                        }
                    )
                    fig[f"{impl}_{source}"] = {
                        "seconds": median([r["seconds"] for r in runs]),
                        "times_s": [r["seconds"] for r in runs],
                        # The first build of a fresh process: later ones may reuse memory freed before.
                        "peak_bytes": max(runs[0]["peak_kib"] * 1024, PAGE),
                        "windows": runs[0]["windows"],
                        "clean_peak": runs[0]["clean_peak"],
                        "reps": len(runs),
                    }
            if fig["book_text"]["windows"] != fig["ours_text"]["windows"]:
                raise RuntimeError(
                    f"window counts differ in {case}: {fig['book_text']['windows']} vs {fig['ours_text']['windows']}"
                )
            out[case] = fig
    if not all(v["clean_peak"] for fig in out.values() for k, v in fig.items() if isinstance(v, dict)):
        notes.append("peak memory could not be reset (/proc/self/clear_refs): peaks are ru_maxrss deltas")
    notes.append("data peaks are VmHWM - VmRSS around the build in a fresh child, floored at one 4 KiB page")
    return out
