"""Windows, shuffles, splits and the token cache behave as the book's data pipeline does."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import gptexp
import gptexp.corpus
import gptexp.token_cache
from gptexp.config import load_config
from gptexp.data import prepare_data
from gptexp.datasets import GPTDatasetV1, make_loader, num_windows
from gptexp.errors import CorpusError
from gptexp.token_cache import HEADER_BYTES, cache_path, cached_token_ids

from conftest import TINY


@pytest.mark.parametrize("max_length,stride", [(4, 1), (4, 4), (8, 3), (256, 128), (16, 32)])
def test_windows_equal_the_books_in_order(book, tokenizer, verdict_text, max_length, stride):
    ours = GPTDatasetV1(verdict_text, tokenizer, max_length, stride)
    theirs = book.GPTDatasetV1(verdict_text, tokenizer, max_length, stride)
    assert len(ours) == len(theirs) == num_windows(5145, max_length, stride)
    for i in range(len(theirs)):
        x, y = ours[i]
        bx, by = theirs[i]
        assert x.dtype == bx.dtype == torch.int64
        assert torch.equal(x, bx) and torch.equal(y, by), i


def test_windows_are_views_into_one_flat_token_array(tokenizer, verdict_text):
    ds = GPTDatasetV1(verdict_text, tokenizer, 4, 1)
    assert ds.token_ids.ndim == 1 and ds.token_ids.dtype == np.uint16
    assert ds.token_ids.nbytes == 2 * 5145  # one array, not 5141 window tensors
    assert not isinstance(ds.input_ids, list)  # the book's per-window tensors are made on access, not stored


def test_a_seeded_shuffle_draws_the_books_order(book, verdict_text):
    def batches(create):
        torch.manual_seed(123)
        loader = create(verdict_text, batch_size=3, max_length=16, stride=8, shuffle=True, drop_last=True)
        out = [x for x, _ in loader] + [x for x, _ in loader]  # two epochs
        return torch.cat(out), torch.rand(1)  # the global RNG is left where the book leaves it

    (ours, our_rng), (theirs, their_rng) = batches(gptexp.create_dataloader_v1), batches(book.create_dataloader_v1)
    assert torch.equal(ours, theirs)
    assert torch.equal(our_rng, their_rng)


def test_the_split_is_by_characters_at_train_ratio(verdict_text):
    train, val = gptexp.split_text(verdict_text, 0.9)
    assert len(train) == int(0.9 * 20479) == 18431
    assert train + val == verdict_text


def test_a_split_too_short_for_one_window_names_the_numbers(tokenizer):
    with pytest.raises(CorpusError) as err:
        GPTDatasetV1.from_token_ids(np.arange(412, dtype=np.uint16), 1024, 1024, name="validation split")
    msg = str(err.value)
    assert "validation split has 412 tokens" in msg and "at least 1025" in msg and "\n" not in msg


def test_a_loader_left_empty_by_drop_last_is_refused_when_built(tokenizer):
    ds = GPTDatasetV1.from_token_ids(np.arange(40, dtype=np.uint16), 16, 16, name="train split")
    assert len(ds) == 2
    with pytest.raises(CorpusError, match="2 window.*batch_size 4"):
        make_loader(ds, batch_size=4, shuffle=True, drop_last=True, name="train split")


def test_calc_loss_loader_raises_where_the_book_returns_nan():
    model = gptexp.GPTModel(dict(gptexp.GPT_CONFIG_124M, vocab_size=64, emb_dim=16, n_heads=2, n_layers=1))
    with pytest.raises(CorpusError, match="empty"):
        gptexp.calc_loss_loader([], model, "cpu")


class CountingTokenizer:
    """The real tokenizer, counting its encode calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.name, self.n_vocab, self.calls = tokenizer, tokenizer.name, tokenizer.n_vocab, 0

    def encode(self, text, **kw):
        self.calls += 1
        return self.tokenizer.encode(text, **kw)


def test_token_ids_are_cached_on_disk_and_not_recomputed(tmp_path, tokenizer, verdict_text):
    counting = CountingTokenizer(tokenizer)
    first = cached_token_ids(verdict_text, counting, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cache that verifies is read silently
        second = cached_token_ids(verdict_text, counting, tmp_path)
    assert counting.calls == 1  # a second build reads the cache; it never needs to encode
    assert np.array_equal(first, second) and len(first) == 5145
    files = list(tmp_path.iterdir())
    assert files == [cache_path(tmp_path, gptexp.corpus.sha256_text(verdict_text), tokenizer)]
    assert files[0].stat().st_size == HEADER_BYTES + 2 * 5145  # header, then uint16 ids
    assert not list(tmp_path.glob("*.tmp"))


def truncate(path, size):
    with path.open("r+b") as f:
        f.truncate(size)


def flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def write_headerless(path):
    """The cache as gptexp wrote it before it had a header: the raw uint16 ids."""
    ids = np.frombuffer(path.read_bytes()[HEADER_BYTES:], dtype=np.uint16)
    path.write_bytes(ids.tobytes())


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda path: truncate(path, 4001), "is truncated"),  # the case
        (flip_middle_byte, "is damaged"),
        (write_headerless, "has no checksum header"),
        (lambda path: path.write_bytes(path.read_bytes() + b"\0\0"), "is too long"),
    ],
    ids=["truncated-to-4001-bytes", "one-byte-flipped", "old-format-without-header", "grown"],
)
def test_a_token_cache_that_does_not_verify_is_rebuilt_with_a_warning(
    tmp_path, tokenizer, verdict_text, damage, problem
):
    counting = CountingTokenizer(tokenizer)
    expected = cached_token_ids(verdict_text, counting, tmp_path)
    path = cache_path(tmp_path, gptexp.corpus.sha256_text(verdict_text), tokenizer)
    good = path.read_bytes()
    damage(path)
    with pytest.warns(UserWarning, match=f"token cache {path} {problem}.*; re-encoded the text and rewrote it"):
        ids = cached_token_ids(verdict_text, counting, tmp_path)
    assert np.array_equal(ids, expected) and counting.calls == 2
    assert path.read_bytes() == good  # repaired: the next read verifies and encodes nothing
    assert np.array_equal(cached_token_ids(verdict_text, counting, tmp_path), expected) and counting.calls == 2


def test_a_large_cache_is_memory_mapped_after_its_header_and_verified(tmp_path, tokenizer, verdict_text, monkeypatch):
    monkeypatch.setattr(gptexp.token_cache, "MMAP_BYTES", 1)
    expected = cached_token_ids(verdict_text, tokenizer, tmp_path)
    mapped = cached_token_ids(verdict_text, tokenizer, tmp_path)
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, expected)
    path = cache_path(tmp_path, gptexp.corpus.sha256_text(verdict_text), tokenizer)
    del mapped
    flip_middle_byte(path)
    with pytest.warns(UserWarning, match="is damaged"):
        assert np.array_equal(cached_token_ids(verdict_text, tokenizer, tmp_path), expected)


def test_a_run_never_trains_on_a_truncated_cache(tmp_path, verdict_path):
    """The issue's case: a cache cut to 4,001 bytes gave 2,000 of the split's tokens, silently."""
    config = load_config(str(TINY), [f"data.source={verdict_path}"])
    data_dir = tmp_path / "data"  # the corpus is a path: only the cache lands here
    first = prepare_data(config, data_dir)
    train_text, _ = gptexp.split_text(verdict_path.read_text(encoding="utf-8"), config.data.train_ratio)
    path = cache_path(data_dir / "cache", gptexp.corpus.sha256_text(train_text), first.tokenizer)
    truncate(path, 4001)
    with pytest.warns(UserWarning, match="is truncated") as caught:
        again = prepare_data(config, data_dir)
    assert np.array_equal(again.train_ids, first.train_ids) and len(again.train_ids) > 2000
    assert all("\n" not in str(w.message) for w in caught)
