"""Reproducible experiments: specs pin a result, `reproduce` checks it, `rerun` repeats a run, and
every run records what a reader needs to re-run it (config, environment, git state)."""

from __future__ import annotations

import csv
import io
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from gptexp import jobs, provenance
from gptexp.cli import main
from gptexp.config import from_dict, load_config
from gptexp.tracking import local_artifact_dir

from conftest import REPO, TINY, VERDICT_SHA256

ONE_EPOCH = ["train.num_epochs=1"]


def runs_of(client, experiment):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def metric_history(client, run_id, key):
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return [(m.step, m.value) for m in history]


@pytest.fixture(scope="module")
def source(mlflow_store):
    """One tracked 1-epoch run of the tiny preset: (client, run_id, config, RunResult)."""
    config = load_config(TINY, ONE_EPOCH)
    outcome = jobs.train(config, experiment="experiments-tests", run_name="source", console=False)
    return MlflowClient(mlflow_store), outcome.run_id, config, outcome.result


def write_spec(path, config, result, *, name="tiny-check", seed=None, sha256=VERDICT_SHA256, bump_val_at=None):
    """A spec for `config` whose expected results are `result`'s (one val_loss bumped by 0.01 if asked)."""
    evals = [
        {
            "step": e.global_step,
            "train_loss": e.train_loss,
            "val_loss": e.val_loss + (0.01 if e.global_step == bump_val_at else 0.0),
            "tokens_seen": e.tokens_seen,
        }
        for e in result.evals
    ]
    last = result.epochs[-1]
    spec = {
        "name": name,
        "seed": config.train.seed if seed is None else seed,
        "corpus": {"name": "the-verdict", "sha256": sha256},
        "impl": config.model.impl,
        "precision": config.train.precision,
        "device": config.train.device,
        "config": config.to_dict(),
        "expected": {
            "evals": evals,
            "sample": {"epoch": last.epoch, "prompt": last.prompt, "text": last.prompt + last.completion},
        },
        "tolerances": {"train_loss": 1e-3, "val_loss": 1e-3, "tokens_seen": 0},
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def comparison_rows(client, run_id):
    text = (local_artifact_dir(client, run_id) / "reproduce" / "comparison.csv").read_text()
    return list(csv.DictReader(io.StringIO(text)))


# ---------------------------------------------------------------------------- the shipped spec


def test_the_ch05_spec_pins_the_books_run():
    raw = yaml.safe_load((REPO / "experiments" / "ch05-verdict.yaml").read_text())
    cfg = from_dict(raw["config"])
    assert cfg.model_cfg() == {
        "vocab_size": 50257,
        "context_length": 256,
        "emb_dim": 768,
        "n_heads": 12,
        "n_layers": 12,
        "drop_rate": 0.1,
        "qkv_bias": False,
        "impl": "book",
    }
    t = cfg.train
    assert (t.lr, t.weight_decay, t.batch_size, t.num_epochs, t.eval_freq, t.eval_iter, t.seed) == (
        4e-4,
        0.1,
        2,
        10,
        5,
        5,
        123,
    )
    assert (t.device, t.precision, t.compile, t.fused_adamw) == ("cpu", "fp32", False, False)
    assert (cfg.sample.start_context, cfg.sample.max_new_tokens) == ("Every effort moves you", 50)
    assert cfg.stride == 256 and cfg.data.train_ratio == 0.9
    assert raw["corpus"]["sha256"] == VERDICT_SHA256
    assert raw["tolerances"] == {"train_loss": 1e-3, "val_loss": 1e-3, "tokens_seen": 0}


def test_the_ch05_expected_results_are_the_book_packages_18_eval_points_and_last_sample():
    raw = yaml.safe_load((REPO / "experiments" / "ch05-verdict.yaml").read_text())
    expected = yaml.safe_load((REPO / "experiments" / raw["expected_file"]).read_text())
    assert expected["experiment"] == "ch05-verdict"
    assert expected["corpus_sha256"] == VERDICT_SHA256
    # 9 steps per epoch x 10 epochs, evaluated every 5 steps from step 0: the book's 18 points
    assert expected["steps_per_epoch"] == 9
    evals = expected["evals"]
    assert [e["step"] for e in evals] == list(range(0, 90, 5))
    assert [e["epoch"] for e in evals] == [s // 9 + 1 for s in range(0, 90, 5)]
    # batch 2 x context 256 tokens per step, counted after the step as the book does
    assert [e["tokens_seen"] for e in evals] == [(s + 1) * 512 for s in range(0, 90, 5)]
    # the book's printed start (9.781 / 9.933) and its overfitting shape: train falls far below val
    assert round(evals[0]["train_loss"], 3) == 9.781 and round(evals[0]["val_loss"], 3) == 9.933
    assert evals[-1]["train_loss"] < 0.5 < 6.0 < evals[-1]["val_loss"]
    assert expected["sample"]["epoch"] == 10
    assert expected["sample"]["prompt"] == "Every effort moves you"
    assert expected["sample"]["text"].startswith("Every effort moves you")
    produced = expected["produced_by"]
    assert {
        "command",
        "code",
        "date",
        "python",
        "torch",
        "llms_from_scratch",
        "tiktoken",
        "cpu",
        "threads",
        "device",
        "precision",
    } <= produced.keys()
    assert (produced["device"], produced["precision"], produced["llms_from_scratch"]) == ("cpu", "fp32", "1.0.19")


# ---------------------------------------------------------------------------- reproduce


def test_reproduce_within_tolerance_passes_exit_0_and_tags_the_run(source, tmp_path, capsys):
    client, _, config, result = source
    spec = write_spec(tmp_path / "tiny-check.yaml", config, result)
    capsys.readouterr()
    assert main(["reproduce", str(spec), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "metric" in out and "|diff|" in out and "verdict: pass" in out
    (run,) = [
        r for r in runs_of(client, config.experiment) if r.data.tags.get("gptexp.experiment_spec") == "tiny-check"
    ]
    assert run.data.tags["gptexp.verdict"] == "pass" and run.data.tags["gptexp.job"] == "reproduce"
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_epochs"] == "1"  # params are the config; the tag names the spec
    rows = comparison_rows(client, run.info.run_id)
    # train_loss, val_loss and tokens_seen at each eval step, then the sample
    assert [(r["metric"], r["step"]) for r in rows[:3]] == [
        ("train_loss", "0"),
        ("val_loss", "0"),
        ("tokens_seen", "0"),
    ]
    assert len(rows) == 3 * len(result.evals) + 1 and rows[-1]["metric"] == "sample"
    assert all(r["ok"] == "true" for r in rows)


def test_reproduce_outside_tolerance_fails_exit_1_naming_the_point(source, tmp_path, capsys):
    client, _, config, result = source
    spec = write_spec(tmp_path / "tiny-wrong.yaml", config, result, name="tiny-wrong", bump_val_at=5)
    capsys.readouterr()
    assert main(["reproduce", str(spec), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "verdict: fail" in out
    (failed,) = [ln for ln in out.splitlines() if ln.rstrip().endswith("FAIL")]
    assert failed.split()[:2] == ["val_loss", "5"]
    (run,) = [
        r for r in runs_of(client, config.experiment) if r.data.tags.get("gptexp.experiment_spec") == "tiny-wrong"
    ]
    assert run.data.tags["gptexp.verdict"] == "fail"
    bad = [r for r in comparison_rows(client, run.info.run_id) if r["ok"] == "false"]
    assert [(r["metric"], r["step"]) for r in bad] == [("val_loss", "5")]
    assert float(bad[0]["abs_diff"]) == pytest.approx(0.01, abs=1e-6)


def test_reproduce_refuses_a_corpus_that_does_not_match_the_pinned_checksum(source, tmp_path, capsys):
    client, _, config, result = source
    spec = write_spec(tmp_path / "other-text.yaml", config, result, name="other-text", sha256="0" * 64)
    before = len(runs_of(client, config.experiment))
    capsys.readouterr()
    assert main(["reproduce", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and VERDICT_SHA256 in err and "0" * 64 in err
    assert len(runs_of(client, config.experiment)) == before  # no run left behind


def test_a_spec_whose_pins_disagree_with_its_config_is_refused(source, tmp_path, capsys):
    _, _, config, result = source
    spec = write_spec(tmp_path / "bad-seed.yaml", config, result, seed=7)
    capsys.readouterr()
    assert main(["reproduce", str(spec)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed pins 7" in err and "train.seed" in err


def test_a_missing_experiment_is_one_line_exit_2_listing_the_available_ones(mlflow_store, capsys):
    assert main(["reproduce", "no-such-experiment"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no experiment 'no-such-experiment'" in err and "ch05-verdict" in err


# ---------------------------------------------------------------------------- rerun


def test_rerun_makes_a_new_run_from_the_recorded_config_with_identical_metrics(source, capsys):
    client, source_id, config, _ = source
    capsys.readouterr()
    assert main(["rerun", source_id, "--quiet"]) == 0
    (rerun,) = [r for r in runs_of(client, "experiments-tests") if r.data.tags.get("gptexp.rerun_of") == source_id]
    assert rerun.info.run_id != source_id and rerun.info.status == "FINISHED"
    original = client.get_run(source_id)
    assert rerun.data.params == original.data.params
    timing = {"tokens_per_sec"}
    # System metrics (system/...) sample the machine, not the run's results: left out here.
    results = {k for k in original.data.metrics if not k.startswith("system/")}
    assert {k for k in rerun.data.metrics if not k.startswith("system/")} == results
    for key in results - timing:
        # bit for bit
        assert metric_history(client, rerun.info.run_id, key) == metric_history(client, source_id, key), key
    assert "identical" in capsys.readouterr().out


def test_rerun_of_an_unknown_run_is_one_line_exit_2(mlflow_store, capsys):
    assert main(["rerun", "0123456789abcdef0123456789abcdef"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no run" in err


# ---------------------------------------------------------------------------- provenance


def _git(repo, *args):
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
    )


def test_a_run_records_config_environment_and_the_diff_of_a_dirty_tree(mlflow_store, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "model.py").write_text("lr = 4e-4\n")
    _git(repo, "add", "model.py")
    _git(repo, "commit", "-q", "-m", "initial")
    monkeypatch.setattr(provenance, "REPO", repo)
    clean = provenance.git_state()
    assert clean.commit and not clean.dirty and clean.diff == ""
    (repo / "model.py").write_text("lr = 1e-3  # uncommitted experiment\n")

    config = load_config(TINY, ONE_EPOCH)
    outcome = jobs.train(config, experiment="provenance-tests", console=False)
    client = MlflowClient(mlflow_store)
    run = client.get_run(outcome.run_id)
    tags = run.data.tags
    assert tags["gptexp.git_dirty"] == "true"
    assert tags["mlflow.source.git.commit"] == clean.commit
    folder = local_artifact_dir(client, outcome.run_id)
    patch = (folder / "environment" / "git-diff.patch").read_text()
    assert "-lr = 4e-4" in patch and "+lr = 1e-3  # uncommitted experiment" in patch
    # The rest of what a reader needs: versions, hardware, threads, packages, the resolved config.
    import platform

    import torch

    assert tags["gptexp.python_version"] == platform.python_version()
    assert tags["gptexp.torch_version"] == torch.__version__
    assert tags["gptexp.cuda_version"] == str(torch.version.cuda)
    assert tags["gptexp.cpu"] == provenance.cpu_model() and tags["gptexp.cpu"]
    assert int(tags["gptexp.threads"]) >= 1
    freeze = (folder / "environment" / "pip-freeze.txt").read_text().splitlines()
    assert any(line.startswith("torch==") for line in freeze) and any(line.startswith("mlflow==") for line in freeze)
    assert load_config(folder / "config" / "config.yaml") == config
