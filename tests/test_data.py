"""Windows, shuffles, splits and the token cache behave as the book's data pipeline does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gptexp
import gptexp.corpus
from gptexp.datasets import GPTDatasetV1, make_loader, num_windows
from gptexp.errors import CorpusError
from gptexp.tokens import cache_path, cached_token_ids


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


def test_token_ids_are_cached_on_disk_and_not_recomputed(tmp_path, tokenizer, verdict_text):
    class CountingTokenizer:
        """The real tokenizer, counting its encode calls."""

        name, n_vocab = tokenizer.name, tokenizer.n_vocab
        calls = 0

        def encode(self, text, **kw):
            CountingTokenizer.calls += 1
            return tokenizer.encode(text, **kw)

        # A second build reads the cache; it never needs to encode.

    counting = CountingTokenizer()
    first = cached_token_ids(verdict_text, counting, tmp_path)
    second = cached_token_ids(verdict_text, counting, tmp_path)
    assert CountingTokenizer.calls == 1
    assert np.array_equal(first, second) and len(first) == 5145
    files = list(tmp_path.iterdir())
    assert files == [cache_path(tmp_path, gptexp.corpus.sha256_text(verdict_text), tokenizer)]
    assert files[0].stat().st_size == 2 * 5145  # uint16
    assert not list(tmp_path.glob("*.tmp"))
