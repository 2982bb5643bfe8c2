"""`make ui`, seen in a real browser: headless Chromium opens the URL `make ui` prints, on a store
holding two training runs and a sweep, and reads what MLflow's UI renders.

Chromium is Debian's `chromium` package (`.ci/run` installs it when missing); without it the
test is skipped, naming the package.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from gptexp.cli import main
from gptexp.tracking import experiment_id

from conftest import REPO, TINY, cli_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXPERIMENT = "ui-tests"
# Loaded CI machines take tens of seconds to start MLflow's server and to render its JS app.
DEADLINE_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_text(url: str, profile: Path) -> str:
    """The visible text of `url` once Chromium has run its scripts (a DOM dump, tags stripped)."""
    out = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--window-size=1600,1000",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    out = re.sub(r"<(script|style)\b.*?</\1>", " ", out, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", out)))


def rendered(url: str, profile: Path, *wanted: str, proc) -> str:
    """Poll the page until every string in `wanted` shows (MLflow's UI renders after its API calls)."""
    deadline, text = time.monotonic() + DEADLINE_S, ""
    while time.monotonic() < deadline and proc.poll() is None:
        text = page_text(url, profile)
        if all(w in text for w in wanted):
            return text
    missing = [w for w in wanted if w not in text]
    raise AssertionError(f"{url} never showed {missing}; it showed: {text[:1500]}")


@pytest.fixture
def corpus(tmp_path, verdict_text):
    path = tmp_path / "verdict-head.txt"
    path.write_text(verdict_text[:3000], encoding="utf-8")
    return path


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install chromium)")
def test_make_ui_opens_the_model_training_table_with_named_runs_losses_a_sweep_and_comparable_plots(
    mlflow_store, corpus, tmp_path
):
    overrides = {"train.num_epochs": 1, "data.source": str(corpus), "sample.max_new_tokens": 3}
    base = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")] + ["--experiment", EXPERIMENT]
    client = MlflowClient(mlflow_store)
    exp = experiment_id(client, EXPERIMENT)  # exists before `make ui` starts, so that it prints its URL
    port = free_port()
    proc = subprocess.Popen(
        # -o: the environment is the one this test runs in; make must not rebuild it mid-test.
        ["make", "-s", "-o", ".venv/.installed-stamp", "ui", f"PORT={port}"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        url = ""
        while proc.poll() is None and not url:
            line = proc.stdout.readline()
            url = next(iter(re.findall(rf"(http://\S+/#/experiments/{exp}/runs\S*)", line)), "")
        assert "workflowType=machine_learning" in url
        # The runs are made while the server starts.
        assert main(["train", "--config", str(TINY), *base]) == 0
        assert main(["train", "--config", str(TINY), *base, "--set", "train.lr=5e-3", "--note", "the faster one"]) == 0
        spec = tmp_path / "sweep.yaml"
        spec.write_text(
            yaml.safe_dump(
                {
                    "study": "ui",
                    "experiment": EXPERIMENT,
                    "base": {"config": str(TINY), "overrides": overrides},
                    "sampler": {"name": "random", "seed": 1},
                    "pruner": {"name": "none"},
                    "n_trials": 2,
                    "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
                }
            )
        )
        assert main(["sweep", "--config", str(spec), "--storage", f"sqlite:///{tmp_path}/optuna.db"]) == 0
        runs = {r.info.run_name: r for r in client.search_runs([exp])}
        # Each name: the preset, then what --set changed, in the order given.
        first, second = (
            "tiny epochs=1 data=verdict-head max_new_tokens=3",
            "tiny epochs=1 data=verdict-head max_new_tokens=3 lr=5e-3",
        )
        assert {first, second, "sweep-ui"} <= set(runs)
        trial = next(name for name in runs if name.startswith("trial 0 · lr="))
        parent = runs["sweep-ui"].info.run_id
        val_loss = str(runs[second].data.metrics["epoch_val_loss"])[:5]  # the table cuts long numbers

        profile = tmp_path / "chromium"
        table = rendered(url, profile, first, second, "epoch_val_loss", val_loss, "sweep-ui", proc=proc)
        assert "Model training" in table and "epoch_train_loss" in table

        ui = url.split("/#/")[0]
        sweep_page = rendered(
            f"{ui}/#/experiments/{exp}/runs/{parent}?workflowType=machine_learning", profile, "Child runs", proc=proc
        )
        assert trial in sweep_page  # the nested trial, listed on its sweep's parent run

        pair = '","'.join(runs[n].info.run_id for n in (first, second))
        compare = rendered(
            f'{ui}/#/compare-runs?runs=["{pair}"]&experiments=["{exp}"]&workflowType=machine_learning',
            profile,
            "Artifacts",
            "loss.png",
            proc=proc,
        )
        assert "No common artifacts" not in compare
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
