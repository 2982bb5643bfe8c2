"""`gptexp`: one command line for training, evaluating, sampling, sweeping and reproducing.

Bad input is one line on stderr and exit code 2; a run that fails exits 1; Ctrl-C or SIGTERM
exits 130 with the MLflow run marked KILLED.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifact_cache, data_command, distributed, interrupts, jobs, report, reproduce, server, sweep
from . import checkpoint as ckpt
from .bench.cli import add_bench_arguments, cmd_bench
from .config import MAX_NEW_TOKENS, MAX_SEED, apply_overrides, from_dict, load_config, read_yaml
from .errors import INTERRUPTS, GptexpError, RunFailed
from .evaluation import evaluate_split
from .generation import generate, text_to_token_ids, token_ids_to_text
from .launch import launch, record_run_id
from .provenance import redact
from .run_names import add_naming_arguments, train_run_name, user_tags
from .runner import NonFiniteLoss
from .tables import aligned
from .tags import TAG_CHECKPOINT, TAG_CORPUS_SHA256, TAG_JOB, TAG_SOURCE_RUN
from .tokenizer import get_tokenizer
from .tracking import get_client, log_flat_params, log_metrics, resolve_run_id, run_params, tracked_run, write_failures

EXIT_BAD_INPUT = 2
# Below this temperature sampling is greedy in all but name, and logits / T overflow to inf as
# T nears float32's smallest values; above the upper bound it is uniform noise.
TEMPERATURE_RANGE = (0.01, 100.0)


class _Parser(argparse.ArgumentParser):
    """Usage errors as the one line every other bad input gets (subcommand parsers inherit it)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"gptexp: error: {message}; see '{self.prog} --help'\n")


def _int_in(low: int, high: int):
    """An argparse type: an integer written in digits, from low to high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high} (got {text!r})")
        return value

    return parse


def _temperature(text: str) -> float:
    low, high = TEMPERATURE_RANGE
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value == 0.0 or low <= value <= high):
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or from {low:g} to {high:g} (got {text!r})")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0 to 86400 (got {text!r})")
    return value


def _prompt(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty or blank: give the text to continue, e.g. --prompt 'Every effort moves you'"
        )
    return text


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key (repeatable); the value is read as a YAML scalar",
    )


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_ID", help="an MLflow run made by gptexp train")
    src.add_argument("--checkpoint", metavar="PATH", help="a checkpoint folder (or a run's checkpoints/ folder)")
    p.add_argument(
        "--which", choices=("last", "best"), default="last", help="with --run: which checkpoint (default last)"
    )


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config", metavar="PATH", help="run config YAML, e.g. configs/tiny.yaml, or runs:/RUN_ID/path of a run's"
    )
    p.add_argument("--resume", metavar="RUN_ID", help="continue this run from its last checkpoint (same run)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the config's, else gptexp)")
    _add_set(p)
    add_naming_arguments(p)
    p.add_argument(
        "--nproc",
        type=_int_in(1, 1024),
        metavar="N",
        help="train on N processes of this machine (torchrun's engine, DDP; one per GPU on CUDA); "
        "train.batch_size stays the global batch",
    )
    p.add_argument(
        "--join-timeout",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others to join (default 300)",
    )


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_source(p)
    p.add_argument("--no-track", action="store_true", help="do not record the evaluation as an MLflow run")
    _add_set(p)


def _generate_arguments(p: argparse.ArgumentParser) -> None:
    _add_source(p)
    p.add_argument("--prompt", required=True, type=_prompt, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_int_in(0, MAX_NEW_TOKENS), default=50, metavar="N")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=0.0,
        metavar="T",
        help=f"0 = greedy (default), else from {TEMPERATURE_RANGE[0]:g} to {TEMPERATURE_RANGE[1]:g}",
    )
    p.add_argument("--top-k", type=_int_in(1, 2**31 - 1), default=None, metavar="K")
    p.add_argument("--seed", type=_int_in(0, MAX_SEED), default=123, metavar="S")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]  # returns the exit code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gptexp",
        description="Pretrain GPT-2-style models as in chapter 5 of 'Build a Large Language Model (From Scratch)', "
        "every job an MLflow run (store: $MLFLOW_TRACKING_URI, default sqlite:///mlruns/mlflow.db).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help)
        command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    showwarning = warnings.showwarning
    try:
        with interrupts.handled():
            return _main(argv)
    finally:
        warnings.showwarning = showwarning  # a caller's warnings keep their own format


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    # MLflow's store-migration notices and artifact progress bars drown the training log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # With a tracking server, MLflow prints a "View run ... at: URL" line as each run ends: a sweep's
    # console keeps its one line per trial.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.showwarning = _one_line_warnings(warnings.showwarning)

    def say(exc: BaseException, line: str) -> None:
        if distributed.speaks(exc):  # one process of a distributed job says what all of them met
            print(line, file=sys.stderr)

    try:
        if args.command != "train" and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
            raise GptexpError(
                f"gptexp {args.command} runs as one process, not under torchrun (WORLD_SIZE is "
                f"{os.environ['WORLD_SIZE']}): only gptexp train spans processes"
            )
        return args.func(args)
    except GptexpError as exc:
        # Messages quote storage URLs and driver errors, which may hold passwords.
        say(exc, f"gptexp: error: {redact(str(exc))}")
        return EXIT_BAD_INPUT
    except NonFiniteLoss as exc:
        say(exc, f"gptexp: training failed: {exc}")
        return 1
    except RunFailed as exc:
        say(exc, f"gptexp: run failed: {exc}")
        return 1
    except INTERRUPTS as exc:
        say(exc, "gptexp: interrupted")
        return 130


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _one_line_warnings(default: Callable[..., None]) -> Callable[..., None]:
    """gptexp's own warnings are advice to the user: one line each, once, no source excerpt."""
    shown: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None):
        if not os.path.abspath(filename).startswith(_PACKAGE_DIR + os.sep):
            return default(message, category, filename, lineno, file, line)
        if str(message) not in shown:
            shown.add(str(message))
            print(f"gptexp: warning: {message}", file=file or sys.stderr)

    return show


def cmd_train(args) -> int:
    if args.resume and (args.config or args.overrides):
        raise GptexpError("--resume continues a run with its recorded config: drop --config and --set")
    if args.resume and (args.run_name or args.tags or args.note):
        raise GptexpError("--resume continues a run under its own name and tags: drop --run-name, --tag and --note")
    if not args.resume and not args.config:
        raise GptexpError("train needs --config PATH (e.g. configs/tiny.yaml) or --resume RUN_ID")
    if args.config and args.config.startswith("runs:/"):  # e.g. a sweep's best/config.yaml on a tracking server
        args.config = str(artifact_cache.resolve_runs_uri(get_client(), args.config))
    config = None if args.resume else load_config(args.config, args.overrides)
    if config is not None and args.run_name is None:
        args.run_name = train_run_name(args.config, args.overrides, config)
    if args.nproc is not None and args.nproc > 1:
        return launch(args.nproc, _worker_argv(args), config)
    # Under torchrun (or --nproc's workers): one process of a job; else SINGLE, the process alone.
    with distributed.joined(distributed.launch_env(), args.join_timeout) as world:
        if args.resume:
            outcome = jobs.resume(args.resume, on_created=record_run_id, world=world)
        else:
            assert config is not None  # loaded above whenever there is no --resume
            outcome = jobs.train(
                config,
                experiment=args.experiment,
                run_name=args.run_name,
                tags=user_tags(args),
                on_created=record_run_id,
                world=world,
            )
    if outcome is None or not world.is_main:  # rank 0 reports the job
        return 0
    last = outcome.result.epochs[-1] if outcome.result.epochs else None
    summary = f"run {outcome.run_id} finished"
    if last is not None:
        summary += f": epoch_val_loss {last.val_loss:.4f} (ppl {last.val_ppl:.2f}) after epoch {last.epoch}"
    print(summary)
    return 0


def _worker_argv(args) -> list[str]:
    """The `gptexp train` command line of each worker `--nproc` starts (without --nproc)."""
    argv = ["train"]
    for flag, value in (
        ("--config", args.config),
        ("--resume", args.resume),
        ("--experiment", args.experiment),
        ("--run-name", args.run_name),
        ("--note", args.note),
    ):
        if value is not None:
            argv += [flag, value]
    for item in args.overrides:
        argv += ["--set", item]
    for key, value in args.tags:
        argv += ["--tag", f"{key}={value}"]
    return argv + ["--join-timeout", str(args.join_timeout)]


def _load_for_inference(args, overrides=()):
    """(model, config, checkpoint folder, source description) from --run/--checkpoint."""
    if args.run:
        client = get_client()
        args.run = resolve_run_id(client, args.run)  # the full id from here on (messages, tags)
        folder = jobs.run_checkpoint(client, args.run, args.which)
        source = f"run {args.run} ({folder.name})"
    else:
        folder = ckpt.resolve_checkpoint_path(Path(args.checkpoint))
        source = str(folder)
    model_cfg = ckpt.load_model_config(folder)
    config_path = folder / ckpt.RUN_CONFIG
    # A folder made outside `train` (e.g. imported weights) has only the model config.
    raw = read_yaml(config_path) if config_path.is_file() else {"model": model_cfg}
    config = from_dict(apply_overrides(raw, list(overrides)), origin=str(config_path))
    given = ckpt.RUN_CONFIG + (" with --set" if overrides else "") if config_path.is_file() else "--set"
    ckpt.check_config_fits(folder, model_cfg, config.model, given)
    model = ckpt.load_model(folder, impl=config.model.impl)
    return model, config, folder, source


def cmd_eval(args) -> int:
    model, config, folder, source = _load_for_inference(args, args.overrides)
    prepared = jobs.preflight(config, training=False)
    data, rt = prepared.data, prepared.runtime
    rt.use_threads()
    model.to(rt.device)
    ctx, bs = config.model.context_length, config.train.eval_batch_size
    with rt.autocast():
        rows = [
            ("train", evaluate_split(model, data.train_ids, ctx, rt.device, bs, name="train split")),
            ("validation", evaluate_split(model, data.val_ids, ctx, rt.device, bs, name="validation split")),
        ]
    print(f"{source} on {data.corpus.name} ({rt.device}, {rt.precision})")
    print(
        aligned(
            ("split", "loss", "ppl", "tokens"),
            [(name, f"{r.loss:.4f}", f"{r.ppl:.2f}", str(r.tokens)) for name, r in rows],
            right={1, 2, 3},
        )
    )
    if not args.no_track:
        _track_eval(config, args, folder, data, rows)
    return 0


def _track_eval(config, args, folder, data, rows) -> None:
    """The evaluation as a child run of the run it evaluates (one row per training job in the
    experiment's table), with training's metric names at the checkpoint's epoch; a checkpoint
    given by path is a run of its own in the config's experiment."""
    client = get_client()
    tags = {TAG_JOB: "eval", TAG_CHECKPOINT: str(folder), TAG_CORPUS_SHA256: data.corpus.sha256}
    experiment, epoch = config.experiment, ckpt.epoch_of(folder)
    name = f"eval {folder.name}"
    if args.run:
        tags[TAG_SOURCE_RUN] = args.run
        experiment = client.get_experiment(client.get_run(args.run).info.experiment_id).name
        name = f"eval of {args.which}" + (f" (epoch {epoch})" if epoch else "")
    with (
        write_failures(client),
        tracked_run(client, experiment, run_name=name, tags=tags, parent_run_id=args.run) as run_id,
    ):
        log_flat_params(client, run_id, run_params(config))
        values = {}
        for split, r in rows:
            short = "train" if split == "train" else "val"
            values[f"epoch_{short}_loss"], values[f"epoch_{short}_ppl"] = r.loss, r.ppl
        log_metrics(client, run_id, values, step=epoch or 0)


def cmd_generate(args) -> int:
    model, config, _, _ = _load_for_inference(args)
    tokenizer = get_tokenizer("gpt2")
    torch.manual_seed(args.seed)
    idx = text_to_token_ids(args.prompt, tokenizer)
    top_k = min(args.top_k, config.model.vocab_size) if args.top_k else None
    out = generate(
        model,
        idx,
        args.max_new_tokens,
        context_size=config.model.context_length,
        temperature=args.temperature,
        top_k=top_k,
    )
    print(token_ids_to_text(out, tokenizer))
    return 0


# Every subcommand, in the order `gptexp --help` lists them.
COMMANDS = (
    Command("train", "train a model (one MLflow run), or resume a run", _train_arguments, cmd_train),
    Command("eval", "loss and perplexity of a checkpoint on both splits", _eval_arguments, cmd_eval),
    Command("generate", "continue a prompt with a trained model", _generate_arguments, cmd_generate),
    Command("sweep", "an Optuna sweep; each trial a nested MLflow run", sweep.add_sweep_arguments, sweep.cmd_sweep),
    Command(
        "server",
        "an MLflow tracking server for workers on other machines (proxied artifacts)",
        server.add_server_arguments,
        server.cmd_server,
    ),
    Command(
        "reproduce",
        "run a named experiment spec and check it against its expected results",
        reproduce.add_reproduce_arguments,
        reproduce.cmd_reproduce,
    ),
    Command(
        "rerun",
        "a new run from a run's recorded config (tagged gptexp.rerun_of)",
        reproduce.add_rerun_arguments,
        reproduce.cmd_rerun,
    ),
    Command(
        "report", "a table of runs or of a study's trials, best first", report.add_report_arguments, report.cmd_report
    ),
    Command(
        "compare",
        "two runs side by side: differing params, metrics, last samples",
        report.add_compare_arguments,
        report.cmd_compare,
    ),
    Command(
        "data",
        "prepare a corpus: tokenize it into the token cache ahead of training",
        data_command.add_data_arguments,
        data_command.cmd_data,
    ),
    Command(
        "bench", "measure gptexp against the book's implementation (JSON + MLflow)", add_bench_arguments, cmd_bench
    ),
)


if __name__ == "__main__":
    sys.exit(main())
