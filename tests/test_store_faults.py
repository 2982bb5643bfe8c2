"""A store that cannot be written, a disk that fills mid-run, a store two jobs open at once.

Tests run as root in CI, and root ignores file modes, so a chmod'ed folder proves nothing there.
Each test uses a fault that holds for root too: a regular file where a folder must be created
(ENOTDIR), the immutable attribute (chattr +i) where chmod would not bind, and the file-size
limit (RLIMIT_FSIZE, which binds root) to make a write fail the way a full disk does.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gptexp.cli import main

from conftest import TINY, cli_env

ONE_EPOCH = ["--set", "train.num_epochs=1", "--set", "sample.max_new_tokens=5"]


def all_runs(uri: str) -> list:
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids) if ids else []


def gptexp(args: list[str], uri: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gptexp.cli", *args],
        env=cli_env(MLFLOW_TRACKING_URI=uri),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


@contextlib.contextmanager
def unwritable(*paths: Path):
    """Paths this process cannot write: chmod for a normal user; for root, the immutable attribute."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in paths}
        for p, mode in modes.items():
            p.chmod(mode & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    made = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"root, and chattr +i is refused here ({made.stderr.strip()!r}): no way to make a file unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def test_two_trains_starting_on_a_store_that_does_not_exist_yet_both_finish(tmp_path):
    # Both processes find an empty store and would both create its tables ('table ... already exists').
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    procs = [
        gptexp(["train", "--config", str(TINY), "--experiment", "race", "--run-name", f"job-{i}", *ONE_EPOCH], uri)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outs]
    runs = all_runs(uri)
    assert sorted((r.info.run_name, r.info.status) for r in runs) == [("job-0", "FINISHED"), ("job-1", "FINISHED")]


def test_an_artifact_folder_that_cannot_be_made_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    # A regular file where the store's artifacts/ folder belongs: mkdir fails with ENOTDIR, for root too.
    (tmp_path / "artifacts").write_text("not a folder")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), "--experiment", "blocked", *ONE_EPOCH])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"gptexp: error: cannot write artifacts to {tmp_path}/artifacts/blocked (Not a directory")
    assert len(err.strip().splitlines()) == 1
    assert all_runs(uri) == []


def test_a_store_that_cannot_be_written_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    from gptexp.tracking import get_client

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    get_client(uri)  # the store exists and can be read: only writing it is impossible
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    capsys.readouterr()
    with unwritable(tmp_path / "mlflow.db", tmp_path):
        code = main(["train", "--config", str(TINY), "--experiment", "read-only", *ONE_EPOCH])
        err = capsys.readouterr().err
        runs = all_runs(uri)  # a read-only store can still be read
    assert code == 2
    assert err.startswith(f"gptexp: error: cannot write the MLflow store {tmp_path}/mlflow.db (")
    assert "point MLFLOW_TRACKING_URI at a writable store" in err and len(err.strip().splitlines()) == 1
    assert runs == []


def test_a_write_that_fails_mid_run_ends_it_failed_with_one_line_naming_the_file(tmp_path):
    # A file-size limit makes the first checkpoint's weights (13 MB for the tiny preset) fail to
    # write with EFBIG, as a full disk fails with ENOSPC: torch and safetensors used to report
    # either one as 'unexpected pos 7616 vs 7508' or a Rust error in a traceback.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri)  # create the store first, so the limit only has to leave room for one run's rows
    limit = (tmp_path / "mlflow.db").stat().st_size + 4 * 2**20

    def limit_file_size():  # Python ignores SIGXFSZ, so the write fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = gptexp(["train", "--config", str(TINY), "--experiment", "full", *ONE_EPOCH], uri, preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("gptexp: run failed: file too large writing "), err[-3000:]
    assert last.endswith(
        "model.safetensors: raise the file-size limit (ulimit -f) or point MLFLOW_TRACKING_URI elsewhere"
    )
    (run,) = all_runs(uri)
    assert run.info.status == "FAILED"
    assert "File too large" in run.data.tags["gptexp.error"]
    checkpoints = Path(run.info.artifact_uri.removeprefix("file://")) / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # no half-written epoch left behind
