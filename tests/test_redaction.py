"""Passwords never reach stdout, stderr, tags or params, whatever URL grammar the driver accepts."""

from __future__ import annotations

import sys
import uuid

import optuna
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from gptexp.cli import main
from gptexp.provenance import environment_tags, redact

from conftest import TINY

# (text as written, text as logged): user names, hosts, ports and databases stay readable.
CASES = [
    # the case: SQLAlchemy reads a raw '/' as part of the password
    ("postgresql://root:s3/cret@host/db", "postgresql://root:***@host/db"),
    ("postgresql://u:p:a?s#s@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql+psycopg://u:pw@h/db", "postgresql+psycopg://u:***@h/db"),
    ("mysql://u:p%2Fw%40rd@h/db", "mysql://u:***@h/db"),  # percent-encoded
    ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),  # no user
    ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),  # urllib ends the userinfo at the last '@'
    ("postgresql://u:p/w@x@h/db", "postgresql://u:***@h/db"),
    ("postgresql://me@corp:pw@h/db", "postgresql://me@corp:***@h/db"),  # SQLAlchemy allows '@' in the user
    ("postgresql://u:pw@h/db?application_name=a@b", "postgresql://u:***@h/db?application_name=a@b"),
    # embedded in a command line, `--storage=URL`, an error message
    (
        "gptexp sweep --storage postgresql://u:p/w@h/db --n-trials 3",
        "gptexp sweep --storage postgresql://u:***@h/db --n-trials 3",
    ),
    ("gptexp sweep --storage=postgresql://u:p/w@h/db", "gptexp sweep --storage=postgresql://u:***@h/db"),
    (
        "cannot open storage postgresql://root:s3/cret@host/db (timeout): check --storage",
        "cannot open storage postgresql://root:***@host/db (timeout): check --storage",
    ),
    ("a postgresql://u:p1@h/d then mysql://v:p2@k/e", "a postgresql://u:***@h/d then mysql://v:***@k/e"),
    # password= in a URL query and in libpq keyword DSNs
    ("postgresql://u@h/db?password=s3/cret&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require"),
    ("postgresql://u:pw@h/db?sslpassword=k3y", "postgresql://u:***@h/db?sslpassword=***"),
    ("host=h user=u password=s3/cret dbname=d", "host=h user=u password=*** dbname=d"),
    (r"host=h password='s3 \' cret' dbname=d", "host=h password=*** dbname=d"),
    ("PGPASSWORD=s3cret gptexp sweep", "PGPASSWORD=*** gptexp sweep"),
    # nothing to hide: left as it is
    ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
    ("sqlite:////home/me@work/optuna.db", "sqlite:////home/me@work/optuna.db"),
    ("journal:///tmp/a:b@c.log", "journal:///tmp/a:b@c.log"),
    ("http://127.0.0.1:5000/#/experiments", "http://127.0.0.1:5000/#/experiments"),
    ("password authentication failed for user root", "password authentication failed for user root"),
]


@pytest.mark.parametrize("text,logged", CASES)
def test_redact_hides_the_password_and_keeps_user_and_host(text, logged):
    assert redact(text) == logged


@pytest.mark.parametrize("value", [None, 3, 2.5, ["postgresql://u:p@h/db"]])
def test_redact_leaves_non_strings_unchanged(value):
    assert redact(value) is value


def test_redact_stays_linear_on_long_hostile_text():
    # Many URL starts and no '@': a naive scan from each start would take minutes here.
    hostile = "a://b:" * 30_000 + "x@" * 30_000
    assert redact(hostile).startswith("a://b:***@")


def test_the_command_tag_of_a_run_hides_a_storage_password(monkeypatch):
    monkeypatch.setattr(
        sys,
        "argv",
        ["gptexp", "sweep", "--storage=postgresql://root:s3/cret@host/db", "--storage", "redis://:s3/cret@host:6379/0"],
    )
    command = environment_tags(torch.device("cpu"), "fp32", 1)["gptexp.command"]
    assert "cret" not in command
    assert command == ("gptexp sweep --storage=postgresql://root:***@host/db --storage redis://:***@host:6379/0")


def test_an_unreachable_storage_with_a_slash_in_its_password_is_redacted_on_stderr(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "study": "nowhere",
                "base": {"config": str(TINY)},
                "n_trials": 1,
                "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2}},
            }
        )
    )
    capsys.readouterr()
    assert main(["sweep", "--config", str(spec), "--storage", "postgresql://u:hun/ter2@127.0.0.1:1/nowhere"]) == 2
    out, err = capsys.readouterr()
    assert "postgresql://u:***@127.0.0.1:1/nowhere" in err
    assert "ter2" not in out + err and len(err.strip().splitlines()) == 1


def test_a_sweep_never_logs_or_prints_a_password_with_a_slash(
    tmp_path, verdict_text, mlflow_store, monkeypatch, capsys
):
    corpus = tmp_path / "verdict-head.txt"
    corpus.write_text(verdict_text[:4000], encoding="utf-8")
    study = f"redact-{uuid.uuid4().hex[:8]}"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "study": study,
                "experiment": "redaction-tests",
                "n_trials": 1,
                "base": {
                    "config": str(TINY),
                    "overrides": {"train.num_epochs": 1, "data.source": str(corpus), "sample.max_new_tokens": 2},
                },
                "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            }
        )
    )
    # The local server trusts loopback connections, so any password is accepted: a fine secret to hunt for.
    storage = "postgresql://root:s3/cret@127.0.0.1:5432/test"
    argv = ["sweep", "--config", str(spec), f"--storage={storage}"]
    monkeypatch.setattr(sys, "argv", ["gptexp", *argv])  # what the trial's gptexp.command tag is built from
    capsys.readouterr()
    try:
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert "storage postgresql://root:***@127.0.0.1:5432/test" in out
        client = MlflowClient(mlflow_store)
        runs = client.search_runs(
            [client.get_experiment_by_name("redaction-tests").experiment_id],
            filter_string=f"tags.`gptexp.study` = '{study}'",
        )
        assert sorted(r.data.tags["gptexp.job"] for r in runs) == ["sweep", "trial"]
        logged = [out, err]
        for run in runs:
            logged += [*run.data.params.values(), *run.data.tags.values()]
        assert not [text for text in logged if "cret" in text]
        parent = next(r for r in runs if r.data.tags["gptexp.job"] == "sweep")
        assert parent.data.tags["optuna.storage"] == "postgresql://root:***@127.0.0.1:5432/test"
        child = next(r for r in runs if r.data.tags["gptexp.job"] == "trial")
        assert "--storage=postgresql://root:***@127.0.0.1:5432/test" in child.data.tags["gptexp.command"]
    finally:
        optuna.delete_study(study_name=study, storage=storage)
