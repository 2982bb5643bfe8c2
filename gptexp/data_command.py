"""`gptexp data prepare SOURCE`: tokenize a corpus into its token caches before training on it."""

from __future__ import annotations

import argparse
import sys

from .config import DataConfig

MAX_THREADS = 1024


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, exclusive (got {text!r})")
    return value


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 (every CPU) to {MAX_THREADS} (got {text!r})")
    return int(text)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """`gptexp data`'s actions (only `prepare` today)."""
    actions = p.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    q = actions.add_parser(
        "prepare",
        help="stream-tokenize a corpus into data/cache on every core (a re-run only verifies)",
        description="Tokenize SOURCE (a registry name, a .txt file or a folder of .txt files) into the token "
        "caches `gptexp train` reads, streaming it in bounded memory on all cores. Prints the token "
        "counts of the book's train/validation split and where the caches are; a re-run verifies "
        "them and encodes nothing.",
    )
    q.add_argument("source", metavar="SOURCE", help="registry name, .txt file or folder of .txt files")
    q.add_argument(
        "--train-ratio",
        type=_ratio,
        default=DataConfig.train_ratio,
        metavar="R",
        help=f"the split a run will use, as data.train_ratio (default {DataConfig.train_ratio})",
    )
    q.add_argument(
        "--threads",
        type=_threads,
        default=0,
        metavar="N",
        help="encoder threads (default 0: every CPU this process may use)",
    )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def cmd_data(args: argparse.Namespace) -> int:
    return {"prepare": cmd_prepare}[args.data_action](args)


def cmd_prepare(args: argparse.Namespace) -> int:
    from .prepare import Progress, prepare_corpus

    prepared = prepare_corpus(
        args.source, args.train_ratio, threads=args.threads, load=False, progress=Progress(sys.stderr)
    )
    corpus = prepared.corpus
    n_files = len(corpus.entries)
    print(
        f"corpus      {corpus.name}: {n_files:,} file{'s' if n_files != 1 else ''}, {_size(corpus.file_bytes)}, "
        f"{corpus.characters:,} characters, sha256 {corpus.sha256}"
    )
    for split in prepared.splits:
        start, end = split.characters
        print(
            f"{split.name:<12}{split.tokens:,} tokens from characters [{start:,}, {end:,}) "
            f"{'encoded' if split.encoded else 'cached'}: {split.path}"
        )
    total = prepared.train.tokens + prepared.validation.tokens
    line = (
        f"tokens      {total:,} (train {prepared.train.tokens:,}, validation {prepared.validation.tokens:,} "
        f"at train_ratio {prepared.train_ratio:g})"
    )
    encoded = sum(s.tokens for s in prepared.splits if s.encoded)
    if prepared.encode_seconds:
        line += (
            f"; encoded {encoded:,} in {prepared.encode_seconds:.1f} s "
            f"({encoded / max(prepared.encode_seconds, 1e-9):,.0f} tokens/s on {prepared.threads} threads)"
        )
    else:
        line += "; both caches were there and verify: nothing to encode"
    print(line)
    return 0
