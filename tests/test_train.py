"""`gptexp train`: one MLflow run per job, with the product's metric names, artifacts and statuses."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from gptexp import jobs
from gptexp.cli import main
from gptexp.config import load_config
from gptexp.tracking import local_artifact_dir

from conftest import TINY, cli_env

TWO_EPOCHS = ["--set", "train.num_epochs=2"]


def metric_history(client, run_id, key):
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


def runs_in(client, status=None):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r for r in runs if status is None or r.info.status == status]


@pytest.fixture(scope="module")
def finished_run(mlflow_store):
    """One 2-epoch run of the tiny preset through the CLI; (client, run_id)."""
    code = main(["train", "--config", str(TINY), *TWO_EPOCHS, "--experiment", "train-tests"])
    assert code == 0
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("train-tests").experiment_id])
    return client, run.info.run_id


def test_a_two_epoch_run_finishes_with_per_epoch_metrics_at_steps_1_and_2(finished_run):
    client, run_id = finished_run
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in ("epoch_train_loss", "epoch_val_loss", "epoch_train_ppl", "epoch_val_ppl", "tokens_per_sec"):
        assert [s for s, _ in metric_history(client, run_id, key)] == [1, 2], key
    for split in ("train", "val"):
        losses = metric_history(client, run_id, f"epoch_{split}_loss")
        ppls = metric_history(client, run_id, f"epoch_{split}_ppl")
        assert [p for _, p in ppls] == pytest.approx([math.exp(v) for _, v in losses], rel=1e-9)


def test_periodic_metrics_follow_the_books_eval_cadence_from_step_0(finished_run):
    client, run_id = finished_run
    # 9 steps an epoch (the train split's 64-token windows at batch 8): global steps 0..17, every 5th.
    steps = [s for s, _ in metric_history(client, run_id, "val_loss")]
    assert steps == [0, 5, 10, 15]
    tokens = metric_history(client, run_id, "tokens_seen")
    assert [(s, v) for s, v in tokens][:2] == [(0, 8 * 64), (5, 6 * 8 * 64)]
    assert {s for s, _ in metric_history(client, run_id, "lr")} == set(steps)


def test_params_hold_every_config_key_and_the_absolute_stride(finished_run):
    client, run_id = finished_run
    params = client.get_run(run_id).data.params
    config = load_config(TINY, ["train.num_epochs=2"])
    assert set(config.flat()) <= set(params)
    assert params["train.num_epochs"] == "2"
    assert params["data.stride"] == "64"  # null in the preset: the context length


def test_samples_table_has_a_row_per_epoch_and_text_files(finished_run):
    client, run_id = finished_run
    folder = local_artifact_dir(client, run_id)
    import json

    table = json.loads((folder / "samples" / "samples.json").read_text())
    assert table["columns"] == ["epoch", "global_step", "prompt", "completion"]
    assert [row[0] for row in table["data"]] == [1, 2]
    assert all(row[2] == "Every effort moves you" for row in table["data"])
    assert (folder / "samples" / "epoch-002.txt").read_text().startswith("Every effort moves you")


def test_artifacts_plots_config_checkpoints_and_the_corpus_input(finished_run, data_dir):
    client, run_id = finished_run
    folder = local_artifact_dir(client, run_id)
    assert (folder / "plots" / "loss.png").stat().st_size > 1000
    assert load_config(folder / "config" / "config.yaml") == load_config(TINY, ["train.num_epochs=2"])
    ckpts = folder / "checkpoints"
    assert {p.name for p in ckpts.iterdir()} >= {"index.json", "epoch-0002"}
    files = {p.name for p in (ckpts / "epoch-0002").iterdir()}
    assert {"model.safetensors", "model_config.json", "state.pt", "config.yaml"} <= files
    run = client.get_run(run_id)
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "the-verdict"
    profile = json.loads(inp.dataset.profile)
    assert profile["sha256"] == "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"
    assert profile["files"] == 1 and profile["bytes"] == 20479 and profile["characters"] == 20479
    assert profile["train_characters"] == [0, 18431] and profile["validation_characters"] == [18431, 20479]
    assert json.loads(inp.dataset.source)["files"] == [str(data_dir / "raw" / "the-verdict.txt")]
    tags = run.data.tags
    assert tags["gptexp.precision"] == "fp32" and tags["gptexp.device"] == "cpu"
    assert tags["gptexp.torch_version"] and tags["gptexp.git_dirty"] in ("true", "false")


def test_eval_of_the_runs_checkpoint_reproduces_the_logged_final_val_loss(finished_run, capsys):
    client, run_id = finished_run
    logged = client.get_run(run_id).data.metrics["epoch_val_loss"]
    capsys.readouterr()
    assert main(["eval", "--run", run_id, "--no-track"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("validation")]
    assert float(line.split()[1]) == pytest.approx(logged, abs=5e-5)  # the table prints 4 decimals
    folder = jobs.run_checkpoint(client, run_id, "last")
    from gptexp.checkpoint import load_model
    from gptexp.data import prepare_data
    from gptexp.evaluation import evaluate_split

    config = load_config(folder / "config.yaml")
    exact = evaluate_split(load_model(folder), prepare_data(config).val_ids, 64, "cpu", 8).loss
    assert exact == logged  # bit for bit


def test_generate_continues_a_prompt_from_a_run(finished_run, capsys):
    _, run_id = finished_run
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--run",
                run_id,
                "--prompt",
                "Every effort",
                "--max-new-tokens",
                "5",
                "--temperature",
                "1.0",
                "--top-k",
                "10",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Every effort")


def _wait_for(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.05)
    return False


# Trains like `gptexp train`, but holds still once the eval point at global step 10 (in epoch 2,
# after the epoch-1 checkpoint) is logged, and says so with a marker file: the test then kills it
# there, at a known point, however loaded the machine is.
_HOLD_AT_STEP_10 = """
import sys, time
from pathlib import Path
from gptexp import jobs
from gptexp.config import load_config
from gptexp.runner import Callback

class HoldAtStep10(Callback):
    def on_eval(self, event):
        if event.global_step == 10:
            Path(sys.argv[3]).touch()
            while True:
                time.sleep(1)

jobs.train(load_config(sys.argv[1], ["train.num_epochs=2"]), experiment=sys.argv[2], callbacks=[HoldAtStep10()],
           console=False)
"""


def test_sigkill_in_the_second_epoch_then_resume_gives_the_uninterrupted_metrics_each_point_once(
    finished_run, mlflow_store, tmp_path
):
    client, reference = finished_run
    exp, marker = "resume-tests", tmp_path / "at-step-10"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AT_STEP_10, str(TINY), exp, str(marker)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(marker.exists, 600, proc), "the run never reached step 10"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "RUNNING"  # SIGKILL leaves no chance to end it: resume does
    assert [s for s, _ in metric_history(client, run_id, "val_loss")] == [0, 5, 10]
    assert main(["train", "--resume", run_id]) == 0
    resumed = client.get_run(run_id)
    assert resumed.info.status == "FINISHED"
    assert len(client.search_runs([client.get_experiment_by_name(exp).experiment_id])) == 1
    # System metrics (system/...) sample the machine, not the run's results: left out here.
    want = {k for k in client.get_run(reference).data.metrics if not k.startswith("system/")}
    assert {k for k in resumed.data.metrics if not k.startswith("system/")} == want
    for key in sorted(want - {"tokens_per_sec"}):  # a timing, not a result
        # Steps 9 and 10 ran twice (before the kill and after the resume); each point is logged once, bit for bit.
        assert metric_history(client, run_id, key) == metric_history(client, reference, key), key
    assert [s for s, _ in metric_history(client, run_id, "tokens_per_sec")] == [1, 2]


def test_resume_of_an_unknown_run_or_a_finished_one_is_one_line_exit_2(finished_run, capsys):
    _, run_id = finished_run
    capsys.readouterr()
    assert main(["train", "--resume", "0123456789abcdef"]) == 2
    err = capsys.readouterr().err
    assert "no run '0123456789abcdef'" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--resume", run_id]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_a_nan_in_training_ends_the_run_failed_naming_the_step(mlflow_store):
    import torch

    from gptexp.runner import Callback, NonFiniteLoss

    class PoisonAtStep3(Callback):
        def on_start(self, event):
            self.model = event.model

        def on_step(self, event):
            if event.global_step == 3:
                with torch.no_grad():
                    self.model.final_norm.scale.fill_(float("nan"))

    config = load_config(TINY, ["train.num_epochs=1"])
    with pytest.raises(NonFiniteLoss, match="at step 4"):
        jobs.train(config, experiment="nan-tests", callbacks=[PoisonAtStep3()], console=False)
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("nan-tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "at step 4" in run.data.tags["gptexp.error"]


DRIVER = Path(__file__).with_name("signal_driver.py")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, verdict_text) -> list[str]:
    """`train` arguments for a run that reaches its training loop quickly: a small model on the
    head of the-verdict, 5 epochs of ~20 steps, so that signals land well before its end."""
    corpus = tmp_path_factory.mktemp("signals") / "verdict-head.txt"
    corpus.write_text(verdict_text[:3000], encoding="utf-8")
    overrides = {
        "model.context_length": 16,
        "model.emb_dim": 16,
        "train.batch_size": 2,
        "train.eval_iter": 1,
        "train.threads": 1,
        "train.num_epochs": 5,
        "sample.max_new_tokens": 3,
        "data.source": corpus,
    }
    return ["--config", str(TINY), *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]


def test_sigterm_to_a_training_process_ends_its_run_killed_with_exit_130(mlflow_store, small_run):
    client = MlflowClient(mlflow_store)
    exp = "sigterm-tests"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptexp.cli", "train", *small_run, "--experiment", exp],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )

    def training():  # the first periodic evaluation is logged: the loop is running
        e = client.get_experiment_by_name(exp)
        runs = client.search_runs([e.experiment_id]) if e else []
        return bool(runs and client.get_metric_history(runs[0].info.run_id, "train_loss"))

    try:
        assert _wait_for(training, 240, proc), "training did not begin"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    (run,) = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert run.info.status == "KILLED"


def drive(mode: str, runs: int, seed: int, train_args: list[str]) -> list[dict]:
    """signal_driver.py's report of each run: what main returned and the run's final status."""
    import json

    proc = subprocess.run(
        [sys.executable, str(DRIVER), mode, str(runs), str(seed), "--", *train_args],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == runs, proc.stdout
    return reports


def test_a_sigterm_landing_in_a_gc_callback_still_stops_training_and_ends_the_run_killed(mlflow_store, small_run):
    # A handler that raises there is swallowed ("Exception ignored in ...") and training goes on.
    for report in drive("gc", 6, seed=1, train_args=small_run):
        assert report["sent"] == 1, report
        assert (report["returned"], report["statuses"]) == (130, ["KILLED"]), report


def test_a_second_signal_10_to_300_ms_after_the_first_still_ends_the_run_killed_with_exit_130(mlflow_store, small_run):
    # SIGTERM or SIGINT, twice, at random moments: the second lands in the run's cleanup or after it.
    for report in drive("twice", 16, seed=2, train_args=small_run):
        assert report["sent"] == 2, report
        assert (report["returned"], report["statuses"]) == (130, ["KILLED"]), report


def test_compile_true_trains_the_same_function_as_eager(mlflow_store):
    # No dropout, so the only difference is the compiled kernels' rounding.
    one_epoch = ["--set", "train.num_epochs=1", "--set", "model.drop_rate=0.0"]
    for exp, extra in (("compile-off", []), ("compile-on", ["--set", "train.compile=true"])):
        assert main(["train", "--config", str(TINY), *one_epoch, *extra, "--experiment", exp]) == 0
    client = MlflowClient(mlflow_store)
    eager, compiled = (
        client.search_runs([client.get_experiment_by_name(e).experiment_id])[0] for e in ("compile-off", "compile-on")
    )
    assert compiled.data.params["train.compile"] == "True" and compiled.info.status == "FINISHED"
    for key in ("epoch_train_loss", "epoch_val_loss"):
        assert compiled.data.metrics[key] == pytest.approx(eager.data.metrics[key], abs=1e-3), key
    # the checkpoint holds the model's own keys, not a compiled wrapper's
    from safetensors.torch import load_file

    def weights(run):
        (path,) = (local_artifact_dir(client, run.info.run_id) / "checkpoints").glob("epoch-*/model.safetensors")
        return load_file(path)

    assert sorted(weights(compiled)) == sorted(weights(eager))
