"""Workers of one study, in separate processes (as on separate machines): they open a fresh storage
at once, and ask for trials at once, and never propose the same point twice (the grid: each point once).

Real Optuna storages (SQLite, and PostgreSQL at 127.0.0.1:5432, a database created and dropped
here); no training: a trial is told at once, so that only the proposing is tested.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid

import optuna
import psycopg
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

from gptexp.sweep_spec import parse_spec
from gptexp.sweep_study import _transient, open_storage, study_sampler

from conftest import TINY

PG = "postgresql://root@127.0.0.1:5432"
# 2 x 2 x 3 = 12 points: small enough that independent streams would meet.
SPACE = {
    "model.context_length": {"type": "categorical", "choices": [16, 32]},
    "train.batch_size": {"type": "categorical", "choices": [4, 8]},
    "train.lr": {"type": "categorical", "choices": [1e-3, 2e-3, 4e-3]},
}


@pytest.fixture
def fresh_pg_database():
    name = f"gptexp_points_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG}/{name}"
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def write_spec(tmp_path, **changes):
    spec = {
        "study": "points",
        "base": {"config": str(TINY)},
        "sampler": {"name": "tpe", "seed": 7},
        "pruner": {"name": "none"},
        "n_trials": 12,
        "space": SPACE,
        "heartbeat": {"interval": 5, "grace": 60},
    }
    spec.update(changes)
    path = tmp_path / f"{spec['study']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _ask_and_tell(spec_path: str, storage_url: str, asks: int, start) -> None:
    """One worker: open the storage, join (or create) the study, and ask `asks` trials, each told
    COMPLETE at once. Asking is what `gptexp sweep`'s workers do, under the study lock."""
    from gptexp.sweep_lock import StudyLock
    from gptexp.sweep_trials import _draw_all

    spec = parse_spec(spec_path)
    start.wait()  # every worker leaves this line together
    storage = open_storage(storage_url, spec)
    lock = StudyLock(storage_url, spec.study)
    with lock:
        study = optuna.create_study(study_name=spec.study, storage=storage, load_if_exists=True)
    study.sampler = study_sampler(spec)
    for _ in range(asks):
        with lock:
            trial = study.ask()
            _draw_all(spec, study, trial)
        study.tell(trial, 0.0)


def run_workers(spec_path, storage_url: str, workers: int, asks: int) -> None:
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(workers)
    procs = [ctx.Process(target=_ask_and_tell, args=(str(spec_path), storage_url, asks, start)) for _ in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0] * workers


def points(storage_url: str, study: str) -> list[tuple]:
    trials = optuna.load_study(study_name=study, storage=storage_url).trials
    assert all(t.state == TrialState.COMPLETE for t in trials)
    return [tuple(sorted(t.params.items())) for t in trials]


def test_workers_started_together_on_a_fresh_postgresql_storage_all_join_one_study(tmp_path, fresh_pg_database):
    spec = write_spec(tmp_path)
    run_workers(spec, fresh_pg_database, workers=4, asks=2)
    assert [s.study_name for s in optuna.get_all_study_summaries(fresh_pg_database)] == ["points"]
    assert len(set(points(fresh_pg_database, "points"))) == 8  # no two workers proposed the same point


def test_a_schema_race_is_recognised_as_one_to_retry(fresh_pg_database):
    # What two processes creating Optuna's tables at once meet: a duplicate key, as PostgreSQL raises it.
    engine = sqlalchemy.create_engine(fresh_pg_database)
    with engine.begin() as con:
        con.execute(sqlalchemy.text("CREATE TABLE t (id int primary key)"))
        con.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    with pytest.raises(sqlalchemy.exc.IntegrityError) as race, engine.begin() as con:
        con.execute(sqlalchemy.text("INSERT INTO t VALUES (1)"))
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = race.value  # how Optuna's RDBStorage reports it
    assert _transient(race.value) and _transient(wrapped)
    with pytest.raises(sqlalchemy.exc.ProgrammingError) as typo, engine.begin() as con:
        con.execute(sqlalchemy.text("SELEC 1"))
    assert not _transient(typo.value)  # a real error is not retried
    engine.dispose()


def test_processes_asking_at_once_on_sqlite_never_propose_the_same_point(tmp_path):
    spec = write_spec(tmp_path)
    storage = f"sqlite:///{tmp_path}/optuna.db"
    run_workers(spec, storage, workers=3, asks=4)
    assert len(set(points(storage, "points"))) == 12  # the whole space, each point once


def test_the_grid_gives_each_point_once_across_processes(tmp_path):
    spec = write_spec(tmp_path, study="grid", sampler={"name": "grid"})
    storage = f"sqlite:///{tmp_path}/optuna.db"
    run_workers(spec, storage, workers=3, asks=4)
    assert len(set(points(storage, "grid"))) == 12


def test_one_worker_from_scratch_proposes_the_same_points_again(tmp_path):
    spec = write_spec(tmp_path, space={"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    first, second = f"sqlite:///{tmp_path}/a.db", f"sqlite:///{tmp_path}/b.db"
    run_workers(spec, first, workers=1, asks=5)
    run_workers(spec, second, workers=1, asks=5)
    assert points(first, "points") == points(second, "points")
    assert len(set(points(first, "points"))) == 5
