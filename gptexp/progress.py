"""Console progress: a tqdm bar per epoch and the book's one-line evaluation summaries."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .runner import Callback, EndEvent, EpochEvent, EvalEvent, StartEvent, StepEvent


class ConsoleProgress(Callback):
    def __init__(self, stream=None, bars: bool | None = None):
        self.stream = stream or sys.stderr
        # Bars only on a terminal: logs of CI and sweeps stay one line per event.
        self.bars = self.stream.isatty() if bars is None else bars
        self.bar: tqdm | None = None
        self.steps_per_epoch = 0
        self.num_epochs = 0

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_start(self, event: StartEvent) -> None:
        self.steps_per_epoch = len(event.data.train_loader)
        self.num_epochs = event.config.train.num_epochs
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
        if not self.bars:
            return
        if self.bar is None:
            self.bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {event.epoch}/{self.num_epochs}",
                file=self.stream,
                leave=False,
                dynamic_ncols=True,
            )
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
        self._write(
            f"epoch {event.epoch}: train {event.train_loss:.4f} (ppl {event.train_ppl:.1f}), "
            f"val {event.val_loss:.4f} (ppl {event.val_ppl:.1f}), {event.tokens_per_sec:,.0f} tokens/s"
        )
        self._write((event.prompt + event.completion).replace("\n", " "))

    def on_end(self, event: EndEvent) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
