"""`gptexp bench`: gptexp measured against the book's own package (llms-from-scratch), side by side.

Every figure is timed in one process next to its baseline from the book's package, as the median
of several repetitions after a warm-up (training variants interleaved round by round, so a noisy
neighbour slows all of them alike); the data windows are built in child processes so their peak
memory is clean. The result is printed as a table, written as JSON (`ratios`: gptexp over the
book, > 1 is better) and logged as an MLflow run in experiment `bench`.

Slow figures get a time budget: after the warm-up and the first repetition, another repetition
runs only while it fits the budget, so the full bench stays within ~10 minutes on 2 idle CPU
cores (other processes on the machine slow it down and are recorded as the load average).
The repetitions done are recorded next to every figure. Where bf16 has no hardware support (the
bench measures the bf16 matmul peak itself), the bf16 figures are measured on a smaller shape,
said so in `notes`, and torch.compile is measured in fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import runner
from .config import Config, TrainConfig
from .model import GPT_CONFIG_124M, GPTModel, compile_blocks
from .provenance import cpu_model
from .runtime import Runtime, physical_cores

EXPERIMENT = "bench"
DEFAULT_OUT_DIR = Path("bench-results")
PROMPT_IDS = [6109, 3626, 6100, 345]  # "Every effort moves you" in GPT-2's BPE
BOOK_LR, BOOK_WEIGHT_DECAY = 4e-4, 0.1
# The training figures time what `gptexp train` runs with its defaults (fused AdamW), at the book's lr.
_TRAIN_CONFIG = Config(train=TrainConfig(lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY))
RATIO_KEYS = ("train_fp32", "train_bf16", "generate_kv", "data_build_time", "data_peak_memory")
OPTIMIZERS = {  # AdamW implementations; the book's default on CPU tensors is the for-loop one
    "for_loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
}
PAGE = 4096


@dataclass(frozen=True)
class Sizes:
    """What the bench measures and how long it may take. FULL and QUICK below; tests shrink it."""

    model: dict = field(default_factory=lambda: dict(GPT_CONFIG_124M))
    batch: int = 8  # training batch; sequence length = context_length
    train_reps: int = 3
    # Interleaved timed rounds, all training variants together: on 2 idle cores round 1 takes ~80 s,
    # and a second round fits for the headline variants (~40 s), not for all of them.
    train_budget_s: float = 150.0
    compile: bool = True
    bf16_slow_shape: tuple[int, int] = (1, 8)  # (batch, seq) for bf16 training without bf16 hardware
    peak_n: int = 2048  # largest square matmul for the peaks
    peak_reps: int = 3
    peak_budget_s: float = 2.0  # a size is skipped when one matmul would take longer
    opt_reps: int = 2
    eval_tokens: int = 513  # validation split: 2 windows of 256
    eval_bf16_slow_tokens: int = 65
    eval_reps: int = 3
    eval_budget_s: float = 12.0
    gen_new: int = 200
    gen_bf16_slow_new: int = 8
    gen_reps: int = 3
    gen_budget_s: float = 35.0  # the book's full-context loop gets one repetition where one is ~minutes
    data_s1_tokens: int = 200_000  # windows at stride 1
    data_big_tokens: int = 2_000_000  # windows at stride = context length
    data_reps: int = 3
    data_budget_s: float = 8.0  # per build kind: the book's stride-1 windows take seconds each
    optimizer_model: bool = True  # compare AdamW implementations on the model's parameters

    def flat(self) -> dict:
        d = dataclasses.asdict(self)
        model = d.pop("model")
        d.update({f"model.{k}": v for k, v in model.items()})
        return d


FULL = Sizes()
QUICK = Sizes(batch=1, train_reps=2, train_budget_s=30.0, compile=False, bf16_slow_shape=(1, 4), peak_n=1024,
              peak_reps=2, opt_reps=1, eval_tokens=257, eval_bf16_slow_tokens=33, eval_reps=2, eval_budget_s=8.0,
              gen_new=20, gen_bf16_slow_new=4, gen_reps=2, gen_budget_s=10.0, data_s1_tokens=20_000,
              data_big_tokens=200_000, data_reps=2, data_budget_s=3.0)


# ----------------------------------------------------------------------------------------- timing

def _median(xs) -> float:
    return float(statistics.median(xs))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _repeat(fn, reps: int, budget_s: float) -> list[float]:
    """Time fn() at least once; repeat while fewer than `reps` and the next one fits `budget_s`."""
    times = [_timed(fn)]
    while len(times) < reps and sum(times) + _median(times) <= budget_s:
        times.append(_timed(fn))
    return times


def _figure(times: list[float], work: float, unit: str) -> dict:
    s = _median(times)
    return {unit: work / s, "seconds": s, "times_s": [round(t, 6) for t in times], "reps": len(times)}


def _cpu_flags() -> list[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return []


# ------------------------------------------------------------------------------------------ peaks

def matmul_peak(dtype: torch.dtype, max_n: int, reps: int, budget_s: float) -> dict:
    """Best GFLOP/s of an n x n matmul (nn.Linear's layout), n doubling from 256 up to max_n.

    A size is skipped when, at the rate seen so far, one product would take longer than budget_s
    (bf16 without hardware support is ~100x slower than fp32).
    """
    best, best_n, n, rate = 0.0, 0, 256, None
    while n <= max_n:
        flops = 2.0 * n ** 3
        if rate is not None and flops / rate > budget_s:
            break
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        F.linear(a, b)
        t = min(_timed(lambda: F.linear(a, b)) for _ in range(reps))
        rate = flops / t
        if rate > best:
            best, best_n = rate, n
        n *= 2
    return {"gflops": best / 1e9, "n": best_n}


def _bf16_hardware() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16); without them bf16 is emulated."""
    flags = _cpu_flags() if sys.platform.startswith("linux") else []
    if flags:
        return any(f.startswith(("amx_bf16", "avx512_bf16")) for f in flags)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _peaks(sizes: Sizes, threads: int) -> dict:
    out = {
        "fp32": matmul_peak(torch.float32, sizes.peak_n, sizes.peak_reps, sizes.peak_budget_s),
        "bf16": matmul_peak(torch.bfloat16, sizes.peak_n, sizes.peak_reps, sizes.peak_budget_s),
    }
    if threads > 1:
        torch.set_num_threads(1)
        try:
            out["fp32_1_thread"] = matmul_peak(torch.float32, sizes.peak_n, sizes.peak_reps, sizes.peak_budget_s)
        finally:
            torch.set_num_threads(threads)
    return out


# -------------------------------------------------------------------------------------- optimizer

def _optimizer_compare(sizes: Sizes) -> dict:
    """Seconds per AdamW step on the model's parameters, for each implementation."""
    torch.manual_seed(0)
    model = GPTModel(dict(sizes.model, impl="fast"))
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {name: torch.optim.AdamW(params, lr=BOOK_LR, weight_decay=BOOK_WEIGHT_DECAY, **kw)
            for name, kw in OPTIMIZERS.items()}
    for opt in opts.values():
        opt.step()  # creates the state
    times: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(sizes.opt_reps):  # interleaved, so a noisy neighbour slows all alike
        for name, opt in opts.items():
            times[name].append(_timed(opt.step))
    del opts
    gc.collect()
    out = {name: {"step_s": _median(ts), "times_s": ts} for name, ts in times.items()}
    out["best"] = min(OPTIMIZERS, key=lambda k: out[k]["step_s"])
    return out


# --------------------------------------------------------------------------------------- training

def _book():
    import llms_from_scratch.ch02 as ch02
    import llms_from_scratch.ch04 as ch04
    import llms_from_scratch.ch05 as ch05

    return ch02, ch04, ch05


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
    return _Trainer(model, optimizer, lambda x, y: runner.train_step(model, optimizer, x, y, runtime, forward=forward),
                    name)


def _batch(cfg: dict, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _seeded(make):
    torch.manual_seed(123)
    return make()


def _train_figures(sizes: Sizes, bf16_native: bool, peaks: dict, notes: list) -> dict:
    _, ch04, ch05 = _book()
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
        trainer = _seeded(factory)
        t0 = time.perf_counter()
        trainer.step(wx, wy)
        warmup_s[name] = time.perf_counter() - t0
        trainer.release()
        trainers[name] = trainer
        optimizer_names[name] = trainer.optimizer_name

    # Round 1 times every variant; later rounds every variant while the budget allows, else only
    # those behind the headline ratios (train_fp32, train_bf16), else stop.
    headline = [n for n in ("book_pkg_fp32", "fast_fp32", "fast_bf16") if n in trainers]
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
        cost = {n: _median(times[n]) for n in trainers}
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
        fig = _figure(ts, tokens, "tokens_per_s")
        fig.update(batch=sizes.batch, seq=seq, warmup_s=warmup_s[name], loss=losses[name],
                   optimizer=optimizer_names[name])
        out[name] = fig

    if not bf16_native:
        b, s = sizes.bf16_slow_shape
        s = min(s, seq)
        bx, by = _batch(cfg, b, s, 3)
        trainer = _seeded(lambda: ours("fast", autocast=True))
        warm = _timed(lambda: trainer.step(bx, by))
        loss = []
        ts = _repeat(lambda: loss.append(trainer.step(bx, by)), 2, 2.5 * warm)
        fig = _figure(ts, b * s, "tokens_per_s")
        fig.update(batch=b, seq=s, warmup_s=warm, loss=loss[-1], optimizer=trainer.optimizer_name, reduced_shape=True)
        out["fast_bf16"] = fig
        notes.append(f"bf16 has no hardware support on this CPU (bf16 matmul peak {peaks['bf16']['gflops']:.1f} vs "
                     f"fp32 {peaks['fp32']['gflops']:.1f} GFLOP/s): the bf16 training step is measured on {b}x{s} "
                     f"tokens instead of {sizes.batch}x{seq}, and torch.compile in fp32")
        flops_bf16 = _flops_per_token(cfg, s)
        out["fast_bf16"]["flops_per_token"] = flops_bf16
        del trainer
        gc.collect()

    for name, fig in out.items():
        f = fig.get("flops_per_token", flops)
        fig["flops_per_token"] = f
        for prec in ("fp32", "bf16"):
            fig[f"mfu_{prec}"] = fig["tokens_per_s"] * f / (peaks[prec]["gflops"] * 1e9)
    return out


def _flops_per_token(cfg: dict, seq: int) -> float:
    with torch.device("meta"):
        model = GPTModel(dict(cfg, impl="fast"))
    return model.flops_per_token(seq)


# ------------------------------------------------------------------------------------- evaluation

class _PassThrough:
    """A 'tokenizer' whose encode returns ids given up front: feeds the book's classes pre-tokenized ids."""

    def __init__(self, ids):
        self.ids = ids

    def encode(self, txt, allowed_special=None):
        return self.ids


def _eval_figures(sizes: Sizes, bf16_native: bool, notes: list) -> dict:
    from torch.utils.data import DataLoader

    from .evaluation import evaluate_split

    ch02, ch04, ch05 = _book()
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg["vocab_size"], (sizes.eval_tokens,), generator=g).numpy().astype(np.int64)

    book_model = _seeded(lambda: ch04.GPTModel(cfg)).eval()
    ds = ch02.GPTDatasetV1(None, _PassThrough(ids.tolist()), ctx, ctx)
    loader = DataLoader(ds, batch_size=2, shuffle=False, drop_last=False)  # the book's validation loader
    book_tokens = len(ds) * ctx

    def book_eval(num_batches=None):
        with torch.no_grad():
            return ch05.calc_loss_loader(loader, book_model, "cpu", num_batches=num_batches)

    book_eval(1)
    out = {"book_pkg_fp32": _figure(_repeat(book_eval, sizes.eval_reps, sizes.eval_budget_s), book_tokens,
                                    "tokens_per_s")}
    out["book_pkg_fp32"].update(loss=book_eval(), batch_size=2)
    del book_model

    fast = _seeded(lambda: GPTModel(dict(cfg, impl="fast"))).eval()
    for prec in ("fp32", "bf16"):
        split = ids if (prec == "fp32" or bf16_native) else ids[:sizes.eval_bf16_slow_tokens]
        ctxm = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()

        def ours(s=split, c=ctxm):
            with c:
                return evaluate_split(fast, s, ctx, "cpu", batch_size=8)

        ours(split[:min(len(split), ctx + 1)])
        result = ours()
        fig = _figure(_repeat(ours, sizes.eval_reps, sizes.eval_budget_s), result.tokens, "tokens_per_s")
        fig.update(loss=result.loss, batch_size=8, tokens=result.tokens)
        if len(split) < len(ids):
            fig["reduced_split"] = True
            notes.append(f"bf16 evaluation measured on {len(split)} tokens instead of {len(ids)} (no bf16 hardware)")
        out[f"fast_{prec}"] = fig
    return out


# ------------------------------------------------------------------------------------- generation

def _gen_figures(sizes: Sizes, bf16_native: bool, notes: list) -> dict:
    from .generation import generate

    _, ch04, _ = _book()
    cfg = dict(sizes.model)
    ctx = cfg["context_length"]
    idx = torch.tensor([PROMPT_IDS])
    if idx.shape[1] + sizes.gen_new > ctx:
        raise ValueError(f"{sizes.gen_new} new tokens after a {idx.shape[1]}-token prompt exceed the context {ctx}")
    out, tokens = {}, {}

    book_model = _seeded(lambda: ch04.GPTModel(cfg)).eval()

    def book(n=sizes.gen_new):
        tokens["book"] = ch04.generate_text_simple(book_model, idx, n, ctx)

    book(2)
    out["book_pkg_fp32"] = _figure(_repeat(book, sizes.gen_reps, sizes.gen_budget_s), sizes.gen_new, "tokens_per_s")
    del book_model

    fast = _seeded(lambda: GPTModel(dict(cfg, impl="fast"))).eval()
    for prec in ("fp32", "bf16"):
        n_new = sizes.gen_new if (prec == "fp32" or bf16_native) else min(sizes.gen_new, sizes.gen_bf16_slow_new)
        ctxm = torch.autocast("cpu", dtype=torch.bfloat16) if prec == "bf16" else contextlib.nullcontext()

        def ours(n=n_new, c=ctxm, p=prec):
            with c:
                tokens[p] = generate(fast, idx, n, ctx, use_cache=True)

        ours(2)
        fig = _figure(_repeat(ours, sizes.gen_reps, sizes.gen_budget_s), n_new, "tokens_per_s")
        fig["new_tokens"] = n_new
        if n_new < sizes.gen_new:
            fig["reduced_tokens"] = True
            notes.append(f"bf16 KV-cached generation measured on {n_new} new tokens instead of {sizes.gen_new} "
                         "(no bf16 hardware)")
        out[f"fast_kv_{prec}"] = fig
    out["book_pkg_fp32"]["new_tokens"] = sizes.gen_new
    # Same seed, same weights: greedy tokens should agree (a near-tie could flip one in fp32).
    out["fast_kv_fp32"]["same_tokens_as_book"] = bool(torch.equal(tokens["book"], tokens["fp32"]))
    return out


# ------------------------------------------------------------------------------------------- data

def _word_tokens(tokenizer) -> np.ndarray:
    """Ids of tokens that are ' ' + 2-10 lowercase letters: each such word re-encodes to itself."""
    pat = re.compile(rb" [a-z]{2,10}")
    ids = [i for i in range(tokenizer.n_vocab)
           if i != tokenizer.eot_token and pat.fullmatch(_token_bytes(tokenizer, i) or b"")]
    return np.asarray(ids, dtype=np.int64)


def _token_bytes(tokenizer, i: int) -> bytes | None:
    try:
        return tokenizer.decode_single_token_bytes(i)
    except KeyError:
        return None


def synthetic_corpus(tokenizer, n_tokens: int, seed: int = 0) -> tuple[str, np.ndarray]:
    """A text of n_tokens random words whose GPT-2 encoding is exactly the returned ids."""
    words = _word_tokens(tokenizer)
    ids = np.random.default_rng(seed).choice(words, size=n_tokens).astype(np.uint16)
    table = {int(i): tokenizer.decode_single_token_bytes(int(i)) for i in words}
    text = b"".join(table[int(i)] for i in ids).decode("ascii")
    return text, ids


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(field_name)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build_windows(spec: dict) -> list[dict]:
    torch.set_num_threads(spec["threads"])
    impl, source = spec["impl"], spec["source"]
    ctx, stride = spec["max_length"], spec["stride"]
    if impl == "book":
        import llms_from_scratch.ch02 as ch02

        cls = ch02.GPTDatasetV1
    else:
        from .datasets import GPTDatasetV1 as cls
    if source == "text":
        from .tokenizer import get_tokenizer

        text = Path(spec["text_path"]).read_text(encoding="ascii")
        tokenizer = get_tokenizer("gpt2")
        tokenizer.encode("warm up the tokenizer", allowed_special={"<|endoftext|>"})

        def build():
            return cls(text, tokenizer, ctx, stride)
    else:
        ids = np.load(spec["ids_path"])
        if impl == "book":
            tok = _PassThrough(ids.tolist())  # the book's input form: a list of Python ints

            def build():
                return cls(None, tok, ctx, stride)
        else:
            def build():
                return cls.from_token_ids(ids, ctx, stride)

    results = []
    while len(results) < spec["reps"]:
        if results and sum(r["seconds"] for r in results) * (1 + 1 / len(results)) > spec["budget_s"]:
            break
        gc.collect()
        clean = _reset_peak()
        rss0 = _rss_kib("VmRSS")
        hwm0 = _rss_kib("VmHWM")
        t0 = time.perf_counter()
        ds = build()
        dt = time.perf_counter() - t0
        peak = _rss_kib("VmHWM") - (rss0 if clean else hwm0)
        n = len(ds)
        x, y = ds[n - 1]
        if not len(x) == len(y) == ctx:
            raise RuntimeError(f"{impl} window of {len(x)} tokens, expected {ctx}")
        del ds, x, y
        results.append({"seconds": dt, "peak_kib": peak, "windows": n, "clean_peak": clean})
    return results


def _fork_server_main() -> None:
    """A process that has imported torch, the tokenizer and both dataset classes once, and forks a
    fresh child per request line (JSON spec) on stdin: each build gets a clean peak, at no import cost.
    One JSON answer line per request on stdout."""
    import llms_from_scratch.ch02  # noqa: F401  (imported once, before forking)

    from . import datasets  # noqa: F401
    from .tokenizer import get_tokenizer

    get_tokenizer("gpt2")  # tiktoken keeps it: the children share the loaded BPE ranks

    out = sys.stdout
    sys.stdout = sys.stderr  # only answers go to the real stdout
    for line in sys.stdin:
        spec = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                payload = ["ok", _build_windows(spec)]
            except BaseException as exc:
                payload = ["error", f"{type(exc).__name__}: {exc}"]
            with os.fdopen(w, "w") as f:
                f.write(json.dumps(payload))
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            answer = f.read()
        _, status = os.waitpid(pid, 0)
        if not answer:
            answer = json.dumps(["error", f"the child died without an answer (wait status {status}; out of memory?)"])
        out.write(answer + "\n")
        out.flush()


class _DataChildren:
    """Builds windows in fresh processes forked by one server (see _fork_server_main)."""

    def __enter__(self):
        import subprocess

        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", "from gptexp.bench import _fork_server_main; "
                                      "_fork_server_main()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        return self

    def run(self, spec: dict) -> list[dict]:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the data fork server exited (code {self.proc.poll()})")
        status, payload = json.loads(line)
        if status != "ok":
            raise RuntimeError(f"data child {spec['impl']}/{spec['source']} failed: {payload}")
        return payload

    def __exit__(self, *exc):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        return False


def _data_figures(sizes: Sizes, threads: int, notes: list) -> dict:
    from .tokenizer import get_tokenizer

    tokenizer = get_tokenizer("gpt2")
    ctx = sizes.model["context_length"]
    cases = {"stride1": (sizes.data_s1_tokens, 1), f"stride{ctx}": (sizes.data_big_tokens, ctx)}
    out = {}
    with tempfile.TemporaryDirectory(prefix="gptexp-bench-") as tmp, _DataChildren() as children:
        for case, (n_tokens, stride) in cases.items():
            text, ids = synthetic_corpus(tokenizer, n_tokens, seed=5)
            text_path, ids_path = Path(tmp) / f"{case}.txt", Path(tmp) / f"{case}.npy"
            text_path.write_text(text, encoding="ascii")
            np.save(ids_path, ids)
            del text
            fig = {"tokens": n_tokens, "stride": stride, "max_length": ctx}
            for impl in ("book", "ours"):
                for source in ("text", "ids"):
                    runs = children.run({"impl": impl, "source": source, "text_path": str(text_path),
                                            "ids_path": str(ids_path), "max_length": ctx, "stride": stride,
                                            "reps": sizes.data_reps, "budget_s": sizes.data_budget_s,
                                            "threads": threads})
                    fig[f"{impl}_{source}"] = {
                        "seconds": _median([r["seconds"] for r in runs]),
                        "times_s": [r["seconds"] for r in runs],
                        # The first build of a fresh process: later ones may reuse memory freed before.
                        "peak_bytes": max(runs[0]["peak_kib"] * 1024, PAGE),
                        "windows": runs[0]["windows"],
                        "clean_peak": runs[0]["clean_peak"],
                        "reps": len(runs),
                    }
            if fig["book_text"]["windows"] != fig["ours_text"]["windows"]:
                raise RuntimeError(f"window counts differ in {case}: {fig['book_text']['windows']} vs "
                                   f"{fig['ours_text']['windows']}")
            out[case] = fig
    if not all(v["clean_peak"] for fig in out.values() for k, v in fig.items() if isinstance(v, dict)):
        notes.append("peak memory could not be reset (/proc/self/clear_refs): peaks are ru_maxrss deltas")
    notes.append("data peaks are VmHWM - VmRSS around the build in a fresh child, floored at one 4 KiB page")
    return out


# ----------------------------------------------------------------------------------------- ratios

def _ratios(r: dict) -> dict:
    tr, ev, gen, data = r["train"], r["eval"], r["generate"], r["data"]
    base = tr["book_pkg_fp32"]["tokens_per_s"]
    ratios = {
        "train_fp32": tr["fast_fp32"]["tokens_per_s"] / base,
        "train_bf16": tr["fast_bf16"]["tokens_per_s"] / base,
        "train_book_impl_fp32": tr["gptexp_book_fp32"]["tokens_per_s"] / base,
    }
    for name in tr:
        if name.startswith("fast_compile_"):
            ratios["train_compile"] = tr[name]["tokens_per_s"] / base
    ratios["eval_fp32"] = ev["fast_fp32"]["tokens_per_s"] / ev["book_pkg_fp32"]["tokens_per_s"]
    ratios["eval_bf16"] = ev["fast_bf16"]["tokens_per_s"] / ev["book_pkg_fp32"]["tokens_per_s"]
    ratios["generate_kv"] = gen["fast_kv_fp32"]["tokens_per_s"] / gen["book_pkg_fp32"]["tokens_per_s"]
    ratios["generate_kv_bf16"] = gen["fast_kv_bf16"]["tokens_per_s"] / gen["book_pkg_fp32"]["tokens_per_s"]
    for case, fig in data.items():
        sfx = "" if case == "stride1" else f"_{case}"
        ratios[f"data_build_time{sfx}"] = fig["book_text"]["seconds"] / fig["ours_text"]["seconds"]
        ratios[f"data_peak_memory{sfx}"] = fig["book_text"]["peak_bytes"] / fig["ours_text"]["peak_bytes"]
        ratios[f"data_build_time_from_ids{sfx}"] = fig["book_ids"]["seconds"] / fig["ours_ids"]["seconds"]
        ratios[f"data_peak_memory_from_ids{sfx}"] = fig["book_ids"]["peak_bytes"] / fig["ours_ids"]["peak_bytes"]
    return ratios


# ------------------------------------------------------------------------------------------ table

def format_table(r: dict) -> str:
    rows: list[tuple[str, str, str, str]] = []
    ratios = r["ratios"]

    def add(label, value, unit, ratio=None, extra=""):
        rows.append((label, f"{value:,.1f}" if value >= 10 else f"{value:.3g}", unit,
                     (f"{ratio:.2f}x" if ratio is not None else "") + (f"  {extra}" if extra else "")))

    pk = r["peak"]
    add(f"matmul peak fp32 (n={pk['fp32']['n']})", pk["fp32"]["gflops"], "GFLOP/s")
    if "fp32_1_thread" in pk:
        add("matmul peak fp32, 1 thread", pk["fp32_1_thread"]["gflops"], "GFLOP/s")
    add(f"matmul peak bf16 (n={pk['bf16']['n']})", pk["bf16"]["gflops"], "GFLOP/s")
    if "optimizer" in r:
        base = r["optimizer"]["for_loop"]["step_s"]
        for name in OPTIMIZERS:
            add(f"AdamW step, {name}", r["optimizer"][name]["step_s"], "s", base / r["optimizer"][name]["step_s"])
    base = r["train"]["book_pkg_fp32"]["tokens_per_s"]
    for name, fig in r["train"].items():
        add(f"train {name} ({fig['batch']}x{fig['seq']})", fig["tokens_per_s"], "tok/s", fig["tokens_per_s"] / base,
            f"MFU {100 * fig['mfu_fp32']:.0f}% of fp32 / {100 * fig['mfu_bf16']:.0f}% of bf16 peak, "
            f"reps {fig['reps']}")
    base = r["eval"]["book_pkg_fp32"]["tokens_per_s"]
    for name, fig in r["eval"].items():
        add(f"eval {name}", fig["tokens_per_s"], "tok/s", fig["tokens_per_s"] / base, f"reps {fig['reps']}")
    base = r["generate"]["book_pkg_fp32"]["tokens_per_s"]
    for name, fig in r["generate"].items():
        add(f"generate {name} ({fig['new_tokens']} new)", fig["tokens_per_s"], "tok/s", fig["tokens_per_s"] / base,
            f"reps {fig['reps']}")
    for case, fig in r["data"].items():
        sfx = "" if case == "stride1" else f"_{case}"
        label = f"data {fig['tokens']:,} tok {case}"
        for src in ("text", "ids"):
            key = f"_from_ids{sfx}" if src == "ids" else sfx
            add(f"{label} book ({src})", fig[f"book_{src}"]["seconds"], "s")
            add(f"{label} ours ({src})", fig[f"ours_{src}"]["seconds"], "s", ratios[f"data_build_time{key}"])
            add(f"{label} book peak ({src})", fig[f"book_{src}"]["peak_bytes"] / 2**20, "MiB")
            add(f"{label} ours peak ({src})", fig[f"ours_{src}"]["peak_bytes"] / 2**20, "MiB",
                ratios[f"data_peak_memory{key}"])
    w = max(len(x[0]) for x in rows)
    env = r["env"]
    head = (f"gptexp bench ({'quick' if r['quick'] else 'full'}): torch {env['torch']}, {env['threads']} threads, "
            f"{env['cpu']} ({env['cpu_capability']}), bf16 native: {env['bf16_native']}, "
            f"load average {env.get('loadavg_1min_start')} -> {env.get('loadavg_1min_end')}")
    lines = [head, f"{'figure':<{w}}  {'value':>10}  {'unit':<7}  vs book (>1 better)"]
    lines += [f"{a:<{w}}  {b:>10}  {c:<7}  {d}" for a, b, c, d in rows]
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    s = r["settings"]
    lines.append(f"fastest training settings: optimizer={s['optimizer']}, threads={s['threads']}, "
                 f"precision={s['precision']}, compile={s['compile']}")
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append(f"elapsed {r['elapsed_s']:.0f} s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- output

def _write_json(result: dict, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _flat_metrics(result: dict) -> dict[str, float]:
    metrics = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
            metrics[prefix] = float(obj)

    for section in ("peak", "optimizer", "train", "eval", "generate", "data"):
        walk(section, result.get(section, {}))
    metrics = {k: v for k, v in metrics.items() if ".times_s" not in k}
    walk("ratio", result["ratios"])
    metrics["elapsed_s"] = result["elapsed_s"]
    return metrics


def log_to_mlflow(result: dict, json_path: Path) -> str:
    """One run in experiment `bench` of the project's store: params, the figures as metrics, the JSON."""
    import logging

    from .tracking import TAG_JOB, get_client, log_flat_params, log_metrics, tracked_run

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = get_client()
    name = f"bench-{result['timestamp']}" + ("-quick" if result["quick"] else "")
    with tracked_run(client, EXPERIMENT, run_name=name,
                     tags={TAG_JOB: "bench", "gptexp.quick": str(result["quick"]).lower()}) as run_id:
        params = {f"sizes.{k}": v for k, v in result["sizes"].items()}
        params.update({f"env.{k}": v for k, v in result["env"].items()})
        params.update({f"settings.{k}": v for k, v in result["settings"].items()})
        params["quick"] = result["quick"]
        log_flat_params(client, run_id, params)
        metrics = _flat_metrics(result)
        keys = list(metrics)
        for i in range(0, len(keys), 500):
            log_metrics(client, run_id, {k: metrics[k] for k in keys[i:i + 500]}, step=0)
        client.log_artifact(run_id, str(json_path))
    return run_id


# ------------------------------------------------------------------------------------------- main

def _offline_tokenizer_default() -> None:
    """Like the tests: without TIKTOKEN_CACHE_DIR, use ../shared/tiktoken_cache beside the checkout if present."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
    if not os.environ.get("TIKTOKEN_CACHE_DIR") and shared.is_dir():
        os.environ["TIKTOKEN_CACHE_DIR"] = str(shared)


def run_bench(quick: bool = False, out: Path | None = None, log_mlflow: bool = True, *,
              sizes: Sizes | None = None, verbose: bool = True) -> dict:
    """Measure everything, print the table, write the JSON, log the MLflow run; return the result."""
    sizes = sizes or (QUICK if quick else FULL)
    _offline_tokenizer_default()
    t_start = time.perf_counter()
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    threads = physical_cores()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)

    def say(msg):
        if verbose:
            print(f"[bench {time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    notes: list[str] = []
    try:
        import llms_from_scratch

        result: dict = {
            "schema": 1,
            "timestamp": stamp,
            "quick": quick,
            "env": {
                "torch": torch.__version__,
                "llms_from_scratch": getattr(llms_from_scratch, "__version__", _pkg_version("llms-from-scratch")),
                "python": platform.python_version(),
                "cpu": cpu_model(),
                "cpu_flags": " ".join(_cpu_flags()),
                "threads": threads,
                "physical_cores": physical_cores(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "loadavg_1min_start": _loadavg(),
            },
            "sizes": sizes.flat(),
        }
        say("matmul peaks")
        peaks = _peaks(sizes, threads)
        bf16_native = _bf16_hardware() and peaks["bf16"]["gflops"] >= peaks["fp32"]["gflops"]
        result["env"]["bf16_native"] = bf16_native
        result["peak"] = peaks
        opt_name = "fused"
        if sizes.optimizer_model:
            say("AdamW implementations")
            result["optimizer"] = _optimizer_compare(sizes)
            opt_name = result["optimizer"]["best"]
        say(f"training steps ({sizes.batch}x{sizes.model['context_length']}, runner.train_step)")
        result["train"] = _train_figures(sizes, bf16_native, peaks, notes)
        say("evaluation")
        result["eval"] = _eval_figures(sizes, bf16_native, notes)
        say(f"generation ({sizes.gen_new} new tokens)")
        result["generate"] = _gen_figures(sizes, bf16_native, notes)
        say("data windows (child processes)")
        result["data"] = _data_figures(sizes, threads, notes)
        result["ratios"] = _ratios(result)
        tr = result["train"]
        eager = {"fp32": tr["fast_fp32"]["tokens_per_s"], "bf16": tr["fast_bf16"]["tokens_per_s"]}
        precision = max(eager, key=eager.get)
        compiled = [k for k in tr if k.startswith("fast_compile_")]
        result["settings"] = {
            "optimizer": opt_name,
            "threads": threads,
            "precision": precision,
            "compile": bool(compiled) and tr[compiled[0]]["tokens_per_s"] > eager[precision],
        }
        single = [f"{section}.{name}" for section in ("train", "eval", "generate")
                  for name, fig in result[section].items() if fig["reps"] == 1]
        if single:
            notes.append(f"one timed repetition only (a second did not fit its time budget): {', '.join(single)}")
        result["env"]["loadavg_1min_end"] = _loadavg()
        result["notes"] = notes
        result["elapsed_s"] = time.perf_counter() - t_start
        out = Path(out) if out is not None else DEFAULT_OUT_DIR / f"bench-{stamp}.json"
        result["out"] = str(out)
        _write_json(result, out)
        if verbose:
            print(format_table(result), flush=True)
            print(f"wrote {out}", flush=True)
        if log_mlflow:
            result["mlflow_run_id"] = log_to_mlflow(result, out)
            if verbose:
                print(f"MLflow run {result['mlflow_run_id']} in experiment {EXPERIMENT!r}", flush=True)
        return result
    finally:
        torch.set_num_threads(old_threads)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes (~1-2 minutes)")
    parser.add_argument("--out", type=Path, default=None, metavar="PATH.json",
                        help="where to write the JSON (default bench-results/bench-<timestamp>.json)")
    parser.add_argument("--no-mlflow", dest="log_mlflow", action="store_false", help="do not log an MLflow run")


def main(args) -> int:
    run_bench(quick=args.quick, out=args.out, log_mlflow=getattr(args, "log_mlflow", True))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m gptexp.bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
