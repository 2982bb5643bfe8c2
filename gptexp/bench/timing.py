"""Timing: the median of repetitions that fit a time budget, and a figure made of them."""

from __future__ import annotations

import statistics
import time


def median(xs) -> float:
    return float(statistics.median(xs))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def repeat(fn, reps: int, budget_s: float) -> list[float]:
    """Time fn() at least once; repeat while fewer than `reps` and the next one fits `budget_s`."""
    times = [timed(fn)]
    while len(times) < reps and sum(times) + median(times) <= budget_s:
        times.append(timed(fn))
    return times


def figure(times: list[float], work: float, unit: str) -> dict:
    """`work` per second of the median time (as `unit`), with every repetition's time."""
    s = median(times)
    return {unit: work / s, "seconds": s, "times_s": [round(t, 6) for t in times], "reps": len(times)}
