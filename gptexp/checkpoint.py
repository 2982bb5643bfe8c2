"""Checkpoints: one immutable folder per saved epoch, and an index naming the last and the best.

    checkpoints/
      index.json                {"last": "epoch-0003", "best": "epoch-0002", "best_val_loss": ...}
      epoch-0003/
        model.safetensors       the weights (the book's state_dict keys)
        model_config.json       the model cfg, so the weights load without the run config
        config.yaml             the resolved run config
        state.pt                optimizer, RNG and loop state for an exact resume (weights_only);
                                absent when checkpoint.resumable is false (sweep trials by default)

An epoch folder is written under a temporary name and renamed into place, and the index is
replaced atomically after it, so a crash at any point leaves the previous good checkpoint
reachable and never a half-written one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import ConfigError, ModelConfig, from_dict
from .errors import GptexpError, first_line
from .model import MODEL_KEYS

INDEX = "index.json"
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
RUN_CONFIG = "config.yaml"
STATE = "state.pt"
# Matched whole (fullmatch): an index entry or folder name is a bare epoch folder name, nothing else.
_EPOCH_DIR = re.compile(r"epoch-([0-9]+)")
# The keys a model config must give and a run config must agree on: they fix the weights' shapes
# (n_heads and qkv_bias the function). drop_rate and impl may differ: eval mode, same function.
ARCH_KEYS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias")
# The loop state a checkpoint's state.pt holds beside optimizer and RNG (runner._save writes it).
_STATE_INTS = ("epoch", "global_step", "tokens_seen", "best_epoch")


class CheckpointError(GptexpError):
    pass


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def epoch_of(folder: Path) -> int | None:
    """The epoch an `epoch-NNNN` checkpoint folder holds; None for a folder named otherwise."""
    m = _EPOCH_DIR.fullmatch(folder.name)
    return int(m.group(1)) if m else None


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
        self.path = path
        self.error: OSError | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view) :]
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
            # A raw binary file is what torch.save writes to; its stubs ask for IO[bytes], which RawIOBase is.
            torch.save(obj, cast(BinaryIO, keeper))
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


def save_checkpoint(
    root: Path, epoch: int, model: torch.nn.Module, state: dict[str, Any] | None, run_config_yaml: str
) -> Path:
    """Write epoch `epoch`'s folder under `root` (atomically); returns its path.

    `state` None: the weights and configs alone (checkpoint.resumable false), which load for
    inference but cannot be resumed.
    """
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
        if state is not None:
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
    """The index's well-formed entries: `last`/`best` naming an epoch folder of `root`.

    Anything else (not JSON, not a mapping, a name with a path in it) is ignored, as if the index
    were absent: the epoch folders describe themselves, so a damaged index costs only the shortcut,
    and an entry can never lead outside `root`.
    """
    try:
        raw = json.loads((root / INDEX).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    index: dict[str, Any] = {
        k: raw[k] for k in ("last", "best") if isinstance(raw.get(k), str) and _EPOCH_DIR.fullmatch(raw[k])
    }
    if "best" in index:
        loss, epoch = raw.get("best_val_loss"), raw.get("best_epoch")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            index["best_val_loss"] = float(loss)
        if isinstance(epoch, int) and not isinstance(epoch, bool):
            index["best_epoch"] = epoch
    return index


def write_index(root: Path, index: dict[str, Any]) -> None:
    write_atomic(root / INDEX, json.dumps(index, indent=2).encode())


def prune(root: Path, keep: set[str]) -> list[str]:
    """Remove epoch folders not named in `keep` (and stale temp folders); returns those removed."""
    removed = []
    for child in root.iterdir() if root.is_dir() else ():
        unkept = _EPOCH_DIR.fullmatch(child.name) and child.name not in keep
        if child.is_dir() and (unkept or child.name.endswith(".tmp")):
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
        epochs = sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _EPOCH_DIR.fullmatch(c.name)))
        candidates += [c for _, c in reversed(epochs)]
    for c in candidates:
        if (c / WEIGHTS).is_file() and (c / STATE).is_file():
            return c
    return None


def latest_weights(root: Path) -> Path | None:
    """The folder to evaluate or sample from: the index's `last`, else the highest epoch folder
    holding weights, resumable or not (a sweep trial keeps its best epoch's weights alone)."""
    index = read_index(root)
    candidates = [root / index["last"]] if index.get("last") else []
    if root.is_dir():
        epochs = sorted((int(m.group(1)), c) for c in root.iterdir() if (m := _EPOCH_DIR.fullmatch(c.name)))
        candidates += [c for _, c in reversed(epochs)]
    return next((c for c in candidates if (c / WEIGHTS).is_file()), None)


def resolve_checkpoint_path(path: Path) -> Path:
    """A checkpoint folder, a checkpoints/ root (-> its latest), or a model.safetensors file."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS:
        return path.parent
    if (path / WEIGHTS).is_file():
        return path
    latest = latest_weights(path)
    if latest is not None:
        return latest
    raise CheckpointError(
        f"no checkpoint at {path}: give a checkpoint folder holding {WEIGHTS}, or a run's checkpoints/ folder"
    )


def load_model_config(folder: Path) -> dict:
    """The checkpoint's model config, validated as a run config's `model` section is."""
    where = f"checkpoint {folder}/{MODEL_CONFIG}"
    try:
        raw = json.loads((folder / MODEL_CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {MODEL_CONFIG}: it is incomplete, use another") from None
    except (OSError, ValueError):
        raise CheckpointError(f"{where} is corrupt (not JSON): use another") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where} is corrupt (not a mapping): use another")
    # A run config's missing keys take defaults; a checkpoint's must not, its weights have one shape.
    missing = [k for k in MODEL_KEYS if k not in raw]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}: it is incomplete, use another")
    try:
        model = from_dict({"model": raw}, origin=where).model
    except ConfigError as exc:
        raise CheckpointError(f"{where} is not a valid model config ({exc}): use another") from None
    return dataclasses.asdict(model)


def check_config_fits(folder: Path, model_cfg: dict, config_model: ModelConfig, source: str) -> None:
    """Refuse a run config whose model differs from the checkpoint's model config.

    The weights were trained with model_config.json; a config that says otherwise (a damaged or
    mixed folder, or a --set) would evaluate or resume a model other than the one it records.
    """
    for key in ARCH_KEYS:
        ours, theirs = getattr(config_model, key), model_cfg[key]
        if ours != theirs:
            raise CheckpointError(
                f"checkpoint {folder}: {source} gives model.{key} {ours} but its {MODEL_CONFIG} gives {theirs}: "
                "the weights follow model_config.json; use a consistent checkpoint"
            )


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, read from the safetensors header alone (no tensor is loaded)."""
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {WEIGHTS}: it is incomplete, use another") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}/{WEIGHTS} is corrupt ({first_line(exc)}): use another") from None


_LAYER_KEY = re.compile(r"trf_blocks\.([0-9]+)\.")


def check_weights(folder: Path, model_cfg: dict) -> None:
    """Refuse weights that do not fit `model_cfg`, before any model is built.

    The sizes are first compared with those the header implies, so the model skeleton built
    (on the meta device, no memory) for the full key-by-key comparison is never larger than
    the file: an absurd emb_dim in the config is refused here, never allocated.
    """
    shapes = weight_shapes(folder)
    tok, pos = shapes.get("tok_emb.weight", ()), shapes.get("pos_emb.weight", ())
    if len(tok) != 2 or len(pos) != 2:
        raise CheckpointError(f"checkpoint {folder}/{WEIGHTS} holds no GPT embedding weights: use another")
    implied = {
        "vocab_size": tok[0],
        "emb_dim": tok[1],
        "context_length": pos[0],
        "n_layers": len({m.group(1) for k in shapes if (m := _LAYER_KEY.match(k))}),
    }
    for key, value in implied.items():
        if model_cfg[key] != value:
            raise CheckpointError(
                f"checkpoint {folder} weights do not fit its model config "
                f"({key} {model_cfg[key]} in {MODEL_CONFIG}, {value} in {WEIGHTS}): use another"
            )
    from .model import GPTModel

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in GPTModel(model_cfg).state_dict().items()}
    for key in sorted(set(want) | set(shapes)):
        if want.get(key) != shapes.get(key):
            got = "missing" if key not in shapes else f"shape {shapes[key]}"
            expected = "no such tensor" if key not in want else f"shape {want[key]}"
            raise CheckpointError(
                f"checkpoint {folder} weights do not fit its model config "
                f"({key}: {got} in {WEIGHTS}, {expected} in {MODEL_CONFIG}): use another"
            )


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(folder / WEIGHTS))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {WEIGHTS}: it is incomplete, use another") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {folder}/{WEIGHTS} is corrupt ({first_line(exc)}): use another") from None


def load_model(folder: Path, *, impl: str | None = None, device: str | torch.device = "cpu"):
    """The GPTModel saved in `folder` (in eval mode), optionally switched to another impl."""
    from .model import GPTModel

    cfg = load_model_config(folder)
    check_weights(folder, cfg)
    if impl is not None:
        cfg["impl"] = impl
    model = GPTModel(cfg)
    try:
        model.load_state_dict(load_weights(folder), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {folder} weights do not fit its model config ({first_line(exc)}): use another"
        ) from None
    return model.to(device).eval()


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of `folder`, checked to be one runner._save wrote."""
    path = folder / STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} lacks {STATE}: it cannot be resumed") from None
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False, i.e. running the file's code: never relay it.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a {found.group(1)} object" if found else "objects"
        raise CheckpointError(
            f"checkpoint {path} is not a gptexp training state (it holds {what}, "
            "which gptexp never saves, and is not loaded): use another"
        ) from None
    except Exception as exc:  # torch.load raises many error types on a corrupt file
        detail = first_line(exc)
        if "weights_only" in detail:
            detail = type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt ({detail}): use another") from None
    problem = _state_problem(state)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not a gptexp training state ({problem}): use another")
    return state


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a mapping"
    for key in _STATE_INTS:
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{key} is {'missing' if value is None else type(value).__name__}, not an integer"
    loss = state.get("best_val_loss")
    if not isinstance(loss, (int, float)) or isinstance(loss, bool):
        return "best_val_loss is not a number"
    if state["epoch"] < 1:
        return f"epoch {state['epoch']}"
    optimizer = state.get("optimizer")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        return "no optimizer state"
    rng = state.get("rng")
    if not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor) and rng["torch"].dtype == torch.uint8):
        return "no random generator state"
    return None
