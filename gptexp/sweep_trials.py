"""A sweep's trials: each one a run of the one runner, asked of and told to Optuna by workers
that share the study's storage, in this process or in spawned worker processes."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

from . import interrupts
from .errors import INTERRUPTS
from .provenance import redact
from .run_names import trial_run_name
from .runner import Callback, EpochEvent, StopTraining
from .sweep_lock import StudyLock
from .sweep_progress import ToParent, TrialDone, forward
from .sweep_spec import OBJECTIVES, SweepError, SweepSpec, any_value, format_params
from .sweep_study import make_pruner, open_storage, quiet_optuna, study_sampler
from .tags import (
    MLFLOW_PARENT_RUN_ID,
    TAG_BEST_PREFIX,
    TAG_BEST_RUN_ID,
    TAG_BEST_TRIAL,
    TAG_ERROR,
    TAG_JOB,
    TAG_OPTUNA_STATE,
    TAG_OPTUNA_STUDY_NAME,
    TAG_OPTUNA_TRIAL_NUMBER,
    TAG_OPTUNA_VALUE,
    TAG_RETRY_OF_TRIAL,
    TAG_SAMPLER_SEED,
    TAG_STATUS,
    TAG_STOP,
    TAG_STUDY,
    TAG_TRIAL,
)


class PruneOnEpoch(Callback):
    """Reports each epoch's objective to Optuna and stops the run when the pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.attr = OBJECTIVES[metric][0]

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.trial.report(getattr(event, self.attr), step=event.epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned at epoch {event.epoch}", status="pruned")


class Heartbeat:
    """Records the trial's heartbeat in the storage while it runs (RDB storages only)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.enabled = hasattr(storage, "record_heartbeat") and bool(storage.get_heartbeat_interval())

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)


def _objective_value(spec: SweepSpec, epochs: list[EpochEvent]) -> float:
    attr = OBJECTIVES[spec.objective][0]
    values = [getattr(e, attr) for e in epochs]
    if spec.reduce == "last":
        return values[-1]
    return min(values) if spec.direction == "minimize" else max(values)


@dataclass
class Context:
    spec: SweepSpec
    storage_url: str
    parent_run_id: str
    threads: int
    worker: int
    sampler_seed: int | None = None  # recorded on each trial, so a reader can reproduce its proposal
    # Where its lines go: the sweep's SweepProgress in the parent, a ToParent in a worker process,
    # None to print them as they are.
    progress: Any = None


def _say(ctx: Context, text: str) -> None:
    if ctx.progress is None:
        print(text, flush=True)
    else:
        ctx.progress.say(text)


def run_trial(ctx: Context, study, trial, client) -> str:
    """Run one trial as a child MLflow run; tell Optuna its outcome; return its state name."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from . import jobs

    spec = ctx.spec
    t0 = time.monotonic()
    try:
        params = {p.key: p.suggest(trial) for p in spec.space}
    except BaseException:
        # load_sweep_spec tries the space on the sampler; should a suggestion still fail, the asked
        # trial must not stay RUNNING in the storage.
        study.tell(trial, state=TrialState.FAIL)
        raise
    tags = {
        TAG_JOB: "trial",
        TAG_STUDY: spec.study,
        TAG_TRIAL: str(trial.number),
        TAG_OPTUNA_STUDY_NAME: spec.study,
        TAG_OPTUNA_TRIAL_NUMBER: str(trial.number),
        TAG_SAMPLER_SEED: str(ctx.sampler_seed),
    }
    trial.set_user_attr("sampler_seed", ctx.sampler_seed)
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(study._storage.get_trial(trial._trial_id))
    if retried is not None:
        tags[TAG_RETRY_OF_TRIAL] = str(retried)
    run_ids: list[str] = []

    def created(run_id: str) -> None:
        run_ids.append(run_id)
        trial.set_user_attr("mlflow_run_id", run_id)

    state, value, note = "FAIL", None, ""
    with Heartbeat(study._storage, trial._trial_id, spec.heartbeat_interval):
        try:
            config = spec.trial_config(params, ctx.threads)
            outcome = jobs.train(
                config,
                experiment=spec.experiment,
                run_name=trial_run_name(trial.number, params),
                tags=tags,
                parent_run_id=ctx.parent_run_id,
                callbacks=[PruneOnEpoch(trial, spec.objective)],
                client=client,
                console=False,
                on_created=created,
            )
            assert outcome is not None  # a trial is one process, the main one
            value = _objective_value(spec, outcome.result.epochs)
            state = "COMPLETE"
        except StopTraining as exc:
            state, note = "PRUNED", str(exc)
        except INTERRUPTS:
            _tag_child(client, run_ids, "FAIL")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # a trial that fails, fails alone
            note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not run_ids:
                # Its config was refused before a run existed: record the failure as a child run anyway
                # (if MLflow cannot, the trial is still told FAIL below rather than left RUNNING).
                with contextlib.suppress(Exception):
                    created(_refused_run(client, ctx, trial_run_name(trial.number, params), tags, note))
    _tag_child(client, run_ids, state, value)
    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
    seconds = time.monotonic() - t0
    result = {
        "COMPLETE": f"{spec.objective} {value:.4f}" if value is not None else "",
        "PRUNED": note,
        "FAIL": f"failed: {note}",
    }[state]
    line = f"trial {trial.number}: {format_params(params)} -> {redact(result)} ({seconds:.1f} s)"
    if ctx.progress is None:
        print(line, flush=True)
    else:
        ctx.progress.trial_done(TrialDone(trial.number, state, value, line))
    if state == "COMPLETE" and value is not None:
        _log_best(ctx, study, trial.number, value, params, run_ids[0] if run_ids else None, client)
    return state


def _refused_run(client, ctx: Context, name: str, tags: dict, error: str) -> str:
    from .tracking import experiment_id

    run = client.create_run(
        experiment_id(client, ctx.spec.experiment),
        run_name=name,
        tags={**tags, MLFLOW_PARENT_RUN_ID: ctx.parent_run_id, TAG_ERROR: redact(error)[:5000]},
    )
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def _tag_child(client, run_ids: list[str], state: str, value: float | None = None) -> None:
    for rid in run_ids:
        with contextlib.suppress(Exception):
            client.set_tag(rid, TAG_OPTUNA_STATE, {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED"}.get(state, "FAIL"))
            if value is not None:
                client.set_tag(rid, TAG_OPTUNA_VALUE, repr(value))


def _log_best(ctx: Context, study, number: int, value: float, params: dict, run_id: str | None, client) -> None:
    # In turn with the other workers: one that read an older best must not write its tags last.
    with StudyLock(ctx.storage_url, ctx.spec.study):
        try:
            best = study.best_trial
        except ValueError:
            return
        if best.number != number:
            return
        _write_best(ctx, number, value, params, run_id, client)


def _write_best(ctx: Context, number: int, value: float, params: dict, run_id: str | None, client) -> None:
    client.log_metric(ctx.parent_run_id, "best_value", value, step=number)
    client.set_tag(ctx.parent_run_id, TAG_BEST_TRIAL, str(number))
    if run_id:
        client.set_tag(ctx.parent_run_id, TAG_BEST_RUN_ID, run_id)
    for k, v in params.items():
        client.set_tag(ctx.parent_run_id, TAG_BEST_PREFIX + k, str(v))


def _fail_stale(ctx: Context, study, client, checked: set[int]) -> None:
    """Fail trials whose worker stopped heartbeating (the retry callback re-enqueues them once),
    and end their child runs FAILED so MLflow does not show them running forever. A worker killed
    between creating the run and recording its id on the trial is found by the run's tags; one killed
    before the trial's run existed (while the corpus and model were being prepared) left no child:
    one is recorded, FAILED, so every trial still has its child run.
    Called under the study lock, so two workers never record the same trial."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials}
    error = "its worker stopped (no heartbeat): the trial was failed and retried"
    for t in trials:
        if t.state != TrialState.FAIL or t.number in checked:
            continue
        checked.add(t.number)
        with contextlib.suppress(Exception):
            # Its run id is on the trial, unless the worker died between creating the run and saying so.
            rid = t.user_attrs.get("mlflow_run_id") or _child_of(client, ctx, t.number)
            if rid and client.get_run(rid).info.status == "RUNNING":
                client.set_tag(rid, TAG_ERROR, error)
                client.set_tag(rid, TAG_OPTUNA_STATE, "FAIL")
                client.set_terminated(rid, status="FAILED")
            elif not rid and t.number in retried:
                tags = {
                    TAG_JOB: "trial",
                    TAG_STUDY: ctx.spec.study,
                    TAG_TRIAL: str(t.number),
                    TAG_OPTUNA_STUDY_NAME: ctx.spec.study,
                    TAG_OPTUNA_TRIAL_NUMBER: str(t.number),
                    TAG_OPTUNA_STATE: "FAIL",
                }
                _refused_run(client, ctx, trial_run_name(t.number, t.params), tags, f"{error}, before its run began")


def _child_of(client, ctx: Context, number: int) -> str | None:
    """The run id of the parent run's child for trial `number`, if it has one."""
    from .tracking import experiment_id

    found = client.search_runs(
        [experiment_id(client, ctx.spec.experiment)],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{ctx.parent_run_id}' and tags.`{TAG_TRIAL}` = '{number}'",
        max_results=1,
    )
    return found[0].info.run_id if found else None


def work(ctx: Context, current_trial=None) -> dict[str, int]:
    """A worker: ask, run and tell trials until the study holds n_trials finished ones.

    Workers take turns (the study lock, held in the storage, so across machines too) to count the
    trials and ask for the next one with all its parameters drawn, so that n_trials is not
    overshot and no other worker proposes the same point meanwhile.

    `current_trial.value` (a shared integer, when given) holds the id of the trial being run, -1
    between trials, so that the parent can fail it should this worker be killed.
    """
    import optuna
    from optuna.trial import TrialState

    from .sweep_sampler import fresh_grid_points
    from .tracking import get_client

    spec = ctx.spec
    client = get_client()
    storage = open_storage(ctx.storage_url, spec)
    lock = StudyLock(ctx.storage_url, spec.study)
    num_epochs = spec.trial_config({p.key: any_value(p) for p in spec.space}, ctx.threads).train.num_epochs
    study = optuna.load_study(study_name=spec.study, storage=storage, pruner=make_pruner(spec, num_epochs))
    study.sampler = sampler = study_sampler(spec)
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    checked: set[int] = set()
    while True:
        interrupts.check()
        trial = None
        with lock:
            _fail_stale(ctx, study, client, checked)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if finished >= spec.n_trials:
                break
            grid = isinstance(sampler, optuna.samplers.GridSampler)
            fresh, _ = fresh_grid_points(sampler, study) if grid else (1, 0)
            if grid and not fresh and not waiting and not running:
                _say(ctx, f"worker {ctx.worker}: every grid point has been tried")
                break
            if counts["FAIL"] >= spec.max_failures:
                _say(ctx, f"worker {ctx.worker}: stopping after {counts['FAIL']} failed trials")
                break
            if finished + running < spec.n_trials and (fresh or waiting):
                with warnings.catch_warnings():
                    # Optuna warns that heartbeats are meant for optimize(); Heartbeat does them here.
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask()
                _draw_all(spec, study, trial)
        if trial is None:
            # Trials still running elsewhere (or stale, awaiting the heartbeat grace period).
            interrupts.sleep(min(2.0, spec.heartbeat_interval))
            continue
        if current_trial is not None:
            current_trial.value = trial._trial_id
        seed = study._storage.get_trial(trial._trial_id).user_attrs.get("sampler_seed")
        counts[run_trial(replace(ctx, sampler_seed=seed), study, trial, client)] += 1
        if current_trial is not None:
            current_trial.value = -1
    return counts


def _draw_all(spec: SweepSpec, study, trial) -> None:
    """Draw every parameter of a just-asked trial now, inside the lock, so the next worker's
    proposal can avoid its point; a trial whose parameters cannot be drawn is failed, not left RUNNING."""
    from optuna.trial import TrialState

    try:
        for p in spec.space:
            p.suggest(trial)
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise


def _worker_main(ctx: Context, queue, current_trial) -> None:
    # The terminal's Ctrl-C reaches every process of the group, and the parent forwards SIGTERM:
    # either is honoured at the worker's safe points, so its trial and child run end in a final state.
    interrupts.install()
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    quiet_optuna()
    import torch

    torch.set_num_threads(ctx.threads)
    try:
        with interrupts.deferred():
            counts = work(ctx, current_trial)
        queue.put((ctx.worker, "ok", counts))
    except INTERRUPTS:
        queue.put((ctx.worker, "interrupted", None))
    except Exception as exc:  # reported by the parent process as one line
        queue.put((ctx.worker, "error", f"{type(exc).__name__}: {exc}"))


# After SIGTERM, how long workers get to end their trials and runs before they are killed.
WORKER_GRACE_S = 30.0


def run_workers(ctx: Context, workers: int) -> None:
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    current = [spawn.RawValue("q", -1) for _ in range(workers)]  # each worker's trial id, -1 between trials
    procs = [
        spawn.Process(
            target=_worker_main,
            args=(
                Context(ctx.spec, ctx.storage_url, ctx.parent_run_id, ctx.threads, i, progress=ToParent(queue, i)),
                queue,
                current[i],
            ),
            daemon=False,
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    results = _collect(procs, queue, ctx.progress)
    for i in range(workers):
        if i not in results and current[i].value >= 0:
            _fail_abandoned(ctx, current[i].value)
    interrupts.check()
    kinds = [kind for kind, _ in results.values()]
    if "interrupted" in kinds:  # a worker alone was stopped
        raise KeyboardInterrupt
    errors = [msg for kind, msg in results.values() if kind == "error"]
    errors += [
        f"worker {i} ended without a result (exit code {procs[i].exitcode})" for i in range(workers) if i not in results
    ]
    if errors:
        raise SweepError(f"a sweep worker stopped: {errors[0]}")


def _collect(procs: list, queue, progress=None) -> dict[int, tuple[str, Any]]:
    """Each worker's (kind, payload), by worker number, once every worker has ended; the lines
    the workers send on the way are printed on `progress` (whole: only this process prints).

    A polling wait, so that a stop asked of this process (Ctrl-C, SIGTERM) is seen: it is
    forwarded to the workers as SIGTERM, and those still alive after WORKER_GRACE_S are killed.
    """
    from queue import Empty

    results: dict[int, tuple[str, Any]] = {}
    deadline = None
    while True:
        try:
            number, kind, payload = queue.get(timeout=0.2)
            if not forward(progress, kind, payload):
                results[number] = (kind, payload)
            continue
        except Empty:
            if not any(p.is_alive() for p in procs):
                break  # a process that has ended has flushed what it sent: the queue is drained
        if deadline is None and interrupts.requested() is not None:
            deadline = time.monotonic() + WORKER_GRACE_S
            for p in procs:
                if p.is_alive():
                    p.terminate()
        elif deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
    for p in procs:
        p.join()
    return results


def _fail_abandoned(ctx: Context, trial_id: int) -> None:
    """Fail the trial of a worker that ended without telling it, and end its child run."""
    import optuna
    from optuna.trial import TrialState

    from .tracking import get_client

    storage = open_storage(ctx.storage_url, ctx.spec)
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return
    rid = trial.user_attrs.get("mlflow_run_id")
    if rid:
        # KILLED when the sweep was being stopped (as an interrupted run ends), else FAILED.
        status, tags = (
            ("KILLED", {TAG_STOP: "its worker was stopped", TAG_STATUS: "interrupted"})
            if interrupts.requested()
            else ("FAILED", {TAG_ERROR: "its worker ended without finishing the trial", TAG_STATUS: "failed"})
        )
        client = get_client()
        with contextlib.suppress(Exception):
            if client.get_run(rid).info.status == "RUNNING":
                for key, value in {**tags, TAG_OPTUNA_STATE: "FAIL"}.items():
                    client.set_tag(rid, key, value)
                client.set_terminated(rid, status=status)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
