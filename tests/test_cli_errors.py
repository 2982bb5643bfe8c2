"""Bad input: one line on stderr saying what and how to fix it, exit 2, no traceback, no run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, cli_env
from gptexp.cli import main


def bad_config(tmp_path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


CASES = {
    "unknown key": (["--set", "train.learning_rate=0.1"], "unknown key train.learning_rate"),
    "unknown section": (["--set", "optim.lr=0.1"], "unknown key 'optim'"),
    "wrong type": (["--set", "train.batch_size=two"], "train.batch_size must be an integer"),
    "lr <= 0": (["--set", "train.lr=0"], "train.lr must be a positive number"),
    "batch_size < 1": (["--set", "train.batch_size=0"], "train.batch_size must be at least 1"),
    "stride < 1": (["--set", "data.stride=0"], "data.stride must be at least 1"),
    "context_length < 1": (["--set", "model.context_length=0"], "model.context_length must be at least 1"),
    "dropout >= 1": (["--set", "model.drop_rate=1.0"], "model.drop_rate must be in [0, 1)"),
    "dropout < 0": (["--set", "model.drop_rate=-0.1"], "model.drop_rate must be in [0, 1)"),
    "emb_dim % n_heads": (["--set", "model.n_heads=3"], "not divisible by model.n_heads 3"),
    "split too short": (["--set", "model.context_length=2000"], "validation split of the-verdict has 534 tokens; context_length 2000 needs at least 2001"),
    "unknown precision": (["--set", "train.precision=fp8"], "train.precision must be one of"),
    "missing corpus": (["--set", "data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    "bad --set": (["--set", "train.lr"], "is not KEY=VALUE"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_creates_no_run(case, mlflow_store, capsys):
    args, expected = CASES[case]
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), "--experiment", "bad-input", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("bad-input")
    assert exp is None or not client.search_runs([exp.experiment_id])


@pytest.mark.parametrize("content,expected", [
    (b"", "empty"),
    (b"   \n\t ", "empty"),
    (b"\xff\xfe\x00abc not utf-8", "UTF-8"),
])
def test_unusable_corpus_files_are_refused_before_any_run(tmp_path, content, expected, mlflow_store, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), "--experiment", "bad-input", "--set", f"data.source={corpus}"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text,expected", [
    ("model: [1, 2", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("train:\n  lr: fast\n", "train.lr must be a number"),
])
def test_broken_config_files_are_one_line(tmp_path, text, expected, capsys):
    capsys.readouterr()
    assert main(["train", "--config", bad_config(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_file_exits_2_from_a_real_process_without_traceback(mlflow_store):
    out = subprocess.run([sys.executable, "-m", "gptexp.cli", "train", "--config", "/no/such.yaml"],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == ("gptexp: error: config file /no/such.yaml does not exist: give the path of a "
                                  "YAML file, e.g. configs/tiny.yaml")


def test_yaml_floats_without_a_dot_are_numbers(capsys):
    from gptexp.config import load_config

    assert load_config(TINY, ["train.lr=4e-4"]).train.lr == 4e-4


@pytest.mark.parametrize("args,expected", [
    (["eval", "--checkpoint", "/no/such/ckpt"], "no checkpoint at /no/such/ckpt"),
    (["generate", "--checkpoint", "/no/such/ckpt", "--prompt", "x"], "no checkpoint at /no/such/ckpt"),
])
def test_missing_checkpoints_are_one_line_exit_2(args, expected, capsys):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "epoch-0001"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (folder / "model_config.json").write_text('{"vocab_size": 50257, "context_length": 8, "emb_dim": 8, '
                                              '"n_heads": 2, "n_layers": 1, "drop_rate": 0.0, "qkv_bias": false}')
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and len(err.strip().splitlines()) == 1
