"""The reproducibility checklist of a paper experiment, generated from its runs, never typed.

It answers what the ACL/NAACL reproducibility checklist and the NeurIPS paper checklist ask of an
experimental table: how many runs and seeds, the search space and its bounds, how the reported
configuration was selected, the hardware and compute spent, parameter counts, the code version and
environment, and whether the numerics were deterministic. Each answer comes from the MLflow
parent run's plan (`paper/plan.json`) and the tags, params and metrics of the children used.
"""

from __future__ import annotations

import json
from collections import Counter

from .aggregate import Experiment, value_columns
from .report import format_duration
from .tags import (
    MLFLOW_GIT_COMMIT,
    TAG_CORPUS,
    TAG_CORPUS_SHA256,
    TAG_CPU,
    TAG_CUDA_VERSION,
    TAG_DETERMINISTIC,
    TAG_DEVICE,
    TAG_DEVICES,
    TAG_GIT_DIRTY,
    TAG_GPU,
    TAG_PLATFORM,
    TAG_PRECISION,
    TAG_PYTHON_VERSION,
    TAG_THREADS,
    TAG_TORCH_VERSION,
    TAG_WORLD_SIZE,
)

# The sections, in order: each is a heading of checklist.md.
FIELDS = (
    "Runs and seeds",
    "Search space and bounds",
    "Selection method",
    "Metrics and aggregation",
    "Hardware and compute",
    "Parameter counts",
    "Data",
    "Code and environment",
    "Determinism",
)


def _values(runs, key: str) -> str:
    """The distinct values of a tag over the runs used, with counts when they differ."""
    counts = Counter(r.data.tags.get(key, "-") for r in runs)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{v} ({n} runs)" for v, n in sorted(counts.items()))


def build(exp: Experiment) -> str:
    plan, runs_df, table = exp.plan, exp.runs, exp.table
    used_ids = set(runs_df["run_id"])
    used = [r for r in exp.children if r.info.run_id in used_ids]
    other = Counter(r.info.status for r in exp.children if r.info.run_id not in used_ids)
    n_cells, seeds = len(plan["cells"]), plan["seeds"]
    missing = exp.missing
    out = [f"# Reproducibility checklist: {exp.name}", ""]
    if plan.get("description"):
        out += [plan["description"], ""]
    out += [f"Generated from MLflow parent run `{exp.parent.info.run_id}` and its child runs.", ""]

    out += ["## Runs and seeds", ""]
    out.append(
        f"- {len(runs_df)} finished runs used, of {len(plan['runs'])} planned: "
        f"{n_cells} cells x {len(seeds)} seeds (seeds {', '.join(map(str, seeds))})"
    )
    out.append(f"- runs per cell (n): {', '.join(f'{c} {n}' for c, n in zip(table['cell'], table['n'], strict=True))}")
    out.append(
        "- missing (not finished): "
        + (", ".join(f"{c} seed {s}" for c, s in missing) if missing else "none")
        + (f"; other child runs not used: {dict(other)}" if other else "")
    )
    out += ["", "## Search space and bounds", ""]
    space = plan["selection"].get("search_space") or {}
    for key, spec in space.items():
        out.append(f"- `{key}`: {json.dumps(spec, default=str)}")
    if not space:
        out.append("- (none recorded)")
    out.append(f"- base configuration: {plan['base']}")
    out += ["", "## Selection method", ""]
    out.append(f"- {plan['selection'].get('method', '-')}")
    out.append(
        f"- best cell per column (bold): lowest mean over seeds of each metric "
        f"({', '.join(value_columns(plan['metrics']))})"
    )
    out += ["", "## Metrics and aggregation", ""]
    out.append(
        "- `final X`: the metric after the last epoch; `best X`: its best epoch value (lowest), on the "
        "validation split, token-weighted over every validation token (the same tokens in every cell)"
    )
    out.append("- mean ± sample standard deviation (ddof 1) over seeds; n = number of seeds")

    out += ["", "## Hardware and compute", ""]
    out.append(f"- device: {_values(used, TAG_DEVICE)}; precision: {_values(used, TAG_PRECISION)}")
    out.append(f"- CPU: {_values(used, TAG_CPU)}; GPU: {_values(used, TAG_GPU)}")
    out.append(
        f"- threads per process: {_values(used, TAG_THREADS)}; processes per run: {_values(used, TAG_WORLD_SIZE)} "
        f"({_values(used, TAG_DEVICES)})"
    )
    total = float(runs_df["seconds"].sum())
    out.append(
        f"- total compute: {format_duration(total)} ({total:.1f} s) of run wall time over {len(used)} runs; "
        f"per run {runs_df['seconds'].min():.1f} to {runs_df['seconds'].max():.1f} s"
    )
    out += ["", "## Parameter counts", ""]
    for cell, params in zip(table["cell"], table["parameters"], strict=True):
        out.append(f"- {cell}: {int(params):,}")
    out += ["", "## Data", ""]
    out.append(f"- corpus: {_values(used, TAG_CORPUS)}, sha256 {_values(used, TAG_CORPUS_SHA256)}")
    out.append(f"- tokens trained on per run (mean per cell): {', '.join(str(round(v)) for v in table['tokens mean'])}")

    out += ["", "## Code and environment", ""]
    dirty = _values(used, TAG_GIT_DIRTY)
    out.append(f"- code commit: {_values(used, MLFLOW_GIT_COMMIT)} (uncommitted changes: {dirty})")
    out.append(f"- code version (commit + diff digest): {plan['code_version']}")
    versions = plan.get("versions", {})
    out.append(
        f"- Python {_values(used, TAG_PYTHON_VERSION)}, torch {_values(used, TAG_TORCH_VERSION)}, "
        f"CUDA {_values(used, TAG_CUDA_VERSION)}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("python", "torch"))
    )
    out.append(f"- platform: {_values(used, TAG_PLATFORM)}")
    out.append(f"- command: `{plan.get('command', '-')}`; full package list: each run's environment/pip-freeze.txt")

    out += ["", "## Determinism", ""]
    out.append(f"- torch.use_deterministic_algorithms on: {_values(used, TAG_DETERMINISTIC)}")
    out.append(
        "- seeds fixed per run (train.seed = the seed); same seed, config, device and threads on CPU fp32: bit-exact"
    )
    return "\n".join(out) + "\n"
