"""`run_bench`: every figure, in order, then the ratios, the winning settings, the table, the JSON
and the MLflow run."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
from pathlib import Path

import torch

from ..provenance import cpu_model
from ..runtime import physical_cores
from ..tokenizer import get_tokenizer
from .baseline import BOOK_PACKAGE, require_book_package
from .inference import eval_figures, gen_figures
from .machine import bf16_hardware, cpu_flags, loadavg, matmul_peaks, pkg_version
from .mlflow_run import EXPERIMENT, log_to_mlflow
from .results import format_table, ratios_of, write_json
from .sizes import FULL, QUICK, Sizes
from .step_logging import step_logging_figures
from .training import optimizer_figures, train_figures
from .windows import data_figures

DEFAULT_OUT_DIR = Path("bench-results")


def run_bench(
    quick: bool = False,
    out: Path | None = None,
    log_mlflow: bool = True,
    *,
    sizes: Sizes | None = None,
    verbose: bool = True,
) -> dict:
    """Measure everything, print the table, write the JSON, log the MLflow run; return the result.

    Without the book's package, or offline without the tokenizer's files (TIKTOKEN_CACHE_DIR), a
    GptexpError says so before anything is measured or written.
    """
    sizes = sizes or (QUICK if quick else FULL)
    book_package = require_book_package()
    get_tokenizer("gpt2")  # the data figures need it: offline without a cache, fail now rather than minutes in
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
        result: dict = {
            "schema": 1,
            "timestamp": stamp,
            "quick": quick,
            "env": {
                "torch": torch.__version__,
                "llms_from_scratch": getattr(book_package, "__version__", pkg_version(BOOK_PACKAGE)),
                "python": platform.python_version(),
                "cpu": cpu_model(),
                "cpu_flags": " ".join(cpu_flags()),
                "threads": threads,
                "physical_cores": physical_cores(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                "loadavg_1min_start": loadavg(),
            },
            "sizes": sizes.flat(),
        }
        say("matmul peaks")
        peaks = matmul_peaks(sizes, threads)
        bf16_native = bf16_hardware() and peaks["bf16"]["gflops"] >= peaks["fp32"]["gflops"]
        result["env"]["bf16_native"] = bf16_native
        result["peak"] = peaks
        opt_name = "fused"
        if sizes.optimizer_model:
            say("AdamW implementations")
            result["optimizer"] = optimizer_figures(sizes)
            opt_name = result["optimizer"]["best"]
        say(f"training steps ({sizes.batch}x{sizes.model['context_length']}, runner.train_step)")
        result["train"] = train_figures(sizes, bf16_native, peaks, notes)
        say(f"per-step logging on vs off ({sizes.logging_steps} steps x {sizes.logging_reps}, tiny model)")
        result["logging"] = step_logging_figures(sizes)
        say("evaluation")
        result["eval"] = eval_figures(sizes, bf16_native, notes)
        say(f"generation ({sizes.gen_new} new tokens)")
        result["generate"] = gen_figures(sizes, bf16_native, notes)
        say("data windows (child processes)")
        result["data"] = data_figures(sizes, threads, notes)
        result["ratios"] = ratios_of(result)
        tr = result["train"]
        eager = {"fp32": tr["fast_fp32"]["tokens_per_s"], "bf16": tr["fast_bf16"]["tokens_per_s"]}
        precision = max(eager, key=lambda p: eager[p])
        compiled = [k for k in tr if k.startswith("fast_compile_")]
        result["settings"] = {
            "optimizer": opt_name,
            "threads": threads,
            "precision": precision,
            "compile": bool(compiled) and tr[compiled[0]]["tokens_per_s"] > eager[precision],
        }
        single = [
            f"{section}.{name}"
            for section in ("train", "eval", "generate")
            for name, fig in result[section].items()
            if fig["reps"] == 1
        ]
        if single:
            notes.append(f"one timed repetition only (a second did not fit its time budget): {', '.join(single)}")
        result["env"]["loadavg_1min_end"] = loadavg()
        result["notes"] = notes
        result["elapsed_s"] = time.perf_counter() - t_start
        out = Path(out) if out is not None else DEFAULT_OUT_DIR / f"bench-{stamp}.json"
        result["out"] = str(out)
        write_json(result, out)
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
