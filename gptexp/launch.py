"""`gptexp train --nproc N`: one training job on N processes of this machine, started by torchrun's engine.

It runs `torch.distributed.run` (what the `torchrun` command runs) in this process: its elastic
agent starts N workers, `python -m gptexp train ...` with RANK, WORLD_SIZE, LOCAL_RANK, ... set,
watches them, and stops them all when one of them fails or when this process gets Ctrl-C/SIGTERM
(it passes the signal on; the workers agree to stop at their next step, see gptexp.distributed).

Rank 0 ends the MLflow run itself: FINISHED, FAILED (a NaN, a lost process) or KILLED (a
signal). A rank 0 killed outright cannot, so the launcher, which learns the run's id from it
(GPTEXP_RUN_ID_FILE), ends a run still RUNNING after the job: FAILED when a worker died, KILLED
when the launcher itself was interrupted. The workers print the job's one-line errors (rank 0
alone); the launcher adds a line only for what they cannot know: a worker killed by a signal,
and the interruption of the whole job.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from .config import Config
from .distributed import LAUNCHER_ENV, World, check_batch
from .errors import INTERRUPTS, GptexpError

# Where rank 0 writes its MLflow run id, so that the launcher can end the run if rank 0 cannot.
RUN_ID_FILE_ENV = "GPTEXP_RUN_ID_FILE"
EXIT_FAILED, EXIT_INTERRUPTED = 1, 130


def record_run_id(run_id: str) -> None:
    """Rank 0's note of its run id for the launcher (a no-op outside `gptexp train --nproc`)."""
    path = os.environ.get(RUN_ID_FILE_ENV)
    if path:
        from .checkpoint import write_atomic

        write_atomic(Path(path), run_id.encode())


def check_launch(nproc: int, config: Config | None) -> None:
    """What can be refused before any process starts: the batch split and the devices."""
    if config is None:  # --resume: rank 0 checks the recorded config
        return
    from .runtime import resolve_device

    check_batch(config.train, nproc)
    resolve_device(config.train.device, World(rank=0, size=nproc, local_rank=0, local_size=nproc))


def launch(nproc: int, worker_argv: list[str], config: Config | None = None) -> int:
    """Run `gptexp <worker_argv>` on `nproc` processes under torchrun's agent; the exit code."""
    if os.environ.get("WORLD_SIZE") or os.environ.get(LAUNCHER_ENV):
        raise GptexpError("--nproc starts its own processes and this one already runs under torchrun: drop --nproc")
    check_launch(nproc, config)
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from .runtime import physical_cores

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "gptexp", *worker_argv])
    folder = Path(tempfile.mkdtemp(prefix="gptexp-launch-"))
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    levels = _quiet_torch_logs()
    # The workers' thread count (unless train.threads says otherwise) is set by each worker; this
    # only spares torchrun's banner about OMP_NUM_THREADS.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, physical_cores() // nproc)))
    os.environ[LAUNCHER_ENV] = "1"
    os.environ[RUN_ID_FILE_ENV] = str(folder / "run_id")
    code, line, ending = 0, None, None
    try:
        run(args)
    except ChildFailedError as exc:
        code, line, ending = _outcome(exc.failures)
    except (SignalException, *INTERRUPTS):
        code, line = EXIT_INTERRUPTED, "gptexp: interrupted"
        ending = ("KILLED", "launcher interrupted (Ctrl-C or SIGTERM)")
    finally:
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            if handler is not None:
                signal.signal(signum, handler)  # torchrun's agent leaves its own behind
        for logger, level in levels.items():
            logger.setLevel(level)
    try:
        if line:
            print(line, file=sys.stderr)
        if ending is not None:
            _settle(folder / "run_id", *ending)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return code


def _quiet_torch_logs() -> dict[logging.Logger, int]:
    """Silence the agent's own log lines ("Sending process ... closing signal"): the workers and
    the launcher say what happened in gptexp's words. Returns the levels to put back."""
    import torch.distributed.run  # noqa: F401 - its loggers exist once imported

    levels = {}
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logger = logging.getLogger(name)
            levels[logger] = logger.level
            logger.setLevel(logging.CRITICAL)
    return levels


def _outcome(failures: dict) -> tuple[int, str | None, tuple[str, str] | None]:
    """(exit code, the launcher's line or None, (status, reason) for a run left RUNNING) from the
    agent's failures: local rank -> ProcessFailure (exitcode < 0: killed by signal -exitcode).

    The agent stops the other workers with SIGTERM once one fails; a worker handles it (it exits
    with a code), unless it was starting or already leaving, so SIGTERM and SIGINT deaths are the
    stop, not its cause.
    """
    killed = sorted(
        (f for f in failures.values() if f.exitcode < 0 and -f.exitcode not in _STOP_SIGNALS),
        key=lambda f: (f.timestamp, f.local_rank),
    )
    if killed:
        first = killed[0]
        what = f"rank {first.local_rank} (pid {first.pid}) was killed by {first.signal_name()}"
        main = failures.get(0)
        code = main.exitcode if main is not None and main.exitcode > 0 else EXIT_FAILED
        return code, f"gptexp: {what}; the job stopped", ("FAILED", f"{what}; the job stopped")
    codes = {rank: f.exitcode for rank, f in failures.items() if f.exitcode > 0}
    if set(codes.values()) <= {EXIT_INTERRUPTED}:  # a stop the ranks agreed on (or the agent's SIGTERM)
        return EXIT_INTERRUPTED, "gptexp: interrupted", ("KILLED", "a worker was interrupted (Ctrl-C or SIGTERM)")
    if codes.get(0) == EXIT_INTERRUPTED:  # rank 0 stopped (quiet under the launcher); others failed after it
        return EXIT_INTERRUPTED, "gptexp: interrupted", ("KILLED", "rank 0 was interrupted (Ctrl-C or SIGTERM)")
    if 0 in codes:  # rank 0 said why in its one line and ended the run
        return codes[0], None, ("FAILED", f"rank 0 exited with code {codes[0]}")
    rank = min(codes, key=lambda r: (failures[r].timestamp, r))
    what = f"rank {rank} (pid {failures[rank].pid}) exited with code {codes[rank]}"
    return EXIT_FAILED, f"gptexp: {what} (its output above says why); the job stopped", ("FAILED", what)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _settle(run_id_file: Path, status: str, reason: str) -> None:
    """End the run rank 0 opened if it is still RUNNING (rank 0 died before it could end it)."""
    try:
        run_id = run_id_file.read_text().strip()
    except OSError:
        return  # no run was created
    from .tags import TAG_ERROR, TAG_STATUS, TAG_STOP
    from .tracking import end_if_running, get_client

    tags = {
        TAG_STOP if status == "KILLED" else TAG_ERROR: reason,
        TAG_STATUS: "interrupted" if status == "KILLED" else "failed",
    }
    try:
        end_if_running(get_client(), run_id, status, tags)
    except Exception as exc:  # the store itself may be what failed
        print(
            f"gptexp: warning: could not end run {run_id} ({type(exc).__name__}): it may be left RUNNING",
            file=sys.stderr,
        )
