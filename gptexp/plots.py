"""The book's loss plot: train and val loss against epochs, tokens seen on a second axis."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: jobs run headless

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def loss_figure(evals, epochs, steps_per_epoch: int):
    """A run's loss plot as a figure (not saved, not shown; the book's `plot_losses` is gptexp.book's).

    evals: EvalEvents (the book's periodic losses); epochs: EpochEvents (full-split losses)."""
    fig, ax1 = plt.subplots(figsize=(6, 3.5))
    if evals:
        x = [(e.global_step + 1) / steps_per_epoch for e in evals]
        ax1.plot(x, [e.train_loss for e in evals], label="Training loss")
        ax1.plot(x, [e.val_loss for e in evals], linestyle="-.", label="Validation loss")
    if epochs:
        ex = [e.epoch for e in epochs]
        ax1.plot(
            ex, [e.train_loss for e in epochs], "o", color="C0", markersize=4, label="Training loss (epoch, full split)"
        )
        ax1.plot(
            ex, [e.val_loss for e in epochs], "s", color="C1", markersize=4, label="Validation loss (epoch, full split)"
        )
    ax1.set_xlabel("Epochs")
    ax1.set_ylabel("Loss")
    ax1.legend(loc="upper right", fontsize="small")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    if evals:
        ax2 = ax1.twiny()  # the book's second x-axis: tokens seen at each evaluation
        ax2.plot([e.tokens_seen for e in evals], [e.train_loss for e in evals], alpha=0)
        ax2.set_xlabel("Tokens seen")
    fig.tight_layout()
    return fig
