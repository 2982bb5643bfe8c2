"""Bad input: one line on stderr saying what and how to fix it, exit 2, no traceback, no run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from gptexp.cli import main

from conftest import TINY, cli_env


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
    "split too short": (
        ["--set", "model.context_length=2000"],
        "validation split of the-verdict has 534 tokens; context_length 2000 needs at least 2001",
    ),
    "unknown precision": (["--set", "train.precision=fp8"], "train.precision must be one of"),
    "missing corpus": (["--set", "data.source=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    "bad --set": (["--set", "train.lr"], "is not KEY=VALUE"),
    # Each of these used to be found only after the MLflow run existed (a traceback mid-run or a crash).
    "empty start_context": (["--set", "sample.start_context="], "sample.start_context is empty or blank"),
    "blank start_context": (["--set", "sample.start_context='   '"], "sample.start_context is empty or blank"),
    "seed beyond torch's range": (["--set", f"train.seed={2**64}"], "train.seed must be from 0 to 2**64-1"),
    "seed as a float too large to be exact": (
        ["--set", "train.seed=1.0e+23"],
        "train.seed must be an integer written in digits",
    ),
    "infinite grad_clip": (["--set", "train.grad_clip=.inf"], "train.grad_clip must be a finite number"),
    "infinite weight_decay": (["--set", "train.weight_decay=.inf"], "train.weight_decay must be a finite number"),
    "nan drop_rate": (["--set", "model.drop_rate=.nan"], "model.drop_rate must be a finite number"),
    "nan train_ratio": (["--set", "data.train_ratio=.nan"], "data.train_ratio must be a finite number"),
    "lr that overflows to inf": (["--set", "train.lr=1e999"], "train.lr must be a finite number"),
    "huge max_new_tokens": (
        ["--set", "sample.max_new_tokens=1000000000"],
        "sample.max_new_tokens must be from 0 to 10000",
    ),
    "huge thread count": (["--set", "train.threads=1000000000"], "train.threads must be from 0 (one per core) to 1024"),
    "model larger than memory": (["--set", "model.emb_dim=1000000"], "GiB of memory: lower model.emb_dim"),
    "blank --experiment": (["--experiment", "   "], "experiment name is blank"),
    "500-character --experiment": (
        ["--experiment", "x" * 500],
        "experiment name is 500 characters long; the limit is 200",
    ),
    "blank --run-name": (["--run-name", " "], "run name is blank"),
    "300-character --run-name": (["--run-name", "r" * 300], "run name is 300 characters long; the limit is 250"),
    "blank experiment in the config": (["--set", "experiment='  '"], "experiment is blank"),
    "experiment with a newline": (["--set", 'experiment="a\\nb"'], "holds control characters"),
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


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", "empty"),
        (b"   \n\t ", "empty"),
        (b"\xff\xfe\x00abc not utf-8", "UTF-8"),
    ],
)
def test_unusable_corpus_files_are_refused_before_any_run(tmp_path, content, expected, mlflow_store, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    capsys.readouterr()
    code = main(["train", "--config", str(TINY), "--experiment", "bad-input", "--set", f"data.source={corpus}"])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model: [1, 2", "not valid YAML"),
        ("- just\n- a list\n", "must hold a mapping"),
        ("train:\n  lr: fast\n", "train.lr must be a number"),
    ],
)
def test_broken_config_files_are_one_line(tmp_path, text, expected, capsys):
    capsys.readouterr()
    assert main(["train", "--config", bad_config(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_a_missing_config_file_exits_2_from_a_real_process_without_traceback(mlflow_store):
    out = subprocess.run(
        [sys.executable, "-m", "gptexp.cli", "train", "--config", "/no/such.yaml"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "gptexp: error: config file /no/such.yaml does not exist: give the path of a YAML file, e.g. configs/tiny.yaml"
    )


def test_yaml_floats_without_a_dot_are_numbers(capsys):
    from gptexp.config import load_config

    assert load_config(TINY, ["train.lr=4e-4"]).train.lr == 4e-4


@pytest.mark.parametrize(
    "args,expected",
    [
        (["eval", "--checkpoint", "/no/such/ckpt"], "no checkpoint at /no/such/ckpt"),
        (["generate", "--checkpoint", "/no/such/ckpt", "--prompt", "x"], "no checkpoint at /no/such/ckpt"),
    ],
)
def test_missing_checkpoints_are_one_line_exit_2(args, expected, capsys):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1


def test_a_corrupt_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    folder = tmp_path / "epoch-0001"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    (folder / "model_config.json").write_text(
        '{"vocab_size": 50257, "context_length": 8, "emb_dim": 8, '
        '"n_heads": 2, "n_layers": 1, "drop_rate": 0.0, "qkv_bias": false}'
    )
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(folder), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and len(err.strip().splitlines()) == 1


def test_a_start_context_outside_the_model_vocabulary_is_refused_before_any_run(tmp_path, mlflow_store, capsys):
    # Words whose GPT-2 ids are all below 1000, so the corpus fits a 1000-token vocabulary but the
    # default prompt ('Every' is id 6109) does not: it used to fail at the first epoch's sample.
    corpus = tmp_path / "small-ids.txt"
    corpus.write_text("a b c d " * 400)
    capsys.readouterr()
    code = main(
        [
            "train",
            "--config",
            str(TINY),
            "--experiment",
            "bad-input",
            "--set",
            f"data.source={corpus}",
            "--set",
            "model.vocab_size=1000",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "sample.start_context has token id 6109 but model.vocab_size is 1000" in err
    assert len(err.strip().splitlines()) == 1
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("bad-input")
    assert exp is None or not client.search_runs([exp.experiment_id])


@pytest.mark.parametrize(
    "text,key,lines",
    [
        ("train:\n  batch_size: 8\n  lr: 2.0e-3\nmodel:\n  n_layers: 2\ntrain:\n  batch_size: 2\n", "train", (1, 6)),
        ("train:\n  lr: 2.0e-3\n  batch_size: 8\n  lr: 4.0e-4\n", "lr", (2, 4)),
        ("experiment: a\nexperiment: b\n", "experiment", (1, 2)),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines, capsys):
    capsys.readouterr()
    assert main(["train", "--config", bad_config(tmp_path, text)]) == 2
    err = capsys.readouterr().err
    assert f"has the key {key!r} twice (lines {lines[0]} and {lines[1]})" in err
    assert len(err.strip().splitlines()) == 1


def test_yaml_merge_keys_may_still_be_overridden_and_tags_are_still_refused(tmp_path):
    from gptexp.config import ConfigError, read_yaml

    merged = tmp_path / "merged.yaml"
    merged.write_text(
        "model: &m {n_layers: 2, emb_dim: 32}\nsample:\n  start_context: x\nanchors:\n  <<: *m\n  n_layers: 4\n"
    )
    assert read_yaml(merged)["anchors"] == {"n_layers": 4, "emb_dim": 32}
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(tagged)


@pytest.mark.parametrize(
    "duplicate,key",
    [
        ("sampler:\n  name: random\n", "sampler"),
        ("  train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, type: int}\n", "type"),  # inside space
    ],
)
def test_a_sweep_spec_with_a_key_given_twice_is_refused(tmp_path, duplicate, key):
    from gptexp.sweep import load_sweep_spec
    from gptexp.sweep_spec import SweepError

    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"study: s\nbase:\n  config: {TINY}\nsampler:\n  name: tpe\nn_trials: 2\n"
        f"space:\n  train.batch_size: {{type: categorical, choices: [4, 8]}}\n{duplicate}"
    )
    with pytest.raises(SweepError, match=f"sweep spec {spec} has the key '{key}' twice"):
        load_sweep_spec(spec)


def test_an_experiment_spec_with_a_key_given_twice_is_refused(tmp_path):
    from gptexp.errors import GptexpError
    from gptexp.reproduce import load_experiment_spec

    from conftest import REPO

    spec = tmp_path / "twice.yaml"
    spec.write_text((REPO / "experiments" / "ch05-verdict.yaml").read_text() + "\nseed: 124\n")
    with pytest.raises(GptexpError, match="has the key 'seed' twice"):
        load_experiment_spec(spec)


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--temperature", "inf"], "argument --temperature: must be 0 (greedy) or from 0.01 to 100 (got 'inf')"),
        (["--temperature", "nan"], "argument --temperature: must be 0 (greedy) or from 0.01 to 100 (got 'nan')"),
        (["--temperature", "1e-45"], "argument --temperature: must be 0 (greedy) or from 0.01 to 100"),
        (["--temperature", "-1"], "argument --temperature: must be 0 (greedy)"),
        (["--prompt", ""], "argument --prompt: is empty or blank"),
        (["--seed", "1e23"], "argument --seed: must be an integer from 0 to 18446744073709551615 (got '1e23')"),
        (["--seed", str(2**64)], "argument --seed: must be an integer from 0 to 18446744073709551615"),
        (["--top-k", "0"], "argument --top-k: must be an integer from 1"),
        (["--max-new-tokens", "1000000000"], "argument --max-new-tokens: must be an integer from 0 to 10000"),
    ],
)
def test_bad_generate_arguments_are_one_line_exit_2_before_any_model_loads(args, expected, capsys):
    capsys.readouterr()
    # The checkpoint does not exist: the argument must be refused first, whatever else is wrong.
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--checkpoint", "/no/such/ckpt", "--prompt", "x", *args])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err


def test_main_gives_the_callers_signal_handlers_and_warning_format_back(capsys):
    import signal
    import warnings

    def mine(signum, frame):
        pass

    before = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    showwarning = warnings.showwarning
    try:
        assert main(["generate", "--checkpoint", "/no/such/folder", "--prompt", "hi"]) == 2
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
        assert warnings.showwarning is showwarning
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
