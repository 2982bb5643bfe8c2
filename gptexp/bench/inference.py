"""Evaluation and generation figures: the book package's loss loader and greedy loop against
`evaluate_split` and the KV-cached `generate`, in fp32 and bf16."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..evaluation import evaluate_split
from ..generation import generate
from ..model import GPTModel
from .baseline import PassThrough, book_modules, seeded
from .sizes import Sizes
from .timing import figure, repeat

PROMPT_IDS = [6109, 3626, 6100, 345]  # "Every effort moves you" in GPT-2's BPE


def eval_figures(sizes: Sizes, bf16_native: bool, notes: list) -> dict:
    """Tokens/s of evaluating a random validation split: the book's calc_loss_loader, our evaluate_split."""
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg["vocab_size"], (sizes.eval_tokens,), generator=g).numpy().astype(np.int64)

    out = {"book_pkg_fp32": _book_eval_figure(sizes, ids)}
    fast = seeded(lambda: GPTModel(dict(cfg, impl="fast"))).eval()
    for prec in ("fp32", "bf16"):
        split = ids if (prec == "fp32" or bf16_native) else ids[: sizes.eval_bf16_slow_tokens]
        ctxm = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()

        def ours(s=split, c=ctxm):
            with c:
                return evaluate_split(fast, s, ctx, "cpu", batch_size=8)

        ours(split[: min(len(split), ctx + 1)])
        result = ours()
        fig = figure(repeat(ours, sizes.eval_reps, sizes.eval_budget_s), result.tokens, "tokens_per_s")
        fig.update(loss=result.loss, batch_size=8, tokens=result.tokens)
        if len(split) < len(ids):
            fig["reduced_split"] = True
            notes.append(f"bf16 evaluation measured on {len(split)} tokens instead of {len(ids)} (no bf16 hardware)")
        out[f"fast_{prec}"] = fig
    return out


def _book_eval_figure(sizes: Sizes, ids: np.ndarray) -> dict:
    """The book package's model (freed on return) on the book's validation loader over `ids`."""
    ch02, ch04, ch05 = book_modules()
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    book_model = seeded(lambda: ch04.GPTModel(cfg)).eval()
    ds = ch02.GPTDatasetV1(None, PassThrough(ids.tolist()), ctx, ctx)
    loader = DataLoader(ds, batch_size=2, shuffle=False, drop_last=False)  # the book's validation loader
    book_tokens = len(ds) * ctx

    def book_eval(num_batches=None):
        with torch.no_grad():
            return ch05.calc_loss_loader(loader, book_model, "cpu", num_batches=num_batches)

    book_eval(1)
    fig = figure(repeat(book_eval, sizes.eval_reps, sizes.eval_budget_s), book_tokens, "tokens_per_s")
    fig.update(loss=book_eval(), batch_size=2)
    return fig


def _book_gen_figure(sizes: Sizes, idx: torch.Tensor, tokens: dict) -> dict:
    """The book package's model (freed on return) and generate_text_simple; its tokens in tokens["book"]."""
    _, ch04, _ = book_modules()
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    book_model = seeded(lambda: ch04.GPTModel(cfg)).eval()

    def book(n=sizes.gen_new):
        tokens["book"] = ch04.generate_text_simple(book_model, idx, n, ctx)

    book(2)
    return figure(repeat(book, sizes.gen_reps, sizes.gen_budget_s), sizes.gen_new, "tokens_per_s")


def gen_figures(sizes: Sizes, bf16_native: bool, notes: list) -> dict:
    """New tokens/s of greedy generation: the book's generate_text_simple, our KV-cached generate."""
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    idx = torch.tensor([PROMPT_IDS])
    if idx.shape[1] + sizes.gen_new > ctx:
        raise ValueError(f"{sizes.gen_new} new tokens after a {idx.shape[1]}-token prompt exceed the context {ctx}")
    tokens: dict[str, torch.Tensor] = {}
    out = {"book_pkg_fp32": _book_gen_figure(sizes, idx, tokens)}
    fast = seeded(lambda: GPTModel(dict(cfg, impl="fast"))).eval()
    for prec in ("fp32", "bf16"):
        n_new = sizes.gen_new if (prec == "fp32" or bf16_native) else min(sizes.gen_new, sizes.gen_bf16_slow_new)
        ctxm = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()

        def ours(n=n_new, c=ctxm, p=prec):
            with c:
                tokens[p] = generate(fast, idx, n, ctx, use_cache=True)

        ours(2)
        fig = figure(repeat(ours, sizes.gen_reps, sizes.gen_budget_s), n_new, "tokens_per_s")
        fig["new_tokens"] = n_new
        if n_new < sizes.gen_new:
            fig["reduced_tokens"] = True
            notes.append(
                f"bf16 KV-cached generation measured on {n_new} new tokens instead of {sizes.gen_new} "
                "(no bf16 hardware)"
            )
        out[f"fast_kv_{prec}"] = fig
    out["book_pkg_fp32"]["new_tokens"] = sizes.gen_new
    # Same seed, same weights: greedy tokens should agree (a near-tie could flip one in fp32).
    out["fast_kv_fp32"]["same_tokens_as_book"] = bool(torch.equal(tokens["book"], tokens["fp32"]))
    return out
