"""Tracked jobs: a runner run wrapped in one MLflow run (train, resume, sweep trial, reproduce).

Everything that can be checked is checked before the MLflow run is created (config, corpus,
splits, device), so bad input never leaves a run behind.

A distributed job (`world`, gptexp.distributed) has one MLflow run: rank 0 checks, creates or
reopens it and tells the other ranks its id and config (`World.lead`); they train beside it
without subscribers (`World.follow`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import artifact_cache
from . import checkpoint as ckpt
from .config import (
    MAX_EXPERIMENT_NAME,
    MAX_RUN_NAME,
    Config,
    ConfigError,
    ModelConfig,
    check_name,
    from_dict,
    read_yaml,
)
from .data import Splits, prepare_data
from .distributed import SINGLE, MainFailed, World, check_batch
from .errors import INTERRUPTS, GptexpError
from .live_metrics import step_subscribers, system_metrics
from .progress import ConsoleProgress
from .runner import Callback, NonFiniteLoss, RunResult, run
from .runtime import Runtime, resolve_runtime
from .tags import TAG_JOB
from .tracking import (
    MlflowLogger,
    checkpoint_root,
    get_client,
    get_run,
    local_artifact_dir,
    require_writable,
    tracked_run,
    write_failures,
)


@dataclass
class TrainOutcome:
    run_id: str
    result: RunResult


@dataclass(frozen=True)
class Prepared:
    """What a job computes with, checked before its run exists: where and how (runtime), and on what."""

    runtime: Runtime
    data: Splits


def preflight(config: Config, *, training: bool = True, world: World = SINGLE) -> Prepared:
    """Validate what a run needs before it exists: device, precision, memory, corpus and splits,
    and that the batch splits over the job's processes.

    The one place a job's device and precision are resolved; the run computes with what this returns.
    """
    if training:
        check_batch(config.train, world.size)
    runtime = resolve_runtime(config.train.device, config.train.precision, config.train.threads, world)
    check_model_fits(config.model, runtime.device, training=training)
    data = prepare_data(config)
    _check_start_context(config, data.tokenizer)
    return Prepared(runtime, data)


def parameter_count(m: ModelConfig) -> int:
    """GPTModel's parameter count, from the config alone (embeddings, blocks, final norm, head)."""
    e = m.emb_dim
    block = 12 * e * e + 10 * e + (3 * e if m.qkv_bias else 0)
    return 2 * m.vocab_size * e + m.context_length * e + m.n_layers * block + 2 * e


def _memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_model_fits(m: ModelConfig, device: torch.device, *, training: bool = True) -> None:
    """Refuse a model whose fp32 tensors cannot fit in memory, rather than crash or swap mid-run.

    The model is built on the CPU, so its weights and per-layer causal masks (context_length^2
    floats each) must fit there; on its device, training also holds gradients and AdamW's two moments.
    """
    params, masks = parameter_count(m), m.n_layers * m.context_length**2
    on_device = 4 * ((4 if training else 1) * params + masks)
    needs = [("this machine's", torch.device("cpu"), 4 * (params + masks))]
    if device.type == "cpu":
        needs = [("this machine's", device, on_device)]
    elif device.type == "cuda":
        needs.append(("the GPU's", device, on_device))
    for where, dev, need in needs:
        have = _memory_bytes(dev)
        if have is not None and need > have:
            gib = 2**30
            raise ConfigError(
                f"model.* makes {params:,} parameters and {masks:,} causal-mask entries: {need / gib:,.1f} GiB "
                f"in fp32{' to train' if training and dev == device else ''}, more than {where} {have / gib:,.1f} "
                "GiB of memory: lower model.emb_dim, n_layers, context_length or vocab_size"
            )


def _check_start_context(config: Config, tokenizer) -> None:
    ids = tokenizer.encode(config.sample.start_context, allowed_special={"<|endoftext|>"})
    if not ids:
        raise ConfigError("sample.start_context gives no tokens: give the text each epoch's sample continues")
    if max(ids) >= config.model.vocab_size:
        raise ConfigError(
            f"sample.start_context has token id {max(ids)} but model.vocab_size is "
            f"{config.model.vocab_size}: use vocab_size 50257 for the GPT-2 tokenizer"
        )


def train(
    config: Config,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    parent_run_id: str | None = None,
    callbacks: Sequence[Callback] = (),
    prepared: Prepared | None = None,
    client=None,
    console: bool = True,
    on_created: Callable[[str], None] | None = None,
    world: World = SINGLE,
) -> TrainOutcome | None:
    """Train `config` as one MLflow run; `on_created(run_id)` is called as soon as the run exists.

    `prepared`: `preflight(config)`'s result when the caller has it already (else it is made here).
    In a distributed job every rank calls it; the ranks other than 0 train rank 0's config (see `_follow`).
    """
    if not world.is_main:
        return _follow(world)
    with world.lead() as start:
        experiment = (
            check_name("experiment name", experiment, MAX_EXPERIMENT_NAME)
            if experiment is not None
            else config.experiment
        )
        if run_name is not None:
            check_name("run name", run_name, MAX_RUN_NAME)
        prepared = preflight(config, world=world) if prepared is None else prepared
        client = client or get_client()
        tags = {TAG_JOB: "train", **(tags or {})}
        with (
            write_failures(client),
            tracked_run(client, experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id) as run_id,
            world.peer_errors(),
        ):
            if on_created is not None:
                on_created(run_id)
            start(run_id, config)
            root, upload = checkpoint_root(client, run_id)
            subscribers = [
                MlflowLogger(client, run_id, upload_checkpoints=upload),
                *step_subscribers(config, client, run_id),
                *callbacks,
            ]
            if console:
                subscribers.append(ConsoleProgress())
            with system_metrics(client, run_id, config.tracking.system_metrics):
                result = run(
                    config, subscribers, runtime=prepared.runtime, data=prepared.data, checkpoint_dir=root, world=world
                )
    return TrainOutcome(run_id, result)


def _follow(world: World) -> TrainOutcome | None:
    """A rank other than 0: rank 0's run id and config, then the same run beside it (no subscribers;
    a resumed run's checkpoint state comes from rank 0 inside `run`).

    None when the job ended in a way rank 0 reports, having met it too: its own error before the
    run, a NaN, a stop the ranks agreed on. This rank then ends quietly and successfully, so that
    rank 0's exit is the job's: torchrun's agent stops every worker once one fails, and would
    otherwise cut rank 0 short as it ends the run and says why.
    """
    try:
        with world.peer_errors():
            run_id, config = world.follow()
            prepared = preflight(config, world=world)
            return TrainOutcome(run_id, run(config, runtime=prepared.runtime, data=prepared.data, world=world))
    except (MainFailed, NonFiniteLoss, *INTERRUPTS):
        return None


def run_config(client, run_id: str) -> Config:
    """The resolved config a run recorded in config/config.yaml."""
    local = local_artifact_dir(client, run_id)
    path = local / "config" / "config.yaml" if local is not None else None
    if path is None or not path.is_file():
        try:
            path = artifact_cache.fetch(client, run_id, "config/config.yaml")
        except Exception:
            raise GptexpError(
                f"run {run_id} has no config/config.yaml artifact: it was not made by gptexp train"
            ) from None
    try:
        # read_yaml: the same YAML rules as a config the user writes (syntax, mapping, UTF-8).
        return from_dict(read_yaml(path), origin=f"run {run_id} config")
    except ConfigError as exc:
        raise GptexpError(f"run {run_id}'s recorded config cannot be used: {exc}") from None


def run_checkpoints(client, run_id: str) -> tuple[Path, bool]:
    """The run's checkpoints/ folder here (the local cache, gptexp.artifact_cache, when the artifact
    store is remote) and whether new checkpoints must be uploaded."""
    local = local_artifact_dir(client, run_id)
    if local is not None:
        return local / "checkpoints", False
    return artifact_cache.checkpoints(client, run_id), True


def run_checkpoint(client, run_id: str, which: str = "last") -> Path:
    """The folder of a run's `last` or `best` checkpoint (`run_id`: the id or a unique prefix)."""
    run_id = get_run(client, run_id).info.run_id
    root, _ = run_checkpoints(client, run_id)
    index = ckpt.read_index(root)
    folder = root / index[which] if index.get(which) else None
    if folder is None or not (folder / ckpt.WEIGHTS).is_file():
        folder = ckpt.latest_weights(root) if which == "last" else None
    if folder is None:
        raise GptexpError(
            f"run {run_id} has no {which} checkpoint: was it trained with checkpoint.keep=none "
            "or killed before its first epoch ended?"
        )
    return folder


def resume(
    run_id: str,
    *,
    client=None,
    callbacks: Sequence[Callback] = (),
    console: bool = True,
    on_created: Callable[[str], None] | None = None,
    world: World = SINGLE,
) -> TrainOutcome | None:
    """Continue run `run_id` from its last checkpoint, in the same MLflow run (`on_created(run_id)`
    once it is reopened). In a distributed job every rank calls it; rank 0 alone reads the run."""
    if not world.is_main:
        return _follow(world)
    with world.lead() as start:
        return _resume(run_id, client, callbacks, console, on_created, world, start)


def _resume(run_id: str, client, callbacks, console: bool, on_created, world: World, start) -> TrainOutcome:
    client = client or get_client()
    info = get_run(client, run_id).info
    run_id = info.run_id  # the full id, when given a prefix
    config = run_config(client, run_id)
    root, upload = run_checkpoints(client, run_id)
    folder = ckpt.latest_checkpoint(root)
    if folder is None:
        raise GptexpError(
            f"run {run_id} has no checkpoint to resume from (it ended before its first epoch, used "
            "checkpoint.keep=none, or kept weights alone with checkpoint.resumable=false, as sweep trials do): "
            "start a new run instead"
        )
    done = ckpt.load_state(folder)["epoch"]
    # The whole checkpoint is checked before the run is reopened, so a damaged one leaves it as it was.
    model_cfg = ckpt.load_model_config(folder)
    ckpt.check_config_fits(folder, model_cfg, config.model, f"run {run_id}'s config")
    ckpt.check_weights(folder, model_cfg)
    if done >= config.train.num_epochs or info.status == "FINISHED":
        raise GptexpError(
            f"run {run_id} already trained all {config.train.num_epochs} epochs ({info.status}): nothing to resume"
        )
    prepared = preflight(config, world=world)
    require_writable(client, info.artifact_uri)
    with write_failures(client), tracked_run(client, "", resume_run_id=run_id), world.peer_errors():
        if on_created is not None:
            on_created(run_id)
        start(run_id, config)
        subscribers = [
            MlflowLogger(client, run_id, upload_checkpoints=upload),
            *step_subscribers(config, client, run_id),
            *callbacks,
        ]
        if console:
            subscribers.append(ConsoleProgress())
        with system_metrics(client, run_id, config.tracking.system_metrics, resumed=True):
            result = run(
                config,
                subscribers,
                runtime=prepared.runtime,
                data=prepared.data,
                checkpoint_dir=root,
                resume_from=folder,
                world=world,
            )
    return TrainOutcome(run_id, result)
