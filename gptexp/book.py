"""The book's training functions: chapter 5's `train_model_simple` and friends, appendix D's `train_model`.

Each keeps the book's signature, printed lines and return values, and trains through the
runner's core (`runner.train_loop`), the loop behind `gptexp train`, with one subscriber that
prints and records what the book returns. So `impl: book` with the book's `torch.optim.AdamW`
gives the book package's losses, learning rates and weights bit for bit.

Intentional differences: a NaN or infinite training loss raises `NonFiniteLoss` (the book trains
on), and `train_model` with `warmup_steps=0` skips the warmup (the book divides by zero).
"""

from __future__ import annotations

import torch

from .config import TrainConfig
from .generation import generate_text_simple, text_to_token_ids, token_ids_to_text
from .runner import Callback, EvalEvent, GradClip, StepEvent, evaluate_model, lr_at, train_loop
from .runtime import Runtime

__all__ = ["train_model_simple", "train_model", "evaluate_model", "generate_and_print_sample", "plot_losses"]

SAMPLE_TOKENS = 50  # the book's generate_and_print_sample continues the prompt by 50 tokens


class _BookLog(Callback):
    """Prints each evaluation as the book does and keeps what the book's functions return."""

    def __init__(self, step_word: str):
        self.step_word = step_word  # chapter 5 prints "Step", appendix D "Iter"
        self.train_losses: list[float] = []
        self.val_losses: list[float] = []
        self.tokens_seen: list[int] = []
        self.lrs: list[float] = []

    def on_step(self, event: StepEvent) -> None:
        self.lrs.append(event.lr)

    def on_eval(self, event: EvalEvent) -> None:
        self.train_losses.append(event.train_loss)
        self.val_losses.append(event.val_loss)
        self.tokens_seen.append(event.tokens_seen)
        print(
            f"Ep {event.epoch} ({self.step_word} {event.global_step:06d}): "
            f"Train loss {event.train_loss:.3f}, Val loss {event.val_loss:.3f}"
        )


def _fp32(device) -> Runtime:
    """The book's functions compute in fp32, on the threads torch already uses."""
    return Runtime(torch.device(device), "fp32", torch.get_num_threads())


def train_model_simple(
    model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter, start_context, tokenizer
):
    """Chapter 5's training loop; returns (train_losses, val_losses, track_tokens_seen).

    Every eval_freq-th global step (from 0) evaluates the first eval_iter batches of each
    loader and prints them; every epoch ends with a printed greedy sample after start_context.
    """
    log = _BookLog("Step")
    train_loop(
        model,
        train_loader,
        val_loader,
        optimizer,
        _fp32(device),
        num_epochs,
        eval_freq,
        eval_iter,
        callbacks=[log],
        epoch_end=lambda _: generate_and_print_sample(model, tokenizer, device, start_context),
    )
    return log.train_losses, log.val_losses, log.tokens_seen


def train_model(
    model,
    train_loader,
    val_loader,
    optimizer,
    device,
    n_epochs,
    eval_freq,
    eval_iter,
    start_context,
    tokenizer,
    warmup_steps,
    initial_lr=3e-05,
    min_lr=1e-6,
    orig_book_version=False,
):
    """Appendix D's loop: linear warmup from initial_lr to the optimizer's lr, cosine decay to
    min_lr, gradients clipped to norm 1 from step warmup_steps on (after it with
    orig_book_version, as first printed). Returns (train_losses, val_losses, track_tokens_seen,
    track_lrs), the last with every step's learning rate.
    """
    schedule = TrainConfig(
        lr=optimizer.param_groups[0]["lr"],
        warmup_steps=warmup_steps,
        initial_lr=initial_lr,
        min_lr=min_lr,
        lr_schedule="cosine",
    )
    total_steps = len(train_loader) * n_epochs
    clip = GradClip(max_norm=1.0, start=warmup_steps + 1 if orig_book_version else warmup_steps)
    log = _BookLog("Iter")
    train_loop(
        model,
        train_loader,
        val_loader,
        optimizer,
        _fp32(device),
        n_epochs,
        eval_freq,
        eval_iter,
        lr_schedule=lambda step: lr_at(step, total_steps, schedule),
        clip=clip,
        callbacks=[log],
        epoch_end=lambda _: generate_and_print_sample(model, tokenizer, device, start_context),
    )
    return log.train_losses, log.val_losses, log.tokens_seen, log.lrs


def generate_and_print_sample(model, tokenizer, device, start_context):
    """Prints start_context and 50 greedy tokens on one line (newlines as spaces), in eval mode."""
    model.eval()
    context_size = model.pos_emb.weight.shape[0]
    idx = text_to_token_ids(start_context, tokenizer).to(device)
    with torch.no_grad():
        token_ids = generate_text_simple(model, idx, max_new_tokens=SAMPLE_TOKENS, context_size=context_size)
    print(token_ids_to_text(token_ids, tokenizer).replace("\n", " "))
    model.train()


def plot_losses(epochs_seen, tokens_seen, train_losses, val_losses):
    """The book's loss plot: losses against epochs, tokens seen on a second x-axis; saved as
    loss-plot.pdf in the working directory, then shown."""
    # Imported here: importing gptexp must not choose a matplotlib backend for its user.
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax1 = plt.subplots(figsize=(5, 3))
    ax1.plot(epochs_seen, train_losses, label="Training loss")
    ax1.plot(epochs_seen, val_losses, linestyle="-.", label="Validation loss")
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2 = ax1.twiny()  # shares the y-axis; an invisible plot aligns its ticks with tokens seen
    ax2.plot(tokens_seen, train_losses, alpha=0)
    ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    plt.savefig("loss-plot.pdf")
    plt.show()
