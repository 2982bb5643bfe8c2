"""Checkpoints: one immutable folder per saved epoch, and an index naming the last and the best.

    checkpoints/
      index.json                {"last": "epoch-0003", "best": "epoch-0002", "best_val_loss": ...}
      epoch-0003/
        model.safetensors       the weights (the book's state_dict keys)
        model_config.json       the model cfg, so the weights load without the run config
        config.yaml             the resolved run config
        state.pt                optimizer, RNG and loop state for an exact resume (weights_only)

An epoch folder is written under a temporary name and renamed into place, and the index is
replaced atomically after it, so a crash at any point leaves the previous good checkpoint
reachable and never a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import GptexpError

INDEX = "index.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "config.yaml"
STATE = "state.pt"
_EPOCH_DIR = re.compile(r"^epoch-(\d+)$")


class CheckpointError(GptexpError):
    pass


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _fsync_write(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        exc.filename = exc.filename or str(path)  # write() errors do not say which file
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        _fsync_write(Path(tmp), data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _OSErrorKeeper(io.RawIOBase):
    """A file torch.save writes through, keeping the OSError it hides behind 'unexpected pos'."""

    def __init__(self, path: Path):
        super().__init__()
        self.path, self.error = path, None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = OSError(exc.errno, exc.strerror, str(self.path))
            raise
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                os.fsync(self._fd)
            finally:
                os.close(self._fd)
        super().close()


def _torch_save(obj: Any, path: Path) -> None:
    keeper = _OSErrorKeeper(path)
    try:
        with keeper:
            torch.save(obj, keeper)
    except (RuntimeError, OSError):
        if keeper.error is not None:
            raise keeper.error from None
        raise


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file(weights, str(path))
    except SafetensorError as exc:
        # safetensors reports the OS error only as text: "... (os error 28)".
        found = re.search(r"os error (\d+)", str(exc))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def save_checkpoint(root: Path, epoch: int, model: torch.nn.Module, state: dict[str, Any],
                    run_config_yaml: str) -> Path:
    """Write epoch `epoch`'s folder under `root` (atomically); returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / epoch_dir_name(epoch)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        # Buffers such as the causal mask are part of the book's state_dict; contiguous copies
        # because safetensors refuses views.
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _save_weights(weights, tmp / WEIGHTS)
        _fsync_write(tmp / MODEL_CONFIG, json.dumps(model.cfg, indent=2).encode())
        _fsync_write(tmp / RUN_CONFIG, run_config_yaml.encode())
        fd, state_tmp = tempfile.mkstemp(dir=tmp)
        os.close(fd)
        _torch_save(state, Path(state_tmp))
        os.replace(state_tmp, tmp / STATE)
        if final.exists():  # the same epoch saved again on a resumed run: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_index(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return {}


def write_index(root: Path, index: dict[str, Any]) -> None:
    write_atomic(root / INDEX, json.dumps(index, indent=2).encode())


def prune(root: Path, keep: set[str]) -> list[str]:
    """Remove epoch folders not named in `keep` (and stale temp folders); returns those removed."""
    removed = []
    for child in root.iterdir() if root.is_dir() else ():
        if child.is_dir() and (_EPOCH_DIR.match(child.name) and child.name not in keep or child.name.endswith(".tmp")):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    return removed


def latest_checkpoint(root: Path) -> Path | None:
    """The folder to resume from: the index's `last`, else the highest complete epoch folder."""
    index = read_index(root)
    candidates = []
    if index.get("last"):
        candidates.append(root / index["last"])
    if root.is_dir():
        epochs = sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _EPOCH_DIR.match(c.name)))
        candidates += [c for _, c in reversed(epochs)]
    for c in candidates:
        if (c / WEIGHTS).is_file() and (c / STATE).is_file():
            return c
    return None


def resolve_checkpoint_path(path: Path) -> Path:
    """A checkpoint folder, a checkpoints/ root (-> its latest), or a model.safetensors file."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        return path.parent
    if (path / WEIGHTS).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"no checkpoint at {path}: give a checkpoint folder holding {WEIGHTS}, or a run's checkpoints/ folder"
    )


def load_model_config(folder: Path) -> dict:
    try:
        cfg = json.loads((folder / MODEL_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {MODEL_CONFIG}: it is incomplete, use another") from None
    except ValueError:
        raise CheckpointError(f"checkpoint {folder}/{MODEL_CONFIG} is corrupt (not JSON): use another") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"checkpoint {folder}/{MODEL_CONFIG} is corrupt (not a mapping): use another")
    return cfg


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {WEIGHTS}: it is incomplete, use another") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}/{WEIGHTS} is corrupt ({_first_line(exc)}): use another") from None


def load_model(folder: Path, *, impl: str | None = None, device: str | torch.device = "cpu"):
    """The GPTModel saved in `folder` (in eval mode), optionally switched to another impl."""
    from .model import GPTModel

    cfg = load_model_config(folder)
    if impl is not None:
        cfg["impl"] = impl
    try:
        model = GPTModel(cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {folder}/{MODEL_CONFIG} is not a valid model config ({exc})") from None
    try:
        model.load_state_dict(load_weights(folder), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {folder} weights do not fit its model config ({_first_line(exc)}): use another"
        ) from None
    return model.to(device).eval()


def load_state(folder: Path) -> dict[str, Any]:
    try:
        return torch.load(folder / STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {STATE}: it cannot be resumed") from None
    except Exception as exc:  # torch.load raises many unpickling error types on a corrupt file
        raise CheckpointError(f"checkpoint {folder}/{STATE} is corrupt ({_first_line(exc)}): use another") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
