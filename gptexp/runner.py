"""The one training runner behind `train`, every sweep trial, `reproduce` and the book's training functions.

Its core, `train_loop`, is the book's `train_model_simple` (appendix D's `train_model` when given a
schedule and clipping): it takes a model, loaders and an optimizer and keeps the book's seeding,
step order, `eval_freq`/`eval_iter` cadence and global-step numbering, so `impl: book` in fp32
reproduces the book's numbers. `train_step` is its one training step (the bench times it) and
`make_optimizer` the optimizer `gptexp train` builds. The book-named functions (gptexp/book.py)
call the core with a printing subscriber; the config-driven `run` builds the model, loaders and
optimizer from a Config and plugs its epoch end into the core: a full token-weighted evaluation of
both splits, a sample, the best epoch so far, then a checkpoint.

The loop knows nothing of MLflow, Optuna or the console: it emits events to subscribers
(`Callback`). A subscriber stops a run early by raising `StopTraining` (pruning does).

The same loop runs on every process of a distributed job (`runtime.world`, gptexp.distributed):
each step takes this rank's share of the book's batch, DDP averages the gradients, and losses and
token counts are summed over the ranks, so every event carries the single-process numbers. Rank 0
alone samples and writes checkpoints; subscribers are given to it alone (gptexp.jobs).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import interrupts
from .config import Config
from .data import Splits
from .distributed import SINGLE, World
from .errors import INTERRUPTS, first_line
from .evaluation import calc_loss_batch, calc_loss_loader, evaluate_split
from .events import (  # noqa: F401 - re-exported: subscribers have always imported them from here
    Callback,
    CheckpointEvent,
    EndEvent,
    EpochEvent,
    EvalEvent,
    StartEvent,
    StepEvent,
)
from .generation import generate, text_to_token_ids, token_ids_to_text
from .model import GPTModel, compile_blocks
from .runtime import Runtime, autocast, use_deterministic_algorithms


class StopTraining(Exception):
    """Raised by a subscriber to end a run early; `status` names why (e.g. 'pruned')."""

    def __init__(self, message: str, status: str = "stopped"):
        super().__init__(message)
        self.status = status


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


@dataclass
class RunResult:
    epochs: list[EpochEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    status: str = "completed"
    best_val_loss: float = math.inf
    best_epoch: int = 0


def lr_at(step: int, total_steps: int, cfg) -> float:
    """The learning rate of global step `step`: appendix D's warmup and cosine, or constant.

    `cfg` holds lr (the peak), warmup_steps, initial_lr, min_lr and lr_schedule (a TrainConfig).
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        # The book's order of operations (the increment first), so the rates are bit-identical.
        return cfg.initial_lr + step * ((cfg.lr - cfg.initial_lr) / cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def make_optimizer(model: torch.nn.Module, config: Config, runtime: Runtime) -> torch.optim.Optimizer:
    """The book's AdamW (every parameter decayed); fused kernels where asked and supported."""
    kwargs: dict[str, Any] = {}
    if config.train.fused_adamw and runtime.device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, **kwargs)


@dataclass
class LoopState:
    """Where a run stands after its last step; a checkpoint's state.pt holds these fields flat."""

    epoch: int = 0  # epochs done
    global_step: int = -1  # the last step done, the book's numbering (-1: none yet)
    tokens_seen: int = 0
    best_val_loss: float = math.inf  # over the epochs' full validation losses (run's epoch end)
    best_epoch: int = 0

    def to_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LoopState:
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class GradClip:
    """Appendix D's clipping: gradients' global norm to `max_norm` from global step `start` on."""

    max_norm: float = 1.0
    start: int = 0  # the book: warmup_steps (its first printing: warmup_steps + 1)


@dataclass(frozen=True)
class TrainedEpoch:
    """The core loop's epoch end: the epoch's steps are done, nothing is evaluated yet."""

    epoch: int
    global_step: int
    tokens_seen: int
    tokens_per_sec: float  # training steps only, evaluation excluded
    seconds: float


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    input_batch: torch.Tensor,
    target_batch: torch.Tensor,
    runtime: Runtime,
    *,
    step: int = 0,
    forward: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    clip: GradClip | None = None,
    epoch: int | None = None,
    accum_steps: int = 1,
    grad_norms: list[float] | None = None,
) -> float:
    """One training step on one batch (global step `step`); returns its loss.

    `forward` runs the forward pass (a compiled view of `model`, DDP in a distributed job; `model`
    when None); clipping and the optimizer act on `model`'s parameters, which the view shares.
    The batch goes through in `accum_steps` equal micro-batches, each loss scaled by
    1/accum_steps, so the gradient is the whole batch's mean loss's. In a distributed job the
    batch is this rank's share: DDP averages the gradients over the ranks on the last micro-batch,
    and the loss returned is the global batch's; a stop asked of any rank is raised here on all.
    Raises NonFiniteLoss when the loss is NaN or infinite (on every rank: the loss is global).
    With `grad_norms` given, the total L2 norm of the gradients the optimizer step uses (before
    clipping; DDP's averaged, i.e. global, gradients) is appended to it; measuring it only reads
    the gradients, so the update is the same bits with or without it.
    """
    forward = model if forward is None else forward
    world = runtime.world
    optimizer.zero_grad(set_to_none=True)
    losses = []
    pieces = zip(input_batch.chunk(accum_steps), target_batch.chunk(accum_steps), strict=True)
    for i, (inputs, targets) in enumerate(pieces):
        with world.no_sync(forward, last=i == accum_steps - 1):
            with runtime.autocast():
                loss = calc_loss_batch(inputs, targets, forward, runtime.device)
            if accum_steps > 1:
                loss = loss / accum_steps
            (loss if scaler is None else scaler.scale(loss)).backward()
        losses.append(loss.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)  # so that clipping sees the true gradients
    norm = None
    if clip is not None and step >= clip.start:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip.max_norm)
    elif grad_norms is not None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if grad_norms is not None and norm is not None:
        grad_norms.append(float(norm))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    value = world.step_loss(float(sum(losses)))
    if not math.isfinite(value):
        where = f"step {step}" if epoch is None else f"step {step} (epoch {epoch})"
        raise NonFiniteLoss(f"training loss is {value} at {where}: lower train.lr or enable train.grad_clip")
    return value


def evaluate_model(
    model,
    train_loader,
    val_loader,
    device,
    eval_iter,
    *,
    precision: str = "fp32",
    forward: torch.nn.Module | None = None,
    world: World = SINGLE,
) -> tuple[float, float]:
    """The book's evaluate_model: in eval mode, the mean loss of the first eval_iter batches of each loader.

    `precision` picks the autocast; `forward` runs the batches (a compiled view of `model`); with a
    `world` of several processes the loaders yield this rank's shares and the losses are global.
    """
    forward = model if forward is None else forward
    model.eval()
    with torch.inference_mode(), autocast(torch.device(device), precision):
        train_loss = calc_loss_loader(train_loader, forward, device, num_batches=eval_iter, world=world)
        val_loss = calc_loss_loader(val_loader, forward, device, num_batches=eval_iter, world=world)
    model.train()
    return train_loss, val_loss


def _emit(callbacks: Iterable[Callback], name: str, event) -> None:
    for cb in callbacks:
        getattr(cb, name)(event)


def train_loop(
    model: torch.nn.Module,
    train_loader,
    val_loader,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    num_epochs: int,
    eval_freq: int,
    eval_iter: int,
    *,
    lr_schedule: Callable[[int], float] | None = None,
    clip: GradClip | None = None,
    callbacks: Iterable[Callback] = (),
    epoch_end: Callable[[TrainedEpoch], None] | None = None,
    state: LoopState | None = None,
    forward: torch.nn.Module | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    grad_norm: bool = False,
) -> LoopState:
    """The core: the book's train_model_simple, or appendix D's train_model with a schedule and clipping.

    Each step emits a StepEvent, every eval_freq-th global step the book's evaluate_model an
    EvalEvent (to `callbacks`), and each epoch's end calls `epoch_end`. `lr_schedule(step)` sets
    every group's lr before the step (None: the optimizer's lr stays). Continues from `state`
    (epochs done, last step: a resumed run), updates it in place and returns it. In a distributed
    job (`runtime.world`) the loaders yield this rank's shares (World.shard) and tokens count all ranks.
    `grad_norm`: each StepEvent carries the gradients' total norm (train_step's `grad_norms`).
    """
    callbacks = list(callbacks)
    norms: list[float] | None = [] if grad_norm else None
    state = LoopState() if state is None else state
    world = runtime.world
    for epoch in range(state.epoch + 1, num_epochs + 1):
        model.train()
        train_seconds, epoch_tokens = 0.0, 0
        tick = time.perf_counter()
        for input_batch, target_batch in train_loader:
            interrupts.check()  # a pending Ctrl-C/SIGTERM stops here, between two whole steps
            step = state.global_step + 1
            if lr_schedule is not None:
                lr = lr_schedule(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            lr = optimizer.param_groups[0]["lr"]
            loss = train_step(
                model,
                optimizer,
                input_batch,
                target_batch,
                runtime,
                step=step,
                forward=forward,
                scaler=scaler,
                clip=clip,
                epoch=epoch,
                accum_steps=accum_steps,
                grad_norms=norms,
            )
            state.global_step = step
            state.tokens_seen += input_batch.numel() * world.size
            epoch_tokens += input_batch.numel() * world.size
            norm = norms.pop() if norms else None
            _emit(callbacks, "on_step", StepEvent(epoch, step, loss, lr, state.tokens_seen, norm))
            if step % eval_freq == 0:
                train_seconds += time.perf_counter() - tick
                train_loss, val_loss = evaluate_model(
                    model,
                    train_loader,
                    val_loader,
                    runtime.device,
                    eval_iter,
                    precision=runtime.precision,
                    forward=forward,
                    world=world,
                )
                _emit(callbacks, "on_eval", EvalEvent(epoch, step, train_loss, val_loss, state.tokens_seen, lr))
                tick = time.perf_counter()
        train_seconds += time.perf_counter() - tick
        state.epoch = epoch
        if epoch_end is not None:
            epoch_end(
                TrainedEpoch(
                    epoch, state.global_step, state.tokens_seen, epoch_tokens / max(train_seconds, 1e-9), train_seconds
                )
            )
    return state


def run(
    config: Config,
    callbacks: Iterable[Callback] = (),
    *,
    runtime: Runtime,
    data: Splits,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    world: World = SINGLE,
) -> RunResult:
    """Train `config` on `runtime` and `data` (as jobs.preflight resolved and built them); emit events
    to `callbacks`; checkpoint into `checkpoint_dir`.

    Exceptions propagate after `on_end` has told every subscriber how the run ended. A pending
    Ctrl-C/SIGTERM (gptexp.interrupts) is raised before the run starts and at each step. In a
    distributed job every rank calls it with its `world`; `checkpoint_dir` and `resume_from` are
    rank 0's, which sends the checkpoint's state to the others.
    """
    interrupts.check()
    callbacks = list(callbacks)
    t = config.train
    runtime.use_threads()
    use_deterministic_algorithms(t.deterministic, runtime.device)
    result = RunResult()

    # The book seeds before building the loaders and again before building the model; loaders
    # draw nothing from the RNG when built, so seeding once here, after them, is the same.
    torch.manual_seed(t.seed)
    model = GPTModel(config.model_cfg())
    model.to(runtime.device)
    if world.rank:
        # Dropout masks of their own; rank 0 keeps the single-process stream, which draws the shuffle.
        torch.manual_seed((t.seed + world.rank) % 2**64)
    optimizer = make_optimizer(model, config, runtime)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None
    state = LoopState()
    saved = world.share(ckpt.load_state(resume_from) if resume_from is not None else None)
    if saved is not None:
        state = _restore(resume_from, saved, model, optimizer, scaler, runtime)
        result.best_val_loss, result.best_epoch = state.best_val_loss, state.best_epoch
    forward = world.replicate(compile_blocks(model) if t.compile else model, runtime.device)

    total_steps = len(data.train_loader) * t.num_epochs
    _emit(
        callbacks,
        "on_start",
        StartEvent(
            config, runtime, model, data, total_steps, state.epoch, saved is not None, world.placement(runtime.device)
        ),
    )
    epoch_end = _RunEpochEnd(config, runtime, model, data, optimizer, scaler, state, result, callbacks, checkpoint_dir)
    try:
        train_loop(
            model,
            world.shard(data.train_loader),
            world.shard(data.val_loader),
            optimizer,
            runtime,
            t.num_epochs,
            t.eval_freq,
            t.eval_iter,
            lr_schedule=lambda step: lr_at(step, total_steps, t),
            clip=None if t.grad_clip is None else GradClip(t.grad_clip, start=t.warmup_steps),
            callbacks=[_EvalRecorder(result), *callbacks],
            epoch_end=epoch_end,
            state=state,
            forward=forward,
            scaler=scaler,
            accum_steps=t.grad_accum_steps,
            grad_norm=config.tracking.step_metrics,
        )
    except StopTraining as exc:
        result.status = exc.status
        _emit(callbacks, "on_end", EndEvent(exc.status, exc, len(result.epochs), state.global_step))
        raise
    except INTERRUPTS as exc:
        _emit(callbacks, "on_end", EndEvent("interrupted", exc, len(result.epochs), state.global_step))
        raise
    except BaseException as exc:
        _emit(callbacks, "on_end", EndEvent("failed", exc, len(result.epochs), state.global_step))
        raise
    _emit(callbacks, "on_end", EndEvent("completed", None, state.epoch, state.global_step))
    return result


class _EvalRecorder(Callback):
    def __init__(self, result: RunResult):
        self.result = result

    def on_eval(self, event: EvalEvent) -> None:
        self.result.evals.append(event)


@dataclass
class _RunEpochEnd:
    """`run`'s epoch end, plugged into the core: a token-weighted evaluation of both whole splits,
    a greedy sample, the best epoch so far, then a checkpoint (rank 0's, holding every rank's RNG)."""

    config: Config
    runtime: Runtime
    model: GPTModel
    data: Splits
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    state: LoopState
    result: RunResult
    callbacks: list[Callback]
    checkpoint_dir: Path | None

    def __call__(self, trained: TrainedEpoch) -> None:
        event = _epoch_end(self.model, self.data, self.config, self.runtime, trained)
        self.result.epochs.append(event)
        is_best = event.val_loss < self.state.best_val_loss
        if is_best:
            self.state.best_val_loss, self.state.best_epoch = event.val_loss, event.epoch
            self.result.best_val_loss, self.result.best_epoch = event.val_loss, event.epoch
        _emit(self.callbacks, "on_epoch_end", event)
        if self.config.checkpoint.keep == "none":
            return
        rngs = self.runtime.world.all_gather(_rng_state(self.runtime))
        if self.checkpoint_dir is not None:
            saved = _save(
                self.checkpoint_dir, self.config, self.model, self.optimizer, self.scaler, self.state, rngs, is_best
            )
            _emit(self.callbacks, "on_checkpoint", saved)


def _epoch_end(model, data: Splits, config: Config, runtime: Runtime, trained: TrainedEpoch) -> EpochEvent:
    epoch, global_step = trained.epoch, trained.global_step
    ctx, bs, world = config.model.context_length, config.train.eval_batch_size, runtime.world
    with runtime.autocast():
        train = evaluate_split(model, data.train_ids, ctx, runtime.device, bs, name="train split", world=world)
        val = evaluate_split(model, data.val_ids, ctx, runtime.device, bs, name="validation split", world=world)
    for name, value in (("train", train.loss), ("validation", val.loss)):
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"{name} loss is {value} after epoch {epoch} (step {global_step}): "
                "lower train.lr or enable train.grad_clip"
            )
    prompt, completion = config.sample.start_context, ""
    if world.is_main:  # the sample is for the record, which rank 0 keeps
        model.eval()
        idx = text_to_token_ids(prompt, data.tokenizer).to(runtime.device)
        with runtime.autocast():
            # Greedy, as the book's generate_and_print_sample; the KV cache (fast) gives the same tokens.
            out = generate(model, idx, config.sample.max_new_tokens, context_size=ctx)
        model.train()
        completion = token_ids_to_text(out[:, idx.shape[1] :], data.tokenizer)
    return EpochEvent(
        epoch,
        global_step,
        train.loss,
        val.loss,
        trained.tokens_seen,
        trained.tokens_per_sec,
        trained.seconds,
        completion,
        prompt,
    )


def _rng_state(runtime: Runtime) -> dict:
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _save(
    root: Path, config: Config, model, optimizer, scaler, loop: LoopState, rngs: list[dict], is_best: bool
) -> CheckpointEvent:
    """`rngs`: every rank's generators, rank 0's first (also as `rng`, all a single process has)."""
    state = dict(loop.to_dict(), optimizer=optimizer.state_dict(), rng=rngs[0])
    if len(rngs) > 1:
        state["rng_ranks"] = rngs
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    # A checkpoint that is never resumed (a sweep trial's: retried from scratch) keeps the weights alone.
    folder = ckpt.save_checkpoint(
        root, loop.epoch, model, state if config.checkpoint.resumable else None, config.to_yaml()
    )
    index = ckpt.read_index(root)
    index["last"] = folder.name
    if is_best or "best" not in index:
        index["best"], index["best_val_loss"], index["best_epoch"] = folder.name, loop.best_val_loss, loop.epoch
    ckpt.write_index(root, index)
    keep = {"last": {index["last"]}, "best": {index["best"]}, "both": {index["last"], index["best"]}}
    removed = () if config.checkpoint.keep == "all" else tuple(ckpt.prune(root, keep[config.checkpoint.keep]))
    return CheckpointEvent(loop.epoch, folder, root, is_best, removed)


def _restore(folder: Path | None, state: dict, model, optimizer, scaler, runtime: Runtime) -> LoopState:
    """Continue from a checkpoint's `state` (ckpt.load_state). `folder` is None on the ranks other
    than 0: DDP gives them rank 0's weights. Each rank takes its own generators back; a rank the
    checkpoint did not have (a larger world) keeps its fresh seed."""
    world = runtime.world
    try:
        if folder is not None:
            model.load_state_dict(ckpt.load_weights(folder), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng_ranks") or [state["rng"]]
        if world.rank < len(rngs):
            torch.set_rng_state(rngs[world.rank]["torch"])
            if "cuda" in rngs[world.rank] and runtime.device.type == "cuda":
                torch.cuda.set_rng_state(rngs[world.rank]["cuda"], runtime.device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        # A state saved for another model or optimizer: torch's multi-line text, cut to its gist.
        raise ckpt.CheckpointError(
            f"checkpoint {folder or 'of rank 0'} does not fit this run's model and optimizer "
            f"({first_line(exc)}): use another"
        ) from None
    return LoopState.from_dict(state)  # the loop's fields sit flat beside optimizer and rng
