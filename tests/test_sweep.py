"""`gptexp sweep`: Optuna trials as nested MLflow runs that tell the truth, resumable and parallel.

Real Optuna storage (SQLite, PostgreSQL), real MLflow store, the tiny preset on a short slice of
the-verdict so that a trial takes a couple of seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from gptexp import jobs
from gptexp.cli import main
from gptexp.config import load_config
from gptexp.runtime import physical_cores

from conftest import TINY, cli_env

STATUS_OF = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, verdict_text):
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(verdict_text[:4000], encoding="utf-8")
    return path


SPACE = {
    "model.context_length": {"type": "categorical", "choices": [16, 32]},
    "data.stride_fraction": {"type": "categorical", "choices": [0.5, 1.0]},
    "train.batch_size": {"type": "categorical", "choices": [4, 8]},
    "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
}


def write_spec(tmp_path, corpus, name="spec.yaml", **changes):
    spec = {
        "study": "s",
        "experiment": "sweep-tests",
        "base": {
            "config": str(TINY),
            "overrides": {"train.num_epochs": 2, "data.source": str(corpus), "sample.max_new_tokens": 5},
        },
        "sampler": {"name": "tpe", "seed": 7},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "n_trials": 6,
        "space": SPACE,
        "heartbeat": {"interval": 1, "grace": 4},
    }
    spec.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep(spec, storage, *extra):
    return main(["sweep", "--config", str(spec), "--storage", storage, *extra])


def mlflow_runs(client, study):
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`gptexp.study` = '{study}'"
    )
    parents = [r for r in runs if r.data.tags.get("gptexp.job") == "sweep"]
    children = [r for r in runs if r.data.tags.get("gptexp.job") == "trial"]
    return parents, children


def assert_children_tell_the_truth(study, children):
    by_number = {int(r.data.tags["gptexp.trial"]): r for r in children}
    assert len(by_number) == len(children)  # one child per trial
    for t in study.trials:
        child = by_number[t.number]
        assert child.info.status == STATUS_OF[t.state.name], t.number
        assert child.data.tags["optuna.state"] == t.state.name
        assert child.data.tags["mlflow.parentRunId"]
    assert set(by_number) == {t.number for t in study.trials}


@pytest.fixture(scope="module")
def six(tmp_path_factory, corpus, mlflow_store):
    tmp = tmp_path_factory.mktemp("six")
    spec = write_spec(tmp, corpus, study="six")
    storage = f"sqlite:///{tmp}/optuna.db"
    assert sweep(spec, storage) == 0
    return spec, storage


def test_six_trials_make_one_parent_and_six_children_whose_states_match(six, mlflow_store):
    spec, storage = six
    study = optuna.load_study(study_name="six", storage=storage)
    assert len(study.trials) == 6
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    client = MlflowClient(mlflow_store)
    parents, children = mlflow_runs(client, "six")
    assert len(parents) == 1 and len(children) == 6
    assert parents[0].info.status == "FINISHED"
    assert_children_tell_the_truth(study, children)
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        params = child.data.params
        stride = float(params["data.stride_fraction"]) * int(params["model.context_length"])
        assert int(params["data.stride"]) == max(1, round(stride))
        assert {"train.lr", "train.batch_size", "model.emb_dim", "data.source"} <= set(params)


def test_the_parent_holds_best_value_trials_table_plots_and_best_config(six, mlflow_store):
    spec, storage = six
    study = optuna.load_study(study_name="six", storage=storage)
    client = MlflowClient(mlflow_store)
    (parent,), _ = mlflow_runs(client, "six")
    assert parent.data.metrics["best_value"] == study.best_value
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= names
    trials_csv = client.download_artifacts(parent.info.run_id, "trials/trials.csv")
    assert len(Path(trials_csv).read_text().strip().splitlines()) == 7


def test_the_exported_best_config_retrains_to_the_best_trials_value(six, mlflow_store):
    spec, storage = six
    study = optuna.load_study(study_name="six", storage=storage)
    client = MlflowClient(mlflow_store)
    (parent,), _ = mlflow_runs(client, "six")
    path = client.download_artifacts(parent.info.run_id, "best/config.yaml")
    config = load_config(path)  # what `gptexp train --config` accepts
    outcome = jobs.train(config, experiment="retrain-best", console=False)
    assert min(e.val_loss for e in outcome.result.epochs) == study.best_value  # CPU fp32: bit for bit


def test_the_same_command_with_more_trials_resumes_the_study_under_the_same_parent(six, mlflow_store):
    spec, storage = six
    assert sweep(spec, storage, "--n-trials", "8") == 0
    study = optuna.load_study(study_name="six", storage=storage)
    assert len(study.trials) == 8
    parents, children = mlflow_runs(MlflowClient(mlflow_store), "six")
    assert len(parents) == 1 and len(children) == 8
    assert_children_tell_the_truth(study, children)


def test_a_study_recorded_before_a_config_key_existed_resumes_while_the_key_sits_at_its_default(
    six, mlflow_store, tmp_path, corpus, capsys
):
    from gptexp.sweep_spec import SEARCH_ATTR

    _, storage = six
    study = optuna.load_study(study_name="six", storage=storage)
    recorded = study.user_attrs[SEARCH_ATTR]
    older = {
        **recorded,
        "base config": {k: v for k, v in recorded["base config"].items() if k != "train.deterministic"},
    }
    study.set_user_attr(SEARCH_ATTR, older)  # as a gptexp without train.deterministic recorded it
    try:
        at_default = write_spec(tmp_path, corpus, study="six", n_trials=len(study.trials))
        assert sweep(at_default, storage) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert sweep(at_default, storage, "--set", "train.deterministic=true") == 2
        err = capsys.readouterr().err.strip()
        assert "holds another search" in err and "train.deterministic: absent -> True" in err, err
    finally:
        study.set_user_attr(SEARCH_ATTR, recorded)


def test_a_trial_whose_worker_died_before_its_run_began_still_gets_a_failed_child_run(tmp_path, corpus, mlflow_store):
    from gptexp.sweep import load_sweep_spec

    spec = write_spec(tmp_path, corpus, study="early", n_trials=2)
    db = tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"
    assert sweep(spec, storage) == 0
    # A worker that asked its trial (parameters drawn, heartbeat recorded) and was killed while
    # preparing it, before the trial's MLflow run existed; its last heartbeat an hour ago.
    study = optuna.load_study(study_name="early", storage=storage)
    trial = study.ask()
    for p in load_sweep_spec(str(spec)).space:
        p.suggest(trial)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute(
            "INSERT INTO trial_heartbeats (trial_id, heartbeat) VALUES (?, datetime('now', '-1 hour'))",
            (trial._trial_id,),
        )

    assert sweep(spec, storage, "--n-trials", "3") == 0

    study = optuna.load_study(study_name="early", storage=storage)
    assert study.trials[trial.number].state == TrialState.FAIL
    (parent,), children = mlflow_runs(MlflowClient(mlflow_store), "early")
    assert_children_tell_the_truth(study, children)
    (dead,) = [c for c in children if c.data.tags["gptexp.trial"] == str(trial.number)]
    assert "before its run began" in dead.data.tags["gptexp.error"]
    assert dead.data.tags["mlflow.parentRunId"] == parent.info.run_id


@pytest.mark.parametrize(
    "change,extra",
    [
        ({"space": {**SPACE, "train.lr": {"type": "float", "low": 1e-4, "high": 2e-2, "log": True}}}, ()),
        ({"objective": {"metric": "epoch_train_loss"}}, ()),
        ({}, ("--set", "train.weight_decay=0.2")),  # the base config the trials start from
    ],
)
def test_resuming_a_study_with_another_search_is_refused_and_adds_nothing(
    six, mlflow_store, tmp_path, corpus, capsys, change, extra
):
    _, storage = six
    client = MlflowClient(mlflow_store)
    before = optuna.load_study(study_name="six", storage=storage)
    (parent,), children = mlflow_runs(client, "six")
    changed = write_spec(tmp_path, corpus, study="six", n_trials=len(before.trials) + 2, **change)
    capsys.readouterr()
    assert sweep(changed, storage, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "study six holds another search" in err and "--study NAME" in err
    after = optuna.load_study(study_name="six", storage=storage)
    assert len(after.trials) == len(before.trials) and after.user_attrs == before.user_attrs
    (parent_after,), children_after = mlflow_runs(client, "six")
    assert len(children_after) == len(children)
    assert parent_after.info.status == parent.info.status and parent_after.data.params == parent.data.params


def test_a_resumed_sweep_never_proposes_an_earlier_point_and_a_rerun_from_scratch_proposes_the_same(
    tmp_path, corpus, mlflow_store
):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    space = {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}
    base = {
        "config": str(TINY),
        "overrides": {
            "train.num_epochs": 1,
            "data.source": str(corpus),
            "sample.max_new_tokens": 0,
            "checkpoint.keep": "none",
        },
    }

    def one_trial_then_two_more(study_name: str):
        spec = write_spec(
            tmp_path,
            corpus,
            name=f"{study_name}.yaml",
            study=study_name,
            space=space,
            base=base,
            n_trials=1,
            pruner={"name": "none"},
        )  # TPE, seeded: its first 10 trials are random draws
        assert sweep(spec, storage) == 0
        assert sweep(spec, storage, "--n-trials", "3") == 0
        trials = optuna.load_study(study_name=study_name, storage=storage).trials
        _, children = mlflow_runs(MlflowClient(mlflow_store), study_name)
        tags = {int(c.data.tags["gptexp.trial"]): c.data.tags.get("gptexp.sampler_seed") for c in children}
        seeds = [(tags[t.number], t.user_attrs.get("sampler_seed")) for t in trials]
        return [t.params["train.lr"] for t in trials], seeds

    lrs, seeds = one_trial_then_two_more("resumed")
    assert len(set(lrs)) == 3  # the resumed session proposed no point of the first one again
    assert all(tag == str(attr) and attr is not None for tag, attr in seeds)  # recorded on the run and the trial
    assert len({attr for _, attr in seeds}) == 3  # one seed per trial, from its number: no two trials share one
    assert one_trial_then_two_more("resumed-again") == (lrs, seeds)  # the same steps give the same points


def test_two_workers_run_every_trial_exactly_once(tmp_path, corpus, mlflow_store):
    spec = write_spec(tmp_path, corpus, study="workers", n_trials=4)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert sweep(spec, storage, "--workers", "2") == 0
    study = optuna.load_study(study_name="workers", storage=storage)
    assert len(study.trials) == 4
    assert not [t for t in study.trials if t.state == TrialState.FAIL]
    parents, children = mlflow_runs(MlflowClient(mlflow_store), "workers")
    assert len(parents) == 1 and len(children) == 4
    assert_children_tell_the_truth(study, children)
    # The workers share the cores: each trial runs on cores // workers threads, at least one.
    assert {c.data.params["train.threads"] for c in children} == {str(max(1, physical_cores() // 2))}


def frozen_while_a_trial_runs(proc, db) -> bool:
    """Freeze the sweep (SIGSTOP to its process group); True, leaving it frozen, when a trial is then
    RUNNING with its heartbeat recorded (read from Optuna's tables), else thaw it and return False.
    Frozen, it cannot finish that trial before the SIGKILL that follows lands."""
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        with contextlib.closing(sqlite3.connect(db, timeout=1)) as con:
            (running,) = con.execute(
                "SELECT count(*) FROM trials t JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING'"
            ).fetchone()
        if running:
            return True
    except sqlite3.OperationalError:
        pass  # frozen in the middle of a write (or the tables do not exist yet): look again
    os.killpg(proc.pid, signal.SIGCONT)
    return False


def test_a_sweep_killed_mid_way_resumes_with_nothing_left_running(tmp_path, corpus, mlflow_store):
    spec = write_spec(tmp_path, corpus, study="killed")
    storage = f"sqlite:///{tmp_path}/optuna.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptexp.cli", "sweep", "--config", str(spec), "--storage", storage],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:  # kill the whole sweep once two trials are done and a third runs
            if line.startswith("trial 1:"):
                break
        assert wait_for(lambda: frozen_while_a_trial_runs(proc, tmp_path / "optuna.db"), 300, proc), (
            "no third trial ran"
        )
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    study = optuna.load_study(study_name="killed", storage=storage)
    assert any(t.state == TrialState.RUNNING for t in study.trials)

    assert sweep(spec, storage) == 0
    study = optuna.load_study(study_name="killed", storage=storage)
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 6
    parents, children = mlflow_runs(MlflowClient(mlflow_store), "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [c for c in children if c.info.status == "RUNNING"]
    assert_children_tell_the_truth(study, children)
    stale = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(stale) == 1  # the killed trial, failed by heartbeat ...
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == stale[0].number]
    assert len(retried) == 1  # ... and retried once


def test_a_failing_trial_fails_alone_and_the_sweep_goes_on(tmp_path, corpus, mlflow_store):
    # The first trial (enqueued) diverges at once: a NaN loss fails it, alone.
    space = {"train.lr": {"type": "categorical", "choices": [1e12, 1e-3, 2e-3]}}
    spec = write_spec(
        tmp_path,
        corpus,
        study="failing",
        space=space,
        n_trials=2,
        pruner={"name": "none"},
        enqueue=[{"train.lr": 1e12}],
    )
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert sweep(spec, storage) == 0
    study = optuna.load_study(study_name="failing", storage=storage)
    states = [t.state for t in study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 2
    parents, children = mlflow_runs(MlflowClient(mlflow_store), "failing")
    assert_children_tell_the_truth(study, children)
    failed = [c for c in children if c.data.tags["gptexp.trial"] == "0"]
    assert failed[0].info.status == "FAILED" and "NonFiniteLoss" in failed[0].data.tags["gptexp.error"]


def test_a_postgresql_storage_works_and_its_password_is_never_logged(tmp_path, corpus, mlflow_store):
    study_name = f"pg-{uuid.uuid4().hex[:8]}"
    # The local server trusts loopback connections, so any password is accepted: a fine secret to hunt for.
    storage = "postgresql://postgres:s3cr3t-pw@127.0.0.1:5432/test"
    spec = write_spec(tmp_path, corpus, study=study_name, n_trials=2)
    try:
        assert sweep(spec, storage) == 0
        study = optuna.load_study(study_name=study_name, storage=storage)
        assert len(study.trials) == 2
        client = MlflowClient(mlflow_store)
        parents, children = mlflow_runs(client, study_name)
        assert len(parents) == 1 and len(children) == 2
        for run in parents + children:
            for value in list(run.data.params.values()) + list(run.data.tags.values()):
                assert "s3cr3t-pw" not in value
        assert parents[0].data.tags["optuna.storage"] == "postgresql://postgres:***@127.0.0.1:5432/test"
    finally:
        optuna.delete_study(study_name=study_name, storage=storage)


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"space": {"train.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}}},
            "space.train.learning_rate is not a config key",
        ),
        ({"space": {"train.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}}, "empty range"),
        ({"space": {"train.batch_size": {"type": "categorical", "choices": []}}}, "choices must be a non-empty list"),
        ({"sampler": {"name": "annealing"}}, "sampler 'annealing' is unknown"),
        ({"pruner": {"name": "patient"}}, "pruner 'patient' is unknown"),
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"enqueue": [{"train.weight_decay": 0.0}]}, "enqueue point names train.weight_decay"),
        # values that used to pass the spec and fail later, some with a trial left RUNNING
        (
            {"space": {"train.batch_size": {"type": "int", "low": 2, "high": 8, "step": 0.5}}},
            "space.train.batch_size: an int range needs an integer step (got 0.5)",
        ),
        (
            {"heartbeat": {"interval": "x", "grace": 4}},
            "heartbeat.interval (seconds) must be a positive integer (got 'x')",
        ),
        ({"heartbeat": {"interval": 5, "grace": "soon"}}, "heartbeat.grace (seconds) must be a positive integer"),
        ({"max_failures": "x"}, "max_failures must be a positive integer (got 'x')"),
        ({"n_trials": True}, "n_trials must be a positive integer (got True)"),
        (
            {"space": {"train.lr": {"type": "float", "low": True, "high": 1e-2}}},
            "space.train.lr.low must be a finite number",
        ),
        (
            {"space": {"train.lr": {"type": "float", "low": 1e-4, "high": float("nan")}}},
            "space.train.lr.high must be a finite number",
        ),
        (
            {"space": {"train.batch_size": {"type": "categorical", "choices": [[4], 8]}}},
            "space.train.batch_size.choices must be numbers, strings, booleans or null (got [4])",
        ),
        (
            {"space": {"train.batch_size": {"type": "int", "low": 0, "high": 8}}},
            "space.train.batch_size reaches 0, which the config refuses: train.batch_size must be at least 1",
        ),
        (
            {"base": {"config": str(TINY), "overrides": {"data.stride": 8}}},
            "space.data.stride_fraction reaches 0.5, which the config refuses: "
            "data.stride and data.stride_fraction are both set",
        ),
        (
            {"enqueue": [{"train.batch_size": 5}]},
            "enqueue point train.batch_size=5 is not one of space.train.batch_size.choices",
        ),
        ({"sampler": {"name": "tpe", "n_startup_trials": "ten"}}, "sampler tpe fails on this space"),
        ({"pruner": {"name": "median", "n_startup_trials": -1}}, "pruner median: "),
        ({"objective": ["epoch_val_loss"]}, "objective must be a metric name or a mapping"),
    ],
)
def test_a_bad_spec_is_one_line_exit_2_before_any_trial(tmp_path, corpus, mlflow_store, change, expected, capsys):
    spec = write_spec(tmp_path, corpus, study="bad", **change)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    capsys.readouterr()
    assert sweep(spec, storage) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "optuna.db").exists() or not optuna.get_all_study_summaries(storage)
    assert mlflow_runs(MlflowClient(mlflow_store), "bad") == ([], [])


def test_a_trial_whose_parameters_cannot_be_suggested_is_failed_not_left_running(tmp_path, corpus, mlflow_store):
    from gptexp.sweep import load_sweep_spec, run_sweep

    spec = load_sweep_spec(
        write_spec(
            tmp_path,
            corpus,
            study="unsuggestable",
            n_trials=1,
            space={"train.batch_size": {"type": "int", "low": 2, "high": 8}},
        )
    )
    spec.space[0].step = 0.5  # load_sweep_spec refuses this; a spec built in code can still hold it
    storage = f"sqlite:///{tmp_path}/optuna.db"
    with pytest.raises(ValueError):
        run_sweep(spec, storage_url=storage)
    study = optuna.load_study(study_name="unsuggestable", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


@pytest.mark.parametrize("kind", ["journal", "redis"])
def test_journal_storages_on_a_file_and_on_redis_run_a_study(tmp_path, corpus, mlflow_store, kind):
    study_name = f"{kind}-{uuid.uuid4().hex[:8]}"
    storage = f"journal://{tmp_path}/journal.log" if kind == "journal" else "redis://127.0.0.1:6379/0"
    spec = write_spec(tmp_path, corpus, study=study_name, n_trials=1)
    assert sweep(spec, storage) == 0
    from gptexp.sweep import load_sweep_spec
    from gptexp.sweep_study import open_storage

    study = optuna.load_study(study_name=study_name, storage=open_storage(storage, load_sweep_spec(spec)))
    try:
        assert [t.state for t in study.trials] == [TrialState.COMPLETE]
        parents, children = mlflow_runs(MlflowClient(mlflow_store), study_name)
        assert len(parents) == 1 and len(children) == 1
    finally:
        optuna.delete_study(study_name=study_name, storage=study._storage)


def test_an_unreachable_storage_is_one_line_exit_2(tmp_path, corpus, capsys):
    spec = write_spec(tmp_path, corpus, study="nowhere")
    capsys.readouterr()
    assert sweep(spec, "postgresql://u:hunter2@127.0.0.1:1/nowhere") == 2
    err = capsys.readouterr().err
    assert "cannot open Optuna storage postgresql://u:***@127.0.0.1:1/nowhere" in err
    assert "hunter2" not in err and len(err.strip().splitlines()) == 1


def test_a_grid_sweep_stops_once_every_grid_point_is_tried(tmp_path, corpus, mlflow_store):
    space = {"train.lr": {"type": "categorical", "choices": [1e-3, 2e-3]}}
    spec = write_spec(
        tmp_path, corpus, study="grid", space=space, n_trials=5, sampler={"name": "grid"}, pruner={"name": "none"}
    )
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert sweep(spec, storage) == 0
    study = optuna.load_study(study_name="grid", storage=storage)
    assert sorted(t.params["train.lr"] for t in study.trials) == [1e-3, 2e-3]


def wait_for(predicate, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def worker_pids(pid: int) -> list[int]:
    """The sweep's worker processes: the children of `pid` started by multiprocessing's spawn."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]
    pids = []
    for child in children:
        with contextlib.suppress(OSError), open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                pids.append(child)
    return pids


@pytest.mark.parametrize(
    "stop", ["SIGTERM to the parent", "Ctrl-C to the process group", "SIGKILL to a worker, then SIGTERM to the parent"]
)
def test_a_stopped_two_worker_sweep_leaves_no_run_and_no_trial_running(tmp_path, corpus, mlflow_store, stop):
    study_name = "stopped-" + "-".join(stop.split()[:2]).lower()
    spec = write_spec(tmp_path, corpus, study=study_name, n_trials=6)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    # Long trials: both workers are mid-trial when the signal comes.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptexp.cli",
            "sweep",
            "--config",
            str(spec),
            "--storage",
            storage,
            "--workers",
            "2",
            "--set",
            "train.num_epochs=50",
        ],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    client = MlflowClient(mlflow_store)

    def both_workers_training():
        _, children = mlflow_runs(client, study_name)
        return sum(c.info.status == "RUNNING" and "train_loss" in c.data.metrics for c in children) == 2

    try:
        assert wait_for(both_workers_training, 300, proc), (
            f"the two workers did not both start a trial: {proc.stdout.read() if proc.poll() is not None else ''}"
        )
        if stop.startswith("Ctrl-C"):
            os.killpg(proc.pid, signal.SIGINT)  # the terminal signals every process of the group
        else:
            if stop.startswith("SIGKILL"):  # e.g. out of memory: the parent must end that worker's trial
                os.kill(worker_pids(proc.pid)[0], signal.SIGKILL)
            proc.send_signal(signal.SIGTERM)  # a scheduler stops the parent
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "gptexp: interrupted" in out
    parents, children = mlflow_runs(client, study_name)
    assert [p.info.status for p in parents] == ["KILLED"]
    assert len(children) >= 2 and not [c for c in children if c.info.status == "RUNNING"]
    study = optuna.load_study(study_name=study_name, storage=storage)
    assert len(study.trials) >= 2 and TrialState.RUNNING not in [t.state for t in study.trials]
    for child in children:  # the interrupted trials: failed in Optuna, their runs ended KILLED
        trial = study.trials[int(child.data.tags["gptexp.trial"])]
        assert trial.state == TrialState.FAIL and child.data.tags["optuna.state"] == "FAIL"
        assert child.info.status == "KILLED" and child.data.tags["gptexp.status"] == "interrupted"
