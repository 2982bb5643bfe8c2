"""Specification of streamed corpus preparation: the ids, the caches, memory, interruption, `gptexp data prepare`."""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from gptexp.cli import main
from gptexp.corpus import DOC_SEPARATOR, load_corpus, sha256_text
from gptexp.corpus_stream import corpus_text, scan_files
from gptexp.datasets import split_text
from gptexp.errors import CorpusError
from gptexp.prepare import Progress, prepare_corpus
from gptexp.stream_encode import safe_chunks, stream_encode
from gptexp.token_cache import HEADER_BYTES, cache_path, cached_token_ids, encode, read_cache

from conftest import REPO, cli_env

EOT = DOC_SEPARATOR
# The Unicode White_Space property (PropList.txt), which the regex engine behind tiktoken calls \s.
WHITE_SPACE = [
    *range(0x09, 0x0E),
    0x20,
    0x85,
    0xA0,
    0x1680,
    *range(0x2000, 0x200B),
    0x2028,
    0x2029,
    0x202F,
    0x205F,
    0x3000,
]


def pieces_of(text: str, sizes: tuple[int, ...]):
    """`text` cut into pieces whose sizes cycle through `sizes`, as blocks of a file would come."""
    i, k = 0, 0
    while i < len(text):
        n = sizes[k % len(sizes)]
        yield text[i : i + n]
        i, k = i + n, k + 1


def streamed_ids(text: str, tokenizer, chunk_chars: int, sizes: tuple[int, ...] = (7,), threads: int = 2):
    arrays = list(stream_encode(pieces_of(text, sizes), tokenizer, threads, chunk_chars))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


CRAFTED = {
    "documents-across-chunks": EOT.join(["First document.", "Second one, longer than a chunk.", "third"]),
    "multi-byte-utf8": "naïve café — 日本語のテキスト 😀😀 emoji, Ünïcödé\nκαλημέρα κόσμε",
    "endoftext-inside-text": f"a{EOT}b {EOT} c{EOT}{EOT}d <|endo ftext|> <|endoftext|x {EOT}",
    "empty-documents": EOT.join(["", "a", "", "", "b", ""]),
    "only-separators": EOT * 5,
    "whitespace-runs": "word" + " " * 300 + "\n" * 200 + "next\n\n\n   \t\t  x" + " \n" * 100 + "end   ",
    "whitespace-at-document-edges": EOT.join(["  lead", "trail  \n", "\n\n", " both "]),
    "contractions-and-digits": "don't it's we'll they've I'm 12345 678,90 'sup '' ''s",
    "unicode-whitespace": "a\u00a0b \u3000c\u2028 d\x85 e\x1c f\x1f\u2029 g\u205f h\u202f\u1680 i",
    "punctuation-runs": "Hello!!! ... ?!?! --- (quoted) [x] {y} <z> @#$%^&*",
    "empty": "",
}


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, 13, 64, 10_000])
@pytest.mark.parametrize("name", CRAFTED)
def test_streamed_ids_equal_the_whole_texts_ids(tokenizer, name, chunk_chars):
    text = CRAFTED[name]
    expected = encode(text, tokenizer)
    for sizes in ((1,), (2, 3), (7,), (1, 4, 13, 100)):
        assert "".join(safe_chunks(pieces_of(text, sizes), chunk_chars)) == text
        assert np.array_equal(streamed_ids(text, tokenizer, chunk_chars, sizes), expected), sizes


def test_streamed_ids_equal_the_whole_texts_ids_for_random_texts(tokenizer):
    atoms = [
        "a",
        "Bc",
        " ",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "'s",
        "'",
        "1",
        "23",
        "é",
        "日本",
        "😀",
        "\u00a0",
        "\u2028",
        "\x1c",
        "\x85",
        EOT,
        "<|endo",
        "ftext|>",
        "!",
        "..",
        " \n ",
    ]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 40)))
        expected = encode(text, tokenizer)
        for chunk_chars, sizes in ((1, (1,)), (2, (3,)), (5, (7, 2))):
            assert np.array_equal(streamed_ids(text, tokenizer, chunk_chars, sizes, threads=1), expected), text


def test_the_verdict_streamed_in_small_chunks_gives_the_books_ids(tokenizer, verdict_text):
    expected = encode(verdict_text, tokenizer)
    assert len(expected) == 5145
    for chunk_chars in (1, 100, 4096):
        assert np.array_equal(streamed_ids(verdict_text, tokenizer, chunk_chars, (1000, 333)), expected)


def test_the_cut_rule_rests_on_pythons_whitespace_covering_unicodes():
    """Cuts need "not whitespace" before them: Python's \\S (not str.isspace) must never be Unicode
    White_Space, which the tokenizer's regex calls \\s."""
    assert all(chr(cp).isspace() for cp in WHITE_SPACE)
    space = re.compile(r"\s")
    mismatched = [cp for cp in range(sys.maxunicode + 1) if bool(space.match(chr(cp))) != chr(cp).isspace()]
    assert mismatched == []


def write_folder(folder: Path, texts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"{i:03d}.txt").write_bytes(text.encode("utf-8"))
    return folder


FOLDER_TEXTS = [
    "Ünïcödé at the very start and at the end é",
    "😀 four-byte characters 😀😀",
    f"a document that holds {EOT} inside it, and <|endo ftext|> broken",
    "\n\n  whitespace around  \n",
    "日本語 " * 40,
    "don't stop — we'll see.\n" * 20,
]


def whole_text_splits(source, ratio: float, tokenizer):
    corpus = load_corpus(source)
    train, val = split_text(corpus.text, ratio)
    return corpus, (train, val), (encode(train, tokenizer), encode(val, tokenizer))


def split_ratio_at(text: str, position: int) -> float:
    """A train_ratio whose character split (int(ratio * len)) falls at `position`."""
    ratio = (position + 0.5) / len(text)
    assert int(ratio * len(text)) == position
    return ratio


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 64, 2**20])
def test_a_prepared_folder_has_the_ids_digest_and_caches_of_the_whole_text(tmp_path, tokenizer, block_bytes):
    folder = write_folder(tmp_path / "corpus", FOLDER_TEXTS)
    text = load_corpus(folder).text
    first_eot = text.index(EOT)
    splits = {
        "0.9": 0.9,
        "inside-a-separator": split_ratio_at(text, first_eot + 5),
        "after-an-emoji": split_ratio_at(text, text.index("😀") + 1),
        "tiny": 0.01,
    }
    for label, ratio in splits.items():
        corpus, texts, expected = whole_text_splits(folder, ratio, tokenizer)
        data_dir = tmp_path / f"data-{label}"
        prepared = prepare_corpus(
            folder, ratio, data_dir, tokenizer=tokenizer, threads=2, chunk_chars=7, block_bytes=block_bytes
        )
        assert prepared.corpus.sha256 == corpus.sha256 and prepared.corpus.characters == len(corpus.text)
        assert prepared.corpus.files == corpus.files
        assert prepared.corpus.text_bytes == len(corpus.text.encode("utf-8"))
        for split, part, ids in zip(prepared.splits, texts, expected, strict=True):
            assert np.array_equal(split.ids, ids), (label, split.name)
            assert split.tokens == len(ids) and split.encoded
            assert split.text_sha256 == sha256_text(part)
            # The name cached_token_ids gives the same text: either path's cache serves the other.
            assert split.path == cache_path(data_dir / "cache", sha256_text(part), tokenizer)
        assert prepared.train.characters == (0, len(texts[0]))
        assert prepared.validation.characters == (len(texts[0]), len(corpus.text))


def test_a_cache_written_by_the_whole_text_path_is_read_not_re_encoded(tmp_path, tokenizer, verdict_path):
    _, (train, val), expected = whole_text_splits(verdict_path, 0.9, tokenizer)
    for part in (train, val):
        cached_token_ids(part, tokenizer, tmp_path / "cache")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = prepare_corpus(verdict_path, 0.9, tmp_path, tokenizer=tokenizer)
    assert not prepared.train.encoded and not prepared.validation.encoded and prepared.encode_seconds == 0
    assert np.array_equal(prepared.train.ids, expected[0]) and np.array_equal(prepared.validation.ids, expected[1])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted(s.path.name for s in prepared.splits)


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 4, 7, 4096])
@pytest.mark.parametrize(
    "data",
    [
        b"valid \xc3\xa9 then \xff bad",
        b"ok \xe2\x82",  # a character cut off by the end of the file
        b"\xe2\x82\xacok\xe2(x",  # a bad continuation byte
        b"ab\xf0\x9f\x98\x80cd\xed\xa0\x80",  # an encoded surrogate, which UTF-8 forbids
    ],
)
def test_a_file_that_is_not_utf8_is_refused_at_the_offset_load_corpus_names(tmp_path, data, block_bytes):
    path = tmp_path / "bad.txt"
    path.write_bytes(data)
    with pytest.raises(CorpusError) as whole:
        load_corpus(path)
    with pytest.raises(CorpusError) as streamed:
        prepare_corpus(path, 0.9, tmp_path / "data", block_bytes=block_bytes)
    assert str(streamed.value) == str(whole.value)
    assert not (tmp_path / "data" / "cache").exists()


@pytest.mark.parametrize("content", [b"", b" \n\t \n"], ids=["empty", "blank"])
def test_an_empty_or_blank_file_in_a_folder_is_refused_as_load_corpus_refuses_it(tmp_path, content):
    folder = write_folder(tmp_path / "corpus", ["some text"])
    (folder / "zz.txt").write_bytes(content)
    with pytest.raises(CorpusError) as whole:
        load_corpus(folder)
    with pytest.raises(CorpusError) as streamed:
        prepare_corpus(folder, 0.9, tmp_path / "data", block_bytes=2)
    assert str(streamed.value) == str(whole.value) and "zz.txt is empty or only whitespace" in str(whole.value)


def test_a_fifo_in_a_folder_is_refused_without_being_opened(tmp_path):
    folder = write_folder(tmp_path / "corpus", ["some text"])
    os.mkfifo(folder / "pipe.txt")
    with pytest.raises(CorpusError, match="pipe.txt in corpus folder .* is a FIFO"):
        prepare_corpus(folder, 0.9, tmp_path / "data")  # returns: no writer ever comes


def test_a_file_that_changes_after_the_scan_is_refused(tmp_path):
    folder = write_folder(tmp_path / "corpus", ["first text", "second text"])
    corpus = scan_files(str(folder), tuple(sorted(folder.glob("*.txt"))))
    with (folder / "001.txt").open("a", encoding="utf-8") as f:
        f.write(" and more")
    with pytest.raises(CorpusError, match="001.txt changed while it was being read; run again"):
        list(corpus_text(corpus))


def test_the_in_memory_size_limit_does_not_apply_to_a_streamed_corpus(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("GPTEXP_MAX_CORPUS_BYTES", "1000")
    path = tmp_path / "big.txt"
    path.write_text("many words here " * 400, encoding="utf-8")
    with pytest.raises(CorpusError, match="1,000 bytes limit"):
        load_corpus(path)
    prepared = prepare_corpus(path, 0.9, tmp_path / "data", tokenizer=tokenizer)
    assert prepared.corpus.file_bytes == 6400 and prepared.train.tokens + prepared.validation.tokens > 1000


def test_a_progress_bar_shows_bytes_and_tokens(tmp_path, tokenizer, verdict_path):
    stream = io.StringIO()
    prepare_corpus(
        verdict_path,
        0.9,
        tmp_path,
        tokenizer=tokenizer,
        threads=2,
        chunk_chars=512,
        progress=Progress(stream, bars=True, refresh_s=0),
    )
    shown = stream.getvalue()
    assert "encoding on 2 threads" in shown and "tokens/s" in shown and "B/s" in shown


# A prepare that stops, mid-encoding, once ids are on disk: it is killed there.
_STALLING_PREPARE = r"""
import signal, sys
from pathlib import Path
from gptexp.prepare import Progress, prepare_corpus

class StallOnceIdsAreWritten(Progress):
    def advance(self, n_bytes=0, n_tokens=0):
        super().advance(n_bytes, n_tokens)
        if self.tokens > 40_000:
            Path(sys.argv[3]).touch()
            signal.pause()  # SIGKILL ends it here

prepare_corpus(sys.argv[1], 0.9, Path(sys.argv[2]), threads=1, chunk_chars=4096,
               progress=StallOnceIdsAreWritten(bars=False))
"""


def wait_for(condition, what: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the prepare exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_an_interrupted_prepare_leaves_no_cache_that_is_later_trusted(tmp_path, tokenizer):
    folder = write_folder(
        tmp_path / "corpus", [f"Document {i}: " + "the quick brown fox jumps. " * 2000 for i in range(8)]
    )
    _, (train, val), expected = whole_text_splits(folder, 0.9, tokenizer)
    data_dir, marker = tmp_path / "data", tmp_path / "stalled"
    cache = data_dir / "cache"
    names = [cache_path(cache, sha256_text(part), tokenizer) for part in (train, val)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _STALLING_PREPARE, str(folder), str(data_dir), str(marker)],
        env=cli_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(marker.exists, "it wrote ids", proc)
        temps = sorted(cache.glob("*.tmp"), key=lambda p: p.stat().st_size)
        assert len(temps) == 2  # one per split, each under a temp name
        assert temps[-1].stat().st_size > HEADER_BYTES + 40_000  # the train split's ids are on disk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert not any(name.exists() for name in names)  # nothing under a cache's name
    assert read_cache(temps[-1], tokenizer, sha256_text(train))[0] is None  # and the temp file is no cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing half-written is found and warned about: it is not looked at
        prepared = prepare_corpus(folder, 0.9, data_dir, tokenizer=tokenizer, threads=2)
    assert prepared.train.encoded and prepared.validation.encoded
    assert np.array_equal(prepared.train.ids, expected[0]) and np.array_equal(prepared.validation.ids, expected[1])
    assert not any(t.exists() for t in temps)  # the killed prepare's temp files are cleaned up
    assert sorted(cache.iterdir()) == sorted(names)


class CtrlCOnceIdsAreWritten(Progress):
    """Ctrl-C, as the interrupt handler raises it, once the encoder has handed over ids."""

    def advance(self, n_bytes=0, n_tokens=0):
        super().advance(n_bytes, n_tokens)
        if n_tokens:
            raise KeyboardInterrupt


def test_a_prepare_stopped_by_ctrl_c_removes_its_temp_files(tmp_path, tokenizer):
    folder = write_folder(tmp_path / "corpus", ["the quick brown fox jumps. " * 2000] * 3)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus(
            folder,
            0.9,
            tmp_path / "data",
            tokenizer=tokenizer,
            threads=2,
            chunk_chars=4096,
            progress=CtrlCOnceIdsAreWritten(bars=False),
        )
    assert list((tmp_path / "data" / "cache").iterdir()) == []


_MEASURE_PEAK = r"""
import gc, json, sys
from pathlib import Path
from gptexp.prepare import prepare_corpus
from gptexp.tokenizer import get_tokenizer

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

tokenizer = get_tokenizer("gpt2")
tokenizer.encode_to_numpy("warm up")
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak so far (imports) := the current size
before = kib("VmRSS")
prepared = prepare_corpus(sys.argv[1], 0.9, Path(sys.argv[2]), tokenizer=tokenizer, threads=2, load=False)
print(json.dumps({"above_start_kib": kib("VmHWM") - before, "bytes": prepared.corpus.text_bytes,
                  "tokens": prepared.train.tokens + prepared.validation.tokens}))
"""
PEAK_BOUND_MIB = 64


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak-RSS reset")
def test_preparing_a_100mb_folder_stays_under_a_memory_bound_that_does_not_grow_with_it(tmp_path):
    """About 100 MB of text (~26M tokens), prepared in a fresh process on 2 threads: its peak
    resident memory above what it held before preparing stays under 64 MiB (measured ~40 MiB;
    encoding the whole text at once takes ~2 GiB). The slowest test here: ~15 s on 2 idle cores.

    The peak is the process's own VmHWM: ru_maxrss of a child started by vfork+exec, as
    subprocess starts it, also counts the parent's peak."""
    from gptexp.bench.data_prepare import generate_corpus

    folder = tmp_path / "corpus"
    try:
        generate_corpus(folder, 100 * 10**6, seed=1)
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE_PEAK, str(folder), str(tmp_path / "data")],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        r = json.loads(out.stdout)
        assert r["bytes"] > 95 * 2**20 and r["tokens"] > 20_000_000
        assert r["above_start_kib"] < PEAK_BOUND_MIB * 1024, r
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)  # ~150 MB of corpus and caches


@pytest.fixture
def own_data_dir(tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(REPO / "data" / "registry.yaml", data_dir / "registry.yaml")
    monkeypatch.setenv("GPTEXP_DATA_DIR", str(data_dir))
    return data_dir


def test_data_prepare_prints_the_counts_the_split_and_the_caches_and_a_rerun_encodes_nothing(
    tmp_path, tokenizer, own_data_dir, capsys
):
    folder = write_folder(tmp_path / "corpus", FOLDER_TEXTS)
    corpus, (train, val), expected = whole_text_splits(folder, 0.8, tokenizer)
    assert main(["data", "prepare", str(folder), "--train-ratio", "0.8", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    paths = [cache_path(own_data_dir / "cache", sha256_text(part), tokenizer) for part in (train, val)]
    total = len(expected[0]) + len(expected[1])
    assert f"{len(FOLDER_TEXTS)} files" in out and f"sha256 {corpus.sha256}" in out
    assert f"{len(expected[0]):,} tokens from characters [0, {len(train):,}) encoded: {paths[0]}" in out
    assert (
        f"{len(expected[1]):,} tokens from characters [{len(train):,}, {len(corpus.text):,}) encoded: {paths[1]}"
    ) in out
    assert f"{total:,} (train {len(expected[0]):,}, validation {len(expected[1]):,} at train_ratio 0.8)" in out
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]

    assert main(["data", "prepare", str(folder), "--train-ratio", "0.8"]) == 0
    again = capsys.readouterr().out
    assert f"cached: {paths[0]}" in again and f"cached: {paths[1]}" in again and "nothing to encode" in again
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths] == before  # not rewritten


def _bad_sources(tmp: Path) -> dict:
    (tmp / "empty-folder").mkdir()
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "blank.txt").write_text("  \n", encoding="utf-8")
    os.mkfifo(tmp / "fifo.txt")
    return {
        "missing": ([str(tmp / "missing.txt")], "is neither an existing file or directory nor a registry corpus"),
        "empty-folder": ([str(tmp / "empty-folder")], "holds no .txt files"),
        "not-utf8": ([str(tmp / "latin1.txt")], "is not UTF-8 (byte 0xe9 at offset 3)"),
        "blank": ([str(tmp / "blank.txt")], "is empty or only whitespace"),
        "fifo": ([str(tmp / "fifo.txt")], "is a FIFO"),
        "device": (["/dev/zero"], "is a character device"),
        "ratio": ([str(tmp / "blank.txt"), "--train-ratio", "1"], "must be a number between 0 and 1"),
        "threads": ([str(tmp / "blank.txt"), "--threads", "-2"], "must be an integer from 0"),
    }


def exit_code(args: list[str]) -> int:
    """gptexp's exit code: what main returns, or the code of argparse's exit on a usage error."""
    try:
        return main(args)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("case", ["missing", "empty-folder", "not-utf8", "blank", "fifo", "device", "ratio", "threads"])
def test_data_prepare_refuses_a_bad_source_in_one_line_exit_2_writing_nothing(tmp_path, own_data_dir, case, capsys):
    args, expected = _bad_sources(tmp_path)[case]
    code = exit_code(["data", "prepare", *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (own_data_dir / "cache").exists()
