"""Decoding: the book's loops, and a KV cache that changes the cost, not the tokens."""

from __future__ import annotations

import pytest
import torch

import gptexp

from conftest import SMALL_CFG


@pytest.fixture(scope="module")
def fast_model():
    torch.manual_seed(7)
    return gptexp.GPTModel(dict(SMALL_CFG, impl="fast", context_length=64)).eval()


def test_kv_cached_greedy_output_equals_the_uncached_for_50_tokens(fast_model, tokenizer):
    idx = gptexp.text_to_token_ids("Every effort moves you", tokenizer)
    plain = gptexp.generate(fast_model, idx, 50, context_size=64, use_cache=False)
    cached = gptexp.generate(fast_model, idx, 50, context_size=64, use_cache=True)
    assert plain.shape == (1, 54)
    assert torch.equal(plain, cached)
    assert torch.equal(plain, gptexp.generate_text_simple(fast_model, idx, 50, context_size=64))


def test_past_the_context_the_cached_loop_slides_the_window_like_the_book(fast_model, tokenizer):
    idx = gptexp.text_to_token_ids("Every effort moves you", tokenizer)
    cached = gptexp.generate(fast_model, idx, 40, context_size=16, use_cache=True)
    assert torch.equal(cached, gptexp.generate_text_simple(fast_model, idx, 40, context_size=16))


def test_kv_cache_costs_one_position_per_new_token(fast_model):
    seen = []
    hook = fast_model.tok_emb.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[1]))
    try:
        gptexp.generate(fast_model, torch.tensor([[1, 2, 3]]), 10, context_size=64, use_cache=True)
    finally:
        hook.remove()
    assert seen == [3] + [1] * 9


def test_generate_matches_the_books_generate_with_top_k_and_temperature(book, tokenizer):
    torch.manual_seed(3)
    model = gptexp.GPTModel(SMALL_CFG).eval()
    idx = gptexp.text_to_token_ids("Every effort moves you", tokenizer)
    torch.manual_seed(123)
    ours = gptexp.generate(model, idx, 15, context_size=32, temperature=1.4, top_k=25)
    torch.manual_seed(123)
    theirs = book.generate(model, idx, 15, context_size=32, temperature=1.4, top_k=25)
    assert torch.equal(ours, theirs)


def test_generation_stops_at_eos_without_appending_it(tokenizer):
    torch.manual_seed(3)
    model = gptexp.GPTModel(SMALL_CFG).eval()
    idx = torch.tensor([[1, 2, 3]])
    greedy = gptexp.generate(model, idx, 6, context_size=32)
    eos = int(greedy[0, 5])  # the third generated token
    stopped = gptexp.generate(model, idx, 6, context_size=32, eos_id=eos)
    assert stopped.tolist() == greedy[:, :5].tolist()
