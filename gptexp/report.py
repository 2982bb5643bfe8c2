"""Tables of runs from the MLflow store: `gptexp report` (runs or a study's trials) and `gptexp compare`.

Everything comes from MLflow params, metrics and tags, so a report needs neither Optuna nor the
machine that trained. Sweeps tag their runs: the parent `gptexp.job=sweep`, `gptexp.study=NAME`;
each trial `gptexp.job=trial`, `gptexp.study=NAME`, `gptexp.trial=N`, `optuna.state=...`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import GptexpError
from .provenance import redact
from .tables import aligned
from .tags import (
    MLFLOW_GIT_COMMIT,
    TAG_CORPUS_SHA256,
    TAG_CPU,
    TAG_DEVICE,
    TAG_GIT_DIRTY,
    TAG_GPU,
    TAG_IMPL,
    TAG_JOB,
    TAG_OPTUNA_STATE,
    TAG_PRECISION,
    TAG_PYTHON_VERSION,
    TAG_STUDY,
    TAG_THREADS,
    TAG_TORCH_VERSION,
    TAG_TRIAL,
)
from .text_view import visible

FORMATS = ("table", "md", "csv", "latex")
KEY_PARAMS = ("model.context_length", "data.stride", "train.batch_size", "train.lr")
# Metrics where more is better; every other metric (losses, perplexities) is best when lowest.
HIGHER_IS_BETTER = ("tokens_per_sec",)
# Provenance tags that `compare` shows when they differ.
COMPARE_TAGS = (
    TAG_IMPL,
    TAG_DEVICE,
    TAG_PRECISION,
    TAG_THREADS,
    TAG_CPU,
    TAG_GPU,
    TAG_TORCH_VERSION,
    TAG_PYTHON_VERSION,
    MLFLOW_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_CORPUS_SHA256,
)


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.endswith(("accuracy", "_acc"))


# ---------------------------------------------------------------------------- finding runs


def _all_experiment_ids(client) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _search(client, filter_string: str = "", experiment_ids=None, order_by=None, max_results: int = 50000):
    ids = experiment_ids if experiment_ids is not None else _all_experiment_ids(client)
    if not ids:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(
            ids, filter_string=filter_string, order_by=order_by, max_results=min(max_results, 1000), page_token=token
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token or len(runs) >= max_results:
            return runs[:max_results]


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def known_studies(client) -> list[str]:
    runs = _search(client, f"tags.`{TAG_JOB}` = 'sweep'")
    return sorted({r.data.tags.get(TAG_STUDY) for r in runs if r.data.tags.get(TAG_STUDY)})


def latest_study(client) -> str | None:
    """The study whose trial started last (a sweep stopped before its first trial has nothing to show)."""
    runs = _search(client, f"tags.`{TAG_JOB}` = 'trial'", order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].data.tags.get(TAG_STUDY) if runs else None


def latest_experiment(client) -> str | None:
    """The experiment of the run that started last, whatever made it."""
    runs = _search(client, order_by=["attributes.start_time DESC"], max_results=1)
    return client.get_experiment(runs[0].info.experiment_id).name if runs else None


def study_runs(client, study: str) -> list:
    runs = _search(client, f"tags.`{TAG_STUDY}` = '{_quote(study)}'")
    trials = [r for r in runs if r.data.tags.get(TAG_JOB) != "sweep"]
    if not trials:
        studies = known_studies(client)
        known = ", ".join(studies) if studies else "none (run gptexp sweep first)"
        if runs:
            raise GptexpError(f"study {study!r} has no trial runs yet: the known studies are {known}")
        raise GptexpError(f"no study {study!r} in the MLflow store: the known studies are {known}")
    return trials


def experiment_runs(client, name: str) -> list:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = sorted(e.name for e in client.search_experiments())
        known = ", ".join(names) if names else "none (train a run first)"
        raise GptexpError(f"no experiment {name!r} in the MLflow store: the experiments are {known}")
    # One row per training job: an evaluation is a child run of the run it evaluated.
    return [r for r in _search(client, experiment_ids=[exp.experiment_id]) if r.data.tags.get(TAG_JOB) != "eval"]


# ---------------------------------------------------------------------------- the table


@dataclass
class Report:
    title: str
    frame: Any  # a pandas.DataFrame (pandas is imported when a report is built)
    metric: str
    kind: str  # "experiment" | "study"
    name: str


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    ms = client.get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(ms, key=lambda m: (m.step, m.timestamp))]


def _duration(run) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    if end is None:
        end = int(time.time() * 1000) if run.info.status == "RUNNING" else None
    return None if end is None else max(0.0, (end - start) / 1000)


def format_duration(seconds) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _param_value(text: str | None):
    """Params are strings in MLflow: show numbers as numbers so they sort and align."""
    if text is None:
        return None
    try:
        as_int = int(text)
        return as_int
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def differing_params(runs) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params})
    if len(runs) < 2:
        return []
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def runs_frame(client, runs, metric: str, *, study: bool = False):
    """One row per run, sorted by the best value of `metric` (best first, runs without it last)."""
    import pandas as pd

    params = list(KEY_PARAMS) + [k for k in differing_params(runs) if k not in KEY_PARAMS]
    rows = []
    for r in runs:
        hist = _history(client, r.info.run_id, metric)
        values = [v for _, v in hist if not math.isnan(v)]
        pick = max if higher_is_better(metric) else min
        epochs_hist = hist if metric.startswith("epoch_") else _history(client, r.info.run_id, "epoch_val_loss")
        row = {}
        if study:
            trial = r.data.tags.get(TAG_TRIAL)
            row["trial"] = int(trial) if trial is not None and trial.isdigit() else trial
            row["state"] = r.data.tags.get(TAG_OPTUNA_STATE, "-")
        row["run"] = r.info.run_name or "-"
        row["run_id"] = r.info.run_id[:8]
        for k in params:
            row[k] = _param_value(r.data.params.get(k))
        row[f"best {metric}"] = pick(values) if values else math.nan
        row[f"final {metric}"] = values[-1] if values else math.nan
        row["epochs"] = max((s for s, _ in epochs_hist), default=0)
        tokens = r.data.metrics.get("tokens_seen")
        row["tokens_seen"] = int(tokens) if tokens is not None and not math.isnan(tokens) else None
        row["duration"] = format_duration(_duration(r))
        row["status"] = r.info.status
        rows.append(row)
    columns = (["trial", "state"] if study else []) + [
        "run",
        "run_id",
        *params,
        f"best {metric}",
        f"final {metric}",
        "epochs",
        "tokens_seen",
        "duration",
        "status",
    ]
    frame = pd.DataFrame(rows, columns=columns)
    if len(frame):
        frame = frame.sort_values(
            f"best {metric}", ascending=not higher_is_better(metric), na_position="last", kind="stable"
        ).reset_index(drop=True)
    return frame


def build_report(
    client, *, experiment: str | None = None, study: str | None = None, metric: str = "epoch_val_loss"
) -> Report:
    if experiment and study:
        raise GptexpError("give --experiment or --study, not both")
    if experiment is None and study is None:
        study = latest_study(client)
        if study is None:
            experiment = latest_experiment(client)
    if study is not None:
        runs = study_runs(client, study)
        frame = runs_frame(client, runs, metric, study=True)
        states = frame["state"].value_counts().to_dict() if len(frame) else {}
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(states.items()))
        return Report(f"study {study}: {len(frame)} trials ({counts}), by {metric}", frame, metric, "study", study)
    if experiment is None:
        raise GptexpError(
            f"nothing to report yet: the MLflow store {redact(client.tracking_uri)} holds no runs; "
            "make some with `gptexp train --config configs/tiny.yaml` or `make sweep` "
            "(or point MLFLOW_TRACKING_URI at the store that holds them)"
        )
    runs = experiment_runs(client, experiment)
    frame = runs_frame(client, runs, metric)
    return Report(f"experiment {experiment}: {len(frame)} runs, by {metric}", frame, metric, "experiment", experiment)


# ---------------------------------------------------------------------------- formats


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.3g}"
        return f"{value:.4f}".rstrip("0").rstrip(".") if not value.is_integer() else str(int(value))
    return str(value)


def _cells(frame) -> tuple[list[str], list[list[str]]]:
    header = [str(c) for c in frame.columns]
    body = [[_cell(v) for v in row] for row in frame.astype(object).where(frame.notna(), None).itertuples(index=False)]
    return header, body


def to_text(frame) -> str:
    header, body = _cells(frame)
    if not body:
        return "(no runs)"
    return aligned(header, body, right=[i for i in range(len(header)) if all(_is_number(r[i]) for r in body)])


def _is_number(text: str) -> bool:
    if text == "-":
        return True
    try:
        float(text)
        return True
    except ValueError:
        return False


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(frame) -> str:
    """A GitHub pipe table (no tabulate needed); numeric columns right-aligned."""
    header, body = _cells(frame)
    numeric = [bool(body) and all(_is_number(r[i]) for r in body) for i in range(len(header))]
    lines = [
        "| " + " | ".join(_md_escape(h) for h in header) + " |",
        "|" + "|".join("---:" if n else ":---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIAL))


def latex_escape(text: str) -> str:
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text).replace("\n", " "))


def to_latex(frame, caption: str | None = None) -> str:
    """A self-contained tabular (no packages needed): one header row, one row per run."""
    header, body = _cells(frame)
    numeric = [bool(body) and all(_is_number(r[i]) for r in body) for i in range(len(header))]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = []
    if caption:
        lines.append(f"% {latex_escape(caption)}")
    lines += [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\hline",
        " & ".join(latex_escape(h) for h in header) + r" \\",
        "\\hline",
    ]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in body]
    lines += ["\\hline", "\\end{tabular}"]
    return "\n".join(lines)


def render(report: Report, fmt: str) -> str:
    if fmt == "table":
        return f"{report.title}\n{to_text(report.frame)}"
    if fmt == "md":
        return to_markdown(report.frame)
    if fmt == "csv":
        return report.frame.to_csv(index=False).rstrip("\n")
    if fmt == "latex":
        return to_latex(report.frame, caption=report.title)
    raise GptexpError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------- compare


def last_sample(client, run) -> tuple[int, str] | None:
    """(epoch, prompt + completion) of the last row of the run's samples/samples.json, if any."""
    from .tracking import local_artifact_dir

    path = None
    try:
        local = local_artifact_dir(client, run.info.run_id)
    except Exception:
        local = None
    if local is not None and (local / "samples" / "samples.json").is_file():
        path = local / "samples" / "samples.json"
    tmp = None
    try:
        if path is None:
            tmp = tempfile.TemporaryDirectory()
            try:
                path = Path(client.download_artifacts(run.info.run_id, "samples/samples.json", tmp.name))
            except Exception:
                return None
        table = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    finally:
        if tmp is not None:
            tmp.cleanup()
    cols, data = table.get("columns", []), table.get("data", [])
    if not data or "completion" not in cols:
        return None
    rows = [dict(zip(cols, row, strict=False)) for row in data]  # a short row: its missing cells stay unset
    last = max(rows, key=lambda r: r.get("epoch") or 0)
    return int(last.get("epoch") or 0), f"{last.get('prompt') or ''}{last.get('completion') or ''}"


def _metric_order(key: str) -> tuple:
    return (0 if key.startswith("epoch_") else 1, key)


def compare_runs(client, run_a: str, run_b: str) -> str:
    from .tracking import get_run

    a, b = get_run(client, run_a), get_run(client, run_b)
    name_a, name_b = a.info.run_name or a.info.run_id[:8], b.info.run_name or b.info.run_id[:8]
    label_a, label_b = f"A {name_a} ({a.info.run_id[:8]})", f"B {name_b} ({b.info.run_id[:8]})"
    out = [f"{label_a}  vs  {label_b}", ""]

    keys = sorted(set(a.data.params) | set(b.data.params))
    diff = [
        (k, a.data.params.get(k, "-"), b.data.params.get(k, "-"))
        for k in keys
        if a.data.params.get(k) != b.data.params.get(k)
    ]
    out.append(f"params that differ ({len(diff)} of {len(keys)}):" if diff else f"params: all {len(keys)} equal")
    if diff:
        out.append(_plain_table(["param", "A", "B"], [list(d) for d in diff]))
    tag_diff = [
        (k, a.data.tags.get(k, "-"), b.data.tags.get(k, "-"))
        for k in COMPARE_TAGS
        if a.data.tags.get(k) != b.data.tags.get(k)
    ]
    if tag_diff:
        out += ["", "environment that differs:", _plain_table(["tag", "A", "B"], [list(d) for d in tag_diff])]

    mkeys = sorted(set(a.data.metrics) | set(b.data.metrics), key=_metric_order)
    out += ["", "metrics (latest values):"]
    if mkeys:
        rows = []
        for k in mkeys:
            va, vb = a.data.metrics.get(k), b.data.metrics.get(k)
            delta = _cell(vb - va) if va is not None and vb is not None else "-"
            rows.append([k, _cell(va), _cell(vb), delta])
        out.append(_plain_table(["metric", "A", "B", "B - A"], rows, right={1, 2, 3}))
    else:
        out.append("  (none)")

    out += ["", "samples after the last epoch:"]
    for label, run in ((label_a, a), (label_b, b)):
        sample = last_sample(client, run)
        text = "(no samples/samples.json)" if sample is None else f"epoch {sample[0]}: {visible(sample[1])}"
        out.append(f"{label}: {text}")
    return "\n".join(out)


def _plain_table(header: list[str], rows: list[list[str]], right: Iterable[int] = ()) -> str:
    return aligned(header, [[str(c).replace("\n", "\\n") for c in r] for r in rows], right, indent="  ")


# ---------------------------------------------------------------------------- CLI


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.description = "Default: the study of the latest sweep trial, else the experiment of the latest run."
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", metavar="NAME", help="the runs of this MLflow experiment")
    which.add_argument("--study", metavar="NAME", help="the trials of this sweep study")
    p.add_argument(
        "--metric",
        default="epoch_val_loss",
        metavar="KEY",
        help="sort by the best value of this metric (default epoch_val_loss); with --aggregate, the figure's",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=None,
        help="table (default), md, csv or latex; with --out, guessed from the suffix",
    )
    p.add_argument(
        "--out", metavar="PATH", help="write the report to this file instead of stdout (--aggregate: a folder)"
    )
    p.add_argument(
        "--aggregate",
        action="store_true",
        help="with --experiment NAME of a study spec: mean ± std per cell, as markdown, CSV, LaTeX, a figure "
        "and a checklist, written to --out (default paper/NAME)",
    )
    p.add_argument(
        "--axis", metavar="KEY", help="with --aggregate: the grid axis of the figure's x (default the first)"
    )


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a", metavar="RUN_A")
    p.add_argument("run_b", metavar="RUN_B")


_SUFFIX_FORMATS = {".md": "md", ".csv": "csv", ".tex": "latex", ".txt": "table"}


def cmd_report(args) -> int:
    from .tracking import get_client

    if args.aggregate:
        from .paper import cmd_aggregate

        return cmd_aggregate(args)
    fmt = args.format or (_SUFFIX_FORMATS.get(Path(args.out).suffix.lower(), "table") if args.out else "table")
    report = build_report(get_client(), experiment=args.experiment, study=args.study, metric=args.metric)
    text = render(report, fmt) + "\n"
    if args.out:
        out = Path(args.out)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise GptexpError(f"cannot write {out}: {exc.strerror or exc}") from None
        print(f"wrote {report.title} to {out} ({fmt})")
    else:
        print(text, end="")
    return 0


def cmd_compare(args) -> int:
    from .tracking import get_client

    print(compare_runs(get_client(), args.run_a, args.run_b))
    return 0
