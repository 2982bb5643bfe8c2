"""The one training runner behind `train`, every sweep trial and `reproduce`.

It follows the book's `train_model_simple` (and appendix D's schedule when configured): the
same seeding, loaders, step order, `eval_freq`/`eval_iter` cadence and global-step numbering,
so `impl: book` in fp32 reproduces the book's numbers. At each epoch end it adds a full
token-weighted evaluation of both splits and a sample, then checkpoints.

The loop knows nothing of MLflow, Optuna or the console: it emits events to subscribers
(`Callback`). A subscriber stops a run early by raising `StopTraining` (pruning does).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from . import checkpoint as ckpt
from . import interrupts
from .config import Config
from .errors import INTERRUPTS
from .evaluation import calc_loss_batch, calc_loss_loader, evaluate_split, perplexity
from .generation import generate, text_to_token_ids, token_ids_to_text
from .model import GPTModel, compile_blocks
from .runtime import Runtime, resolve_runtime
from .splits import Splits, prepare_data


class StopTraining(Exception):
    """Raised by a subscriber to end a run early; `status` names why (e.g. 'pruned')."""

    def __init__(self, message: str, status: str = "stopped"):
        super().__init__(message)
        self.status = status


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


@dataclass(frozen=True)
class StepEvent:
    epoch: int  # from 1
    global_step: int  # from 0, the book's numbering
    loss: float
    lr: float
    tokens_seen: int


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


@dataclass
class RunResult:
    epochs: list[EpochEvent] = field(default_factory=list)
    evals: list[EvalEvent] = field(default_factory=list)
    status: str = "completed"
    best_val_loss: float = math.inf
    best_epoch: int = 0
    model: GPTModel | None = None


def lr_at(step: int, total_steps: int, cfg) -> float:
    """The learning rate of global step `step`: appendix D's warmup and cosine, or constant."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.initial_lr + step * (cfg.lr - cfg.initial_lr) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr


def make_optimizer(model: torch.nn.Module, config: Config, runtime: Runtime) -> torch.optim.Optimizer:
    """The book's AdamW (every parameter decayed); fused kernels where asked and supported."""
    kwargs = {}
    if config.train.fused_adamw and runtime.device.type in ("cpu", "cuda"):
        kwargs["fused"] = True
    return torch.optim.AdamW(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay, **kwargs)


def _emit(callbacks: Iterable[Callback], name: str, event) -> None:
    for cb in callbacks:
        getattr(cb, name)(event)


def run(
    config: Config,
    callbacks: Iterable[Callback] = (),
    *,
    data: Splits | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
) -> RunResult:
    """Train `config`; emit events to `callbacks`; checkpoint into `checkpoint_dir`.

    Exceptions propagate after `on_end` has told every subscriber how the run ended. A pending
    Ctrl-C/SIGTERM (gptexp.interrupts) is raised before the run starts and at each step.
    """
    interrupts.check()
    callbacks = list(callbacks)
    t = config.train
    runtime = resolve_runtime(t.device, t.precision, t.threads)
    data = data or prepare_data(config)
    result = RunResult()

    # The book seeds before building the loaders and again before building the model; loaders
    # draw nothing from the RNG when built, so seeding once here, after them, is the same.
    torch.manual_seed(t.seed)
    model = GPTModel(config.model_cfg())
    model.to(runtime.device)
    optimizer = make_optimizer(model, config, runtime)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.precision == "fp16" else None
    state = {"epoch": 0, "global_step": -1, "tokens_seen": 0, "best_val_loss": math.inf, "best_epoch": 0}
    if resume_from is not None:
        state = _restore(resume_from, model, optimizer, scaler, runtime)
        result.best_val_loss, result.best_epoch = state["best_val_loss"], state["best_epoch"]
    step_model = compile_blocks(model) if t.compile else model

    total_steps = len(data.train_loader) * t.num_epochs
    _emit(callbacks, "on_start", StartEvent(config, runtime, model, data, total_steps, state["epoch"],
                                            resume_from is not None))
    global_step, tokens_seen = state["global_step"], state["tokens_seen"]
    epoch = state["epoch"]
    try:
        for epoch in range(state["epoch"] + 1, t.num_epochs + 1):
            model.train()
            train_seconds, epoch_tokens = 0.0, 0
            tick = time.perf_counter()
            for input_batch, target_batch in data.train_loader:
                interrupts.check()
                step = global_step + 1
                lr = lr_at(step, total_steps, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.zero_grad(set_to_none=True)
                with runtime.autocast():
                    loss = calc_loss_batch(input_batch, target_batch, step_model, runtime.device)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                if t.grad_clip is not None and step >= t.warmup_steps:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=t.grad_clip)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(f"training loss is {loss_value} at step {step} (epoch {epoch}): "
                                        "lower train.lr or enable train.grad_clip")
                global_step = step
                tokens_seen += input_batch.numel()
                epoch_tokens += input_batch.numel()
                _emit(callbacks, "on_step", StepEvent(epoch, global_step, loss_value, lr, tokens_seen))
                if global_step % t.eval_freq == 0:
                    train_seconds += time.perf_counter() - tick
                    ev = _book_eval(step_model, model, data, runtime, t.eval_iter)
                    event = EvalEvent(epoch, global_step, ev[0], ev[1], tokens_seen, lr)
                    result.evals.append(event)
                    _emit(callbacks, "on_eval", event)
                    tick = time.perf_counter()
            train_seconds += time.perf_counter() - tick

            epoch_event = _epoch_end(model, data, config, runtime, epoch, global_step, tokens_seen,
                                     epoch_tokens / max(train_seconds, 1e-9), train_seconds)
            result.epochs.append(epoch_event)
            is_best = epoch_event.val_loss < result.best_val_loss
            if is_best:
                result.best_val_loss, result.best_epoch = epoch_event.val_loss, epoch
            _emit(callbacks, "on_epoch_end", epoch_event)
            if checkpoint_dir is not None and config.checkpoint.keep != "none":
                state = {"epoch": epoch, "global_step": global_step, "tokens_seen": tokens_seen,
                         "best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch}
                event = _save(checkpoint_dir, config, model, optimizer, scaler, state, runtime, is_best)
                _emit(callbacks, "on_checkpoint", event)
    except StopTraining as exc:
        result.status = exc.status
        _emit(callbacks, "on_end", EndEvent(exc.status, exc, len(result.epochs), global_step))
        raise
    except INTERRUPTS as exc:
        _emit(callbacks, "on_end", EndEvent("interrupted", exc, len(result.epochs), global_step))
        raise
    except BaseException as exc:
        _emit(callbacks, "on_end", EndEvent("failed", exc, len(result.epochs), global_step))
        raise
    result.model = model
    _emit(callbacks, "on_end", EndEvent("completed", None, epoch, global_step))
    return result


def _book_eval(step_model, model, data: Splits, runtime: Runtime, eval_iter: int) -> tuple[float, float]:
    """The book's evaluate_model: eval mode, the first eval_iter batches of each loader."""
    model.eval()
    with torch.inference_mode(), runtime.autocast():
        train = calc_loss_loader(data.train_loader, step_model, runtime.device, num_batches=eval_iter)
        val = calc_loss_loader(data.val_loader, step_model, runtime.device, num_batches=eval_iter)
    model.train()
    return train, val


def _epoch_end(model, data: Splits, config: Config, runtime: Runtime, epoch: int, global_step: int,
               tokens_seen: int, tokens_per_sec: float, seconds: float) -> EpochEvent:
    ctx, bs = config.model.context_length, config.train.eval_batch_size
    with runtime.autocast():
        train = evaluate_split(model, data.train_ids, ctx, runtime.device, bs, name="train split")
        val = evaluate_split(model, data.val_ids, ctx, runtime.device, bs, name="validation split")
    for name, value in (("train", train.loss), ("validation", val.loss)):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name} loss is {value} after epoch {epoch} (step {global_step}): "
                                "lower train.lr or enable train.grad_clip")
    prompt = config.sample.start_context
    model.eval()
    idx = text_to_token_ids(prompt, data.tokenizer).to(runtime.device)
    with runtime.autocast():
        # Greedy, as the book's generate_and_print_sample; the KV cache (fast) gives the same tokens.
        out = generate(model, idx, config.sample.max_new_tokens, context_size=ctx)
    model.train()
    completion = token_ids_to_text(out[:, idx.shape[1]:], data.tokenizer)
    return EpochEvent(epoch, global_step, train.loss, val.loss, tokens_seen, tokens_per_sec, seconds,
                      completion, prompt)


def _rng_state(runtime: Runtime) -> dict:
    state = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _save(root: Path, config: Config, model, optimizer, scaler, loop: dict, runtime: Runtime,
          is_best: bool) -> CheckpointEvent:
    state = dict(loop, optimizer=optimizer.state_dict(), rng=_rng_state(runtime))
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    folder = ckpt.save_checkpoint(root, loop["epoch"], model, state, config.to_yaml())
    index = ckpt.read_index(root)
    index["last"] = folder.name
    if is_best or "best" not in index:
        index["best"], index["best_val_loss"], index["best_epoch"] = folder.name, loop["best_val_loss"], loop["epoch"]
    ckpt.write_index(root, index)
    keep = {"last": {index["last"]}, "best": {index["best"]}, "both": {index["last"], index["best"]}}
    removed = () if config.checkpoint.keep == "all" else tuple(ckpt.prune(root, keep[config.checkpoint.keep]))
    return CheckpointEvent(loop["epoch"], folder, root, is_best, removed)


def _restore(folder: Path, model, optimizer, scaler, runtime: Runtime) -> dict:
    state = ckpt.load_state(folder)
    try:
        model.load_state_dict(ckpt.load_weights(folder), strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and runtime.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        # A state saved for another model or optimizer: torch's multi-line text, cut to its gist.
        raise ckpt.CheckpointError(f"checkpoint {folder} does not fit this run's model and optimizer "
                                   f"({ckpt._first_line(exc)}): use another") from None
    return {k: state[k] for k in ("epoch", "global_step", "tokens_seen", "best_val_loss", "best_epoch")}
