"""Sweeps across machines: one `gptexp server` (a real `mlflow server` on PostgreSQL, proxied
artifacts), one PostgreSQL Optuna study, and "machines" that share nothing else: each worker is a
process with its own working directory, HOME, TMPDIR and data folder, pinned to one CPU.

PostgreSQL at 127.0.0.1:5432 (trust auth): the databases are created and dropped here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import optuna
import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import REPO, TINY, cli_env

PG = "postgresql://root@127.0.0.1:5432"
# Secrets a worker holds: MLflow's basic-auth password and the storage URL's password (the local
# PostgreSQL trusts loopback, so it accepts any). Neither may be found in what the sweep leaves.
TRACKING_PASSWORD = f"trk-{uuid.uuid4().hex}"
STORAGE_PASSWORD = f"pgpw-{uuid.uuid4().hex}"
STATUS_OF = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
DEADLINE_S = 600  # every wait polls; this is only how long before a hang is called one


def wait_until(predicate, what: str, procs=(), timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p in procs:
            assert p.poll() is None, f"{what}: a process ended first (exit {p.returncode})"
        time.sleep(0.2)
    raise AssertionError(f"{what}: not within {timeout} s")


def create_database(prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Machine:
    """A folder standing for one machine: its own cwd, HOME, TMPDIR and data folder; the same
    tracking server. Everything it prints is kept, to look for secrets in."""

    def __init__(self, root: Path, name: str, server: str, outputs: list[str], cpu: int):
        self.dir = root / name
        for sub in ("home", "tmp", "data"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "data" / "registry.yaml", self.dir / "data" / "registry.yaml")
        self.env = cli_env(
            MLFLOW_TRACKING_URI=server,
            MLFLOW_TRACKING_USERNAME="gptexp",
            MLFLOW_TRACKING_PASSWORD=TRACKING_PASSWORD,
            HOME=self.dir / "home",
            TMPDIR=self.dir / "tmp",
            GPTEXP_DATA_DIR=self.dir / "data",
        )
        for inherited in ("XDG_CACHE_HOME", "GPTEXP_CACHE_DIR"):
            self.env.pop(inherited, None)
        self.outputs, self.cpu = outputs, cpu

    def start(self, *args: str) -> subprocess.Popen:
        cpu = self.cpu
        return subprocess.Popen(
            [sys.executable, "-m", "gptexp", *args],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            # One core per machine, so each worker trains on one thread (cores // workers).
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu % os.cpu_count()}),
        )

    def finish(self, proc: subprocess.Popen, timeout: float = DEADLINE_S) -> tuple[int, str]:
        try:
            out, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.outputs.append(out)
        return proc.returncode, out

    def run(self, *args: str) -> str:
        code, out = self.finish(self.start(*args))
        assert code == 0, f"gptexp {' '.join(args)} exited {code}:\n{out}"
        return out

    def cache(self) -> Path:
        return self.dir / "home" / ".cache" / "gptexp" / "runs"


@pytest.fixture(scope="module")
def outputs():
    return []


@pytest.fixture(scope="module")
def server(tmp_path_factory, outputs):
    """`gptexp server` on a free port, its runs in a fresh PostgreSQL database, artifacts in a temp folder."""
    root = tmp_path_factory.mktemp("server")
    db = create_database("gptexp_server")
    port = free_port()
    log = root / "server.log"
    env = cli_env(
        # Few connections each: the PostgreSQL server admits 100, for every test run on this machine.
        MLFLOW_SQLALCHEMYSTORE_POOL_SIZE=2,
        MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW=2,
    )
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gptexp", "server", "--port", str(port), "--workers", "2"]
            + ["--backend-store-uri", f"{PG}/{db}", "--artifacts-destination", str(root / "artifacts")],
            cwd=root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        wait_until(healthy, f"the MLflow server at {url} (log: {log})", [proc])
        assert f"export MLFLOW_TRACKING_URI={url}" in log.read_text()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # this process's own downloads
            yield {"url": url, "db": db, "artifacts": root / "artifacts", "log": log}
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with open(log, errors="replace") as f:
            outputs.append(f.read())
        drop_database(db)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, verdict_text):
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(verdict_text[:4000], encoding="utf-8")
    return path


N_TRIALS = 6


def write_spec(path: Path, corpus: Path, study: str) -> Path:
    spec = {
        "study": study,
        "experiment": "remote-sweep",
        "base": {
            "config": str(TINY),
            "overrides": {"train.num_epochs": 3, "data.source": str(corpus), "sample.max_new_tokens": 5},
        },
        "sampler": {"name": "tpe", "seed": 7},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "n_trials": N_TRIALS,
        "space": {
            "model.context_length": {"type": "categorical", "choices": [16, 32]},
            "train.batch_size": {"type": "categorical", "choices": [4, 8]},
            "train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        },
        "enqueue": [{"model.context_length": 32, "train.batch_size": 8, "train.lr": 1e-3}],
        # A loaded machine can hold a worker back for seconds: only a killed one misses 30 s of beats.
        "heartbeat": {"interval": 2, "grace": 30},
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def running_trial_of(machine: Machine, storage_db: str) -> int | None:
    """The id of a RUNNING trial, with a heartbeat recorded, whose run this machine trains (its
    checkpoints are in this machine's cache), else None."""
    with psycopg.connect(f"{PG}/{storage_db}", autocommit=True) as con:
        if con.execute("SELECT to_regclass('trial_heartbeats')").fetchone()[0] is None:
            return None  # the workers have not created Optuna's tables yet
        rows = con.execute(
            "SELECT t.trial_id, a.value_json FROM trials t "
            "JOIN trial_heartbeats h ON h.trial_id = t.trial_id "
            "JOIN trial_user_attributes a ON a.trial_id = t.trial_id AND a.key = 'mlflow_run_id' "
            "WHERE t.state = 'RUNNING'"
        ).fetchall()
    for trial_id, run_json in rows:
        if (machine.cache() / json.loads(run_json) / "checkpoints").is_dir():
            return trial_id
    return None


def kill_mid_trial(proc: subprocess.Popen, machine: Machine, storage_db: str) -> None:
    """SIGKILL the worker while a trial of its own is RUNNING. It is frozen (SIGSTOP) before the
    storage is read, so that it cannot end that trial between the look and the kill."""

    def frozen_mid_trial():
        os.killpg(proc.pid, signal.SIGSTOP)
        if running_trial_of(machine, storage_db) is not None:
            return True
        os.killpg(proc.pid, signal.SIGCONT)
        return False

    wait_until(frozen_mid_trial, "a trial running on the worker to kill", [proc])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def sweep(server, corpus, tmp_path_factory, outputs):
    """Three workers started at once on a fresh PostgreSQL storage; worker 0 is SIGKILLed mid-trial
    and started again. Returns what they did, once all have ended."""
    root = tmp_path_factory.mktemp("machines")
    storage_db = create_database("gptexp_study")
    storage = f"postgresql://root:{STORAGE_PASSWORD}@127.0.0.1:5432/{storage_db}"
    study = "across-machines"
    machines = [Machine(root, f"worker-{i}", server["url"], outputs, cpu=i) for i in range(3)]
    command = ["sweep", "--config", "", "--storage", storage]
    specs = [write_spec(m.dir / "sweep.yaml", corpus, study) for m in machines]  # each machine its own copy
    t0 = time.monotonic()
    try:
        procs = [m.start(*command[:2], str(spec), *command[3:]) for m, spec in zip(machines, specs, strict=True)]
        kill_mid_trial(procs[0], machines[0], storage_db)
        machines[0].outputs.append(procs[0].stdout.read())
        restarted = machines[0].start(*command[:2], str(specs[0]), *command[3:])
        results = [m.finish(p) for m, p in zip(machines, [restarted, *procs[1:]], strict=True)]
        seconds = time.monotonic() - t0
        print(f"\nthe three-worker sweep took {seconds:.0f} s")
        yield {
            "study": optuna.load_study(study_name=study, storage=storage),
            "name": study,
            "results": results,
            "client": MlflowClient(server["url"]),
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        drop_database(storage_db)


def sweep_runs(client, study: str):
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.`gptexp.study` = '{study}'"
    )
    parents = [r for r in runs if r.data.tags.get("gptexp.job") == "sweep"]
    children = [r for r in runs if r.data.tags.get("gptexp.job") == "trial"]
    return parents, children


def test_workers_started_together_on_fresh_storage_finish_the_study_once_whatever_dies(sweep):
    for code, out in sweep["results"]:
        assert code == 0, out
        assert "Traceback" not in out
    trials = sweep["study"].trials
    states = [t.state for t in trials]
    assert TrialState.RUNNING not in states
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == N_TRIALS
    # The killed worker's trial: failed once its heartbeat was stale, and run again (same point).
    (killed,) = [t for t in trials if t.state == TrialState.FAIL]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params
    # No other point twice: not across workers, not after the restart; the enqueued point once.
    points = [tuple(sorted(t.params.items())) for t in trials if t.number != killed.number]
    assert len(set(points)) == len(points) == N_TRIALS
    assert sum(t.params == {"model.context_length": 32, "train.batch_size": 8, "train.lr": 1e-3} for t in trials) == 1


def test_the_study_has_one_parent_run_and_one_child_per_trial_that_tells_the_truth(sweep):
    client, study = sweep["client"], sweep["study"]
    parents, children = sweep_runs(client, sweep["name"])
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    by_number = {int(c.data.tags["gptexp.trial"]): c for c in children}
    assert len(by_number) == len(children) and set(by_number) == {t.number for t in study.trials}
    for t in study.trials:
        child = by_number[t.number]
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert child.info.status == STATUS_OF[t.state.name], t.number
        assert child.data.tags["optuna.state"] == t.state.name
        if t.state == TrialState.COMPLETE:  # its checkpoints and samples went up to the server
            rid = child.info.run_id
            files = {a.path for a in client.list_artifacts(rid, "checkpoints")}
            assert "checkpoints/index.json" in files and "checkpoints/epoch-0003" in files
            samples = {a.path for a in client.list_artifacts(rid, "samples")}
            assert "samples/samples.json" in samples and "samples/epoch-003.txt" in samples


def test_each_worker_prints_one_line_per_trial_and_no_run_urls(sweep):
    trial_lines = 0
    for _, out in sweep["results"]:
        assert "View run" not in out and "🏃" not in out
        trial_lines += sum(line.startswith("trial ") for line in out.splitlines())
    assert trial_lines >= N_TRIALS


def train_until_checkpointed(machine: Machine, client, corpus: Path) -> str:
    """A run on `machine` killed (SIGKILL) once its first checkpoint is on the server; its id."""
    proc = machine.start(
        "train", "--config", str(TINY), "--experiment", "remote-runs", "--set", f"data.source={corpus}"
    )
    exp = wait_until(lambda: client.get_experiment_by_name("remote-runs"), "the experiment", [proc])

    def checkpointed():
        for run in client.search_runs([exp.experiment_id]):
            if "checkpoints/index.json" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}:
                return run.info.run_id
        return None

    run_id = wait_until(checkpointed, "a checkpoint of the run on the server", [proc])
    os.killpg(proc.pid, signal.SIGKILL)
    machine.finish(proc)
    return run_id


def test_every_command_works_from_a_fresh_directory_through_the_server_alone(sweep, server, corpus, tmp_path):
    client = sweep["client"]
    there = Machine(tmp_path, "there", server["url"], [], cpu=0)
    killed = train_until_checkpointed(there, client, corpus)
    here = Machine(tmp_path, "here", server["url"], there.outputs, cpu=1)

    out = here.run("train", "--resume", killed)
    assert f"run {killed} finished" in out
    assert client.get_run(killed).info.status == "FINISHED"
    assert (here.cache() / killed / "checkpoints").is_dir()  # downloaded into the cache, by run id

    (parent,), _ = sweep_runs(client, sweep["name"])
    spec = reproduce_spec(client, killed, corpus, here.dir / "remote-check.yaml")
    commands = {  # independent of each other: run side by side, from fresh folders of their own
        "eval": ("eval", "--run", killed),
        "generate": ("generate", "--run", killed, "--prompt", "Every effort moves you", "--max-new-tokens", "5"),
        "rerun": ("rerun", killed, "--quiet"),
        "reproduce": ("reproduce", str(spec), "--quiet"),
        "report": ("report", "--study", sweep["name"]),
        "best": ("train", "--config", f"runs:/{parent.info.run_id}/best/config.yaml", "--experiment", "remote-best"),
    }
    machines = {name: Machine(tmp_path, name, server["url"], here.outputs, cpu=i) for i, name in enumerate(commands)}
    procs = {name: machines[name].start(*args) for name, args in commands.items()}
    out = {}
    for name, proc in procs.items():
        code, out[name] = machines[name].finish(proc)
        assert code == 0, f"gptexp {' '.join(commands[name])} exited {code}:\n{out[name]}"

    assert "validation" in out["eval"]
    assert out["generate"].startswith("Every effort moves you")
    assert "identical" in out["rerun"]  # the resumed run's numbers, bit for bit, again
    assert "verdict: pass" in out["reproduce"]  # and the spec pinned from them on the server
    assert len([line for line in out["report"].splitlines() if line.strip()]) > N_TRIALS
    (retrained,) = client.search_runs([client.get_experiment_by_name("remote-best").experiment_id])
    history = client.get_metric_history(retrained.info.run_id, "epoch_val_loss")
    assert min(m.value for m in history) == sweep["study"].best_value  # bit for bit on CPU fp32

    (rerun,) = client.search_runs(
        [client.get_experiment_by_name("remote-runs").experiment_id],
        filter_string=f"tags.`gptexp.rerun_of` = '{killed}'",
    )
    compared = here.run("compare", killed, rerun.info.run_id)
    assert killed[:8] in compared and rerun.info.run_id[:8] in compared

    pid = parent.info.run_id
    assert {"plots/optimization_history.png", "plots/intermediate_values.png"} <= {
        a.path for a in client.list_artifacts(pid, "plots")
    }
    table = Path(client.download_artifacts(pid, "trials/trials.csv", str(tmp_path)))
    assert len(table.read_text().strip().splitlines()) == len(sweep["study"].trials) + 1


def reproduce_spec(client, run_id: str, corpus: Path, path: Path) -> Path:
    """A reproduce spec pinning what the run logged on the server (evals and last sample)."""
    import hashlib

    config = yaml.safe_load(Path(client.download_artifacts(run_id, "config/config.yaml", str(path.parent))).read_text())

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run_id, key)}

    train, val, seen = history("train_loss"), history("val_loss"), history("tokens_seen")
    epochs = config["train"]["num_epochs"]
    text = Path(client.download_artifacts(run_id, f"samples/epoch-{epochs:03d}.txt", str(path.parent))).read_text()
    spec = {
        "name": "remote-check",
        "seed": config["train"]["seed"],
        "corpus": {"name": str(corpus), "sha256": hashlib.sha256(corpus.read_bytes()).hexdigest()},
        "impl": config["model"]["impl"],
        "precision": config["train"]["precision"],
        "device": config["train"]["device"],
        "config": config,
        "expected": {
            "evals": [
                {"step": s, "train_loss": train[s], "val_loss": val[s], "tokens_seen": int(seen[s])}
                for s in sorted(val)
            ],
            "sample": {"epoch": epochs, "prompt": config["sample"]["start_context"], "text": text.rstrip("\n")},
        },
        "tolerances": {"train_loss": 1e-3, "val_loss": 1e-3, "tokens_seen": 0},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_an_upload_cut_short_leaves_the_previous_checkpoint_in_use(sweep, server, tmp_path, monkeypatch):
    """The uploader sends an epoch's folder before the index that names it: a folder on the server
    that the index does not name yet (its upload cut short) is never the one resumed or evaluated."""
    from gptexp import artifact_cache, jobs

    client = sweep["client"]
    (child, *_) = [c for c in sweep_runs(client, sweep["name"])[1] if c.info.status == "FINISHED"]
    rid = child.info.run_id
    partial = tmp_path / "epoch-0009"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)  # a weights file cut short
    client.log_artifacts(rid, str(partial), "checkpoints/epoch-0009")
    monkeypatch.setenv("GPTEXP_CACHE_DIR", str(tmp_path / "cache"))
    assert jobs.run_checkpoint(client, rid).name == "epoch-0003"
    assert not (artifact_cache.run_dir(rid) / "checkpoints" / "epoch-0009").exists()


def test_the_passwords_are_nowhere_in_the_servers_database_artifacts_or_output(sweep, server, outputs):
    dump = subprocess.run(
        ["pg_dump", "-h", "127.0.0.1", "-U", "root", server["db"]], capture_output=True, text=True, check=True
    ).stdout
    assert "remote-sweep" in dump  # the dump holds the runs
    files = [p.read_bytes() for p in server["artifacts"].rglob("*") if p.is_file()]
    outputs = [*outputs, server["log"].read_text(errors="replace")]
    assert files
    for secret in (TRACKING_PASSWORD, STORAGE_PASSWORD):
        assert secret not in dump
        assert not [b for b in files if secret.encode() in b]
        assert not [o for o in outputs if secret in o]
