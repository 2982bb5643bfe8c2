"""`make ui` serves the project's MLflow store on 127.0.0.1; the runs are found through its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

from mlflow.tracking import MlflowClient

from conftest import REPO, cli_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_ui_serves_the_store_and_finds_a_run_by_its_rest_api(mlflow_store):
    client = MlflowClient(mlflow_store)
    exp = client.create_experiment("ui-test")
    run_id = client.create_run(exp, run_name="ui-probe").info.run_id
    client.log_metric(run_id, "epoch_val_loss", 6.5, step=1)
    client.set_terminated(run_id)
    port = free_port()
    proc = subprocess.Popen(
        ["make", "-s", "ui", f"PORT={port}"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
    try:
        deadline, body = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    body = json.load(resp)
                    break
            except OSError:
                time.sleep(0.5)
        assert body is not None, f"the UI did not answer on port {port}"
        assert body["run"]["info"]["run_name"] == "ui-probe"
        assert body["run"]["data"]["metrics"][0]["key"] == "epoch_val_loss"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
