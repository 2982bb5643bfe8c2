"""What a sweep prints: one line per finished trial, with the sweep's standing at its end.

    trial 3: model.context_length=64 train.lr=0.0059 -> epoch_val_loss 6.1234 (41.2 s) \
        | 4/10 done, 2m10s elapsed, ETA 3m15s, best 6.0512 (trial 1)

(one line; cut here to fit).

Only one process prints: with `--workers`, each worker sends its lines to the parent
(`ToParent`), which prints them whole, in the order they arrive, so workers' lines never
interleave. Trials done counts finished (complete or pruned) trials, as the study's n_trials
does, including those a resumed study held already; the ETA is the time this sweep has taken
per trial it finished, times the trials left (workers finish trials side by side, so it counts
their pace together).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

from .progress import eta
from .report import format_duration

COUNTED = ("COMPLETE", "PRUNED")  # the states n_trials counts


@dataclass(frozen=True)
class TrialDone:
    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    value: float | None  # the objective, when complete
    line: str  # "trial N: params -> result (seconds)"


class SweepProgress:
    """Prints each finished trial's line with the trials done / N, elapsed time, ETA and best so far."""

    def __init__(
        self,
        n_trials: int,
        direction: str,
        *,
        finished_before: int = 0,
        best: tuple[float, int] | None = None,
        stream=None,
    ):
        self.n_trials, self.direction = n_trials, direction
        self.finished = finished_before
        self.finished_here = 0
        self.best = best  # (value, trial number)
        self.stream = stream
        self.started = time.monotonic()

    @classmethod
    def for_study(cls, study, n_trials: int, direction: str, stream=None) -> SweepProgress:
        """The standing of `study` as it resumes (a new one: nothing done, no best)."""
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state.name == "COMPLETE" and t.value is not None]
        pick = min if direction == "minimize" else max
        best = pick(((t.value, t.number) for t in complete), key=lambda vn: vn[0]) if complete else None
        return cls(
            n_trials,
            direction,
            finished_before=sum(t.state.name in COUNTED for t in trials),
            best=best,
            stream=stream,
        )

    def _better(self, value: float) -> bool:
        if self.best is None or math.isnan(self.best[0]):
            return True
        return value < self.best[0] if self.direction == "minimize" else value > self.best[0]

    def standing(self) -> str:
        elapsed = time.monotonic() - self.started
        left = eta(elapsed, self.finished_here, max(0, self.n_trials - self.finished + self.finished_here))
        best = "none yet" if self.best is None else f"{self.best[0]:.4f} (trial {self.best[1]})"
        return (
            f"{min(self.finished, self.n_trials)}/{self.n_trials} done, {format_duration(elapsed)} elapsed, "
            f"ETA {format_duration(left)}, best {best}"
        )

    def trial_done(self, done: TrialDone) -> None:
        if done.state in COUNTED:
            self.finished += 1
            self.finished_here += 1
        if done.state == "COMPLETE" and done.value is not None and self._better(done.value):
            self.best = (done.value, done.number)
        self.say(f"{done.line} | {self.standing()}")

    def say(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)


class ToParent:
    """A worker process's progress: its lines go to the parent, which prints them (SweepProgress)."""

    def __init__(self, queue, worker: int):
        self.queue, self.worker = queue, worker

    def trial_done(self, done: TrialDone) -> None:
        self.queue.put((self.worker, "trial", done))

    def say(self, text: str) -> None:
        self.queue.put((self.worker, "say", text))


def forward(progress, kind: str, payload) -> bool:
    """Print a worker's message on `progress` if it is one (`kind` trial or say); whether it was."""
    if kind == "trial":
        progress.trial_done(payload)
    elif kind == "say":
        progress.say(payload)
    else:
        return False
    return True
