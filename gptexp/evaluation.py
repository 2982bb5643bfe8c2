"""Losses: the book's batch and loader losses, and a token-weighted loss over a whole split.

`calc_loss_loader` is the book's mean of batch means over at most `num_batches` batches; it
depends on the loader's batch size and stride. `evaluate_split` is what sweeps compare: every
target token of the split predicted exactly once, from non-overlapping windows of the model's
context length, averaged per token, so it does not depend on training stride or batch size.

Both take a `world` (gptexp.distributed): in a job of several processes each rank scores its
share and the sums are added over the ranks, so every process gets the single-process value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import interrupts
from .distributed import SINGLE, World
from .errors import CorpusError


def calc_loss_batch(input_batch, target_batch, model, device):
    """Mean cross-entropy of one (batch, n) batch; logits are (batch, n, vocab)."""
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None, *, world: World = SINGLE) -> float:
    """The book's mean of batch losses over the first `num_batches` batches (all if None).

    With a `world` of several processes, `data_loader` yields this rank's share of each batch
    (World.shard) and each batch's loss is its token losses summed over the ranks' shares.
    """
    if len(data_loader) == 0:
        # The book returns NaN here, which then poisons every comparison downstream.
        raise CorpusError(
            f"the data loader is empty{_why_empty(data_loader)}: use a longer text, "
            "a shorter max_length (context_length), a smaller batch_size or drop_last=False"
        )
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if world.size > 1:
        return _sharded_loss_loader(data_loader, model, device, num_batches, world)
    total_loss = 0.0
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        interrupts.check()
        total_loss += calc_loss_batch(input_batch, target_batch, model, device).item()
    return total_loss / num_batches


def _sharded_loss_loader(data_loader, model, device, num_batches: int, world: World) -> float:
    sums = []  # per batch: this share's summed token loss, its token count
    for i, (input_batch, target_batch) in enumerate(data_loader):
        if i >= num_batches:
            break
        loss = 0.0
        if len(input_batch):  # the last batch of a loader that keeps it may leave a rank nothing
            logits = model(input_batch.to(device))
            loss = F.cross_entropy(logits.flatten(0, 1), target_batch.to(device).flatten(), reduction="sum").item()
        sums += [loss, target_batch.numel()]
    totals = world.sum(sums)
    return sum(totals[k] / totals[k + 1] for k in range(0, len(totals), 2)) / num_batches


def _why_empty(data_loader) -> str:
    """' (N window(s) of L tokens from T tokens, batch_size B[ with drop_last])' for our dataset's loaders."""
    dataset = getattr(data_loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "max_length"):
        return ""
    drop = " with drop_last" if getattr(data_loader, "drop_last", False) else ""
    return (
        f" ({len(dataset)} window(s) of {dataset.max_length} tokens from {len(dataset.token_ids)} tokens, "
        f"batch_size {data_loader.batch_size}{drop})"
    )


def perplexity(loss) -> float:
    """exp(loss); inf where exp overflows."""
    loss = float(loss)
    return math.exp(loss) if loss < 709.0 else math.inf


@dataclass(frozen=True)
class SplitLoss:
    loss: float  # mean cross-entropy per target token
    tokens: int  # number of target tokens scored

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


def evaluation_windows(n_tokens: int, context_length: int) -> list[tuple[int, int]]:
    """(start, length) of non-overlapping input windows that predict tokens 1..n-1 once each."""
    return [(s, min(context_length, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, context_length)]


def evaluate_split(
    model, token_ids, context_length: int, device, batch_size: int = 8, *, name: str = "split", world: World = SINGLE
) -> SplitLoss:
    """Token-weighted loss of `model` over every target token of a split.

    Full windows go through in batches; the shorter tail window alone. Sums are kept in float64
    so the result does not drift with the number of batches. With a `world` of several processes
    rank r scores batches r, r + size, ... (the single-process batches, so the same numerics) and
    the sums are added over the ranks.
    """
    ids = np.asarray(token_ids)
    if len(ids) < 2:
        raise CorpusError(f"{name} has {len(ids)} token(s); evaluation needs at least 2")
    windows = evaluation_windows(len(ids), context_length)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        with torch.inference_mode():
            full = [s for s, n in windows if n == context_length]
            tail = [(s, n) for s, n in windows if n != context_length]
            groups = [(full[i : i + batch_size], context_length) for i in range(0, len(full), batch_size)]
            groups += [([s], n) for s, n in tail]
            rounds = -(-len(groups) // world.size)
            for i in range(rounds):
                interrupts.check()
                world.check_stop()
                if i * world.size + world.rank >= len(groups):
                    continue
                starts, n = groups[i * world.size + world.rank]
                offsets = np.arange(n + 1)
                batch = torch.from_numpy(ids[np.asarray(starts)[:, None] + offsets].astype(np.int64)).to(device)
                logits = model(batch[:, :-1])
                losses = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none")
                total += losses.double().sum().item()
                count += losses.numel()
    finally:
        model.train(was_training)
    total, count = world.sum([total, count])
    return SplitLoss(loss=total / count, tokens=int(count))
