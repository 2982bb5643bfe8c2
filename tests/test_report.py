"""`gptexp report` and `gptexp compare`: tables of runs and studies from MLflow params, metrics and tags.

The store is built directly with MlflowClient (params, metric histories, tags, samples), the way
`train` and `sweep` record runs, so these tests need no training.
"""

from __future__ import annotations

import io
import re

import pandas as pd
import pytest
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from gptexp.cli import main
from gptexp.tracking import experiment_id

BASE = {
    "model.context_length": "64",
    "model.emb_dim": "32",
    "data.stride": "64",
    "train.batch_size": "8",
    "train.lr": "0.002",
    "train.seed": "123",
    "model.impl": "fast",
}
T0 = 1_700_000_000_000  # ms


def make_run(
    client,
    experiment,
    name,
    params,
    val_losses,
    *,
    tags=None,
    status="FINISHED",
    start=T0,
    seconds=75,
    completion=" and then",
):
    exp_id = experiment_id(client, experiment)
    run = client.create_run(exp_id, start_time=start, tags=dict(tags or {}), run_name=name)
    rid = run.info.run_id
    client.log_batch(rid, params=[Param(k, v) for k, v in params.items()])
    for epoch, v in enumerate(val_losses, 1):
        client.log_metric(rid, "epoch_val_loss", v, step=epoch)
        client.log_metric(rid, "epoch_train_loss", v - 0.5, step=epoch)
        client.log_metric(rid, "tokens_seen", 512 * 9 * epoch, step=9 * epoch - 1)
    if val_losses:
        epochs = list(range(1, len(val_losses) + 1))
        client.log_table(
            rid,
            {
                "epoch": epochs,
                "global_step": [9 * e - 1 for e in epochs],
                "prompt": ["Every effort moves you"] * len(epochs),
                "completion": [f"{completion} (epoch {e})" for e in epochs],
            },
            "samples/samples.json",
        )
    client.set_terminated(rid, status=status, end_time=start + seconds * 1000)
    return rid


@pytest.fixture(scope="module")
def store(mlflow_store):
    """Three runs in experiment report-tests, an older study and the latest study of a sweep."""
    client = MlflowClient(mlflow_store)
    ids = {
        "base": make_run(client, "report-tests", "base_run #1 (50% & more)", BASE, [6.0, 5.5, 5.8]),
        "wide": make_run(
            client,
            "report-tests",
            "wide",
            dict(BASE, **{"model.emb_dim": "64"}),
            [5.9, 5.2],
            completion=" the wide one",
        ),
        "fast_lr": make_run(client, "report-tests", "fast_lr", dict(BASE, **{"train.lr": "0.004"}), [6.5, 6.4]),
    }
    for study, start, lrs in (("old-study", T0, ("0.001",)), ("lr-study", T0 + 3_600_000, ("0.001", "0.002", "0.004"))):
        parent = make_run(
            client,
            "sweep-tests",
            f"sweep-{study}",
            {},
            [],
            start=start,
            tags={"gptexp.job": "sweep", "gptexp.study": study},
        )
        states = ("COMPLETE", "PRUNED", "FAIL")
        losses = ([5.4, 5.1], [6.2], [])
        for n, lr in enumerate(lrs):
            ids[f"{study}-{n}"] = make_run(
                client,
                "sweep-tests",
                f"trial-{n}",
                dict(BASE, **{"train.lr": lr}),
                losses[n],
                start=start + 1000 * (n + 1),
                status="FINISHED" if states[n] == "COMPLETE" else ("KILLED" if states[n] == "PRUNED" else "FAILED"),
                tags={
                    "gptexp.job": "trial",
                    "gptexp.study": study,
                    "gptexp.trial": str(n),
                    "optuna.state": states[n],
                    "mlflow.parentRunId": parent,
                },
            )
    return client, ids


def report(capsys, *args) -> str:
    capsys.readouterr()
    assert main(["report", *args]) == 0
    return capsys.readouterr().out


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def csv_frame(text: str) -> pd.DataFrame:
    return pd.read_csv(io.StringIO(text))


# ---------------------------------------------------------------------------- report


def test_a_report_lists_runs_best_first_with_key_and_differing_params(store, capsys):
    client, ids = store
    frame = csv_frame(report(capsys, "--experiment", "report-tests", "--format", "csv"))
    assert list(frame["run"]) == ["wide", "base_run #1 (50% & more)", "fast_lr"]  # by best epoch_val_loss
    assert list(frame["best epoch_val_loss"]) == [5.2, 5.5, 6.4]
    assert list(frame["final epoch_val_loss"]) == [5.2, 5.8, 6.4]
    assert list(frame["run_id"]) == [ids[k][:8] for k in ("wide", "base", "fast_lr")]
    # the key params always, plus model.emb_dim because it differs; not seed or impl, which do not
    params = [c for c in frame.columns if "." in c and " " not in c]
    assert params == ["model.context_length", "data.stride", "train.batch_size", "train.lr", "model.emb_dim"]
    assert list(frame["epochs"]) == [2, 3, 2]
    assert list(frame["tokens_seen"]) == [9216, 13824, 9216]
    assert set(frame["duration"]) == {"1m15s"} and set(frame["status"]) == {"FINISHED"}


def test_the_table_format_has_a_title_and_aligned_rows(store, capsys):
    out = report(capsys, "--experiment", "report-tests")
    title, header, *rows = out.rstrip("\n").splitlines()
    assert title == "experiment report-tests: 3 runs, by epoch_val_loss"
    assert header.split()[:2] == ["run", "run_id"] and len(rows) == 3
    assert rows[0].startswith("wide")


def test_markdown_is_a_pipe_table_with_one_cell_per_column(store, capsys):
    out = report(capsys, "--experiment", "report-tests", "--format", "md")
    lines = out.rstrip("\n").splitlines()
    assert len(lines) == 2 + 3
    assert re.fullmatch(r"\|(:?-{3}:?\|)+", lines[1])
    cells = [len(re.split(r"(?<!\\)\|", line)) for line in lines]
    assert len(set(cells)) == 1
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[:1] + lines[2:])
    assert "| wide |" in lines[2]


def test_latex_is_a_well_formed_tabular_with_special_characters_escaped(store, capsys):
    out = report(capsys, "--experiment", "report-tests", "--format", "latex")
    lines = out.rstrip("\n").splitlines()
    begin = next(i for i, ln in enumerate(lines) if ln.startswith(r"\begin{tabular}"))
    assert lines[-1] == r"\end{tabular}" and sum(ln.startswith(r"\begin{tabular}") for ln in lines) == 1
    columns = len(re.fullmatch(r"\\begin\{tabular\}\{([lr]+)\}", lines[begin]).group(1))
    rows = [ln for ln in lines[begin + 1 : -1] if ln.endswith(r"\\")]
    assert len(rows) == 1 + 3  # header + one per run
    for row in rows:
        assert len(re.split(r"(?<!\\)&", row)) == columns, row
    assert r"model.context\_length" in rows[0] and r"best epoch\_val\_loss" in rows[0]
    assert r"base\_run \#1 (50\% \& more)" in out
    body = "\n".join(lines[begin:])
    assert not re.search(r"(?<!\\)[_%#]", body.replace(r"\\", ""))


def test_a_study_report_lists_its_trials_with_their_state_and_not_the_parent(store, capsys):
    frame = csv_frame(report(capsys, "--study", "lr-study", "--format", "csv"))
    assert list(frame.columns[:4]) == ["trial", "state", "run", "run_id"]
    assert list(frame["trial"]) == [0, 1, 2]  # 5.1 (complete), 6.2 (pruned), none (failed)
    assert list(frame["state"]) == ["COMPLETE", "PRUNED", "FAIL"]
    assert list(frame["train.lr"]) == [0.001, 0.002, 0.004]
    assert frame["best epoch_val_loss"].isna().tolist() == [False, False, True]


def test_without_a_flag_the_report_shows_the_latest_sweeps_study(store, capsys):
    out = report(capsys)
    assert out.splitlines()[0] == "study lr-study: 3 trials (1 complete, 1 fail, 1 pruned), by epoch_val_loss"


def test_without_sweeps_the_report_shows_the_gptexp_experiment(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    make_run(MlflowClient(uri), "gptexp", "only", BASE, [7.0])
    out = report(capsys)
    assert out.splitlines()[0] == "experiment gptexp: 1 runs, by epoch_val_loss"


def test_without_sweeps_the_report_shows_the_experiment_of_the_latest_run(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    make_run(client, "older", "old", BASE, [7.0], start=T0)
    make_run(client, "my-runs", "train-only", BASE, [6.0], start=T0 + 1000, tags={"gptexp.job": "train"})
    out = report(capsys)
    assert out.splitlines()[0] == "experiment my-runs: 1 runs, by epoch_val_loss"
    assert "train-only" in out


def test_on_an_empty_store_the_report_says_there_is_nothing_yet_and_how_to_make_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    err = one_line_error(capsys, ["report"])
    assert "nothing to report yet" in err and "gptexp train --config" in err and str(tmp_path) in err


def test_report_sorted_by_another_metric_and_written_to_a_file(store, capsys, tmp_path):
    path = tmp_path / "reports" / "runs.csv"
    out = report(capsys, "--experiment", "report-tests", "--metric", "epoch_train_loss", "--out", str(path))
    assert "wrote" in out and str(path) in out
    frame = csv_frame(path.read_text())  # the format follows the suffix
    assert list(frame["best epoch_train_loss"]) == [4.7, 5.0, 5.9]
    tex = tmp_path / "runs.tex"
    report(capsys, "--experiment", "report-tests", "--out", str(tex))
    assert r"\begin{tabular}" in tex.read_text()


def test_an_unknown_experiment_or_study_is_one_line_exit_2(store, capsys):
    err = one_line_error(capsys, ["report", "--experiment", "nope"])
    assert "no experiment 'nope'" in err and "report-tests" in err
    err = one_line_error(capsys, ["report", "--study", "nope"])
    assert "no study 'nope'" in err and "lr-study" in err and "old-study" in err


# ---------------------------------------------------------------------------- compare


def test_compare_shows_the_params_that_differ_metrics_side_by_side_and_the_last_samples(store, capsys):
    _, ids = store
    capsys.readouterr()
    assert main(["compare", ids["base"], ids["wide"]]) == 0
    out = capsys.readouterr().out
    section = out.split("params that differ (1 of 7):\n")[1].split("\n\n")[0].splitlines()
    assert section[0].split() == ["param", "A", "B"]
    assert section[1].split() == ["model.emb_dim", "32", "64"]
    assert "train.lr" not in out.split("metrics")[0]  # equal params are not listed
    (val,) = [ln.split() for ln in out.splitlines() if ln.strip().startswith("epoch_val_loss")]
    assert val == ["epoch_val_loss", "5.8", "5.2", "-0.6"]
    assert "epoch 3: Every effort moves you and then (epoch 3)" in out
    assert "epoch 2: Every effort moves you the wide one (epoch 2)" in out
    a, b = out.index("epoch 3: Every effort"), out.index("epoch 2: Every effort")
    assert a < b  # A's sample above B's


def test_compare_with_an_unknown_run_is_one_line_exit_2(store, capsys):
    _, ids = store
    err = one_line_error(capsys, ["compare", ids["base"], "f" * 32])
    assert "no run" in err and "f" * 32 in err


def test_console_tables_pad_each_column_to_its_widest_cell_and_right_align_the_numbers():
    from gptexp.tables import aligned

    assert aligned(["name", "loss"], [["a", "1.5"], ["longer", "10.25"]], right={1}).splitlines() == [
        "name     loss",
        "a         1.5",
        "longer  10.25",
    ]
    assert aligned(["metric", "ok"], [], indent="  ") == "  metric  ok"  # no rows: the header alone
