"""`gptexp reproduce` of a study spec and `gptexp report --aggregate`: run, aggregate, check, write.

A study's expected aggregates (`expected_file`) are produced by the harness itself
(`gptexp reproduce NAME --write-expected`, which records the command, code version, versions and
hardware beside them) and checked by every later `reproduce`: per cell, n, tokens and parameters
exactly; each metric's mean within the spec's relative tolerance `rtol`, its std within rtol x
|mean| (a std is a difference of nearly equal numbers: relative to itself it means little).
"""

from __future__ import annotations

import csv
import datetime
import io
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import aggregate, checklist
from .errors import GptexpError
from .reproduce import _read_yaml_mapping
from .study import StudySpec, load_study_spec, relative_diff, run_study
from .tables import aligned
from .tags import TAG_MAX_ABS_DIFF, TAG_VERDICT

COMPARISON_ARTIFACT = "paper/comparison.csv"
EXACT = ("n", "tokens", "parameters")


@dataclass(frozen=True)
class Check:
    cell: str
    quantity: str  # n, tokens, parameters, or "<final|best> <metric> <mean|std>"
    expected: float
    got: float | None
    diff: float | None  # relative to the expected mean (see the module doc)
    ok: bool


def load_expected(spec: StudySpec) -> dict | None:
    if spec.expected_path is None:
        return None
    if not spec.expected_path.is_file():
        raise GptexpError(
            f"experiment spec {spec.path}: expected_file {spec.expected_path} does not exist: produce it with "
            f"`gptexp reproduce {spec.name} --write-expected`"
        )
    raw = _read_yaml_mapping(spec.expected_path, "expected results")
    cells = raw.get("cells")
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "cell" in c for c in cells):
        raise GptexpError(f"expected results {spec.expected_path}: cells must list {{cell: NAME, n: ..., ...}}")
    return raw


def expected_cells(exp: aggregate.Experiment) -> list[dict]:
    out = []
    for row in exp.table.to_dict("records"):
        cell: dict[str, Any] = {"cell": row["cell"], "n": int(row["n"])}
        cell["tokens"] = round(row["tokens mean"])
        cell["parameters"] = int(row["parameters"])
        for col in aggregate.value_columns(exp.plan["metrics"]):
            std = row[f"{col} std"]
            cell[col] = {"mean": float(row[f"{col} mean"]), "std": None if math.isnan(std) else float(std)}
        out.append(cell)
    return out


def compare(expected: dict, exp: aggregate.Experiment, rtol: float) -> list[Check]:
    got = {c["cell"]: c for c in expected_cells(exp)}
    checks = []
    for want in expected["cells"]:
        name, have = want["cell"], got.get(want["cell"])
        for key in EXACT:
            value = None if have is None else have[key]
            checks.append(Check(name, key, want[key], value, None, value == want[key]))
        for col in aggregate.value_columns(exp.plan["metrics"]):
            if col not in want:
                continue
            mean, std = want[col]["mean"], want[col]["std"]
            g = None if have is None else have[col]
            diff = None if g is None else relative_diff(g["mean"], mean)
            checks.append(
                Check(
                    name, f"{col} mean", mean, None if g is None else g["mean"], diff, diff is not None and diff <= rtol
                )
            )
            if std is None:
                continue
            gstd = None if g is None else g["std"]
            sdiff = None if gstd is None else abs(gstd - std) / abs(mean) if mean else abs(gstd - std)
            ok = sdiff is not None and sdiff <= rtol
            checks.append(Check(name, f"{col} std", std, gstd, sdiff, ok))
    return checks


def checks_csv(checks: list[Check]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["cell", "quantity", "expected", "got", "rel_diff", "ok"])
    for c in checks:
        w.writerow(
            [
                c.cell,
                c.quantity,
                repr(c.expected),
                "" if c.got is None else repr(c.got),
                "" if c.diff is None else repr(c.diff),
                str(c.ok).lower(),
            ]
        )
    return buf.getvalue()


def format_checks(checks: list[Check]) -> str:
    def num(v):
        return "-" if v is None else (str(v) if isinstance(v, int) else f"{v:.6f}")

    rows = [
        (
            c.cell,
            c.quantity,
            num(c.expected),
            num(c.got),
            "-" if c.diff is None else ("0" if c.diff == 0 else f"{c.diff:.2e}"),
            "ok" if c.ok else "FAIL",
        )
        for c in checks
    ]
    return aligned(("cell", "quantity", "expected", "got", "rel diff", "ok"), rows, right={2, 3, 4})


def write_expected(spec: StudySpec, exp: aggregate.Experiment, seconds: float) -> Path:
    assert spec.expected_path is not None
    plan = exp.plan
    first = exp.children[0].data.tags if exp.children else {}
    produced = {
        "command": f"gptexp reproduce {spec.name} --write-expected",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "code_version": plan["code_version"],
        **plan["versions"],
        "cpu": first.get("gptexp.cpu", "-"),
        "threads": first.get("gptexp.threads", "-"),
        "device": first.get("gptexp.device", "-"),
        "precision": first.get("gptexp.precision", "-"),
        "seconds": round(seconds, 1),
        "parent_run": exp.parent.info.run_id,
    }
    body = {"experiment": spec.name, "produced_by": produced, "cells": expected_cells(exp)}
    header = (
        f"# Expected aggregates of experiments/{spec.path.name}, produced by the harness itself with\n"
        f"# `{produced['command']}`. Do not edit by hand: rerun that command. Checked by\n"
        f"# `gptexp reproduce {spec.name}` within the spec's tolerance (rtol {spec.rtol:g}).\n"
    )
    text = header + yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
    tmp = spec.expected_path.with_name(spec.expected_path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(spec.expected_path)
    except OSError as exc:
        raise GptexpError(f"cannot write {spec.expected_path}: {exc.strerror or exc}") from None
    return spec.expected_path


# ---------------------------------------------------------------------------- commands


def cmd_reproduce_study(args) -> int:
    from .tracking import get_client

    spec = load_study_spec(args.experiment)
    if args.write_expected and spec.expected_path is None:
        raise GptexpError(
            f"experiment spec {spec.path} has no expected_file: add one to write the expected aggregates to"
        )
    expected = None if args.write_expected else load_expected(spec)
    client = get_client()
    outcome = run_study(spec, client=client, console=not args.quiet)
    exp = aggregate.load_experiment(client, spec.name, parent_run_id=outcome.parent_run_id)
    print(
        f"experiment {spec.name} ({spec.path}) - parent run {outcome.parent_run_id}: {len(outcome.ran)} trained, "
        f"{len(outcome.skipped)} skipped (finished before with the same config and code), "
        f"{len(outcome.diverged)} diverged; {outcome.seconds:.0f} s"
    )
    print(aggregate.to_markdown(exp), end="")
    if exp.missing:
        print(f"missing runs: {', '.join(f'{c} seed {s}' for c, s in exp.missing)}", file=sys.stderr)
    if args.write_expected:
        path = write_expected(spec, exp, outcome.seconds)
        print(f"wrote the expected aggregates to {path}")
        return 0 if not exp.missing else 1
    if expected is None:
        print("no expected_file in the spec: nothing to compare")
        return 0 if not exp.missing else 1
    checks = compare(expected, exp, spec.rtol)
    passed = all(c.ok for c in checks) and not exp.missing
    diffs = [c.diff for c in checks if c.diff is not None]
    worst = max(diffs) if diffs else math.nan
    client.set_tag(outcome.parent_run_id, TAG_VERDICT, "pass" if passed else "fail")
    client.set_tag(outcome.parent_run_id, TAG_MAX_ABS_DIFF, repr(worst))
    client.log_text(outcome.parent_run_id, checks_csv(checks), COMPARISON_ARTIFACT)
    by = expected.get("produced_by") or {}
    print(
        "expected from: "
        + ", ".join(f"{k} {by[k]}" for k in ("code_version", "torch", "cpu", "threads", "date") if k in by)
    )
    print(format_checks(checks))
    bad = sum(not c.ok for c in checks)
    why = f": {spec.tolerance_why}" if spec.tolerance_why else ""
    print(
        f"verdict: {'pass' if passed else 'fail'} - {len(checks) - bad}/{len(checks)} within tolerance "
        f"(n, tokens, parameters exact; means rtol {spec.rtol:g}, stds rtol x |mean|{why}); "
        f"max relative diff {worst:.3g}"
    )
    return 0 if passed else 1


def cmd_aggregate(args) -> int:
    from .tracking import get_client

    if not args.experiment:
        raise GptexpError("--aggregate needs --experiment NAME (the name of a study spec run by gptexp reproduce)")
    client = get_client()
    exp = aggregate.load_experiment(client, args.experiment)
    folder = Path(args.out) if args.out else Path("paper") / exp.name
    text = checklist.build(exp)
    paths = aggregate.write_outputs(exp, folder, metric=args.metric, axis=args.axis, checklist=text, client=client)
    planned = len(exp.plan["runs"])
    print(f"paper experiment {exp.name}: {len(exp.runs)} of {planned} planned runs, parent {exp.parent.info.run_id}")
    print(aggregate.to_markdown(exp))
    print(text)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    if exp.missing:
        print(
            f"gptexp: warning: {len(exp.missing)} planned runs are missing: rerun gptexp reproduce {exp.name}",
            file=sys.stderr,
        )
    return 0
