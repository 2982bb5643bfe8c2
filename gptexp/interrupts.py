"""Ctrl-C and SIGTERM: a request to stop, honoured at safe points, never in the middle of a write.

A Python signal handler runs between two bytecodes of whatever the main thread is doing. An
exception raised there can land in a GC or weakref callback, where Python prints "Exception
ignored" and carries on (training then simply goes on), or halfway through the cleanup that ends
a run (which then stays RUNNING), or inside an MLflow/SQLAlchemy write. So while a job is open
(`deferred()`: from just before an MLflow run is created until it has ended, and for the whole
life of a sweep worker) the handler only records the request, and the code raises it itself at
safe points (`check()`): each training step, each evaluation batch, each generated token, the
start of a run, and between sweep trials. Cleanup never calls `check()`, so a second signal can
never interrupt it.

Outside a job each write stands alone and is atomic (a file written to a temp path and renamed,
one database transaction), so there the first signal raises at once, as Python's own Ctrl-C does,
and commands with no run (`generate`, `report`, `compare`) still stop promptly. Should that raise
be swallowed (a GC callback again), the request stays recorded and the next `check()` or the
start of a run honours it. Once a stop has been raised, later signals are only recorded: the exit
path (a run's cleanup, the one line "gptexp: interrupted", exit 130) runs to its end.

In a job that spans several processes (gptexp.distributed) a rank must not stop alone: the others
would wait for it in their next collective. There (`collective()`) `check()` never raises; each
training step and evaluation batch the ranks sum their requests (`World.step_loss`, `World.check_stop`)
and all stop together through `raise_agreed`.

Signals are delivered to a process, not to an object, so the request is process-wide state.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time

from .errors import Terminated

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Request:
    """The stop request of this process: the first signal received, and where we are."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.depth = 0  # nesting of deferred(); > 0 while a job must end cleanly
        self.raised = False  # the stop is under way: never raise again from the handler
        self.collective = 0  # nesting of collective(); > 0 while the ranks of a job decide together


_request = _Request()


def _raise() -> None:
    _request.raised = True
    raise KeyboardInterrupt() if _request.signum == signal.SIGINT else Terminated()


def raise_agreed(signum: int) -> None:
    """Raise the stop the ranks of a job agreed on (signal `signum`), though this rank may have received none."""
    if _request.signum is None:
        _request.signum = signum
    _raise()


def _handle(signum: int, frame) -> None:
    if _request.signum is None:
        _request.signum = signum
    if _request.depth == 0 and not _request.raised:
        _raise()


def install() -> None:
    """Handle SIGINT and SIGTERM in this process from now on, with no request pending."""
    _request.signum, _request.raised, _request.collective = None, False, 0
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers; embedding code keeps its own
    for signum in SIGNALS:
        signal.signal(signum, _handle)


@contextlib.contextmanager
def handled():
    """install() for the length of one command; the handlers that were there come back after it,
    so a process that calls `gptexp.cli.main` (a test runner, a notebook) keeps its own Ctrl-C
    and SIGTERM, and `timeout` can still stop it."""
    main = threading.current_thread() is threading.main_thread()
    # getsignal gives None for a handler set outside Python, which cannot be put back from here.
    previous = {s: signal.getsignal(s) for s in SIGNALS} if main else {}
    install()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


def requested() -> int | None:
    """The signal number of the pending stop request, or None."""
    return _request.signum


def check() -> None:
    """Raise KeyboardInterrupt (SIGINT) or Terminated (SIGTERM) if a stop was requested
    (never inside `collective()`, where the ranks agree on a stop first)."""
    if _request.signum is not None and not _request.collective:
        _raise()


@contextlib.contextmanager
def collective():
    """While inside, `check()` only leaves the request recorded: the caller agrees on it with the
    other processes of its job and raises it with `raise_agreed`."""
    _request.collective += 1
    try:
        yield
    finally:
        _request.collective -= 1


@contextlib.contextmanager
def deferred(honour: bool = True):
    """While inside, signals are only recorded; a request still pending when the outermost
    block ends normally is raised then (the job has ended cleanly; the command stops), unless
    not `honour`: a rank other than 0 of a distributed job, which rank 0 speaks for."""
    _request.depth += 1
    try:
        yield
    finally:
        _request.depth -= 1
    if _request.depth == 0 and honour:
        check()


def ending() -> None:
    """The command's exit path begins: from now on signals are only recorded, as once a stop has
    been raised. A distributed worker's job has ended, and torchrun, stopping the other workers,
    must not cut the line that says how."""
    _request.raised = True


def sleep(seconds: float, step: float = 0.1) -> None:
    """time.sleep that returns early once a stop is requested (a handler that does not raise
    lets time.sleep run its full length)."""
    deadline = time.monotonic() + seconds
    while _request.signum is None:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(step, left))
