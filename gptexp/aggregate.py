"""Aggregates of a paper experiment (gptexp.study): per cell, mean ± std over seeds, from MLflow.

`gptexp report --experiment NAME --aggregate` reads the experiment's latest parent run and its
plan (`paper/plan.json`), takes one FINISHED child per planned (cell, seed) whose config digest
is the planned one, and writes `table.md`, `table.csv` (with every run id behind each number),
`table.tex` (booktabs), `figure.png`/`figure.pdf` (the metric against a grid axis, error bars one
std) and `checklist.md` (gptexp.checklist) into a folder, and as artifacts of the parent run.
Std is the sample standard deviation (ddof 1) over seeds; it is undefined (shown `-`) for n = 1.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import latex
from .errors import GptexpError
from .report import _duration, _quote, _search, higher_is_better
from .study import JOB_CHILD, JOB_PARENT, PLAN_ARTIFACT
from .tags import (
    MLFLOW_PARENT_RUN_ID,
    TAG_CELL,
    TAG_CONFIG_SHA256,
    TAG_EXPERIMENT_SPEC,
    TAG_JOB,
    TAG_NUM_PARAMETERS,
    TAG_SEED,
)

OUTPUTS = ("table.md", "table.csv", "table.tex", "figure.png", "figure.pdf", "checklist.md")


@dataclass
class Experiment:
    name: str
    parent: Any  # the parent mlflow Run
    plan: dict
    runs: Any  # pandas.DataFrame: one row per finished child used, in plan order
    children: list  # every child run of the parent (any status)
    table: Any  # pandas.DataFrame: one row per cell

    @property
    def missing(self) -> list[tuple[str, int]]:
        have = {(r.cell, int(r.seed)) for r in self.runs.itertuples()}
        return [(r["cell"], r["seed"]) for r in self.plan["runs"] if (r["cell"], r["seed"]) not in have]


def value_columns(metrics) -> list[str]:
    return [f"{which} {m}" for m in metrics for which in ("final", "best")]


def find_parent(client, name: str):
    """The experiment's parent run that was active last (a rerun reopens its parent)."""
    runs = _search(client, f"tags.`{TAG_JOB}` = '{JOB_PARENT}' and tags.`{TAG_EXPERIMENT_SPEC}` = '{_quote(name)}'")
    if not runs:
        known = sorted(
            {r.data.tags.get(TAG_EXPERIMENT_SPEC, "") for r in _search(client, f"tags.`{TAG_JOB}` = '{JOB_PARENT}'")}
        )
        names = ", ".join(n for n in known if n) or "none (run gptexp reproduce NAME on a study spec first)"
        raise GptexpError(f"no paper experiment {name!r} in the MLflow store: the experiments run so far are {names}")
    return max(runs, key=lambda r: (r.info.end_time or 2**62, r.info.start_time))


def read_plan(client, run_id: str) -> dict:
    from .tracking import local_artifact_dir

    local = local_artifact_dir(client, run_id)
    path = local / PLAN_ARTIFACT if local is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        if path is None or not path.is_file():
            try:
                path = Path(client.download_artifacts(run_id, PLAN_ARTIFACT, tmp))
            except Exception:
                raise GptexpError(
                    f"run {run_id} has no {PLAN_ARTIFACT}: it is not a paper experiment's parent"
                ) from None
        return json.loads(path.read_text(encoding="utf-8"))


def _series(client, run_id: str, key: str) -> list[float]:
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [m.value for m in history]


def runs_frame(client, plan: dict, children: list):
    """One row per planned (cell, seed): its latest FINISHED child with the planned config digest."""
    import pandas as pd

    wanted = {(r["cell"], str(r["seed"])): r["config_sha256"] for r in plan["runs"]}
    values = {c["cell"]: c["values"] for c in plan["cells"]}
    chosen: dict[tuple[str, str], Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        t = run.data.tags
        key = (t.get(TAG_CELL, ""), t.get(TAG_SEED, ""))
        if run.info.status == "FINISHED" and wanted.get(key) == t.get(TAG_CONFIG_SHA256):
            chosen[key] = run
    rows = []
    for r in plan["runs"]:
        run = chosen.get((r["cell"], str(r["seed"])))
        if run is None:
            continue
        row: dict[str, Any] = {"cell": r["cell"], "seed": r["seed"], "run_id": run.info.run_id}
        row.update({k: v for k, v in values[r["cell"]].items()})
        for m in plan["metrics"]:
            series = [v for v in _series(client, run.info.run_id, m) if not math.isnan(v)]
            pick = max if higher_is_better(m) else min
            row[f"final {m}"] = series[-1] if series else math.nan
            row[f"best {m}"] = pick(series) if series else math.nan
        row["seconds"] = _duration(run)
        tokens = run.data.metrics.get("tokens_seen")
        row["tokens"] = int(tokens) if tokens is not None else None
        params = run.data.tags.get(TAG_NUM_PARAMETERS)
        row["parameters"] = int(params) if params else None
        rows.append(row)
    columns = ["cell", "seed", "run_id", *plan["axes"], *value_columns(plan["metrics"]), "seconds", "tokens"]
    return pd.DataFrame(rows, columns=[*columns, "parameters"])


def aggregate_frame(runs, plan: dict):
    """Per cell, in plan order: n, seeds, mean and std (ddof 1) of each value, wall time, tokens,
    parameters and the run ids behind them."""
    import pandas as pd

    rows = []
    for cell in plan["cells"]:
        part = runs[runs["cell"] == cell["cell"]]
        if part.empty:
            continue
        row: dict[str, Any] = {"cell": cell["cell"], **cell["values"], "n": len(part)}
        row["seeds"] = " ".join(str(s) for s in part["seed"])
        for col in value_columns(plan["metrics"]):
            row[f"{col} mean"] = float(part[col].mean())
            row[f"{col} std"] = float(part[col].std(ddof=1)) if len(part) > 1 else math.nan
        row["seconds mean"] = float(part["seconds"].mean())
        row["seconds total"] = float(part["seconds"].sum())
        row["tokens mean"] = float(part["tokens"].mean())
        row["parameters"] = int(part["parameters"].iloc[0])
        row["run_ids"] = ";".join(part["run_id"])
        rows.append(row)
    return pd.DataFrame(rows)


def load_experiment(client, name: str, *, parent_run_id: str | None = None) -> Experiment:
    parent = client.get_run(parent_run_id) if parent_run_id else find_parent(client, name)
    plan = read_plan(client, parent.info.run_id)
    children = [
        r
        for r in _search(client, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'", [parent.info.experiment_id])
        if r.data.tags.get(TAG_JOB) == JOB_CHILD
    ]
    runs = runs_frame(client, plan, children)
    if runs.empty:
        raise GptexpError(
            f"paper experiment {name!r} has no finished run yet (parent {parent.info.run_id}): "
            f"run gptexp reproduce {name}"
        )
    return Experiment(name, parent, plan, runs, children, aggregate_frame(runs, plan))


# ---------------------------------------------------------------------------- rendering


def _decimals(value: float) -> int:
    size = abs(value) if value is not None and math.isfinite(value) else 0
    return 1 if size >= 1000 else 2 if size >= 100 else 4


def best_rows(table, column: str) -> set[int]:
    """The row(s) with the best mean of `column`: lowest, or highest for metrics where more is better."""
    means = table[f"{column} mean"]
    if means.isna().all():
        return set()
    best = means.max() if higher_is_better(column.split(" ", 1)[1]) else means.min()
    return {i for i, v in enumerate(means) if v == best}


def _short(key: str, keys) -> str:
    tail = key.rsplit(".", 1)[-1]
    return tail if sum(k.rsplit(".", 1)[-1] == tail for k in keys) == 1 else key


def display(exp: Experiment) -> tuple[list[str], list[dict]]:
    """Column names and, per cell, {column: (kind, payload)} that markdown and LaTeX both render."""
    axes, metrics = exp.plan["axes"], exp.plan["metrics"]
    columns = ["cell", *(_short(a, axes) for a in axes), "n", *value_columns(metrics)]
    columns += ["wall time (s)", "tokens", "parameters"]
    bold = {col: best_rows(exp.table, col) for col in value_columns(metrics)}
    cells = []
    for i, row in enumerate(exp.table.to_dict("records")):
        out: dict[str, tuple] = {"cell": ("text", row["cell"])}
        for a in axes:
            value = row.get(a, "")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            out[_short(a, axes)] = ("number" if number else "text", str(value))
        out["n"] = ("int", row["n"])
        for col in value_columns(metrics):
            out[col] = ("pm", row[f"{col} mean"], row[f"{col} std"], i in bold[col])
        out["wall time (s)"] = ("pm", row["seconds mean"], math.nan, False, 1)
        out["tokens"] = ("int", round(row["tokens mean"]))
        out["parameters"] = ("int", row["parameters"])
        cells.append(out)
    return columns, cells


def _md_cell(spec: tuple) -> str:
    kind = spec[0]
    if kind in ("text", "number"):
        return str(spec[1]).replace("|", "\\|")
    if kind == "int":
        return f"{int(spec[1]):,}"
    mean, std, bold = spec[1], spec[2], spec[3]
    decimals = spec[4] if len(spec) > 4 else _decimals(mean)
    text = "-" if math.isnan(mean) else f"{mean:.{decimals}f}"
    if not math.isnan(mean) and not math.isnan(std):
        text += f" ± {std:.{decimals}f}"
    return f"**{text}**" if bold else text


def to_markdown(exp: Experiment) -> str:
    columns, cells = display(exp)
    right = [c not in ("cell",) and cells[0][c][0] != "text" for c in columns]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if r else ":---" for r in right) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(cell[c]) for c in columns) + " |" for cell in cells]
    return "\n".join(lines) + "\n"


def _tex_cell(spec: tuple) -> str:
    kind = spec[0]
    if kind in ("text", "number"):
        return latex.latex_escape(spec[1])
    if kind == "int":
        return f"{int(spec[1]):,}".replace(",", "{,}")
    decimals = spec[4] if len(spec) > 4 else _decimals(spec[1])
    return latex.mean_pm_std(spec[1], spec[2], decimals, bold=spec[3])


def to_latex(exp: Experiment) -> str:
    columns, cells = display(exp)
    align = "".join("l" if cells[0][c][0] == "text" else "r" for c in columns)
    n = sorted({int(v) for v in exp.table["n"]})
    comment = (
        f"paper experiment {exp.name}: mean {chr(177)} std (ddof 1) over {'/'.join(map(str, n))} seeds; "
        f"best mean per column in bold; run ids per cell in table.csv"
    )
    return latex.tabular(columns, [[_tex_cell(cell[c]) for c in columns] for cell in cells], align, comment=comment)


def to_csv(exp: Experiment) -> str:
    return exp.table.to_csv(index=False, float_format="%.17g")


def figure(exp: Experiment, metric: str, axis: str | None = None):
    """The final `metric` (mean, error bars one std) against a grid axis, a line per value of the
    other axes; a sweep's cells (no numeric axis) side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    table, axes = exp.table, exp.plan["axes"]
    col = f"final {metric}"
    if f"{col} mean" not in table:
        raise GptexpError(f"metric {metric!r} is not aggregated here: the experiment has {exp.plan['metrics']}")
    if axis is not None and axis not in axes:
        raise GptexpError(f"--axis {axis} is not an axis of {exp.name}: its axes are {', '.join(axes) or 'none'}")
    numeric = [a for a in axes if pd.api.types.is_numeric_dtype(table[a])]
    axis = axis or (numeric[0] if numeric else None)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if axis is None or exp.plan.get("kind") == "sweep":
        x = range(len(table))
        ax.errorbar(x, table[f"{col} mean"], yerr=table[f"{col} std"].fillna(0), fmt="o", capsize=4)
        ax.set_xticks(list(x), list(table["cell"]), rotation=20, ha="right")
        ax.set_xlabel("cell")
    else:
        others = [a for a in axes if a != axis]
        groups = table.groupby(others, sort=False) if others else [((), table)]
        for key, part in groups:
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{_short(a, axes)}={v}" for a, v in zip(others, key, strict=True)) or None
            part = part.sort_values(axis)
            yerr = part[f"{col} std"].fillna(0)
            ax.errorbar(part[axis], part[f"{col} mean"], yerr=yerr, marker="o", capsize=4, label=label)
        ax.set_xticks(sorted(set(table[axis])))
        ax.set_xlabel(axis)
        if others:
            ax.legend(fontsize=8)
    n = "/".join(str(v) for v in sorted({int(v) for v in table["n"]}))
    ax.set_ylabel(f"final {metric}")
    ax.set_title(f"{exp.name}: mean ± std over {n} seeds", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_outputs(exp: Experiment, folder: Path, *, metric: str, axis: str | None, checklist: str, client=None):
    """Every output file into `folder` (and under paper/ of the parent run when `client` is given)."""
    import matplotlib.pyplot as plt

    fig = figure(exp, metric, axis)
    texts = {
        "table.md": to_markdown(exp),
        "table.csv": to_csv(exp),
        "table.tex": to_latex(exp),
        "checklist.md": checklist,
    }
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            _atomic_write(folder / name, text.encode("utf-8"))
        for suffix in ("png", "pdf"):
            tmp = folder / f".figure.{suffix}.tmp"
            fig.savefig(tmp, format=suffix, dpi=150, metadata={"CreationDate": None} if suffix == "pdf" else None)
            tmp.replace(folder / f"figure.{suffix}")
    except OSError as exc:
        raise GptexpError(f"cannot write {exc.filename or folder}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    paths = [folder / name for name in OUTPUTS]
    if client is not None:
        for path in paths:
            client.log_artifact(exp.parent.info.run_id, str(path), "paper/aggregate")
    return paths


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
