"""Run names say what a run is; --tag and --note reach MLflow; eval records under the run it evaluates."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from gptexp.cli import main
from gptexp.config import load_config
from gptexp.run_names import format_value, train_run_name, trial_run_name

from conftest import TINY


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("train.lr", 5e-3, "5e-3"),
        ("train.lr", 0.005893, "5.9e-3"),
        ("train.weight_decay", 0.1, "0.1"),
        ("model.context_length", 64, "64"),
        ("data.stride_fraction", 0.5, "0.5ctx"),
        ("data.stride_fraction", 1.0, "ctx"),
        ("train.compile", True, "true"),
        ("data.source", "/data/corpora/verdict-head.txt", "verdict-head"),
    ],
)
def test_values_are_written_as_a_person_writes_them(key, value, shown):
    assert format_value(key, value) == shown


def test_a_train_run_is_named_by_its_preset_and_the_settings_given_on_top_in_their_order():
    overrides = ["train.lr=5e-3", "model.context_length=32", "train.seed=123"]  # the seed is tiny's own
    assert train_run_name(TINY, overrides, load_config(TINY, overrides)) == "tiny lr=5e-3 ctx=32"
    assert train_run_name(TINY, [], load_config(TINY)) == "tiny"


def test_a_trial_is_named_by_its_number_and_its_searched_values():
    params = {"model.context_length": 64, "train.lr": 0.0059}
    assert trial_run_name(7, params) == "trial 7 · ctx=64 lr=5.9e-3"


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--tag", "purpose"], "argument --tag: must be KEY=VALUE, e.g. --tag purpose=baseline (got 'purpose')"),
        (["--tag", "=x"], "argument --tag: must be KEY=VALUE"),
        (["--tag", "gptexp.job=mine"], "argument --tag: key 'gptexp.job' is in a namespace gptexp or MLflow writes"),
        (["--tag", "a\tb=1"], "argument --tag: key 'a\\tb' must be up to 250 letters"),
        (["--note", "  "], "argument --note: is blank"),
    ],
)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_malformed_tag_or_note_is_one_line_and_exit_2_before_anything_runs(command, argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--config", str(TINY), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_resume_refuses_a_new_name_tag_or_note(capsys):
    assert main(["train", "--resume", "abc", "--tag", "a=b"]) == 2
    assert "drop --run-name, --tag and --note" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(mlflow_store, tmp_path_factory, verdict_text):
    corpus = tmp_path_factory.mktemp("names") / "verdict-head.txt"
    corpus.write_text(verdict_text[:3000], encoding="utf-8")
    argv = ["train", "--config", str(TINY), "--set", "train.num_epochs=1", "--set", f"data.source={corpus}"]
    argv += ["--set", "sample.max_new_tokens=2", "--experiment", "names-tests"]
    assert main([*argv, "--tag", "purpose=baseline", "--tag", "owner=ui", "--note", "first **try**"]) == 0
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("names-tests").experiment_id])
    return client, run


def test_tags_and_the_note_land_on_the_run_beside_gptexps_own(trained):
    _, run = trained
    tags = run.data.tags
    assert tags["purpose"] == "baseline" and tags["owner"] == "ui"
    assert tags["mlflow.note.content"] == "first **try**"
    assert tags["gptexp.job"] == "train"
    assert run.info.run_name == "tiny epochs=1 data=verdict-head max_new_tokens=2"


def test_eval_of_a_run_is_its_child_with_trainings_metric_names_at_the_checkpoints_epoch(trained, capsys):
    client, run = trained
    assert main(["eval", "--run", run.info.run_id[:8], "--which", "best"]) == 0
    exp = run.info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    (child,) = children
    assert child.data.tags["gptexp.job"] == "eval" and child.info.run_name == "eval of best (epoch 1)"
    assert set(child.data.metrics) == {"epoch_train_loss", "epoch_val_loss", "epoch_train_ppl", "epoch_val_ppl"}
    (point,) = client.get_metric_history(child.info.run_id, "epoch_val_loss")
    assert point.step == 1
    assert point.value == pytest.approx(run.data.metrics["epoch_val_loss"], abs=1e-5)
    # The experiment's table keeps one top-level row per training job.
    top_level = [r for r in client.search_runs([exp]) if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in top_level] == [run.info.run_id]
    from gptexp.report import build_report

    assert len(build_report(client, experiment="names-tests").frame) == 1
