"""Paper experiments: a study spec (a base config, a grid or a sweep's best K trials, seeds), run as
tracked child runs under one parent run, resumable.

A study spec in experiments/ (what tells it from a single-run spec: `seeds`):

    name: ctx-stride-ablation
    base: {config: ../configs/tiny.yaml, overrides: {train.num_epochs: 2}}   # relative to the spec
    grid: {model.context_length: [32, 64], data.stride_fraction: [0.5, 1.0]}
    # or, instead of grid: sweep: {study: NAME, top_k: 3} (the K best complete trials, from MLflow)
    seeds: [1, 2, 3]
    metrics: [epoch_val_loss, epoch_val_ppl]      # each aggregated at the final and the best epoch
    expected_file: ctx-stride-ablation.expected.yaml
    tolerance: {rtol: 1.0e-3, why: "..."}

Every (cell, seed) trains through `jobs.train` as a child of one parent run (`gptexp.job=paper`),
tagged with the spec, cell, seed, the digest of its resolved config and the code version (commit,
plus a digest of the diff when the tree is dirty). A rerun with the same code version reopens that
parent and skips every child already FINISHED with the same config digest, so an interrupted
experiment resumes where it stopped; another code version starts a new parent. The parent holds
the plan (`paper/plan.json`): what `gptexp report --aggregate` aggregates and its checklist reads.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import MAX_SEED, Config, ConfigError, config_keys, from_dict, read_yaml, set_dotted
from .errors import GptexpError
from .provenance import git_state, redact
from .reproduce import _read_yaml_mapping, resolve_spec_path
from .tags import (
    MLFLOW_PARENT_RUN_ID,
    TAG_CELL,
    TAG_CODE_VERSION,
    TAG_CONFIG_SHA256,
    TAG_ERROR,
    TAG_EXPERIMENT_SPEC,
    TAG_JOB,
    TAG_OPTUNA_STATE,
    TAG_OPTUNA_VALUE,
    TAG_SEED,
    TAG_STATUS,
    TAG_STUDY,
    TAG_TRIAL,
)

JOB_PARENT = "paper"
JOB_CHILD = "paper_run"
PLAN_ARTIFACT = "paper/plan.json"
DEFAULT_METRICS = ("epoch_val_loss", "epoch_val_ppl")
# CPU fp32 with the same seed and threads is bit-exact on one machine; other CPUs take other SIMD
# paths (reductions round differently) and the difference grows over training.
DEFAULT_RTOL = 1e-3
STUDY_KEYS = {
    "name",
    "description",
    "experiment",
    "base",
    "grid",
    "sweep",
    "seeds",
    "metrics",
    "corpus",
    "expected_file",
    "tolerance",
}
VERSIONED_PACKAGES = ("torch", "mlflow", "optuna", "numpy", "pandas", "tiktoken")


def is_study_spec(raw: dict) -> bool:
    return "seeds" in raw


@dataclass(frozen=True)
class Cell:
    name: str
    values: dict[str, Any]  # the grid's (or the sweep trial's searched) keys and their values
    config: Config  # train.seed is set per seed (`seeded`)
    source_run: str | None = None  # a sweep trial's run id

    def seeded(self, seed: int) -> Config:
        return replace(self.config, train=replace(self.config.train, seed=seed))


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    raw: dict
    experiment: str
    description: str
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]
    base: str  # what the cells start from, in words
    grid: dict[str, list]  # empty for a sweep's best trials
    sweep: dict | None  # {study, top_k}
    cells: tuple[Cell, ...] = ()  # resolved: a sweep's need the MLflow store (`resolve_cells`)
    expected_path: Path | None = None
    rtol: float = DEFAULT_RTOL
    tolerance_why: str = ""
    corpus_sha256: str | None = None
    selection: dict = field(default_factory=dict)  # method, search space (see plan.json)

    @property
    def axes(self) -> list[str]:
        return list(self.grid) if self.grid else sorted({k for c in self.cells for k in c.values})


def _error(path: Path, message: str) -> GptexpError:
    return GptexpError(f"experiment spec {path}: {message}")


def _short(key: str, keys) -> str:
    """`context_length` for `model.context_length`, unless another key ends the same way."""
    tail = key.rsplit(".", 1)[-1]
    return tail if sum(k.rsplit(".", 1)[-1] == tail for k in keys) == 1 else key


def _value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def config_digest(config: Config) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()


def code_version() -> str:
    """The commit, and a digest of the uncommitted diff: the code a run's numbers come from."""
    git = git_state()
    if git.commit is None:
        return "unknown"
    if not git.dirty:
        return git.commit
    return f"{git.commit}+dirty-{hashlib.sha256(git.diff.encode()).hexdigest()[:12]}"


def _base_raw(path: Path, raw: dict) -> tuple[dict, dict, str]:
    """(base config as a nested dict, overrides, description) from the spec's `base`."""
    base = raw.get("base") or {}
    if not isinstance(base, dict) or set(base) - {"config", "overrides"}:
        raise _error(path, "base must be {config: PATH (relative to the spec), overrides: {key: value}}")
    overrides = base.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise _error(path, "base.overrides must map config keys (e.g. train.num_epochs) to values")
    known = set(config_keys())
    for key in overrides:
        if key not in known:
            raise _error(path, f"base.overrides.{key} is not a config key (e.g. train.num_epochs, model.emb_dim)")
    if base.get("config") is None:
        return {}, overrides, "the trials' own configs"
    config_path = (path.parent / str(base["config"])).resolve()
    try:
        nested = read_yaml(config_path)
    except ConfigError as exc:
        raise _error(path, f"base.config: {exc}") from None
    shown = f"{base['config']}" + (f" with {overrides}" if overrides else "")
    return nested, overrides, shown


def _cell_config(path: Path, nested: dict, settings: dict, experiment: str, cell: str) -> Config:
    raw = json.loads(json.dumps(nested))
    for key, value in settings.items():
        set_dotted(raw, key, value)
    raw["experiment"] = experiment
    try:
        return from_dict(raw, origin=f"cell {cell}")
    except ConfigError as exc:
        raise _error(path, str(exc)) from None


def _seeds(path: Path, raw: Any) -> tuple[int, ...]:
    if not isinstance(raw, list) or not raw:
        raise _error(path, "seeds must be a non-empty list of integers, e.g. [1, 2, 3]")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED for s in raw):
        raise _error(path, f"seeds must be integers from 0 to 2**64-1 (got {raw})")
    if len(set(raw)) != len(raw):
        raise _error(path, f"seeds lists a seed twice ({raw}): each seed once")
    return tuple(raw)


def load_study_spec(name_or_path: str | Path, directory: Path | None = None) -> StudySpec:
    """The validated study spec; a grid's cells are resolved and every cell's config checked here,
    a sweep's by `resolve_cells` (they live in the MLflow store)."""
    path = resolve_spec_path(str(name_or_path), directory)
    raw = _read_yaml_mapping(path, "experiment spec")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise _error(
            path, f"unknown key(s) {', '.join(sorted(unknown))}: a study takes {', '.join(sorted(STUDY_KEYS))}"
        )
    name = str(raw.get("name") or path.stem)
    experiment = str(raw.get("experiment") or name)
    seeds = _seeds(path, raw.get("seeds"))
    metrics = raw.get("metrics") or list(DEFAULT_METRICS)
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m.startswith("epoch_") for m in metrics):
        raise _error(path, f"metrics must list per-epoch metrics such as {', '.join(DEFAULT_METRICS)}")
    if ("grid" in raw) == ("sweep" in raw):
        raise _error(path, "give grid: {key: [values]} or sweep: {study: NAME, top_k: K}, one of them")
    nested, overrides, base_text = _base_raw(path, raw)
    spec = StudySpec(
        name=name,
        path=path,
        raw=raw,
        experiment=experiment,
        description=str(raw.get("description") or ""),
        seeds=seeds,
        metrics=tuple(metrics),
        base=base_text,
        grid={},
        sweep=None,
        **_expectations(path, raw),
    )
    if "sweep" in raw:
        sweep = raw["sweep"]
        if not isinstance(sweep, dict) or set(sweep) != {"study", "top_k"} or not isinstance(sweep["top_k"], int):
            raise _error(path, "sweep must be {study: NAME, top_k: K} (K >= 1)")
        if sweep["top_k"] < 1:
            raise _error(path, f"sweep.top_k must be at least 1 (got {sweep['top_k']})")
        if nested:
            raise _error(path, "a sweep's cells are its trials' configs: give base.overrides alone, not base.config")
        return replace(spec, sweep={"study": str(sweep["study"]), "top_k": sweep["top_k"]})
    if not nested:
        raise _error(path, "a grid needs base.config: the config its cells start from")
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid:
        raise _error(path, "grid must map config keys to lists of values, e.g. {model.context_length: [32, 64]}")
    known = set(config_keys())
    for key, values in grid.items():
        if key not in known or key in ("train.seed", "experiment"):
            raise _error(path, f"grid key {key} is not a config key a grid can vary (seeds vary train.seed)")
        if not isinstance(values, list) or not values or len({json.dumps(v) for v in values}) != len(values):
            raise _error(path, f"grid.{key} must be a non-empty list of distinct values")
    cells = []
    for combo in _product([[(k, v) for v in vs] for k, vs in grid.items()]):
        values = dict(combo)
        name_ = " ".join(f"{_short(k, grid)}={_value_text(v)}" for k, v in values.items())
        cells.append(Cell(name_, values, _cell_config(path, nested, {**overrides, **values}, experiment, name_)))
    _check_pins(path, raw, cells)
    space = {k: {"values": v, "bounds": _bounds(v)} for k, v in grid.items()}
    selection = {
        "method": f"full grid ({len(cells)} cells), every cell reported",
        "search_space": space,
    }
    return replace(spec, grid=dict(grid), cells=tuple(cells), selection=selection)


def _product(lists: list[list]) -> list[tuple]:
    out: list[tuple] = [()]
    for options in lists:
        out = [(*prefix, o) for prefix in out for o in options]
    return out


def _bounds(values: list) -> list | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return [min(numbers), max(numbers)] if len(numbers) == len(values) else None


def _expectations(path: Path, raw: dict) -> dict:
    out: dict[str, Any] = {}
    if "expected_file" in raw:
        out["expected_path"] = path.parent / str(raw["expected_file"])
    tol = raw.get("tolerance") or {}
    if not isinstance(tol, dict) or set(tol) - {"rtol", "why"}:
        raise _error(path, "tolerance must be {rtol: NUMBER, why: TEXT}")
    if "rtol" in tol:
        rtol = tol["rtol"]
        if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not (0 <= rtol < 1):
            raise _error(path, f"tolerance.rtol must be a number in [0, 1) (got {rtol!r})")
        out["rtol"] = float(rtol)
    out["tolerance_why"] = str(tol.get("why") or "")
    corpus = raw.get("corpus")
    if corpus is not None:
        if not isinstance(corpus, dict) or not isinstance(corpus.get("sha256"), str) or len(corpus["sha256"]) != 64:
            raise _error(path, "corpus must be {name: ..., sha256: <64 hex digits>}")
        out["corpus_sha256"] = corpus["sha256"].lower()
    return out


def _check_pins(path: Path, raw: dict, cells: list[Cell]) -> None:
    """Expected results depend on the device and precision: a spec that has them pins both."""
    if "expected_file" not in raw:
        return
    for cell in cells:
        t = cell.config.train
        if t.device == "auto" or t.precision == "auto":
            raise _error(path, f"cell {cell.name}: train.device and train.precision must be explicit (not auto)")


def resolve_cells(spec: StudySpec, client) -> StudySpec:
    """A sweep spec's cells: the `top_k` best complete trials of its study, by its objective."""
    if spec.sweep is None:
        return spec
    from .jobs import run_config
    from .report import _quote, _search

    study, top_k = spec.sweep["study"], spec.sweep["top_k"]
    parents = _search(client, f"tags.`{TAG_JOB}` = 'sweep' and tags.`{TAG_STUDY}` = '{_quote(study)}'")
    if not parents:
        raise _error(
            spec.path, f"sweep.study {study!r} has no sweep run in {redact(client.tracking_uri)}: run it first"
        )
    parent = max(parents, key=lambda r: r.info.start_time)
    direction = parent.data.params.get("sweep.direction", "minimize")
    trials = [
        r
        for r in _search(client, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'")
        if r.data.tags.get(TAG_OPTUNA_STATE) == "COMPLETE" and r.data.tags.get(TAG_OPTUNA_VALUE)
    ]
    if len(trials) < top_k:
        raise _error(spec.path, f"sweep {study!r} has {len(trials)} complete trials, fewer than top_k {top_k}")
    trials.sort(key=lambda r: float(r.data.tags[TAG_OPTUNA_VALUE]), reverse=direction == "maximize")
    _, overrides, _ = _base_raw(spec.path, spec.raw)
    space_keys = [k for k in parent.data.params.get("sweep.space", "").split(",") if k]
    cells = []
    for r in trials[:top_k]:
        name = f"trial-{r.data.tags.get(TAG_TRIAL, r.info.run_id[:8])}"
        trial_config = run_config(client, r.info.run_id)
        values = {k: v for k, v in trial_config.flat().items() if k in space_keys}
        cell_config = _cell_config(spec.path, trial_config.to_dict(), overrides, spec.experiment, name)
        cells.append(Cell(name, values, cell_config, source_run=r.info.run_id))
    _check_pins(spec.path, spec.raw, cells)
    how = {k: parent.data.params.get(f"sweep.{k}", "?") for k in ("objective", "sampler", "pruner")}
    selection = {
        "method": (
            f"the {top_k} best of {len(trials)} complete trials of sweep {study!r} by its objective "
            f"({how['objective']}, {direction}, sampler {how['sampler']}, pruner {how['pruner']}),"
            f" each retrained with {len(spec.seeds)} seeds"
        ),
        "search_space": _sweep_space(client, parent.info.run_id),
        "sweep_run": parent.info.run_id,
    }
    return replace(spec, cells=tuple(cells), selection=selection)


def _sweep_space(client, run_id: str) -> dict:
    """The space (types, bounds, choices) the sweep recorded in sweep/spec.yaml."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        try:
            text = Path(client.download_artifacts(run_id, "sweep/spec.yaml", tmp)).read_text(encoding="utf-8")
        except Exception:
            return {}
    space = (yaml.safe_load(text) or {}).get("space") or {}
    return {k: dict(v) for k, v in space.items()}


# ---------------------------------------------------------------------------- running


@dataclass
class StudyOutcome:
    spec: StudySpec
    parent_run_id: str
    ran: list[tuple[str, int, str]] = field(default_factory=list)  # (cell, seed, run id)
    skipped: list[tuple[str, int, str]] = field(default_factory=list)
    diverged: list[tuple[str, int, str]] = field(default_factory=list)
    seconds: float = 0.0


def plan(spec: StudySpec, code: str) -> dict:
    """What the parent run records of the experiment (paper/plan.json), for reports and checklists."""
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "name": spec.name,
        "description": spec.description,
        "spec": spec.path.name,
        "kind": "sweep" if spec.sweep else "grid",
        "base": spec.base,
        "axes": spec.axes,
        "seeds": list(spec.seeds),
        "metrics": list(spec.metrics),
        "cells": [{"cell": c.name, "values": c.values, "source_run": c.source_run} for c in spec.cells],
        "runs": [
            {"cell": c.name, "seed": s, "config_sha256": config_digest(c.seeded(s))}
            for c in spec.cells
            for s in spec.seeds
        ],
        "selection": spec.selection,
        "code_version": code,
        "versions": versions,
        "command": command_line(),
    }


def command_line() -> str:
    """This process's command, `python -m gptexp` shown as the `gptexp` it stands for."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "gptexp"):
        argv[0] = "gptexp"
    return redact(" ".join(argv))


def _find_parent(client, spec: StudySpec, code: str) -> str | None:
    from .report import _quote, _search

    exp = client.get_experiment_by_name(spec.experiment)
    if exp is None:
        return None
    runs = _search(
        client,
        f"tags.`{TAG_JOB}` = '{JOB_PARENT}' and tags.`{TAG_EXPERIMENT_SPEC}` = '{_quote(spec.name)}' "
        f"and tags.`{TAG_CODE_VERSION}` = '{_quote(code)}'",
        experiment_ids=[exp.experiment_id],
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


def _children(client, spec: StudySpec, parent: str) -> list:
    from .report import _search

    exp = client.get_experiment_by_name(spec.experiment)
    return _search(client, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}'", experiment_ids=[exp.experiment_id])


def run_study(spec: StudySpec, *, client=None, console: bool = True, say=print) -> StudyOutcome:
    """Train every (cell, seed) not yet finished with the same config and code under the parent run."""
    from . import jobs
    from .runner import NonFiniteLoss
    from .tracking import end_if_running, get_client, tracked_run, write_failures

    client = client or get_client()
    spec = resolve_cells(spec, client)
    prepared = {}
    for cell in spec.cells:  # every cell checked before any run exists (corpus, device, memory)
        prepared[cell.name] = jobs.preflight(cell.config)
        sha = prepared[cell.name].data.corpus.sha256
        if spec.corpus_sha256 is not None and sha != spec.corpus_sha256:
            raise GptexpError(
                f"experiment {spec.name}: corpus {prepared[cell.name].data.corpus.name} has sha256 {sha} but "
                f"the spec pins {spec.corpus_sha256}: restore the pinned text (refusing to run)"
            )
    code = code_version()
    existing = _find_parent(client, spec, code)
    tags = {TAG_JOB: JOB_PARENT, TAG_EXPERIMENT_SPEC: spec.name, TAG_CODE_VERSION: code}
    tick = time.perf_counter()
    with (
        write_failures(client),
        tracked_run(
            client, spec.experiment, run_name=f"paper-{spec.name}", tags=tags, resume_run_id=existing
        ) as parent,
    ):
        outcome = StudyOutcome(spec, parent)
        say(f"experiment {spec.name}: {'resuming' if existing else 'new'} parent run {parent} (code {code[:12]})")
        client.log_text(parent, json.dumps(plan(spec, code), indent=2, default=str), PLAN_ARTIFACT)
        client.log_text(parent, spec.path.read_text(encoding="utf-8"), f"paper/{spec.path.name}")
        done: dict[tuple[str, str, str], str] = {}
        for r in _children(client, spec, parent):
            t = r.data.tags
            if r.info.status == "FINISHED":
                done[(t.get(TAG_CELL, ""), t.get(TAG_SEED, ""), t.get(TAG_CONFIG_SHA256, ""))] = r.info.run_id
            elif r.info.status == "RUNNING":
                # A child whose process was killed outright: nothing will end it but us.
                note = "its process ended before the run finished (killed?); the rerun trains it again"
                end_if_running(client, r.info.run_id, "FAILED", {TAG_ERROR: note, TAG_STATUS: "failed"})
        total = len(spec.cells) * len(spec.seeds)
        for cell in spec.cells:
            for seed in spec.seeds:
                config = cell.seeded(seed)
                digest = config_digest(config)
                index = len(outcome.ran) + len(outcome.skipped) + len(outcome.diverged) + 1
                label = f"[{index}/{total}] {cell.name} seed {seed}"
                found = done.get((cell.name, str(seed), digest))
                if found is not None:
                    say(f"{label}: skipped, finished in run {found[:8]} with the same config and code")
                    outcome.skipped.append((cell.name, seed, found))
                    continue
                say(f"{label}: training")
                child_tags = {
                    TAG_JOB: JOB_CHILD,
                    TAG_EXPERIMENT_SPEC: spec.name,
                    TAG_CELL: cell.name,
                    TAG_SEED: str(seed),
                    TAG_CONFIG_SHA256: digest,
                    TAG_CODE_VERSION: code,
                }
                created: list[str] = []
                try:
                    result = jobs.train(
                        config,
                        experiment=spec.experiment,
                        run_name=f"{cell.name} seed {seed}",
                        tags=child_tags,
                        parent_run_id=parent,
                        prepared=prepared[cell.name],
                        client=client,
                        console=console,
                        on_created=created.append,
                    )
                except NonFiniteLoss as exc:
                    # A diverged cell is a result: its run ends FAILED and the study goes on.
                    say(f"{label}: diverged ({exc})")
                    outcome.diverged.append((cell.name, seed, created[0] if created else ""))
                    continue
                assert result is not None  # one process
                outcome.ran.append((cell.name, seed, result.run_id))
        outcome.seconds = time.perf_counter() - tick
    return outcome


def relative_diff(got: float, want: float) -> float:
    if got == want:
        return 0.0
    scale = max(abs(want), abs(got))
    return abs(got - want) / scale if scale and math.isfinite(scale) else math.inf
