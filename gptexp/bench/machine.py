"""The machine: its CPU's flags, whether it multiplies in bf16 natively, its matmul peaks, its load."""

from __future__ import annotations

import contextlib
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F

from .sizes import Sizes
from .timing import timed


def cpu_flags() -> list[str]:
    """The CPU's AVX, AMX and FMA flags (Linux; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    return []


def matmul_peak(dtype: torch.dtype, max_n: int, reps: int, budget_s: float) -> dict:
    """Best GFLOP/s of an n x n matmul (nn.Linear's layout), n doubling from 256 up to max_n.

    A size is skipped when, at the rate seen so far, one product would take longer than budget_s
    (bf16 without hardware support is ~100x slower than fp32).
    """
    best, best_n, n, rate = 0.0, 0, 256, None
    while n <= max_n:
        flops = 2.0 * n**3
        if rate is not None and flops / rate > budget_s:
            break
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        F.linear(a, b)
        t = min(timed(lambda a=a, b=b: F.linear(a, b)) for _ in range(reps))
        rate = flops / t
        if rate > best:
            best, best_n = rate, n
        n *= 2
    return {"gflops": best / 1e9, "n": best_n}


def bf16_hardware() -> bool:
    """Whether this CPU has bf16 instructions (AMX or AVX512-BF16); without them bf16 is emulated."""
    flags = cpu_flags() if sys.platform.startswith("linux") else []
    if flags:
        return any(f.startswith(("amx_bf16", "avx512_bf16")) for f in flags)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def matmul_peaks(sizes: Sizes, threads: int) -> dict:
    """fp32 and bf16 matmul peaks on `threads` threads, and fp32 on one thread when threads > 1."""
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


def loadavg() -> float | None:
    """The 1-minute load average: other processes slow every figure down."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"
