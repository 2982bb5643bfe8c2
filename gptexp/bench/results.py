"""The result: the ratios (gptexp over the book), the printed table and the JSON file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..tables import aligned
from .training import OPTIMIZERS

RATIO_KEYS = ("train_fp32", "train_bf16", "generate_kv", "data_build_time", "data_peak_memory", "step_logging")


def ratios_of(r: dict) -> dict:
    """gptexp's figure over the book package's, for each figure (> 1: gptexp is faster or leaner)."""
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
    if "logging" in r:  # not gptexp over the book: steps/s with per-step logging over without (1 = free)
        ratios["step_logging"] = r["logging"]["on"]["steps_per_s"] / r["logging"]["off"]["steps_per_s"]
    return ratios


def format_table(r: dict) -> str:
    """The result as the printed table: each figure, its unit and its ratio to the book's, then the settings."""
    rows: list[tuple[str, str, str, str]] = []
    ratios = r["ratios"]

    def add(label, value, unit, ratio=None, extra=""):
        rows.append(
            (
                label,
                f"{value:,.1f}" if value >= 10 else f"{value:.3g}",
                unit,
                (f"{ratio:.2f}x" if ratio is not None else "") + (f"  {extra}" if extra else ""),
            )
        )

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
        add(
            f"train {name} ({fig['batch']}x{fig['seq']})",
            fig["tokens_per_s"],
            "tok/s",
            fig["tokens_per_s"] / base,
            f"MFU {100 * fig['mfu_fp32']:.0f}% of fp32 / {100 * fig['mfu_bf16']:.0f}% of bf16 peak, reps {fig['reps']}",
        )
    if "logging" in r:
        off = r["logging"]["off"]["steps_per_s"]
        for name, fig in r["logging"].items():
            add(
                f"train steps, per-step logging {name} ({fig['batch']}x{fig['seq']}, tiny)",
                fig["steps_per_s"],
                "steps/s",
                None,
                f"{fig['steps_per_s'] / off:.3f} of logging off (step_logging), reps {fig['reps']}"
                + (f", {1e3 * fig['log_s_per_step']:.2f} ms/step in the logger" if "log_s_per_step" in fig else ""),
            )
    base = r["eval"]["book_pkg_fp32"]["tokens_per_s"]
    for name, fig in r["eval"].items():
        add(f"eval {name}", fig["tokens_per_s"], "tok/s", fig["tokens_per_s"] / base, f"reps {fig['reps']}")
    base = r["generate"]["book_pkg_fp32"]["tokens_per_s"]
    for name, fig in r["generate"].items():
        add(
            f"generate {name} ({fig['new_tokens']} new)",
            fig["tokens_per_s"],
            "tok/s",
            fig["tokens_per_s"] / base,
            f"reps {fig['reps']}",
        )
    for case, fig in r["data"].items():
        sfx = "" if case == "stride1" else f"_{case}"
        label = f"data {fig['tokens']:,} tok {case}"
        for src in ("text", "ids"):
            key = f"_from_ids{sfx}" if src == "ids" else sfx
            add(f"{label} book ({src})", fig[f"book_{src}"]["seconds"], "s")
            add(f"{label} ours ({src})", fig[f"ours_{src}"]["seconds"], "s", ratios[f"data_build_time{key}"])
            add(f"{label} book peak ({src})", fig[f"book_{src}"]["peak_bytes"] / 2**20, "MiB")
            add(
                f"{label} ours peak ({src})",
                fig[f"ours_{src}"]["peak_bytes"] / 2**20,
                "MiB",
                ratios[f"data_peak_memory{key}"],
            )
    env = r["env"]
    head = (
        f"gptexp bench ({'quick' if r['quick'] else 'full'}): torch {env['torch']}, {env['threads']} threads, "
        f"{env['cpu']} ({env['cpu_capability']}), bf16 native: {env['bf16_native']}, "
        f"load average {env.get('loadavg_1min_start')} -> {env.get('loadavg_1min_end')}"
    )
    lines = [head, aligned(("figure", "value", "unit", "vs book (>1 better)"), rows, right={1})]
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    s = r["settings"]
    lines.append(
        f"fastest training settings: optimizer={s['optimizer']}, threads={s['threads']}, "
        f"precision={s['precision']}, compile={s['compile']}"
    )
    lines += [f"note: {n}" for n in r["notes"]]
    lines.append(f"elapsed {r['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_json(result: dict, out: Path) -> Path:
    """The result as JSON at `out`, written to a temp file and renamed (never half-written)."""
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
