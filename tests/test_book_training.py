"""The book's training functions on gptexp: same losses, tokens seen, learning rates, weights and printed lines.

Each side builds everything from its own package as the book's chapter 5 does (seed, loaders,
seed, model, `torch.optim.AdamW`), gptexp's model with `impl: book`, then trains with its own
`train_model_simple` or appendix D's `train_model`.
"""

from __future__ import annotations

import pytest
import torch

import gptexp

from conftest import SMALL_CFG

START = "Every effort moves you"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both sides on one thread: the same numbers, and no thread contention on a loaded CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def verdict_slice(verdict_text) -> tuple[str, str]:
    text = verdict_text[:3500]  # 12 training batches of 2 x 32 tokens, 1 validation batch
    split = int(0.9 * len(text))
    return text[:split], text[split:]


@pytest.fixture(scope="module")
def appendix_d():
    import llms_from_scratch.appendix_d as appendix_d

    return appendix_d


@pytest.fixture(scope="module")
def ch05():
    import llms_from_scratch.ch05 as ch05

    return ch05


def _ours():
    return gptexp.GPTModel, gptexp.create_dataloader_v1


def _books(book):
    return book.GPTModel, book.create_dataloader_v1


def _setup(model_cls, create_loader, texts, lr=4e-4):
    train_text, val_text = texts
    torch.manual_seed(123)
    train_loader = create_loader(
        train_text, batch_size=2, max_length=32, stride=32, drop_last=True, shuffle=True, num_workers=0
    )
    val_loader = create_loader(
        val_text, batch_size=2, max_length=32, stride=32, drop_last=False, shuffle=False, num_workers=0
    )
    torch.manual_seed(123)
    model = model_cls(dict(SMALL_CFG, impl="book")) if model_cls is gptexp.GPTModel else model_cls(SMALL_CFG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    return model, train_loader, val_loader, optimizer


def _assert_same_weights(ours, theirs):
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_train_model_simple_returns_prints_and_trains_exactly_as_the_books(
    book, ch05, verdict_slice, tokenizer, capsys
):
    def train(train_model_simple, classes):
        model, train_loader, val_loader, optimizer = _setup(*classes, verdict_slice)
        result = train_model_simple(
            model,
            train_loader,
            val_loader,
            optimizer,
            torch.device("cpu"),
            num_epochs=2,
            eval_freq=3,
            eval_iter=2,
            start_context=START,
            tokenizer=tokenizer,
        )
        return result, model, capsys.readouterr().out

    (ours, our_model, our_out) = train(gptexp.train_model_simple, _ours())
    (theirs, their_model, their_out) = train(ch05.train_model_simple, _books(book))
    assert len(ours) == 3
    train_losses, val_losses, tokens_seen = ours
    assert len(train_losses) == len(val_losses) == len(tokens_seen) == 8  # steps 0, 3, ..., 21 of 24
    assert ours == theirs  # losses and tokens seen, bit for bit
    assert our_out == their_out
    assert our_out.splitlines()[0].startswith("Ep 1 (Step 000000): Train loss ")
    assert sum(line.startswith(START) for line in our_out.splitlines()) == 2  # a sample per epoch
    _assert_same_weights(our_model, their_model)


@pytest.mark.parametrize("orig_book_version", [False, True])
def test_appendix_d_train_model_gives_the_books_lrs_losses_and_weights_bit_for_bit(
    book, appendix_d, verdict_slice, tokenizer, capsys, orig_book_version
):
    def train(train_model, classes):
        model, train_loader, val_loader, optimizer = _setup(*classes, verdict_slice, lr=1e-3)
        # warmup 7 from 1e-5 to 1e-3: a step where a different float order of the warmup
        # increment would change the rate's last bit (step 5)
        result = train_model(
            model,
            train_loader,
            val_loader,
            optimizer,
            "cpu",
            n_epochs=2,
            eval_freq=4,
            eval_iter=2,
            start_context=START,
            tokenizer=tokenizer,
            warmup_steps=7,
            initial_lr=1e-5,
            min_lr=1e-6,
            orig_book_version=orig_book_version,
        )
        return result, model, capsys.readouterr().out

    ours, our_model, our_out = train(gptexp.train_model, _ours())
    theirs, their_model, their_out = train(appendix_d.train_model, _books(book))
    train_losses, val_losses, tokens_seen, lrs = ours
    assert len(lrs) == 24 and lrs[0] == 1e-5 and max(lrs) == 1e-3
    assert ours == theirs  # every list bit for bit, the learning rate of each step included
    assert our_out == their_out
    assert our_out.splitlines()[0].startswith("Ep 1 (Iter 000000): Train loss ")
    _assert_same_weights(our_model, their_model)


def test_evaluate_model_and_the_printed_sample_equal_the_books(book, ch05, verdict_slice, tokenizer, capsys):
    ours = _setup(*_ours(), verdict_slice)
    theirs = _setup(*_books(book), verdict_slice)
    torch.manual_seed(1)  # the shuffled train loader draws its order from the global RNG
    got = gptexp.evaluate_model(ours[0], ours[1], ours[2], "cpu", eval_iter=2)
    torch.manual_seed(1)
    want = ch05.evaluate_model(theirs[0], theirs[1], theirs[2], "cpu", eval_iter=2)
    assert got == want
    assert ours[0].training  # back in training mode, as the book leaves it
    capsys.readouterr()
    gptexp.generate_and_print_sample(ours[0], tokenizer, "cpu", START)
    our_line = capsys.readouterr().out
    ch05.generate_and_print_sample(theirs[0], tokenizer, "cpu", START)
    assert our_line == capsys.readouterr().out
    assert our_line.startswith(START) and our_line.count("\n") == 1


def test_plot_losses_saves_the_books_loss_plot_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gptexp.plot_losses([0.5, 1.0, 1.5], [64, 128, 192], [9.0, 8.0, 7.0], [9.5, 8.8, 8.4]) is None
    assert (tmp_path / "loss-plot.pdf").read_bytes().startswith(b"%PDF")


def test_the_runners_core_emits_the_book_loops_events_to_subscribers(verdict_slice):
    from gptexp.runner import Callback, LoopState, train_loop
    from gptexp.runtime import Runtime

    model, train_loader, val_loader, optimizer = _setup(*_ours(), verdict_slice)
    seen = []

    class Record(Callback):
        def on_step(self, event):
            seen.append(("step", event.epoch, event.global_step))

        def on_eval(self, event):
            seen.append(("eval", event.epoch, event.global_step))

    state = train_loop(
        model,
        train_loader,
        val_loader,
        optimizer,
        Runtime(torch.device("cpu"), "fp32", 1),
        num_epochs=2,
        eval_freq=10,
        eval_iter=1,
        callbacks=[Record()],
        epoch_end=lambda trained: seen.append(("epoch", trained.epoch, trained.global_step)),
    )
    assert state == LoopState(epoch=2, global_step=23, tokens_seen=24 * 2 * 32)
    assert [e for e in seen if e[0] != "step"] == [
        ("eval", 1, 0),
        ("eval", 1, 10),
        ("epoch", 1, 11),
        ("eval", 2, 20),
        ("epoch", 2, 23),
    ]
    assert [e[2] for e in seen if e[0] == "step"] == list(range(24))
