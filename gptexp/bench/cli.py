"""`gptexp bench`'s arguments and command (listed in gptexp.cli.COMMANDS)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .run import run_bench


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller sizes (~1-2 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH.json",
        help="where to write the JSON (default bench-results/bench-<timestamp>.json)",
    )
    parser.add_argument("--no-mlflow", dest="log_mlflow", action="store_false", help="do not log an MLflow run")


def cmd_bench(args: argparse.Namespace) -> int:
    run_bench(quick=args.quick, out=args.out, log_mlflow=args.log_mlflow)
    return 0
