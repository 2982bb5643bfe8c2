"""The cost of per-step metrics: training steps/s with `step_loss` and `grad_norm` logged at every
step (tracking.step_metrics, as `gptexp train` logs them) against the same steps without them.

Both variants run the runner's `train_step` on the same model shape and batch, one repetition of
each in turn (so a noisy neighbour slows both alike); the logging variant measures the gradient
norm, emits each step to `StepMetricsLogger` on a real MLflow run (a SQLite store in a temp
folder, as the default store is) and flushes at the end of the repetition, as an eval point
would. The ratio is logging over not logging: 1.0 means free, 0.95 a 5% slowdown. Where the
machine is noisy (the ratio of two medians moves by as much as the repetitions do), the time spent
in the logger itself (`log_s_per_step`, timed inside the logging repetitions) is the steadier figure.
"""

from __future__ import annotations

import tempfile
import time

import torch

from .. import runner
from ..events import StepEvent
from ..live_metrics import StepMetricsLogger
from ..model import GPTModel
from ..runtime import Runtime
from .sizes import Sizes
from .timing import figure, median
from .training import _TRAIN_CONFIG, _batch


def step_logging_figures(sizes: Sizes) -> dict:
    """Steps/s with per-step logging on and off, each a figure of `sizes.logging_steps` steps per repetition."""
    from mlflow.tracking import MlflowClient

    cfg = dict(sizes.logging_model, impl="fast")
    x, y = _batch(cfg, sizes.logging_batch, cfg["context_length"], 4)
    runtime = Runtime(torch.device("cpu"), "fp32", torch.get_num_threads())
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    optimizer = runner.make_optimizer(model, _TRAIN_CONFIG, runtime)
    steps = sizes.logging_steps
    with tempfile.TemporaryDirectory(prefix="gptexp-bench-logging-") as tmp:
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        experiment = client.create_experiment("step-logging", artifact_location=f"file://{tmp}/artifacts")
        run_id = client.create_run(experiment).info.run_id
        logger = StepMetricsLogger(client, run_id, flush_steps=steps)
        step_no = 0
        in_logger: list[float] = []  # seconds in the logger, per timed logging repetition

        def rep(logging: bool) -> float:
            nonlocal step_no
            t0 = time.perf_counter()
            logging_s = 0.0
            for _ in range(steps):
                norms: list[float] | None = [] if logging else None
                loss = runner.train_step(model, optimizer, x, y, runtime, step=step_no, grad_norms=norms)
                if norms is not None:
                    t1 = time.perf_counter()
                    logger.on_step(StepEvent(1, step_no, loss, _TRAIN_CONFIG.train.lr, 0, norms[0]))
                    logging_s += time.perf_counter() - t1
                step_no += 1
            if logging:
                t1 = time.perf_counter()
                logger.flush()
                logging_s += time.perf_counter() - t1
                in_logger.append(logging_s)
            return time.perf_counter() - t0

        rep(True)  # warm-up: the optimizer's state, the store's tables and its first writes
        rep(False)
        in_logger.clear()
        times: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(sizes.logging_reps):
            for name in ("on", "off"):
                times[name].append(rep(name == "on"))
        logged = len(client.get_metric_history(run_id, "step_loss"))
        client.set_terminated(run_id)
    out = {name: figure(ts, steps, "steps_per_s") for name, ts in times.items()}
    for fig in out.values():
        fig.update(steps=steps, batch=sizes.logging_batch, seq=cfg["context_length"])
    out["on"]["points_logged"] = logged  # every step of the warm-up and the timed repetitions
    out["on"]["log_s_per_step"] = median(in_logger) / steps
    out["on"]["log_share"] = out["on"]["log_s_per_step"] / out["off"]["seconds"] * steps  # of a step's time
    return out
