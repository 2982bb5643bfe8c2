"""`gptexp bench` on tiny sizes: the JSON, the ratios and the MLflow run are there (no timing asserted)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from gptexp.bench.cli import add_bench_arguments
from gptexp.bench.results import RATIO_KEYS, format_table
from gptexp.bench.run import run_bench
from gptexp.bench.sizes import Sizes
from gptexp.bench.training import OPTIMIZERS
from gptexp.bench.windows import synthetic_corpus

TINY = Sizes(
    model={"vocab_size": 50257, "context_length": 32, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.1, "qkv_bias": False},
    batch=2, train_reps=2, train_budget_s=5.0, compile=False, bf16_slow_shape=(1, 8),
    peak_n=256, peak_reps=1, opt_reps=1,
    eval_tokens=97, eval_bf16_slow_tokens=33, eval_reps=2, eval_budget_s=5.0,
    gen_new=8, gen_bf16_slow_new=4, gen_reps=2, gen_budget_s=5.0,
    data_s1_tokens=2_000, data_big_tokens=5_000, data_reps=1,
)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
    mp.chdir(tmp)  # nothing may land in the checkout
    try:
        result = run_bench(out=tmp / "out" / "bench.json", sizes=TINY, verbose=False)
    finally:
        mp.undo()
    return tmp, result


def test_json_has_every_ratio_as_a_positive_finite_number(tiny_run):
    tmp, result = tiny_run
    written = json.loads((tmp / "out" / "bench.json").read_text())
    assert not list((tmp / "out").glob("*.tmp"))
    assert written["ratios"] == pytest.approx(result["ratios"])
    for key in RATIO_KEYS:
        value = written["ratios"][key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert all(math.isfinite(v) for v in _numbers(written))


def test_json_holds_each_figure_with_its_baseline_and_the_winning_settings(tiny_run):
    _, result = tiny_run
    assert {"book_pkg_fp32", "gptexp_book_fp32", "fast_fp32", "fast_bf16"} <= set(result["train"])
    for fig in result["train"].values():
        assert fig["tokens_per_s"] > 0 and fig["reps"] >= 1 and fig["mfu_fp32"] > 0 and fig["mfu_bf16"] > 0
    assert set(result["eval"]) == {"book_pkg_fp32", "fast_fp32", "fast_bf16"}
    assert set(result["generate"]) == {"book_pkg_fp32", "fast_kv_fp32", "fast_kv_bf16"}
    assert set(result["data"]) == {"stride1", "stride32"}
    s1 = result["data"]["stride1"]
    assert s1["book_text"]["windows"] == s1["ours_text"]["windows"] == 2_000 - 32
    assert result["settings"]["optimizer"] in OPTIMIZERS
    assert result["settings"]["precision"] in ("fp32", "bf16")
    assert result["settings"]["threads"] >= 1
    assert result["peak"]["fp32"]["gflops"] > 0 and result["peak"]["bf16"]["gflops"] > 0


def test_an_mlflow_run_in_experiment_bench_has_the_figures_and_the_json(tiny_run):
    from mlflow.tracking import MlflowClient

    tmp, result = tiny_run
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("bench")
    assert exp is not None
    assert exp.artifact_location == (tmp / "artifacts" / "bench").resolve().as_uri()  # beside every other experiment
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.experiment_id == exp.experiment_id and run.info.status == "FINISHED"
    for key in RATIO_KEYS:
        assert run.data.metrics[f"ratio.{key}"] == pytest.approx(result["ratios"][key])
    assert run.data.metrics["train.fast_fp32.tokens_per_s"] > 0
    assert run.data.params["env.torch"] and run.data.params["settings.threads"]
    assert "bench.json" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_the_table_names_every_ratio(tiny_run):
    _, result = tiny_run
    table = format_table(result)
    for key in RATIO_KEYS:
        assert key in table


def test_synthetic_corpus_encodes_to_exactly_its_ids(tokenizer):
    text, ids = synthetic_corpus(tokenizer, 3_000, seed=1)
    assert tokenizer.encode(text) == ids.tolist()


def test_cli_arguments_parse():
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    args = parser.parse_args(["--quick", "--out", "x.json"])
    assert args.quick and str(args.out) == "x.json" and args.log_mlflow
