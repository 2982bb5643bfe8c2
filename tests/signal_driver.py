"""Runs `gptexp train` again and again in this process, each run stopped by signals sent at a
chosen moment, and prints one JSON line per run: what `main` returned and the run's final status.

    python tests/signal_driver.py gc|twice RUNS SEED -- TRAIN ARGS...

gc     one SIGTERM sent from inside a garbage-collection callback, on the k-th collection (k at
       random) after training began: where a handler that raises is swallowed ("Exception ignored").
twice  a first SIGTERM or SIGINT at a random moment of training, a second one 10-300 ms later:
       the second lands anywhere in the cleanup that ends the run, or after it.

A helper of tests/test_train.py, run as a subprocess so that its signal handlers stay its own.
Runs in one process, so each costs no interpreter start-up.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import signal
import sys
import threading
import time

from mlflow.tracking import MlflowClient

from gptexp.cli import main
from gptexp.errors import INTERRUPTS

RUNNER = os.path.join("gptexp", "runner.py")


def in_training() -> bool:
    """Whether the main thread is inside the runner (so the MLflow run exists and is open)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith(RUNNER):
            return True
        frame = frame.f_back
    return False


class Training:
    """A GC callback: notes when training has begun and, if asked, sends SIGTERM from inside
    the callback once `countdown` collections have happened since."""

    def __init__(self, countdown: int | None):
        self.countdown = countdown
        self.began = False
        self.sent = False

    def __call__(self, phase, info) -> None:
        if phase != "start" or self.sent or threading.current_thread() is not threading.main_thread():
            return
        if not in_training():
            return
        self.began = True
        if self.countdown is None:
            return
        if self.countdown > 0:
            self.countdown -= 1
            return
        self.sent = True
        os.kill(os.getpid(), signal.SIGTERM)  # a signal to oneself is handled here, in the callback


def send_twice(training: Training, plan: dict, log: dict) -> None:
    deadline = time.monotonic() + 300
    while not training.began and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(plan["after_ms"] / 1000)
    os.kill(os.getpid(), plan["first"])
    log["sent"] = 1
    time.sleep(plan["delay_ms"] / 1000)
    os.kill(os.getpid(), plan["second"])
    log["sent"] = 2


def one_run(mode: str, rng: random.Random, number: int, train_args: list[str]) -> dict:
    experiment = f"signals-{mode}-{number}"
    kinds = (signal.SIGTERM, signal.SIGINT)
    plan = (
        {"countdown": rng.randint(0, 20)}
        if mode == "gc"
        else {
            "after_ms": rng.randint(0, 300),
            "first": rng.choice(kinds),
            "second": rng.choice(kinds),
            "delay_ms": round(10 * 30 ** rng.random()),
        }
    )  # 10-300 ms, as many short delays as long
    training = Training(plan.get("countdown"))
    log: dict = {}
    sender = None
    if mode == "twice":
        sender = threading.Thread(target=send_twice, args=(training, plan, log), daemon=True)
        sender.start()
    gc.callbacks.append(training)
    try:
        returned = main(["train", *train_args, "--experiment", experiment])
    except BaseException as exc:  # an interrupt that escaped main: the process would die of it
        returned = f"raised {type(exc).__name__}"
    while sender is not None and sender.is_alive():
        with contextlib.suppress(INTERRUPTS):  # a signal after main returned: the process would have exited by then
            sender.join()
    gc.callbacks.remove(training)
    if mode == "gc":
        log["sent"] = int(training.sent)
    client = MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return {
        "run": number,
        "plan": {k: int(v) for k, v in plan.items()},
        "returned": returned,
        "statuses": [r.info.status for r in runs],
        **log,
    }


def run(mode: str, runs: int, seed: int, train_args: list[str]) -> None:
    rng = random.Random(seed)
    # main() handles signals while it runs and puts these back when it returns: a second signal
    # that lands after the run has ended is ignored here, as a real process would have exited.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    if mode == "gc":
        gc.set_threshold(100)  # collections every few steps, so the countdown ends early in training
    for number in range(runs):
        print(json.dumps(one_run(mode, rng, number, train_args)), flush=True)


if __name__ == "__main__":
    mode, runs, seed, sep, *train_args = sys.argv[1:]
    assert mode in ("gc", "twice") and sep == "--", __doc__
    run(mode, int(runs), int(seed), train_args)
