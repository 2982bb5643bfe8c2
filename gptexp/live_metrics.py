"""Signals recorded while a run trains, beside the book's numbers: per-step metrics and system metrics.

`step_loss` (the step's batch loss) and `grad_norm` (the gradients' total L2 norm before the
optimizer step) are logged at every optimizer step, step = global step from 0. Their names stay
apart from the book's `train_loss`/`val_loss` (the eval-cadence losses of `evaluate_model`), which
they leave unchanged. They are sent in batches (one `log_batch` every FLUSH_STEPS steps, at each
eval point, epoch end and run end), so a step costs an append, not a store write.

System metrics are MLflow's own monitor (`system/cpu_utilization_percentage`, memory, disk,
network; GPU with nvidia-ml-py installed), started for the run's id and stopped, with its last
samples flushed, when the run ends however it ends.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from .events import Callback, EndEvent, EpochEvent, EvalEvent, StartEvent, StepEvent

STEP_METRICS = ("step_loss", "grad_norm")
# Steps buffered before a write: a few hundred points per log_batch on a fast model, and on a slow
# one (seconds a step) the eval points flush sooner anyway.
FLUSH_STEPS = 100
# MLflow's limit of metrics per log_batch call.
MAX_BATCH = 1000
# Seconds between two system-metric samples; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it.
SYSTEM_SAMPLING_S = 10.0


class StepMetricsLogger(Callback):
    """Logs `step_loss` and `grad_norm` at every optimizer step, in batches."""

    def __init__(self, client, run_id: str, *, flush_steps: int = FLUSH_STEPS):
        self.client, self.run_id, self.flush_steps = client, run_id, flush_steps
        self._pending: list = []
        self._steps = 0
        # A resumed run trains its interrupted epoch again: steps up to this one are logged already.
        self._logged_through = -1

    def on_start(self, event: StartEvent) -> None:
        if event.resumed:
            history = self.client.get_metric_history(self.run_id, "step_loss")
            self._logged_through = max((m.step for m in history), default=-1)

    def on_step(self, event: StepEvent) -> None:
        from mlflow.entities import Metric

        if event.global_step <= self._logged_through:
            return
        now = int(time.time() * 1000)
        self._pending.append(Metric("step_loss", event.loss, now, event.global_step))
        if event.grad_norm is not None:
            self._pending.append(Metric("grad_norm", event.grad_norm, now, event.global_step))
        self._steps += 1
        if self._steps >= self.flush_steps:
            self.flush()

    def on_eval(self, event: EvalEvent) -> None:
        self.flush()

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.flush()

    def on_end(self, event: EndEvent) -> None:
        if event.status == "completed":
            self.flush()
            return
        # The run is ending on an error already: a store that fails now must not replace it.
        with contextlib.suppress(Exception):
            self.flush()

    def flush(self) -> None:
        pending, self._pending, self._steps = self._pending, [], 0
        for i in range(0, len(pending), MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=pending[i : i + MAX_BATCH])


def step_subscribers(config, client, run_id: str) -> list[Callback]:
    """The per-step loggers `config.tracking` asks for."""
    return [StepMetricsLogger(client, run_id)] if config.tracking.step_metrics else []


@contextlib.contextmanager
def system_metrics(client, run_id: str, enabled: bool, *, resumed: bool = False) -> Iterator[None]:
    """MLflow's system-metrics monitor on `run_id` for the body's duration (when `enabled`).

    The monitor is a thread of this process that samples and logs on its own; it is stopped and
    joined (its last samples flushed) when the body ends, whether it returns or raises, so no
    thread outlives the run. A resumed run continues the monitor's step numbering.
    """
    if not enabled:
        yield
        return
    import logging

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its start/stop notices are INFO lines in the middle of the training log.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=SYSTEM_SAMPLING_S, resume_logging=resumed, tracking_uri=client.tracking_uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
