"""Console progress: the book's one-line evaluation summaries, each epoch's summary with the whole
run's elapsed time and ETA, and on a terminal two tqdm bars (the whole run, with its ETA, and the
epoch)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from .events import Callback, EndEvent, EpochEvent, EvalEvent, StartEvent, StepEvent
from .report import format_duration
from .text_view import visible


def eta(elapsed: float, done: int, total: int) -> float | None:
    """Seconds left at the pace so far (`done` of `total` units in `elapsed` seconds); None before any."""
    return None if done <= 0 else elapsed / done * max(0, total - done)


class ConsoleProgress(Callback):
    def __init__(self, stream=None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        # Bars only on a terminal: logs of CI and sweeps stay one line per event.
        self.bars = self.stream.isatty() if bars is None else bars
        self.bar: tqdm | None = None
        self.run_bar: tqdm | None = None
        self.steps_per_epoch = 0
        self.num_epochs = 0
        self.total_steps = 0
        self.steps_before = 0  # a resumed run's steps done before this process
        self.steps_done = 0
        self.started = time.monotonic()

    def _write(self, text: str) -> None:
        if self.bar is not None or self.run_bar is not None:
            tqdm.write(text, file=self.stream)  # clears the bars, writes, redraws them
        else:
            print(text, file=self.stream, flush=True)

    def on_start(self, event: StartEvent) -> None:
        self.steps_per_epoch = len(event.data.train_loader)
        self.num_epochs = event.config.train.num_epochs
        self.total_steps = event.total_steps
        self.steps_before = min(event.total_steps, event.start_epoch * self.steps_per_epoch)
        self.steps_done = 0
        self.started = time.monotonic()
        rt = event.runtime
        what = f"resuming after epoch {event.start_epoch:d}" if event.resumed else "training"
        where = f"{rt.device} {rt.precision}, {rt.threads} threads"
        if event.placement.world_size > 1:
            p = event.placement
            where = (
                f"{p.world_size} processes ({p.backend}, {p.devices_summary()}, {p.nodes} machine(s)), "
                f"{rt.precision}, {rt.threads} threads each"
            )
        self._write(
            f"{what}: {event.model.num_parameters():,} parameters, impl {event.config.model.impl}, "
            f"{where}, {self.steps_per_epoch} steps/epoch"
        )

    def on_step(self, event: StepEvent) -> None:
        self.steps_done += 1
        if not self.bars:
            return
        if self.run_bar is None:
            self.run_bar = tqdm(
                total=self.total_steps,
                initial=self.steps_before,
                desc="run",
                unit="step",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                position=0,
            )
        if self.bar is None:
            self.bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {event.epoch}/{self.num_epochs}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
                position=1,
            )
        self.run_bar.update(1)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{event.loss:.3f}", refresh=False)

    def on_eval(self, event: EvalEvent) -> None:
        self._write(
            f"Ep {event.epoch} (Step {event.global_step:06d}): "
            f"Train loss {event.train_loss:.3f}, Val loss {event.val_loss:.3f}"
        )

    def on_epoch_end(self, event: EpochEvent) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elapsed = time.monotonic() - self.started
        left = eta(elapsed, self.steps_done, self.total_steps - self.steps_before)
        self._write(
            f"epoch {event.epoch}/{self.num_epochs}: train {event.train_loss:.4f} (ppl {event.train_ppl:.1f}), "
            f"val {event.val_loss:.4f} (ppl {event.val_ppl:.1f}), {event.tokens_per_sec:,.0f} tokens/s; "
            f"run {format_duration(elapsed)} elapsed, ETA {format_duration(left)}"
        )
        self._write(visible(event.prompt + event.completion))

    def on_end(self, event: EndEvent) -> None:
        for bar in (self.bar, self.run_bar):
            if bar is not None:
                bar.close()
        self.bar = self.run_bar = None
