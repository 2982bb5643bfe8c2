"""Tracked jobs: a runner run wrapped in one MLflow run (train, resume, sweep trial, reproduce).

Everything that can be checked is checked before the MLflow run is created (config, corpus,
splits, device), so bad input never leaves a run behind.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint as ckpt
from .config import Config, ConfigError, from_dict, read_yaml
from .errors import GptexpError
from .progress import ConsoleProgress
from .runner import Callback, RunResult, run
from .runtime import resolve_device, resolve_precision
from .splits import Splits, prepare_data
from .tracking import (TAG_JOB, MlflowLogger, checkpoint_root, get_client, get_run, local_artifact_dir,
                       tracked_run)


@dataclass
class TrainOutcome:
    run_id: str
    result: RunResult


def preflight(config: Config, data: Splits | None = None) -> Splits:
    """Validate what a run needs before it exists: device, precision, corpus and splits."""
    resolve_precision(config.train.precision, resolve_device(config.train.device))
    return data or prepare_data(config)


def train(config: Config, *, experiment: str | None = None, run_name: str | None = None,
          tags: dict | None = None, parent_run_id: str | None = None, callbacks: list[Callback] = (),
          data: Splits | None = None, client=None, console: bool = True,
          on_created: Callable[[str], None] | None = None) -> TrainOutcome:
    """Train `config` as one MLflow run; `on_created(run_id)` is called as soon as the run exists."""
    data = preflight(config, data)
    client = client or get_client()
    experiment = experiment or config.experiment
    tags = {TAG_JOB: "train", **(tags or {})}
    with tracked_run(client, experiment, run_name=run_name, tags=tags, parent_run_id=parent_run_id) as run_id:
        if on_created is not None:
            on_created(run_id)
        root, upload = checkpoint_root(client, run_id)
        subscribers = [MlflowLogger(client, run_id, upload_checkpoints=upload), *callbacks]
        if console:
            subscribers.append(ConsoleProgress())
        result = run(config, subscribers, data=data, checkpoint_dir=root)
    return TrainOutcome(run_id, result)


def run_config(client, run_id: str) -> Config:
    """The resolved config a run recorded in config/config.yaml."""
    with tempfile.TemporaryDirectory() as tmp:
        local = local_artifact_dir(client, run_id)
        path = local / "config" / "config.yaml" if local is not None else None
        if path is None or not path.is_file():
            try:
                path = Path(client.download_artifacts(run_id, "config/config.yaml", tmp))
            except Exception:
                raise GptexpError(f"run {run_id} has no config/config.yaml artifact: it was not made by gptexp train") from None
        try:
            # read_yaml: the same YAML rules as a config the user writes (syntax, mapping, UTF-8).
            return from_dict(read_yaml(path), origin=f"run {run_id} config")
        except ConfigError as exc:
            raise GptexpError(f"run {run_id}'s recorded config cannot be used: {exc}") from None


def run_checkpoints(client, run_id: str) -> tuple[Path, bool]:
    """The run's checkpoints/ folder here (downloaded when the artifact store is remote)."""
    local = local_artifact_dir(client, run_id)
    if local is not None:
        return local / "checkpoints", False
    tmp = Path(tempfile.mkdtemp(prefix="gptexp-ckpt-"))
    try:
        client.download_artifacts(run_id, "checkpoints", str(tmp))
    except Exception:
        pass
    return tmp / "checkpoints", True


def run_checkpoint(client, run_id: str, which: str = "last") -> Path:
    """The folder of a run's `last` or `best` checkpoint (`run_id`: the id or a unique prefix)."""
    run_id = get_run(client, run_id).info.run_id
    root, _ = run_checkpoints(client, run_id)
    index = ckpt.read_index(root)
    folder = root / index[which] if index.get(which) else None
    if folder is None or not (folder / ckpt.WEIGHTS).is_file():
        folder = ckpt.latest_checkpoint(root) if which == "last" else None
    if folder is None:
        raise GptexpError(f"run {run_id} has no {which} checkpoint: was it trained with checkpoint.keep=none "
                          "or killed before its first epoch ended?")
    return folder


def resume(run_id: str, *, client=None, callbacks: list[Callback] = (), console: bool = True) -> TrainOutcome:
    """Continue run `run_id` from its last checkpoint, in the same MLflow run."""
    client = client or get_client()
    info = get_run(client, run_id).info
    run_id = info.run_id  # the full id, when given a prefix
    config = run_config(client, run_id)
    root, upload = run_checkpoints(client, run_id)
    folder = ckpt.latest_checkpoint(root)
    if folder is None:
        raise GptexpError(f"run {run_id} has no checkpoint to resume from (it ended before its first epoch "
                          "or used checkpoint.keep=none): start a new run instead")
    done = ckpt.load_state(folder)["epoch"]
    # The whole checkpoint is checked before the run is reopened, so a damaged one leaves it as it was.
    model_cfg = ckpt.load_model_config(folder)
    ckpt.check_config_fits(folder, model_cfg, config.model, f"run {run_id}'s config")
    ckpt.check_weights(folder, model_cfg)
    if done >= config.train.num_epochs or info.status == "FINISHED":
        raise GptexpError(f"run {run_id} already trained all {config.train.num_epochs} epochs ({info.status}): "
                          "nothing to resume")
    data = preflight(config)
    with tracked_run(client, "", resume_run_id=run_id):
        subscribers = [MlflowLogger(client, run_id, upload_checkpoints=upload), *callbacks]
        if console:
            subscribers.append(ConsoleProgress())
        result = run(config, subscribers, data=data, checkpoint_dir=root, resume_from=folder)
    return TrainOutcome(run_id, result)
