"""What a researcher sees while and after a run trains: readable samples, progress with an ETA,
per-step and system metrics that leave the book's numbers alone, and sweep trials that keep only
what a sweep needs. Real MLflow store, real Optuna storage, the tiny preset on a short corpus."""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import threading

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from gptexp import checkpoint as ckpt
from gptexp import jobs
from gptexp.cli import main
from gptexp.config import load_config
from gptexp.live_metrics import system_metrics
from gptexp.model import GPTModel
from gptexp.progress import ConsoleProgress
from gptexp.runner import train_step
from gptexp.runtime import Runtime
from gptexp.sweep import load_sweep_spec, run_sweep
from gptexp.sweep_progress import SweepProgress, ToParent, TrialDone
from gptexp.sweep_trials import _collect
from gptexp.text_view import visible
from gptexp.tracking import local_artifact_dir

from conftest import SMALL_CFG, TINY

# --------------------------------------------------------------------------- samples made visible


def test_visible_shows_newlines_tabs_and_control_characters_as_escapes():
    assert visible("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert visible("\x00\x1b[31m\u200b\xa0") == "\\x00\\x1b[31m\\u200b\\xa0"


def test_visible_marks_spaces_a_reader_cannot_count():
    assert visible("\n\n  \n") == "\\n\\n\u2423\u2423\\n"  # a whitespace-only completion is not blank
    assert visible("a  b ") == "a\u2423\u2423b\u2423"  # a run of two, and a trailing one
    assert visible(" and the picture") == " and the picture"  # GPT-2's leading space stays as it is
    assert visible("") == ""


def test_visible_is_idempotent_so_a_reader_may_apply_it_to_shown_text():
    for raw in ("\n\n\n   \n", "x\t y  z ", "plain text", " \x07 "):
        assert visible(visible(raw)) == visible(raw)
        assert "\n" not in visible(raw) and visible(raw).isprintable()


# --------------------------------------------------------------------------- the gradient norm


def test_measuring_the_gradient_norm_leaves_the_update_bit_identical():
    runtime = Runtime(torch.device("cpu"), "fp32", 1)
    g = torch.Generator().manual_seed(3)
    cfg = dict(SMALL_CFG, vocab_size=500, drop_rate=0.0)
    x = torch.randint(0, cfg["vocab_size"], (2, 32), generator=g)
    y = torch.randint(0, cfg["vocab_size"], (2, 32), generator=g)
    params = []
    norms: list[float] = []
    for measure in (False, True):
        torch.manual_seed(1)
        model = GPTModel(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for step in range(2):
            train_step(model, opt, x, y, runtime, step=step, grad_norms=norms if measure else None)
        expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters()))
        params.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*params, strict=True))
    assert len(norms) == 2 and norms[1] == pytest.approx(expected, rel=1e-4)  # fp32 sums vs a float64 one


# --------------------------------------------------------------------------- one run, one sweep


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, verdict_text):
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(verdict_text[:6000], encoding="utf-8")
    return path


def _config(corpus, *overrides):
    return load_config(
        TINY,
        [f"data.source={corpus}", "train.num_epochs=2", "sample.max_new_tokens=5", "train.eval_freq=3", *overrides],
    )


@pytest.fixture(scope="module")
def runs(mlflow_store, corpus):
    """The same job twice: with per-step and system metrics (and a console with bars), and without."""
    client = MlflowClient(mlflow_store)
    bars = io.StringIO()
    with pytest.MonkeyPatch.context() as m:
        m.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's own knob: a sample a second
        on = jobs.train(
            _config(corpus),
            experiment="signals",
            client=client,
            console=False,
            callbacks=[ConsoleProgress(stream=bars, bars=True)],
        )
    off = jobs.train(
        _config(corpus, "tracking.step_metrics=false", "tracking.system_metrics=false"),
        experiment="signals",
        client=client,
        console=False,
    )
    return client, on, off, bars.getvalue()


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_per_step_metrics_leave_the_books_train_and_val_losses_bit_identical(runs):
    client, on, off, _ = runs
    for key in ("train_loss", "val_loss", "epoch_train_loss", "epoch_val_loss", "tokens_seen", "lr"):
        assert _history(client, on.run_id, key) == _history(client, off.run_id, key), key
    assert [(e.train_loss, e.val_loss) for e in on.result.evals] == [
        (e.train_loss, e.val_loss) for e in off.result.evals
    ]
    assert [e.val_loss for e in on.result.epochs] == [e.val_loss for e in off.result.epochs]


def test_step_loss_and_grad_norm_are_logged_at_every_optimizer_step(runs):
    client, on, off, _ = runs
    last = on.result.epochs[-1].global_step
    for key in ("step_loss", "grad_norm"):
        points = _history(client, on.run_id, key)
        assert [s for s, _ in points] == list(range(last + 1)), key
        assert all(math.isfinite(v) and v > 0 for _, v in points), key
    assert "step_loss" not in client.get_run(off.run_id).data.metrics


def test_system_metrics_are_logged_and_their_thread_stops_with_the_run(runs):
    client, on, off, _ = runs
    assert "system/cpu_utilization_percentage" in client.get_run(on.run_id).data.metrics
    assert "system/system_memory_usage_megabytes" in client.get_run(on.run_id).data.metrics
    assert not [k for k in client.get_run(off.run_id).data.metrics if k.startswith("system/")]
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_the_system_metrics_thread_stops_when_the_run_fails(mlflow_store, monkeypatch):
    client = MlflowClient(mlflow_store)
    run_id = client.create_run(client.create_experiment("signals-failing")).info.run_id
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    with pytest.raises(RuntimeError, match="boom"), system_metrics(client, run_id, True):
        assert [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
        raise RuntimeError("boom")
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]


def test_the_console_shows_a_whole_run_bar_and_each_epoch_with_its_eta(runs, capsys):
    _, _, _, shown = runs
    assert "run:" in shown and "step" in shown  # the whole run's tqdm bar, with its own ETA
    assert "epoch 1/2:" in shown and "epoch 2/2:" in shown
    assert shown.count("elapsed, ETA ") == 2


def test_the_samples_table_shows_whitespace_and_the_epoch_file_keeps_the_raw_text(runs):
    client, on, _, _ = runs
    folder = local_artifact_dir(client, on.run_id)
    table = json.loads((folder / "samples" / "samples.json").read_text())
    last = on.result.epochs[-1]
    assert table["data"][-1][3] == visible(last.completion)
    assert (folder / "samples" / "epoch-002.txt").read_text() == last.prompt + last.completion + "\n"


@pytest.fixture(scope="module")
def trial(tmp_path_factory, mlflow_store, corpus):
    """A one-trial sweep of the same job as `runs`; its child run's id."""
    tmp = tmp_path_factory.mktemp("sweep")
    spec = tmp / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "study": "keep",
                "experiment": "signals",
                "base": {
                    "config": str(TINY),
                    "overrides": {
                        "data.source": str(corpus),
                        "train.num_epochs": 2,
                        "sample.max_new_tokens": 5,
                        "train.eval_freq": 3,
                    },
                },
                "pruner": {"name": "none"},
                "n_trials": 1,
                "space": {"train.lr": {"type": "categorical", "choices": [2.0e-3]}},
            }
        )
    )
    summary = run_sweep(load_sweep_spec(spec), storage_url=f"sqlite:///{tmp}/optuna.db")
    return summary["best"]["run_id"], summary


def _files(root):
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def test_a_sweep_trial_keeps_its_best_epochs_weights_alone_and_a_run_what_resume_needs(runs, trial):
    client, on, _, _ = runs
    trial_id, _ = trial
    single = _files(local_artifact_dir(client, on.run_id) / "checkpoints")
    kept = _files(local_artifact_dir(client, trial_id) / "checkpoints")
    best = ckpt.read_index(local_artifact_dir(client, trial_id) / "checkpoints")["best"]
    assert {k.split("/")[0] for k in kept} == {best, "index.json"}  # one epoch folder: the best
    assert not [k for k in kept if k.endswith(ckpt.STATE)]
    assert {f"epoch-0002/{ckpt.STATE}", f"epoch-0002/{ckpt.WEIGHTS}"} <= set(single)
    # AdamW's two moments are twice the weights: a trial keeps well under half of a run's bytes.
    assert sum(kept.values()) < 0.5 * sum(single.values())


def test_a_trials_checkpoint_evaluates_and_generates_but_is_not_resumed(trial, capsys):
    trial_id, summary = trial
    for which in ("last", "best"):
        assert main(["eval", "--run", trial_id, "--which", which, "--no-track"]) == 0
    assert main(["generate", "--run", trial_id, "--prompt", "Every effort", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", trial_id]) == 2
    assert "checkpoint.resumable=false" in capsys.readouterr().err
    best = load_config(summary["best"]["config"])  # the best config trains a run of its own: resumable
    assert best.checkpoint.resumable and best.checkpoint.keep == "both"


# --------------------------------------------------------------------------- sweep progress


def test_each_finished_trial_line_carries_done_over_n_elapsed_eta_and_best():
    out = io.StringIO()
    progress = SweepProgress(4, "minimize", finished_before=1, best=(6.5, 0), stream=out)
    progress.trial_done(TrialDone(1, "COMPLETE", 6.25, "trial 1: lr=0.001 -> epoch_val_loss 6.2500 (3.0 s)"))
    progress.trial_done(TrialDone(2, "FAIL", None, "trial 2: lr=10 -> failed: NonFiniteLoss"))
    progress.trial_done(TrialDone(3, "PRUNED", None, "trial 3: lr=0.01 -> pruned at epoch 1 (1.0 s)"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("trial 1: lr=0.001 -> epoch_val_loss 6.2500 (3.0 s) | 2/4 done, ")
    assert "elapsed, ETA " in lines[0] and lines[0].endswith("best 6.2500 (trial 1)")
    assert " | 2/4 done, " in lines[1] and lines[1].endswith("best 6.2500 (trial 1)")  # a failure is not done
    assert " | 3/4 done, " in lines[2]


def test_a_resumed_study_starts_from_its_finished_trials_and_best():
    study = optuna.create_study(direction="minimize")
    for value in (7.0, 5.5):
        trial = study.ask()
        study.tell(trial, value)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    progress = SweepProgress.for_study(study, 10, "minimize")
    assert progress.finished == 3 and progress.best == (5.5, 1)
    assert progress.standing().startswith("3/10 done, ") and progress.standing().endswith(
        "ETA -, best 5.5000 (trial 1)"
    )


def _chatty_worker(queue, number: int) -> None:
    progress = ToParent(queue, number)
    for i in range(40):
        progress.trial_done(TrialDone(i, "COMPLETE", 10.0 - i, f"trial {number}-{i}: " + "x" * 300))
        progress.say(f"worker {number}: note {i}")
    queue.put((number, "ok", {"COMPLETE": 40}))


def test_workers_lines_are_printed_whole_by_the_parent_alone():
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [spawn.Process(target=_chatty_worker, args=(queue, n)) for n in range(2)]
    for p in procs:
        p.start()
    out = io.StringIO()
    results = _collect(procs, queue, SweepProgress(80, "minimize", stream=out))
    assert results == {0: ("ok", {"COMPLETE": 40}), 1: ("ok", {"COMPLETE": 40})}
    lines = out.getvalue().splitlines()
    trials = [line for line in lines if line.startswith("trial ")]
    assert len(trials) == 80 and len(lines) == 160
    assert all(line.split(": ", 1)[1].startswith("x" * 300 + " | ") for line in trials)
    assert trials[-1].split(" | ")[1].startswith("80/80 done")


def test_an_eta_is_the_pace_so_far_times_what_is_left_and_none_before_anything_is_done():
    from gptexp.progress import eta

    assert eta(10.0, 0, 5) is None
    assert eta(10.0, 2, 5) == pytest.approx(15.0)
    assert eta(10.0, 5, 5) == 0.0
