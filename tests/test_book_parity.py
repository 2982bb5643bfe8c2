"""gptexp reproduces the book: same weights, same greedy text, same losses, same training steps."""

from __future__ import annotations

import math

import pytest
import torch

import gptexp
from gptexp import GPT_CONFIG_124M, GPTModel
from gptexp.model import compile_blocks

from conftest import SMALL_CFG

CFG_124M = dict(GPT_CONFIG_124M)  # context 256, drop 0.1, no qkv bias: the book's chapter-5 model
START = "Every effort moves you"
TOY_INPUTS = torch.tensor([[16833, 3626, 6100], [40, 1107, 588]])
TOY_TARGETS = torch.tensor([[3626, 6100, 345], [1107, 588, 11311]])


@pytest.fixture(scope="module")
def models_124m(book):
    torch.manual_seed(123)
    theirs = book.GPTModel(CFG_124M).eval()
    torch.manual_seed(123)
    ours = GPTModel(CFG_124M).eval()
    return ours, theirs


def test_seeded_init_is_bit_identical_to_the_books(models_124m):
    ours, theirs = models_124m
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("impl", ["book", "fast"])
def test_state_dict_round_trips_with_the_books_model_in_both_directions(book, impl):
    torch.manual_seed(1)
    theirs = book.GPTModel(SMALL_CFG)
    torch.manual_seed(2)
    ours = GPTModel(dict(SMALL_CFG, impl=impl))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    torch.manual_seed(3)
    ours2 = GPTModel(dict(SMALL_CFG, impl=impl))
    theirs.load_state_dict(ours2.state_dict(), strict=True)
    for k, v in ours2.state_dict().items():
        assert torch.equal(theirs.state_dict()[k], v)


def test_greedy_tokens_after_every_effort_moves_you_equal_the_books(models_124m, book, tokenizer):
    ours, theirs = models_124m
    idx = gptexp.text_to_token_ids(START, tokenizer)
    got = gptexp.generate_text_simple(ours, idx, max_new_tokens=10, context_size=256)
    want = book.generate_text_simple(theirs, book.text_to_token_ids(START, tokenizer), 10, 256)
    assert torch.equal(got, want)
    assert got.shape == (1, 14)


def test_toy_batch_loss_and_perplexity_equal_the_books(models_124m, book):
    ours, theirs = models_124m
    with torch.no_grad():
        got = gptexp.calc_loss_batch(TOY_INPUTS, TOY_TARGETS, ours, "cpu").item()
        want = book.calc_loss_batch(TOY_INPUTS, TOY_TARGETS, theirs, "cpu").item()
    assert got == pytest.approx(want, abs=1e-6)
    assert got == pytest.approx(10.7940, abs=1e-4)  # the figure printed in the book's chapter 5
    assert gptexp.perplexity(got) == pytest.approx(math.exp(got), rel=1e-12)


def test_loader_losses_on_the_verdict_equal_the_books(models_124m, book, verdict_text, tokenizer):
    ours, theirs = models_124m
    train_text, val_text = gptexp.split_text(verdict_text, 0.9)
    assert len(verdict_text) == 20479

    def loaders(create):
        torch.manual_seed(123)
        tl = create(train_text, batch_size=2, max_length=256, stride=256, drop_last=True, shuffle=True, num_workers=0)
        vl = create(val_text, batch_size=2, max_length=256, stride=256, drop_last=False, shuffle=False, num_workers=0)
        return tl, vl

    (otl, ovl), (btl, bvl) = loaders(gptexp.create_dataloader_v1), loaders(book.create_dataloader_v1)
    assert (len(otl), len(ovl)) == (len(btl), len(bvl)) == (9, 1)
    with torch.no_grad():
        torch.manual_seed(123)
        ours_losses = (gptexp.calc_loss_loader(otl, ours, "cpu"), gptexp.calc_loss_loader(ovl, ours, "cpu"))
        torch.manual_seed(123)
        book_losses = (book.calc_loss_loader(btl, theirs, "cpu"), book.calc_loss_loader(bvl, theirs, "cpu"))
    assert ours_losses == pytest.approx(book_losses, abs=1e-6)


def _train_steps(model_cls, create_loader, calc_loss_batch, text, steps=6):
    """The book's chapter-5 loop body (seed, loaders, seed, model, AdamW), first `steps` steps."""
    torch.manual_seed(123)
    loader = create_loader(text, batch_size=2, max_length=32, stride=32, drop_last=True, shuffle=True, num_workers=0)
    torch.manual_seed(123)
    model = model_cls(SMALL_CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    model.train()
    losses = []
    for input_batch, target_batch in loader:
        optimizer.zero_grad()
        loss = calc_loss_batch(input_batch, target_batch, model, "cpu")
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) == steps:
            break
    return losses, model


def test_book_impl_training_with_dropout_gives_the_books_losses_exactly(book, verdict_text):
    text = verdict_text[:4000]
    ours, om = _train_steps(GPTModel, gptexp.create_dataloader_v1, gptexp.calc_loss_batch, text)
    theirs, tm = _train_steps(book.GPTModel, book.create_dataloader_v1, book.calc_loss_batch, text)
    assert ours == theirs  # bit for bit, dropout masks included
    for (k, a), b in zip(om.state_dict().items(), tm.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_fast_impl_gives_the_same_logits_as_book_within_1e_4(verdict_text, tokenizer):
    torch.manual_seed(0)
    book_model = GPTModel(dict(SMALL_CFG, impl="book")).eval()
    fast_model = GPTModel(dict(SMALL_CFG, impl="fast")).eval()
    fast_model.load_state_dict(book_model.state_dict())
    ids = torch.tensor([tokenizer.encode(verdict_text[:2000])[:64]]).view(2, 32)
    with torch.no_grad():
        diff = (book_model(ids) - fast_model(ids)).abs().max().item()
    assert diff < 1e-4


def test_fast_impl_under_bf16_autocast_gives_the_loss_within_2e_2(verdict_text, tokenizer):
    cfg = dict(CFG_124M, context_length=128, emb_dim=256, n_heads=4, n_layers=4)
    torch.manual_seed(123)
    book = GPTModel(cfg).eval()
    fast = GPTModel(dict(cfg, impl="fast")).eval()
    fast.load_state_dict(book.state_dict())
    ids = torch.tensor(tokenizer.encode(verdict_text)[:513])
    x, y = ids[:-1].view(4, 128), ids[1:].view(4, 128)
    with torch.no_grad():
        ref = gptexp.calc_loss_batch(x, y, book, "cpu").item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = gptexp.calc_loss_batch(x, y, fast, "cpu").item()
    assert abs(low - ref) < 2e-2


def test_fast_impl_trains_under_regional_torch_compile_sharing_the_models_weights():
    torch.manual_seed(0)
    model = GPTModel(dict(SMALL_CFG, impl="fast", vocab_size=256, n_layers=2))
    keys = list(model.state_dict())
    compiled = compile_blocks(model)
    x = torch.randint(0, 256, (2, 16))
    loss = gptexp.calc_loss_batch(x, x, compiled, "cpu")
    loss.backward()
    # one set of parameters: the gradients land on the model's own, which checkpoints save
    assert model.tok_emb.weight.grad is not None and model.trf_blocks[1].att.W_query.weight.grad is not None
    assert list(model.state_dict()) == keys
    model.eval()  # the view follows the model's train/eval flags: no dropout now
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)
        assert torch.equal(compiled(x), compiled(x))
    # the model itself stays eager, so KV-cached generation (a new shape every token) is untouched
    out = gptexp.generate(model, x[:1, :4], 6, SMALL_CFG["context_length"], use_cache=True)
    assert torch.equal(out, gptexp.generate_text_simple(model, x[:1, :4], 6, SMALL_CFG["context_length"]))
