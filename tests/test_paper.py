"""Paper experiments: a study spec (grid or a sweep's best trials x seeds) runs as child runs under
one parent run, resumes after a kill, and aggregates into tables, a figure and a checklist that are
computed from the runs.

The micro experiment: 2 cells (context 16 and 32) x 2 seeds of a very small model on the first
6,000 characters of the-verdict, 2 epochs each.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from gptexp import aggregate, checklist, jobs, study
from gptexp.cli import main
from gptexp.config import load_config

from conftest import REPO, TINY, cli_env

SEEDS = [1, 2]
CELLS = ["context_length=16", "context_length=32"]
METRIC_COLUMNS = [f"{w} {m}" for m in ("epoch_val_loss", "epoch_val_ppl") for w in ("final", "best")]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, verdict_text):
    path = tmp_path_factory.mktemp("corpus") / "verdict-head.txt"
    path.write_text(verdict_text[:6000], encoding="utf-8")
    return path


def micro_overrides(corpus) -> dict:
    return {
        "data.source": str(corpus),
        "model.emb_dim": 16,
        "train.num_epochs": 2,
        "train.eval_freq": 100,
        "train.eval_iter": 1,
        "train.threads": 1,
        "train.device": "cpu",
        "train.precision": "fp32",
        "sample.max_new_tokens": 2,
        "checkpoint.keep": "none",
    }


def write_micro(folder, corpus, name="micro", **extra):
    spec = {
        "name": name,
        "description": "two cells, two seeds",
        "base": {"config": str(TINY), "overrides": micro_overrides(corpus)},
        "grid": {"model.context_length": [16, 32]},
        "seeds": SEEDS,
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def children(client, parent_id):
    exp = client.get_experiment(client.get_run(parent_id).info.experiment_id)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def parents(client, name):
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(
        exps, filter_string=f"tags.`gptexp.job` = 'paper' and tags.`gptexp.experiment_spec` = '{name}'"
    )


def finished(runs):
    return {
        (r.data.tags["gptexp.cell"], int(r.data.tags["gptexp.seed"])): r.info.run_id
        for r in runs
        if r.info.status == "FINISHED"
    }


def run_cli(argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def micro(mlflow_store, corpus, tmp_path_factory):
    """The micro experiment, killed (SIGKILL) once its first run has finished, then run again."""
    folder = tmp_path_factory.mktemp("specs")
    spec = write_micro(folder, corpus)
    client = MlflowClient(mlflow_store)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptexp", "reproduce", str(spec), "--quiet"],
        env=cli_env(PYTHONPATH=REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 600
    before: dict = {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            found = parents(client, "micro") if client.get_experiment_by_name("micro") else []
            before = finished(children(client, found[0].info.run_id)) if found else {}
            if before:
                break
            time.sleep(0.05)  # a poll interval, not a wait for something to happen
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert before, f"no run finished before the deadline or the process ended: {err}"
    (parent,) = parents(client, "micro")
    before = finished(children(client, parent.info.run_id))  # a run may have ended as we killed
    code, out = run_cli(["reproduce", str(spec), "--quiet"])
    assert code == 0, out
    return {"spec": spec, "client": client, "parent": parent.info.run_id, "before": before, "rerun_out": out}


# ---------------------------------------------------------------------------- structure


def test_every_cell_and_seed_is_a_tagged_child_of_one_parent_run(micro):
    client, parent_id = micro["client"], micro["parent"]
    (parent,) = parents(client, "micro")
    assert parent.info.run_id == parent_id and parent.info.status == "FINISHED"
    assert parent.data.tags["gptexp.code_version"] == study.code_version()
    runs = children(client, parent_id)
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished(done)) == [(c, s) for c in CELLS for s in SEEDS]
    assert len(done) == 4  # one finished run per (cell, seed), never two
    for r in done:
        tags = r.data.tags
        assert tags["gptexp.job"] == "paper_run" and tags["gptexp.experiment_spec"] == "micro"
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["gptexp.code_version"] == parent.data.tags["gptexp.code_version"]
        assert r.info.run_name == f"{tags['gptexp.cell']} seed {tags['gptexp.seed']}"
        assert r.data.params["train.seed"] == tags["gptexp.seed"]
        assert r.data.params["model.context_length"] == tags["gptexp.cell"].split("=")[1]
        recorded = jobs.run_config(client, r.info.run_id)  # the resolved config the run trained
        assert tags["gptexp.config_sha256"] == study.config_digest(recorded)
        assert recorded.train.seed == int(tags["gptexp.seed"]) and recorded.experiment == "micro"
    # the run the kill cut short is not left RUNNING: it is failed, saying why
    for r in runs:
        assert r.info.status in ("FINISHED", "FAILED"), r.info.status
        if r.info.status == "FAILED":
            assert "killed" in r.data.tags["gptexp.error"]


def test_a_rerun_after_a_kill_trains_only_the_missing_runs(micro):
    client, before, out = micro["client"], micro["before"], micro["rerun_out"]
    assert 1 <= len(before) < 4, "the kill came after every run had finished: nothing was left to resume"
    after = finished(children(client, micro["parent"]))
    assert {k: after[k] for k in before} == before  # the runs finished before the kill are the ones kept
    trained = re.findall(r"\] (context_length=\d+) seed (\d+): training", out)
    skipped = re.findall(r"\] (context_length=\d+) seed (\d+): skipped, finished in run (\w{8})", out)
    assert {(c, int(s)) for c, s in trained} == set(after) - set(before)
    assert {(c, int(s)): rid for c, s, rid in skipped} == {k: v[:8] for k, v in before.items()}
    assert "same config and code" in out
    assert f"resuming parent run {micro['parent']}" in out


def test_a_third_run_skips_everything_and_trains_nothing(micro):
    client = micro["client"]
    count = len(children(client, micro["parent"]))
    code, out = run_cli(["reproduce", str(micro["spec"]), "--quiet"])
    assert code == 0
    assert out.count(": skipped, finished in run") == 4 and ": training" not in out
    assert "0 trained, 4 skipped" in out
    assert len(children(client, micro["parent"])) == count


# ---------------------------------------------------------------------------- aggregates


@pytest.fixture(scope="module")
def outputs(micro, tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper") / "micro"
    code, out = run_cli(["report", "--experiment", "micro", "--aggregate", "--out", str(folder)])
    assert code == 0
    return folder, out


def pandas_aggregates(client, parent_id) -> pd.DataFrame:
    """The same figures, computed here from the children's metric histories with pandas."""
    rows = []
    for r in children(client, parent_id):
        if r.info.status != "FINISHED":
            continue
        row = {"cell": r.data.tags["gptexp.cell"], "run_id": r.info.run_id}
        for m in ("epoch_val_loss", "epoch_val_ppl"):
            hist = sorted(client.get_metric_history(r.info.run_id, m), key=lambda p: p.step)
            row[f"final {m}"] = hist[-1].value
            row[f"best {m}"] = min(p.value for p in hist)
        row["parameters"] = int(r.data.tags["gptexp.num_parameters"])
        row["tokens"] = r.data.metrics["tokens_seen"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    grouped = frame.groupby("cell")
    out = grouped[METRIC_COLUMNS].agg(["mean", "std"])
    out.columns = [f"{c} {s}" for c, s in out.columns]
    out["n"] = grouped.size()
    out["parameters"] = grouped["parameters"].first()
    out["tokens mean"] = grouped["tokens"].mean()
    out["run_ids"] = grouped["run_id"].agg(lambda ids: set(ids))
    return out


def test_the_csv_aggregates_equal_a_pandas_computation_over_the_children(micro, outputs):
    folder, _ = outputs
    table = pd.read_csv(folder / "table.csv").set_index("cell")
    want = pandas_aggregates(micro["client"], micro["parent"])
    assert list(table.index) == CELLS
    for cell in CELLS:
        for col in [f"{c} {s}" for c in METRIC_COLUMNS for s in ("mean", "std")]:
            assert table.loc[cell, col] == pytest.approx(want.loc[cell, col], rel=1e-12), (cell, col)
        assert table.loc[cell, "n"] == want.loc[cell, "n"] == 2
        assert table.loc[cell, "parameters"] == want.loc[cell, "parameters"]
        assert table.loc[cell, "tokens mean"] == want.loc[cell, "tokens mean"]
        # every number traces to its runs
        assert set(table.loc[cell, "run_ids"].split(";")) == want.loc[cell, "run_ids"]
    # the larger context has more position embeddings
    assert table.loc[CELLS[1], "parameters"] - table.loc[CELLS[0], "parameters"] == 16 * 16


def test_the_markdown_table_is_printed_and_written_with_mean_pm_std_and_the_best_bold(outputs):
    folder, out = outputs
    md = (folder / "table.md").read_text()
    assert md in out
    header, rule, *rows = md.strip().splitlines()
    assert header.startswith("| cell | context_length | n | final epoch_val_loss |")
    assert len(rows) == 2 and all(r.count("|") == header.count("|") for r in [rule, *rows])
    assert all(" ± " in r for r in rows)
    assert sum(r.count("**") for r in rows) == 2 * len(METRIC_COLUMNS)  # one bold cell per metric column


def test_the_latex_tabular_is_balanced_booktabs_with_escaped_underscores(outputs):
    folder, _ = outputs
    tex = (folder / "table.tex").read_text()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert body.count(r"\begin{tabular}") == body.count(r"\end{tabular}") == 1
    assert body.index(r"\toprule") < body.index(r"\midrule") < body.index(r"\bottomrule")
    assert body.count("{") == body.count("}") and body.count("$") % 2 == 0
    assert "\\hline" not in body
    assert re.search(r"(?<!\\)_", body) is None  # every underscore escaped
    assert "final epoch\\_val\\_loss" in body
    align = re.search(r"\\begin\{tabular\}\{([lrc]+)\}", body).group(1)
    lines = body.splitlines()
    rows = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    rows = [r for r in rows if r != r"\midrule"]
    assert len(rows) == 3  # the header and one row per cell
    for row in rows:
        assert row.endswith(r"\\") and row.count(" & ") == len(align) - 1
    assert body.count(r"\mathbf{") == len(METRIC_COLUMNS)
    assert re.search(r"\$\d+\.\d+ \\pm \d+\.\d+\$", body)


def test_the_figure_is_written_as_png_and_pdf(micro, outputs):
    folder, _ = outputs
    png, pdf = (folder / "figure.png").read_bytes(), (folder / "figure.pdf").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert pdf.startswith(b"%PDF") and len(pdf) > 5_000
    # the metric against the grid axis, one error bar (one std) per cell
    exp = aggregate.load_experiment(micro["client"], "micro")
    fig = aggregate.figure(exp, "epoch_val_loss")
    (ax,) = fig.axes
    assert ax.get_xlabel() == "model.context_length" and ax.get_ylabel() == "final epoch_val_loss"
    (line,) = ax.get_lines()[:1]
    assert list(line.get_xdata()) == [16, 32]
    assert list(line.get_ydata()) == pytest.approx(list(exp.table["final epoch_val_loss mean"]))


def test_the_checklist_names_every_field_from_the_runs(micro, outputs):
    folder, out = outputs
    text = (folder / "checklist.md").read_text()
    assert text in out
    for field in checklist.FIELDS:
        assert f"## {field}" in text
    client = micro["client"]
    runs = [r for r in children(client, micro["parent"]) if r.info.status == "FINISHED"]
    assert "4 finished runs used, of 4 planned: 2 cells x 2 seeds (seeds 1, 2)" in text
    assert '`model.context_length`: {"values": [16, 32], "bounds": [16, 32]}' in text
    assert "full grid (2 cells)" in text
    assert runs[0].data.tags["mlflow.source.git.commit"] in text
    assert f"torch {runs[0].data.tags['gptexp.torch_version']}" in text
    assert "torch.use_deterministic_algorithms on: false" in text
    assert "threads per process: 1" in text
    for r in runs:
        assert f"{int(r.data.tags['gptexp.num_parameters']):,}" in text
    total = sum((r.info.end_time - r.info.start_time) / 1000 for r in runs)
    seconds = float(re.search(r"total compute: \S+ \(([\d.]+) s\)", text).group(1))
    assert seconds == pytest.approx(total, abs=0.06)


def test_the_outputs_are_artifacts_of_the_parent_run_too(micro, outputs):
    client = micro["client"]
    names = {f.path for f in client.list_artifacts(micro["parent"], "paper/aggregate")}
    assert names == {
        f"paper/aggregate/{n}"
        for n in ("table.md", "table.csv", "table.tex", "figure.png", "figure.pdf", "checklist.md")
    }


# ---------------------------------------------------------------------------- expected aggregates


def test_expected_aggregates_written_by_the_harness_pass_and_a_changed_one_fails(micro, tmp_path):
    spec = tmp_path / "micro.yaml"  # the same experiment, now with expected aggregates beside it
    raw = yaml.safe_load(micro["spec"].read_text())
    raw["expected_file"] = "micro.expected.yaml"
    raw["tolerance"] = {"rtol": 1e-9, "why": "same machine, same seeds: bit-exact"}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    code, out = run_cli(["reproduce", str(spec), "--quiet", "--write-expected"])
    assert code == 0 and "0 trained, 4 skipped" in out
    expected = yaml.safe_load((tmp_path / "micro.expected.yaml").read_text())
    assert expected["produced_by"]["command"] == "gptexp reproduce micro --write-expected"
    assert {"torch", "mlflow", "python", "cpu", "threads", "code_version", "date"} <= expected["produced_by"].keys()
    assert [c["cell"] for c in expected["cells"]] == CELLS

    code, out = run_cli(["reproduce", str(spec), "--quiet"])
    assert code == 0 and "verdict: pass" in out and "max relative diff 0" in out
    assert "same machine, same seeds: bit-exact" in out
    assert micro["client"].get_run(micro["parent"]).data.tags["gptexp.verdict"] == "pass"

    expected["cells"][1]["final epoch_val_loss"]["mean"] *= 1.01
    (tmp_path / "micro.expected.yaml").write_text(yaml.safe_dump(expected, sort_keys=False))
    code, out = run_cli(["reproduce", str(spec), "--quiet"])
    assert code == 1 and "verdict: fail" in out
    (failed,) = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failed.startswith("context_length=32") and "final epoch_val_loss mean" in failed


# ---------------------------------------------------------------------------- specs


def test_the_shipped_ctx_stride_ablation_spec_validates_and_has_its_expected_aggregates():
    spec = study.load_study_spec("ctx-stride-ablation")
    assert [c.values for c in spec.cells] == [
        {"model.context_length": ctx, "data.stride_fraction": sf} for ctx in (32, 64) for sf in (0.5, 1.0)
    ]
    assert spec.seeds == (1, 2, 3)
    for cell in spec.cells:
        t = cell.config.train
        assert (t.device, t.precision, t.threads) == ("cpu", "fp32", 2)
        assert cell.config.experiment == "ctx-stride-ablation"
    assert spec.rtol == 1e-3 and "bit-exact" in spec.tolerance_why
    expected = yaml.safe_load(spec.expected_path.read_text())
    assert [c["cell"] for c in expected["cells"]] == [c.name for c in spec.cells]
    assert all(c["n"] == 3 for c in expected["cells"])
    produced = expected["produced_by"]
    assert produced["command"] == "gptexp reproduce ctx-stride-ablation --write-expected"
    assert {"torch", "python", "mlflow", "cpu", "threads", "device", "precision", "code_version"} <= produced.keys()
    for cell in expected["cells"]:
        loss = cell["final epoch_val_loss"]
        assert 0 < loss["std"] < 0.5 < loss["mean"] and math.isfinite(loss["mean"])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"grid": {"model.context_lenght": [16]}}, ["model.context_lenght", "not a config key"]),
        ({"grid": {"train.seed": [1, 2]}}, ["train.seed", "seeds vary train.seed"]),
        ({"seeds": [1, 1]}, ["seeds lists a seed twice"]),
        ({"seeds": []}, ["seeds must be a non-empty list"]),
        ({"sweep": {"study": "s", "top_k": 1}}, ["give grid", "or sweep"]),
        ({"grid": {"model.n_heads": [3]}}, ["emb_dim 16 is not divisible by model.n_heads 3"]),
        ({"tolerance": {"rtol": 2}}, ["tolerance.rtol"]),
    ],
)
def test_a_bad_study_spec_is_one_line_exit_2_before_any_run(mlflow_store, corpus, tmp_path, capsys, change, words):
    spec = write_micro(tmp_path, corpus, name="bad-micro", **change)
    assert main(["reproduce", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(spec) in err
    for w in words:
        assert w in err
    assert MlflowClient(mlflow_store).get_experiment_by_name("bad-micro") is None  # nothing half-made


def test_report_aggregate_of_an_unknown_experiment_is_one_line_exit_2(micro, capsys):
    assert main(["report", "--experiment", "no-such", "--aggregate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no paper experiment 'no-such'" in err and "micro" in err


# ---------------------------------------------------------------------------- a sweep's best trials


def test_a_sweeps_best_trials_are_retrained_with_every_seed(mlflow_store, corpus, tmp_path):
    sweep = {
        "study": "paper-sweep",
        "base": {"config": str(TINY), "overrides": {**micro_overrides(corpus), "train.num_epochs": 1}},
        "sampler": {"name": "random", "seed": 1},
        "pruner": {"name": "none"},
        "n_trials": 2,
        "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    }
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump(sweep))
    storage = f"sqlite:///{tmp_path}/optuna.db"
    code, _ = run_cli(["sweep", "--config", str(sweep_path), "--storage", storage])
    assert code == 0
    client = MlflowClient(mlflow_store)
    trials = client.search_runs(
        [client.get_experiment_by_name("gptexp-tiny").experiment_id],
        filter_string="tags.`gptexp.study` = 'paper-sweep' and tags.`optuna.state` = 'COMPLETE'",
    )
    best = min(trials, key=lambda r: float(r.data.tags["optuna.value"]))
    spec = tmp_path / "best.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "best-of-sweep", "sweep": {"study": "paper-sweep", "top_k": 1}, "seeds": [5, 6]})
    )
    code, out = run_cli(["reproduce", str(spec), "--quiet"])
    assert code == 0, out
    (parent,) = parents(client, "best-of-sweep")
    runs = [r for r in children(client, parent.info.run_id) if r.info.status == "FINISHED"]
    cell = f"trial-{best.data.tags['gptexp.trial']}"
    assert sorted(finished(runs)) == [(cell, 5), (cell, 6)]
    for r in runs:
        assert r.data.params["train.lr"] == best.data.params["train.lr"]
    code, out = run_cli(["report", "--experiment", "best-of-sweep", "--aggregate", "--out", str(tmp_path / "out")])
    assert code == 0
    text = (tmp_path / "out" / "checklist.md").read_text()
    assert "the 1 best of 2 complete trials of sweep 'paper-sweep'" in text
    assert '`train.lr`: {"type": "float", "low": 0.0001, "high": 0.01, "log": true}' in text


# ---------------------------------------------------------------------------- determinism


def test_each_run_records_whether_deterministic_algorithms_were_on(mlflow_store, corpus):
    import torch

    overrides = [f"{k}={v}" for k, v in micro_overrides(corpus).items()] + ["train.num_epochs=1"]
    on = jobs.train(load_config(TINY, [*overrides, "train.deterministic=true"]), experiment="det", console=False)
    off = jobs.train(load_config(TINY, overrides), experiment="det", console=False)
    client = MlflowClient(mlflow_store)
    assert client.get_run(on.run_id).data.tags["gptexp.deterministic"] == "true"
    # each run sets the switch to its own config's value, not the previous run's
    assert client.get_run(off.run_id).data.tags["gptexp.deterministic"] == "false"
    assert not torch.are_deterministic_algorithms_enabled()
    assert client.get_run(on.run_id).data.params["train.deterministic"] == "True"
