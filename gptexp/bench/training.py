"""Training figures: the book package's step against `runner.train_step`, the step `gptexp train`
runs (with `runner.make_optimizer`); and the AdamW implementations side by side."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import runner
from ..config import Config, TrainConfig
from ..model import GPTModel, compile_blocks
from ..runtime import Runtime
from .baseline import book_modules, seeded
from .sizes import Sizes
from .timing import figure, median, repeat, timed

BOOK_LR, BOOK_WEIGHT_DECAY = 4e-4, 0.1
# The training figures time what `gptexp train` runs with its defaults (fused AdamW), at the book's lr.
_TRAIN_CONFIG = Config(train=TrainConfig(lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY))
# AdamW implementations; the book's default on CPU tensors is the for-loop one.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "for_loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}


def optimizer_figures(sizes: Sizes) -> dict:
    """Seconds per AdamW step on the model's parameters, for each implementation."""
    torch.manual_seed(0)
    model = GPTModel(dict(sizes.model, impl="fast"))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {
        name: torch.optim.AdamW(params, lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY, **kw)
        for name, kw in OPTIMIZERS.items()
    }
    for opt in opts.values():
        opt.step()  # creates the state
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(sizes.opt_reps):  # interleaved, so a noisy neighbour slows all alike
        for name, opt in opts.items():
            times[name].append(timed(opt.step))
    del opts
    gc.collect()
    out: dict[str, Any] = {name: {"step_s": median(ts), "times_s": ts} for name, ts in times.items()}
    out["best"] = min(OPTIMIZERS, key=lambda k: out[k]["step_s"])
    return out


class _Trainer:
    """One training variant: a model, its optimizer and its step, which returns the loss."""

    def __init__(self, model, optimizer, step: Callable[[torch.Tensor, torch.Tensor], float], optimizer_name: str):
        self.model = model.train()
        self.optimizer = optimizer
        self.step = step
        self.optimizer_name = optimizer_name

    def release(self) -> None:
        """Drop the gradients between timed steps (not timed), so idle variants hold less memory."""
        self.optimizer.zero_grad(set_to_none=True)


def _book_trainer(ch04, ch05, cfg: dict) -> _Trainer:
    """The book package's model, torch's default AdamW and the book's loop body."""
    model = ch04.GPTModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY)

    def step(x, y) -> float:
        optimizer.zero_grad()
        loss = ch05.calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        optimizer.step()
        return loss.item()

    return _Trainer(model, optimizer, step, "book default (for-loop AdamW)")


def _gptexp_trainer(cfg: dict, impl: str, precision: str, compiled: bool, threads: int) -> _Trainer:
    """What `gptexp train` runs: the runner's optimizer and training step (`runner.train_step`)."""
    model = GPTModel(dict(cfg, impl=impl))
    runtime = Runtime(torch.device("cpu"), precision, threads)
    optimizer = runner.make_optimizer(model, _TRAIN_CONFIG, runtime)
    forward = compile_blocks(model, dynamic=False) if compiled else model
    name = "fused" if optimizer.defaults.get("fused") else "for_loop"
    return _Trainer(
        model, optimizer, lambda x, y: runner.train_step(model, optimizer, x, y, runtime, forward=forward), name
    )


def _batch(cfg: dict, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def train_figures(sizes: Sizes, bf16_native: bool, peaks: dict, notes: list) -> dict:
    """Tokens/s of each training variant (the book package's, and gptexp's through `runner.train_step`),
    timed round by round; each with its MFU against both matmul peaks."""
    _, ch04, ch05 = book_modules()
    cfg = dict(sizes.model)
    seq = cfg["context_length"]
    x, y = _batch(cfg, sizes.batch, seq, 1)
    # Every variant warms up at the timed shape, so compiling, creating the optimizer state and
    # the first allocation of that shape's buffers all fall outside the timed steps.
    wx, wy = _batch(cfg, sizes.batch, seq, 2)
    compile_prec = "bf16" if bf16_native else "fp32"

    threads = torch.get_num_threads()

    def book_pkg():
        return _book_trainer(ch04, ch05, cfg)

    def ours(impl, autocast=False, compiled=False):
        return _gptexp_trainer(cfg, impl, "bf16" if autocast else "fp32", compiled, threads)

    variants = {
        "book_pkg_fp32": book_pkg,
        "gptexp_book_fp32": lambda: ours("book"),
        "fast_fp32": lambda: ours("fast"),
    }
    if bf16_native:
        variants["fast_bf16"] = lambda: ours("fast", autocast=True)
    if sizes.compile:
        variants[f"fast_compile_{compile_prec}"] = lambda: ours("fast", autocast=bf16_native, compiled=True)

    trainers, losses, warmup_s, optimizer_names = {}, {}, {}, {}
    for name, factory in variants.items():
        trainer = seeded(factory)
        t0 = time.perf_counter()
        trainer.step(wx, wy)
        warmup_s[name] = time.perf_counter() - t0
        trainer.release()
        trainers[name] = trainer
        optimizer_names[name] = trainer.optimizer_name

    # Round 1 times every variant; later rounds every variant while the budget allows, else only
    # those behind the headline ratios (train_fp32, train_bf16), else stop.
    headline: list[str] = [n for n in ("book_pkg_fp32", "fast_fp32", "fast_bf16") if n in trainers]
    times: dict[str, list[float]] = {name: [] for name in trainers}
    spent, members = 0.0, list(trainers)
    while True:
        for name in members:
            trainer = trainers[name]
            t0 = time.perf_counter()
            losses[name] = trainer.step(x, y)
            dt = time.perf_counter() - t0
            trainer.release()
            times[name].append(dt)
            spent += dt
        if len(times["book_pkg_fp32"]) >= sizes.train_reps:
            break
        cost = {n: median(times[n]) for n in trainers}
        if spent + sum(cost.values()) <= sizes.train_budget_s:
            members = list(trainers)
        elif spent + sum(cost[n] for n in headline) <= sizes.train_budget_s:
            members = headline
        else:
            break
    del trainers
    gc.collect()

    tokens = sizes.batch * seq
    flops = _flops_per_token(cfg, seq)
    out = {}
    for name, ts in times.items():
        fig = figure(ts, tokens, "tokens_per_s")
        fig.update(
            batch=sizes.batch, seq=seq, warmup_s=warmup_s[name], loss=losses[name], optimizer=optimizer_names[name]
        )
        out[name] = fig

    if not bf16_native:
        b, s = sizes.bf16_slow_shape
        s = min(s, seq)
        bx, by = _batch(cfg, b, s, 3)
        trainer = seeded(lambda: ours("fast", autocast=True))
        warm = timed(lambda: trainer.step(bx, by))
        loss = []
        ts = repeat(lambda: loss.append(trainer.step(bx, by)), 2, 2.5 * warm)
        fig = figure(ts, b * s, "tokens_per_s")
        fig.update(batch=b, seq=s, warmup_s=warm, loss=loss[-1], optimizer=trainer.optimizer_name, reduced_shape=True)
        out["fast_bf16"] = fig
        notes.append(
            f"bf16 has no hardware support on this CPU (bf16 matmul peak {peaks['bf16']['gflops']:.1f} vs "
            f"fp32 {peaks['fp32']['gflops']:.1f} GFLOP/s): the bf16 training step is measured on {b}x{s} "
            f"tokens instead of {sizes.batch}x{seq}, and torch.compile in fp32"
        )
        flops_bf16 = _flops_per_token(cfg, s)
        out["fast_bf16"]["flops_per_token"] = flops_bf16
        del trainer
        gc.collect()

    for fig in out.values():
        f = fig.get("flops_per_token", flops)
        fig["flops_per_token"] = f
        for prec in ("fp32", "bf16"):
            fig[f"mfu_{prec}"] = fig["tokens_per_s"] * f / (peaks[prec]["gflops"] * 1e9)
    return out


def _flops_per_token(cfg: dict, seq: int) -> float:
    with torch.device("meta"):
        model = GPTModel(dict(cfg, impl="fast"))
    return model.flops_per_token(seq)
