"""The events the training loop emits, and the subscriber base that receives them.

The loop (gptexp.runner) knows nothing of MLflow, Optuna or the console; each of those is a
`Callback` that overrides the events it needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .evaluation import perplexity

if TYPE_CHECKING:
    from .config import Config
    from .data import Splits
    from .distributed import Placement
    from .model import GPTModel
    from .runtime import Runtime


@dataclass(frozen=True)
class StepEvent:
    epoch: int  # from 1
    global_step: int  # from 0, the book's numbering
    loss: float  # the step's batch loss (before the optimizer step), summed over ranks
    lr: float
    tokens_seen: int
    # The total L2 norm of the gradients the optimizer step used (before any clipping); None when
    # the run does not measure it (tracking.step_metrics off).
    grad_norm: float | None = None


@dataclass(frozen=True)
class EvalEvent:
    epoch: int
    global_step: int
    train_loss: float  # the book's evaluate_model: mean of the first eval_iter batch losses
    val_loss: float
    tokens_seen: int
    lr: float


@dataclass(frozen=True)
class EpochEvent:
    epoch: int
    global_step: int
    train_loss: float  # token-weighted over the whole split
    val_loss: float
    tokens_seen: int
    tokens_per_sec: float  # training steps only, evaluation excluded
    seconds: float
    completion: str  # the continuation of sample.start_context (prompt excluded)
    prompt: str

    @property
    def train_ppl(self) -> float:
        return perplexity(self.train_loss)

    @property
    def val_ppl(self) -> float:
        return perplexity(self.val_loss)


@dataclass(frozen=True)
class CheckpointEvent:
    epoch: int
    path: Path  # the epoch folder just written
    root: Path  # the checkpoints/ folder (index.json and every kept epoch)
    is_best: bool
    removed: tuple[str, ...]


@dataclass(frozen=True)
class StartEvent:
    config: Config
    runtime: Runtime
    model: GPTModel
    data: Splits
    total_steps: int
    start_epoch: int  # epochs already done (a resumed run)
    resumed: bool
    placement: Placement  # the processes and devices of the job


@dataclass(frozen=True)
class EndEvent:
    status: str  # completed | stopped | pruned | failed | interrupted
    error: BaseException | None
    epochs_done: int
    global_step: int


class Callback:
    """Subscriber base: override the events you need."""

    def on_start(self, event: StartEvent) -> None: ...
    def on_step(self, event: StepEvent) -> None: ...
    def on_eval(self, event: EvalEvent) -> None: ...
    def on_epoch_end(self, event: EpochEvent) -> None: ...
    def on_checkpoint(self, event: CheckpointEvent) -> None: ...
    def on_end(self, event: EndEvent) -> None: ...
