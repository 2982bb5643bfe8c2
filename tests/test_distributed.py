"""One `gptexp train` run on several processes (torchrun, DDP over gloo): the same numbers as one process.

Every job here is real: 2 CPU processes started by torchrun's own agent (`gptexp train --nproc 2`,
or `python -m torch.distributed.run` for tests/dist_driver.py), a real MLflow store, real signals.
The tiny preset with train_ratio 0.89 gives 8 training steps an epoch and a validation loader of
9 windows in batches of 8, so the last validation batch leaves rank 0 nothing: the uneven case.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from gptexp import jobs
from gptexp.cli import main
from gptexp.config import load_config
from gptexp.data import prepare_data
from gptexp.evaluation import calc_loss_loader, evaluate_split
from gptexp.model import GPTModel
from gptexp.runtime import physical_cores
from gptexp.tracking import local_artifact_dir

from conftest import REPO, TINY, cli_env

SETTINGS = ["data.train_ratio=0.89", "train.num_epochs=2"]
EXACT = [*SETTINGS, "model.drop_rate=0"]  # dropout masks depend on the batch's shape, so the same only without
# The equivalence runs accumulate 2 micro-batches a step: on 2 processes each rank's 4 windows go
# through as 2 + 2, the first without DDP's gradient sync (no_sync), the second with it.
ACCUM = [*EXACT, "train.grad_accum_steps=2"]
DEADLINE = 600  # seconds; the waits end as soon as their condition holds


def sets(settings: list[str]) -> list[str]:
    return [arg for item in settings for arg in ("--set", item)]


def gptexp(*args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gptexp", *args],
        cwd=REPO,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )


def only_run(client, experiment: str):
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def last_weights(client, run_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(jobs.run_checkpoint(client, run_id, "last") / "model.safetensors"))


def wait_for(predicate, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert proc.poll() is None, f"the job ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within {DEADLINE} s"
        time.sleep(0.05)


def worker_pid(launcher: subprocess.Popen, local_rank: int) -> int | None:
    """The pid of the launcher's worker of `local_rank` (torchrun's agent runs in the launcher's process)."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher.pid and f"LOCAL_RANK={local_rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def client(mlflow_store):
    return MlflowClient(mlflow_store)


@pytest.fixture(scope="module")
def one_process(client):
    assert main(["train", "--config", str(TINY), *sets(ACCUM), "--experiment", "ddp-one"]) == 0
    return only_run(client, "ddp-one").info.run_id


@pytest.fixture(scope="module")
def two_processes(client):
    done = gptexp("train", "--nproc", "2", "--config", str(TINY), *sets(ACCUM), "--experiment", "ddp-two")
    assert done.returncode == 0, done.stderr
    return only_run(client, "ddp-two").info.run_id


def assert_same_numbers(client, run_a: str, run_b: str, tol: float) -> None:
    for key in ("train_loss", "val_loss", "epoch_train_loss", "epoch_val_loss", "tokens_seen", "lr"):
        a, b = history(client, run_a, key), history(client, run_b, key)
        assert [s for s, _ in a] == [s for s, _ in b], key
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=tol, rel=0), key
    wa, wb = last_weights(client, run_a), last_weights(client, run_b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tol


def test_two_processes_log_the_one_process_losses_at_every_eval_step_and_end_with_its_weights(
    client, one_process, two_processes
):
    assert [s for s, _ in history(client, two_processes, "val_loss")] == [0, 5, 10, 15]
    assert_same_numbers(client, two_processes, one_process, 1e-4)
    # tokens_seen counts both ranks: 8 windows of 64 tokens a step, whoever computed them.
    assert history(client, two_processes, "tokens_seen")[:2] == [(0, 512.0), (5, 3072.0)]


def test_grad_accum_steps_2_on_one_process_is_the_same_training_as_whole_batches(client, one_process):
    assert client.get_run(one_process).data.params["train.grad_accum_steps"] == "2"
    assert main(["train", "--config", str(TINY), *sets(EXACT), "--experiment", "ddp-whole"]) == 0
    whole = only_run(client, "ddp-whole")
    assert whole.data.params["train.grad_accum_steps"] == "1"
    assert_same_numbers(client, whole.info.run_id, one_process, 1e-4)


def test_a_two_process_job_is_one_finished_run_recording_where_it_ran(client, two_processes):
    run = client.get_run(two_processes)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    tags = run.data.tags
    assert (tags["gptexp.world_size"], tags["gptexp.backend"], tags["gptexp.nodes"], tags["gptexp.devices"]) == (
        "2",
        "gloo",
        "1",
        "cpu x2",
    )
    assert tags["gptexp.threads"] == str(max(1, physical_cores() // 2))  # the cores shared by the 2 processes
    folder = jobs.run_checkpoint(client, two_processes, "last")
    state = torch.load(folder / "state.pt", weights_only=True)
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and torch.equal(ranks[0]["torch"], state["rng"]["torch"])
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # each rank its own dropout stream


def test_a_two_process_runs_checkpoints_load_in_eval_and_generate(client, two_processes, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", two_processes, "--no-track"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("validation")]
    assert float(line.split()[1]) == pytest.approx(
        client.get_run(two_processes).data.metrics["epoch_val_loss"], abs=5e-5
    )  # the table prints 4 decimals
    assert main(["generate", "--run", two_processes, "--prompt", "Every effort", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("Every effort")


def torchrun_driver(mode: str, out: Path, settings: list[str]) -> list[dict]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(REPO / "tests" / "dist_driver.py"),
            mode,
            str(out),
            str(TINY),
            *settings,
        ],
        cwd=REPO,
        env=cli_env(OMP_NUM_THREADS=1),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_the_ranks_shares_are_the_books_batches_and_sharded_losses_the_one_process_values(tmp_path):
    ranks = torchrun_driver("shards", tmp_path, EXACT)
    config = load_config(TINY, EXACT)
    data = prepare_data(config)
    # One process, the same sequence: two shuffled epochs from the seed, the validation batches.
    torch.manual_seed(config.train.seed)
    epochs = [[inputs for inputs, _ in data.train_loader] for _ in range(2)]
    val = [inputs for inputs, _ in data.val_loader]
    rng = torch.get_rng_state()
    for e, epoch in enumerate(epochs):
        assert len(epoch) == 8
        for k, batch in enumerate(epoch):
            shares = [r["epochs"][e][k] for r in ranks]
            assert [len(s) for s in shares] == [4, 4]
            assert torch.equal(torch.cat(shares), batch), (e, k)
    assert [[len(s) for s in r["val"]] for r in ranks] == [[4, 0], [4, 1]]  # the last batch: one window
    assert all(torch.equal(torch.cat([r["val"][k] for r in ranks]), val[k]) for k in range(2))
    # Rank 0 drew from the random stream exactly what the one-process loaders drew.
    assert torch.equal(ranks[0]["rng"], rng)

    torch.manual_seed(config.train.seed)
    model = GPTModel(config.model_cfg()).eval()
    with torch.inference_mode():
        split = evaluate_split(model, data.val_ids, config.model.context_length, "cpu", 3)
        losses = [
            calc_loss_loader(data.val_loader, model, "cpu"),
            calc_loss_loader(data.train_loader, model, "cpu", num_batches=3),
        ]
    for r in ranks:
        assert r["split"][1] == split.tokens
        assert r["split"][0] == pytest.approx(split.loss, abs=1e-6, rel=0)
        assert r["losses"] == pytest.approx(losses, abs=1e-6, rel=0)


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    ranks = torchrun_driver("nan", tmp_path, EXACT)
    for r in ranks:
        assert r["raised"] == "NonFiniteLoss"
        assert "training loss is nan at step 3 (epoch 1)" in r["message"]


@pytest.fixture(scope="module")
def uninterrupted(client):
    """A two-process run with dropout: the reference the killed-and-resumed run must match."""
    done = gptexp(
        "train",
        "--nproc",
        "2",
        "--config",
        str(TINY),
        *sets([*SETTINGS, "train.num_epochs=3"]),
        "--experiment",
        "ddp-uninterrupted",
    )
    assert done.returncode == 0, done.stderr
    return only_run(client, "ddp-uninterrupted").info.run_id


def test_sigkill_of_one_rank_fails_the_run_and_resume_finishes_it_with_the_uninterrupted_metrics(client, uninterrupted):
    experiment = "ddp-killed"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptexp",
            "train",
            "--nproc",
            "2",
            "--config",
            str(TINY),
            *sets([*SETTINGS, "train.num_epochs=3"]),
            "--experiment",
            experiment,
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def in_epoch_2() -> bool:  # the eval point at step 10: rank 0 has logged it, 6 steps into epoch 2
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp is not None else []
            return bool(runs) and any(m.step == 10 for m in client.get_metric_history(runs[0].info.run_id, "val_loss"))

        wait_for(in_epoch_2, launcher, "eval point at step 10")
        os.kill(worker_pid(launcher, 1), signal.SIGKILL)
        _, err = launcher.communicate(timeout=DEADLINE)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 1
    assert err.strip().splitlines()[-1].startswith("gptexp: rank 1 (pid ")
    assert "was killed by SIGKILL; the job stopped" in err
    run = only_run(client, experiment)
    assert run.info.status == "FAILED"
    assert "lost contact with another process" in run.data.tags["gptexp.error"]
    assert [s for s, _ in history(client, run.info.run_id, "epoch_val_loss")] == [1]  # stopped in epoch 2
    assert (local_artifact_dir(client, run.info.run_id) / "checkpoints" / "epoch-0001" / "state.pt").is_file()

    done = gptexp("train", "--resume", run.info.run_id, "--nproc", "2")
    assert done.returncode == 0, done.stderr
    resumed = client.get_run(run.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert len(client.search_runs([resumed.info.experiment_id])) == 1
    # System metrics (system/...) sample the machine, not the run's results: left out here.
    want = {k: v for k, v in client.get_run(uninterrupted).data.metrics.items() if not k.startswith("system/")}
    assert {k for k in resumed.data.metrics if not k.startswith("system/")} == set(want)
    for key in sorted(set(want) - {"tokens_per_sec"}):  # a timing, not a result
        assert resumed.data.metrics[key] == pytest.approx(want[key], abs=1e-6, rel=0), key


def test_sigterm_to_the_launcher_ends_the_run_killed(client):
    experiment = "ddp-sigterm"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gptexp",
            "train",
            "--nproc",
            "2",
            "--config",
            str(TINY),
            *sets(SETTINGS),
            "--experiment",
            experiment,
        ],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def training() -> bool:
            exp = client.get_experiment_by_name(experiment)
            runs = client.search_runs([exp.experiment_id]) if exp is not None else []
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "val_loss"))

        wait_for(training, launcher, "eval point at step 0")
        launcher.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=DEADLINE)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130
    assert err.strip().splitlines()[-1] == "gptexp: interrupted"
    run = only_run(client, experiment)
    assert run.info.status == "KILLED"
    assert run.data.tags["gptexp.status"] == "interrupted"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_process_that_cannot_join_is_one_line_exit_2_and_no_run(client):
    port = free_port()  # closed again: nobody listens there
    done = gptexp(
        "train",
        "--config",
        str(TINY),
        "--experiment",
        "ddp-unjoined",
        "--join-timeout",
        "2",
        RANK=1,
        WORLD_SIZE=2,
        LOCAL_RANK=1,
        LOCAL_WORLD_SIZE=2,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
    )
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"gptexp: error: process 1 of 2 could not join the job at 127.0.0.1:{port} within 2 s")
    assert client.get_experiment_by_name("ddp-unjoined") is None


def test_nproc_0_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exited:  # argparse's exit, as for every bad argument
        main(["train", "--config", str(TINY), "--nproc", "0"])
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("gptexp: error: argument --nproc: must be an integer from 1 to 1024 (got '0')")


@pytest.mark.parametrize(
    "args, says",
    [
        (["--nproc", "3"], "train.batch_size 8 does not split over 3 process(es) x train.grad_accum_steps 1"),
        (
            ["--nproc", "2", "--set", "train.grad_accum_steps=3"],
            "train.batch_size 8 is not a multiple of train.grad_accum_steps 3",
        ),
        (
            ["--nproc", "2", "--set", "train.grad_accum_steps=8"],
            "does not split over 2 process(es) x train.grad_accum_steps 8",
        ),
    ],
)
def test_a_launch_whose_batch_does_not_split_is_one_line_exit_2_before_any_process(client, capsys, args, says):
    capsys.readouterr()
    assert main(["train", "--config", str(TINY), "--experiment", "ddp-refused", *args]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert says in line
    assert client.get_experiment_by_name("ddp-refused") is None


def test_commands_other_than_train_refuse_to_run_under_torchrun(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["sweep", "--config", str(REPO / "configs" / "sweep.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "gptexp: error: gptexp sweep runs as one process, not under torchrun (WORLD_SIZE is 2): "
        "only gptexp train spans processes"
    )


def test_an_error_rank_0_meets_before_the_run_is_its_one_line_and_the_jobs_exit_2(client):
    done = gptexp("train", "--nproc", "2", "--resume", "0123456789abcdef")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()  # the other rank, told rank 0 failed, says nothing
    assert line.startswith("gptexp: error: no run '0123456789abcdef' in the MLflow store")
