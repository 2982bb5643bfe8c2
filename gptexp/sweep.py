"""`gptexp sweep`: Optuna studies whose trials are runs of the one runner, nested in MLflow.

One parent MLflow run per study (the same one when the study resumes), one child run per trial
(tagged with the study and trial number, holding the trial's full config as params). Child
status tells the truth: complete -> FINISHED, pruned -> KILLED with optuna.state=PRUNED,
failed -> FAILED with the error. The objective is the best epoch's validation loss, measured on
the same validation tokens for every trial (see gptexp.evaluation.evaluate_split).

Workers share the Optuna storage, on one machine or many; a lock per study held in the storage
(gptexp.sweep_lock) makes one study, one parent run and one set of enqueued points whoever starts
first, and keeps the number of finished trials exact; trials heartbeat (RDB storages), so the
trial of a killed worker is failed once stale and retried once. Ctrl-C or SIGTERM stops every
worker at a safe point: each ends its trial FAIL and its child run KILLED, then the parent run
ends KILLED.

The spec (no Optuna) is in gptexp.sweep_spec, the Optuna storage, samplers and pruners in
gptexp.sweep_study, the trials and worker processes in gptexp.sweep_trials; here, the parent run,
`run_sweep` and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from . import interrupts
from .config import MAX_RUN_NAME, check_name, from_dict
from .provenance import redact
from .run_names import add_naming_arguments, user_tags
from .runtime import physical_cores
from .sweep_lock import StudyLock
from .sweep_plots import log_plots
from .sweep_progress import SweepProgress
from .sweep_spec import SweepError, SweepSpec, any_value, check_same_search, format_params, parse_spec, spec_dict
from .sweep_study import default_storage, make_pruner, make_sampler, open_storage, quiet_optuna, try_sampler_and_pruner
from .sweep_trials import Context, run_workers, work
from .tags import TAG_JOB, TAG_OPTUNA_STORAGE, TAG_STUDY
from .ui_view import show_sweep


def load_sweep_spec(
    path: str | Path, *, overrides: Sequence[str] = (), n_trials: int | None = None, study: str | None = None
) -> SweepSpec:
    """Read and validate a sweep spec; the base config it names is validated too, and the sampler and
    pruner options are tried on Optuna."""
    spec = parse_spec(path, overrides=overrides, n_trials=n_trials, study=study)
    try_sampler_and_pruner(spec, spec.base().train.num_epochs)
    return spec


# --- the sweep ---------------------------------------------------------------------------------


def _parent_run(client, spec: SweepSpec, study, storage_url: str, run_name: str | None, tags: dict) -> str:
    from .tracking import experiment_id, log_flat_params

    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid:
        with contextlib.suppress(Exception):
            run = client.get_run(rid)
            if run.info.lifecycle_stage == "active":
                client.update_run(rid, status="RUNNING", name=run_name)
                for k, v in tags.items():  # a resumed sweep may add a tag or a note
                    client.set_tag(rid, k, v)
                return rid
    run = client.create_run(
        experiment_id(client, spec.experiment),
        run_name=run_name or f"sweep-{spec.study}",
        tags={**tags, TAG_JOB: "sweep", TAG_STUDY: spec.study, TAG_OPTUNA_STORAGE: redact(storage_url)},
    )
    rid = run.info.run_id
    show_sweep(client, run.info.experiment_id, [p.key for p in spec.space])
    params = {
        f"sweep.{k}": v
        for k, v in {
            "study": spec.study,
            "objective": spec.objective,
            "direction": spec.direction,
            "reduce": spec.reduce,
            "sampler": spec.sampler.get("name"),
            "pruner": spec.pruner.get("name"),
            "base_config": spec.base_config,
            "space": ",".join(p.key for p in spec.space),
        }.items()
    }
    log_flat_params(client, rid, params)
    client.log_text(rid, yaml.safe_dump(spec_dict(spec), sort_keys=False), "sweep/spec.yaml")
    study.set_user_attr("mlflow_parent_run_id", rid)
    return rid


def _finish_parent(client, spec: SweepSpec, study, parent: str, threads: int) -> dict:
    """Trials table, study plots and the best trial's config as artifacts of the parent run."""
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"best": None}
    df = study.trials_dataframe()
    client.log_text(parent, df.to_csv(index=False), "trials/trials.csv")
    for line in log_plots(client, parent, study, spec.objective, spec.reduce):
        print(f"({line})", flush=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        config = spec.trial_config(best.params, threads, as_trial=False)  # a run of its own: resumable
        text = config.to_yaml()
        client.log_text(parent, text, "best/config.yaml")
        client.log_metric(parent, "best_value", best.value, step=best.number)
        path = _local_best_config(client, parent, text)
        summary["best"] = {
            "number": best.number,
            "value": best.value,
            "params": best.params,
            "run_id": best.user_attrs.get("mlflow_run_id"),
            "config": path,
        }
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    summary["states"] = {s: states.count(s) for s in sorted(set(states))}
    for name, n in summary["states"].items():
        client.log_metric(parent, f"trials_{name.lower()}", n)
    return summary


def _local_best_config(client, parent: str, text: str) -> str:
    """Where `gptexp train --config` finds the best config: its file, or its runs:/ URI on a server."""
    from .tracking import local_artifact_dir

    local = local_artifact_dir(client, parent)
    if local is not None and (local / "best" / "config.yaml").is_file():
        return str(local / "best" / "config.yaml")
    if local is None:
        return f"runs:/{parent}/best/config.yaml"
    path = Path(tempfile.mkdtemp(prefix="gptexp-best-")) / "config.yaml"
    path.write_text(text)
    return str(path)


def run_sweep(
    spec: SweepSpec,
    *,
    storage_url: str | None = None,
    workers: int = 1,
    run_name: str | None = None,
    tags: dict | None = None,
) -> dict:
    """Create or resume the study and run it to n_trials finished trials; returns a summary.

    `run_name` and `tags` (--run-name, --tag, --note) are the parent run's."""
    import optuna

    from .tracking import get_client, tracked_run

    quiet_optuna()
    if workers < 1:
        raise SweepError(f"--workers must be at least 1 (got {workers})")
    if run_name is not None:
        check_name("--run-name", run_name, MAX_RUN_NAME)
    storage_url = storage_url or default_storage()
    storage = open_storage(storage_url, spec)
    cores = physical_cores()
    threads = max(1, cores // workers)
    base = spec.trial_config({p.key: any_value(p) for p in spec.space}, threads)
    from .jobs import preflight

    preflight(from_dict(spec.base_raw(), origin="sweep base config"))  # corpus and splits, before any trial
    lock = StudyLock(storage_url, spec.study)
    client = get_client()
    with lock:  # workers started together: one creates the study, enqueues and makes the parent run
        try:
            study = optuna.create_study(
                study_name=spec.study,
                storage=storage,
                direction=spec.direction,
                sampler=make_sampler(spec),
                pruner=make_pruner(spec, base.train.num_epochs),
                load_if_exists=True,
            )
        except ValueError as exc:
            raise SweepError(f"study {spec.study}: {exc}") from None
        if study.direction.name.lower() != spec.direction:
            raise SweepError(
                f"study {spec.study} exists with direction {study.direction.name.lower()}: use another --study name"
            )
        check_same_search(study, spec)
        if not study.trials:
            with interrupts.deferred():  # all of them: a resumed study (it has trials) never enqueues the rest
                for point in spec.enqueue:
                    study.enqueue_trial(point)
    with interrupts.deferred():  # from the parent run's (re)opening until it has ended
        with lock:
            parent = _parent_run(client, spec, study, storage_url, run_name, tags or {})
        print(
            f"sweep {spec.study}: {spec.n_trials} trials of {spec.objective} ({spec.direction}), "
            f"{workers} worker(s) x {threads} thread(s), storage {redact(storage_url)}, MLflow parent run {parent}",
            flush=True,
        )
        progress = SweepProgress.for_study(study, spec.n_trials, spec.direction)
        ctx = Context(spec, storage_url, parent, threads, 0, progress=progress)
        with tracked_run(client, spec.experiment, resume_run_id=parent):
            if workers == 1:
                import torch

                torch.set_num_threads(threads)
                work(ctx)
            else:
                run_workers(ctx, workers)
            with lock:  # one worker at a time rewrites the parent's table, plots and best config
                summary = _finish_parent(client, spec, study, parent, threads)
    summary.update(parent_run_id=parent, study=spec.study)
    _print_summary(spec, summary)
    return summary


def _print_summary(spec: SweepSpec, summary: dict) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    print(f"study {spec.study}: {states}")
    best = summary["best"]
    if best is None:
        print("no trial completed")
        return
    print(f"best trial {best['number']}: {spec.objective} {best['value']:.4f} with {format_params(best['params'])}")
    print(f"  MLflow run {best['run_id']} (parent {summary['parent_run_id']})")
    print(f"  re-train it: gptexp train --config {best['config']}")


# --- command line ------------------------------------------------------------------------------


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """`gptexp sweep`'s arguments."""
    p.add_argument("--config", required=True, metavar="PATH", help="sweep spec YAML, e.g. configs/sweep.yaml")
    p.add_argument("--n-trials", type=int, metavar="N", help="finished (complete or pruned) trials to reach")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="processes sharing the storage (default 1)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the spec's, else its file name)")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: sqlite:///..., postgresql://..., mysql://..., journal:///path, redis://... "
        "(default sqlite:///mlruns/optuna.db)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a key of the base run config (repeatable)",
    )
    add_naming_arguments(p, "sweep's parent run", "sweep-STUDY")


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_sweep_spec(args.config, overrides=args.overrides, n_trials=args.n_trials, study=args.study)
    run_sweep(spec, storage_url=args.storage, workers=args.workers, run_name=args.run_name, tags=user_tags(args))
    return 0
