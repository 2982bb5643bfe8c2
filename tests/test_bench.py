"""`gptexp bench` on tiny sizes: the JSON, the ratios and the MLflow run hold figures that agree with the
times they were made of (no timing asserted), and a missing book package is one line."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys

import pytest

from gptexp.bench.cli import add_bench_arguments
from gptexp.bench.results import RATIO_KEYS, format_table
from gptexp.bench.run import run_bench
from gptexp.bench.sizes import Sizes
from gptexp.bench.training import OPTIMIZERS
from gptexp.bench.windows import synthetic_corpus
from gptexp.runtime import physical_cores

from conftest import cli_env

TINY = Sizes(
    model={
        "vocab_size": 50257,
        "context_length": 32,
        "emb_dim": 64,
        "n_heads": 4,
        "n_layers": 2,
        "drop_rate": 0.1,
        "qkv_bias": False,
    },
    batch=2,
    train_reps=2,
    train_budget_s=5.0,
    compile=False,
    bf16_slow_shape=(1, 8),
    peak_n=256,
    peak_reps=1,
    opt_reps=1,
    eval_tokens=97,
    eval_bf16_slow_tokens=33,
    eval_reps=2,
    eval_budget_s=5.0,
    gen_new=8,
    gen_bf16_slow_new=4,
    gen_reps=2,
    gen_budget_s=5.0,
    data_s1_tokens=2_000,
    data_big_tokens=5_000,
    data_reps=1,
    logging_steps=5,
    logging_reps=1,
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
    assert set(result["eval"]) == {"book_pkg_fp32", "fast_fp32", "fast_bf16"}
    assert set(result["generate"]) == {"book_pkg_fp32", "fast_kv_fp32", "fast_kv_bf16"}
    assert set(result["data"]) == {"stride1", "stride32"}
    s1 = result["data"]["stride1"]
    assert s1["book_text"]["windows"] == s1["ours_text"]["windows"] == 2_000 - 32
    # The winning settings are the fastest of what was measured, on the threads the bench used.
    optimizer = result["optimizer"]
    assert result["settings"]["optimizer"] == optimizer["best"] == min(OPTIMIZERS, key=lambda k: optimizer[k]["step_s"])
    train = result["train"]
    eager = {p: train[f"fast_{p}"]["tokens_per_s"] for p in ("fp32", "bf16")}
    assert result["settings"]["precision"] == max(eager, key=eager.get)
    assert result["settings"]["threads"] == result["env"]["threads"] == physical_cores()


def test_each_figure_is_its_work_over_the_median_of_its_recorded_times(tiny_run):
    _, result = tiny_run
    peak = {p: result["peak"][p]["gflops"] * 1e9 for p in ("fp32", "bf16")}
    for name, fig in result["train"].items():
        assert len(fig["times_s"]) == fig["reps"] >= 1, name
        assert fig["seconds"] == pytest.approx(statistics.median(fig["times_s"]), abs=1e-6), name
        assert fig["tokens_per_s"] == pytest.approx(fig["batch"] * fig["seq"] / fig["seconds"]), name
        for p in ("fp32", "bf16"):
            assert fig[f"mfu_{p}"] == pytest.approx(fig["tokens_per_s"] * fig["flops_per_token"] / peak[p]), name
    evals = result["eval"]
    for name, fig in evals.items():
        assert fig["seconds"] == pytest.approx(statistics.median(fig["times_s"]), abs=1e-6), name
    # The book's loader and evaluate_split see the same validation tokens: 3 windows of 32 in 97 tokens.
    assert evals["fast_fp32"]["tokens"] == 3 * 32
    assert evals["book_pkg_fp32"]["tokens_per_s"] * evals["book_pkg_fp32"]["seconds"] == pytest.approx(3 * 32)
    assert evals["fast_fp32"]["tokens_per_s"] * evals["fast_fp32"]["seconds"] == pytest.approx(3 * 32)
    for name, fig in result["generate"].items():
        assert fig["tokens_per_s"] * fig["seconds"] == pytest.approx(fig["new_tokens"]), name
    for name in OPTIMIZERS:
        step = result["optimizer"][name]
        assert step["step_s"] == pytest.approx(statistics.median(step["times_s"])), name
    for case, fig in result["data"].items():
        for build in ("book_text", "ours_text", "book_ids", "ours_ids"):
            assert fig[build]["seconds"] == statistics.median(fig[build]["times_s"]), (case, build)
            assert fig[build]["peak_bytes"] >= 4096, (case, build)


def test_each_ratio_is_gptexps_figure_over_the_books(tiny_run):
    _, result = tiny_run
    ratios, train, evals, gen = result["ratios"], result["train"], result["eval"], result["generate"]
    book = train["book_pkg_fp32"]["tokens_per_s"]
    assert ratios["train_fp32"] == pytest.approx(train["fast_fp32"]["tokens_per_s"] / book)
    assert ratios["train_bf16"] == pytest.approx(train["fast_bf16"]["tokens_per_s"] / book)
    assert ratios["train_book_impl_fp32"] == pytest.approx(train["gptexp_book_fp32"]["tokens_per_s"] / book)
    eval_book, gen_book = evals["book_pkg_fp32"]["tokens_per_s"], gen["book_pkg_fp32"]["tokens_per_s"]
    assert ratios["eval_fp32"] == pytest.approx(evals["fast_fp32"]["tokens_per_s"] / eval_book)
    assert ratios["generate_kv"] == pytest.approx(gen["fast_kv_fp32"]["tokens_per_s"] / gen_book)
    s1 = result["data"]["stride1"]
    assert ratios["data_build_time"] == pytest.approx(s1["book_text"]["seconds"] / s1["ours_text"]["seconds"])
    assert ratios["data_peak_memory"] == pytest.approx(s1["book_text"]["peak_bytes"] / s1["ours_text"]["peak_bytes"])


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
    fast_fp32 = result["train"]["fast_fp32"]["tokens_per_s"]
    assert run.data.metrics["train.fast_fp32.tokens_per_s"] == pytest.approx(fast_fp32)
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


# `import llms_from_scratch` fails as it does where the package is not installed: None in sys.modules
# is Python's own way to make an import fail.
WITHOUT_THE_BOOK = "import sys; sys.modules['llms_from_scratch'] = None; "


@pytest.mark.parametrize(
    "how",
    [
        "from gptexp.cli import main; sys.exit(main(sys.argv[1:]))",
        "import runpy; runpy.run_module('gptexp.bench', run_name='__main__', alter_sys=True)",
    ],
    ids=["gptexp bench", "python -m gptexp.bench"],
)
def test_without_the_books_package_bench_is_one_line_exit_2_and_writes_nothing(tmp_path, how):
    args = ["bench", "--quick", "--out", str(tmp_path / "out" / "bench.json")]
    if "runpy" in how:
        args = args[1:]
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_THE_BOOK + how, *args],
        cwd=tmp_path,
        env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert (
        proc.stderr.startswith(
            "gptexp: error: gptexp bench measures gptexp against the book's package llms-from-scratch"
        )
        and proc.stderr.count("\n") == 1
    )
    assert "pip install --no-deps llms-from-scratch==1.0.19" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no JSON, no MLflow store
