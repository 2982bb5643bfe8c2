"""`gptexp server`: the MLflow tracking server that workers on other machines log to.

`mlflow server` with a database backend store (default: the project's mlruns/mlflow.db; for a
team, PostgreSQL) and proxied artifacts (clients upload and download through the server, so no
machine needs the artifact folder or cloud credentials). Bound to 127.0.0.1 unless told otherwise.
It prints the URL workers set as MLFLOW_TRACKING_URI, then becomes the server (same process id).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from .errors import GptexpError
from .provenance import redact


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535 (got {text!r})")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"must be a number of processes from 1 to 64 (got {text!r})")
    return int(text)


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for other machines)"
    )
    p.add_argument("--port", type=_port, default=5000, help="port (default 5000)")
    p.add_argument(
        "--backend-store-uri",
        metavar="URI",
        help="runs' database: default sqlite:///mlruns/mlflow.db (this project's store); for a team "
        "postgresql://USER@HOST:5432/DB (a password is best left to ~/.pgpass or PGPASSWORD)",
    )
    p.add_argument(
        "--artifacts-destination",
        metavar="URI",
        help="where the server keeps the artifacts it proxies: a folder (default mlruns/artifacts) or s3://, gs://...",
    )
    p.add_argument("--workers", type=_count, metavar="N", help="server processes (default: MLflow's, 4)")


def server_command(args: argparse.Namespace) -> tuple[list[str], dict[str, str], str]:
    """(argv, environment, workers' URL) of the `mlflow server` that `args` describe."""
    backend = args.backend_store_uri
    if not backend:
        root = Path("mlruns").resolve()
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise GptexpError(f"cannot create {root} ({exc.strerror}): run from a writable folder") from None
        backend = f"sqlite:///{root}/mlflow.db"
    if "://" not in backend:
        raise GptexpError(
            f"--backend-store-uri {redact(backend)} is not a database URL: give sqlite:///PATH or "
            "postgresql://USER@HOST:PORT/DB"
        )
    artifacts = args.artifacts_destination or str(Path("mlruns/artifacts").resolve())
    if "://" not in artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts,
    ]
    if args.workers:
        argv += ["--workers", str(args.workers)]
    # The store URL goes by environment, not argv: a password in it would show in `ps`.
    env = dict(os.environ, MLFLOW_BACKEND_STORE_URI=backend)
    host = socket.gethostname() if args.host in ("0.0.0.0", "::") else args.host
    if ":" in host:
        host = f"[{host}]"
    return argv, env, f"http://{host}:{args.port}"


def cmd_server(args: argparse.Namespace) -> int:
    argv, env, url = server_command(args)
    print(
        f"MLflow tracking server on {url} (runs in {redact(env['MLFLOW_BACKEND_STORE_URI'])}, artifacts proxied "
        f"to {redact(argv[argv.index('--artifacts-destination') + 1])})\n"
        f"on each worker: export MLFLOW_TRACKING_URI={url}",
        flush=True,
    )
    os.execve(argv[0], argv, env)
    return 0  # not reached: the process is the server now
