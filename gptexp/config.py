"""The typed run configuration: YAML + `--set section.key=value` overrides, validated at the edge.

Sections and key names are part of the product (MLflow params, dashboards and reports use
them): `model`, `data`, `train`, `sample`, `checkpoint`, `tracking`, plus the top-level `experiment`.
Every problem is a ConfigError whose message is one line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import GptexpError
from .model import IMPLS

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
KEEP = ("last", "best", "both", "all", "none")
LR_SCHEDULES = ("constant", "cosine")
# YAML 1.1 reads 4e-4 (no dot) as a string; users write it that way, so floats accept it.
_FLOAT_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
# torch.manual_seed takes 0 .. 2**64 - 1 (and maps negatives into that range; we refuse them).
MAX_SEED = 2**64 - 1
# A sample is for reading: far past this, each epoch's sample (one forward per token) would take
# longer than the training it follows.
MAX_NEW_TOKENS = 10_000
# libgomp allocates per-thread state up front; a billion threads aborts the process.
MAX_THREADS = 1024
# An experiment's name, slugged, names its artifact folder (file systems allow 255 bytes per name);
# MLflow's runs.name column holds 250 characters.
MAX_EXPERIMENT_NAME = 200
MAX_RUN_NAME = 250


class ConfigError(GptexpError, ValueError):
    """A bad config value; also a ValueError, the type that code catches for bad values."""


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names a key twice: YAML would keep the last silently, dropping the first."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"has the key {key!r} twice (lines {first_line} and {line}): keep one")
        self.key, self.first_line, self.line = key, first_line, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags beyond plain data) that refuses duplicate keys at any depth."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` entries are meant to be overridden by explicit keys
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], line)
                    seen[key] = line
                except TypeError:
                    continue  # an unhashable key: the base constructor says so
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text as plain data; yaml.YAMLError (DuplicateKeyError for a key given twice) if it is not."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML file, as the end of a sentence that starts with its name."""
    if isinstance(exc, DuplicateKeyError):
        return str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"is not valid YAML{where}: fix its syntax"


@dataclass
class ModelConfig:
    vocab_size: int = 50257
    context_length: int = 256
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    impl: str = "fast"


@dataclass
class DataConfig:
    source: str = "the-verdict"
    train_ratio: float = 0.9
    # Window stride of the training loader; null means the context length (the book's setting).
    stride: int | None = None
    # The stride as a fraction of the context length, so a sweep over context lengths keeps its
    # meaning; exclusive with `stride`.
    stride_fraction: float | None = None


@dataclass
class TrainConfig:
    batch_size: int = 2  # the global batch, whatever the number of processes
    # A step's batch goes through in this many equal micro-batches (gradients accumulated), for
    # batches that do not fit in memory at once: the same step, in smaller pieces.
    grad_accum_steps: int = 1
    num_epochs: int = 10
    lr: float = 4e-4
    weight_decay: float = 0.1
    eval_freq: int = 5
    eval_iter: int = 5
    seed: int = 123
    device: str = "auto"
    precision: str = "auto"
    # Appendix D of the book: linear warmup from initial_lr, cosine decay to min_lr, clipping.
    warmup_steps: int = 0
    initial_lr: float = 3e-5
    min_lr: float = 1e-6
    lr_schedule: str = "constant"
    grad_clip: float | None = None
    # Speed knobs; none changes what is computed beyond float rounding (and, for compile, which
    # dropout masks are drawn: compiled code draws its own random numbers).
    fused_adamw: bool = True
    compile: bool = False  # torch.compile per transformer block (regional: one graph serves all)
    threads: int = 0  # 0: one per physical core
    eval_batch_size: int = 8
    # torch.use_deterministic_algorithms for the run: CUDA kernels then pick deterministic
    # implementations (slower; an op without one raises). CPU fp32 is deterministic either way.
    deterministic: bool = False


@dataclass
class SampleConfig:
    start_context: str = "Every effort moves you"
    max_new_tokens: int = 50


@dataclass
class CheckpointConfig:
    keep: str = "both"
    # false: each kept epoch holds its weights and configs only, no optimizer/RNG state (a third of
    # the size with AdamW's two moments gone); enough to evaluate, sample or report, not to resume.
    resumable: bool = True


@dataclass
class TrackingConfig:
    # `step_loss` and `grad_norm` at every optimizer step (logged in batches), beside the book's
    # eval-cadence `train_loss`/`val_loss`, which they leave unchanged.
    step_metrics: bool = True
    # MLflow's system metrics (CPU, memory, disk, network; GPU where present) while the run trains.
    system_metrics: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    experiment: str = "gptexp"

    @property
    def stride(self) -> int:
        """The absolute training stride: data.stride, else stride_fraction x context, else the context."""
        if self.data.stride is not None:
            return self.data.stride
        if self.data.stride_fraction is not None:
            return max(1, round(self.data.stride_fraction * self.model.context_length))
        return self.model.context_length

    def model_cfg(self) -> dict:
        """The book's GPT_CONFIG dict (plus impl) for GPTModel."""
        return dataclasses.asdict(self.model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{'model.context_length': 256, ..., 'experiment': 'gptexp'}: the MLflow params."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _section_classes() -> dict[str, type]:
    """Each section's dataclass (ModelConfig, ...), by section name."""
    hints = typing.get_type_hints(Config)
    return {name: cls for name, cls in hints.items() if isinstance(cls, type) and dataclasses.is_dataclass(cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """value as the annotated type, or ConfigError naming the key and the expected type."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} must not be null: give a {annotation.__name__}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            # Past 2**53 a float has dropped digits: 1e23 is not the integer the user wrote.
            if abs(value) > 2**53:
                raise ConfigError(
                    f"{key} must be an integer written in digits (got {value!r}, a float too large to be exact)"
                )
            return int(value)
        raise ConfigError(f"{key} must be an integer (got {value!r})")
    if annotation is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number or isinstance(value, str) and _FLOAT_RE.match(value.strip())):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        out = float(value)
        # No key means anything by nan or inf (grad_clip's "off" is null), and they pass range checks.
        if not math.isfinite(out):
            raise ConfigError(f"{key} must be a finite number (got {value!r})")
        return out
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string (got {value!r})")
    raise AssertionError(f"unhandled type {annotation} for {key}")


def from_dict(raw: Any, *, origin: str = "config") -> Config:
    """A validated Config from a nested dict (missing keys take their defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    classes = _section_classes()
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown key {name!r} in {origin}: the sections are {', '.join(SECTIONS)}")
        if name == "experiment":
            kwargs[name] = _coerce("experiment", value, str)
            continue
        cls = classes[name]
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} in {origin} must be a mapping of keys, got {value!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        section = {}
        for key, v in value.items():
            if key not in fields:
                raise ConfigError(f"unknown key {name}.{key} in {origin}: {name} takes {', '.join(sorted(fields))}")
            section[key] = _coerce(f"{name}.{key}", v, hints[key])
        kwargs[name] = cls(**section)
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    m, d, t = cfg.model, cfg.data, cfg.train
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        value = getattr(m, key)
        _check(value >= 1, f"model.{key} must be at least 1 (got {value})")
    _check(0.0 <= m.drop_rate < 1.0, f"model.drop_rate must be in [0, 1) (got {m.drop_rate})")
    _check(
        m.emb_dim % m.n_heads == 0,
        f"model.emb_dim {m.emb_dim} is not divisible by model.n_heads {m.n_heads}: pick n_heads that divides emb_dim",
    )
    _check(m.impl in IMPLS, f"model.impl must be one of {', '.join(IMPLS)} (got {m.impl!r})")
    _check(bool(d.source.strip()), "data.source is empty: give a registry name, a .txt file or a folder of .txt files")
    _check(0.0 < d.train_ratio < 1.0, f"data.train_ratio must be in (0, 1) (got {d.train_ratio})")
    _check(d.stride is None or d.stride >= 1, f"data.stride must be at least 1 (got {d.stride})")
    _check(
        d.stride_fraction is None or 0 < d.stride_fraction <= 1,
        f"data.stride_fraction must be in (0, 1] (got {d.stride_fraction})",
    )
    _check(
        d.stride is None or d.stride_fraction is None,
        "data.stride and data.stride_fraction are both set: keep one (set the other to null)",
    )
    _check(t.batch_size >= 1, f"train.batch_size must be at least 1 (got {t.batch_size})")
    _check(t.grad_accum_steps >= 1, f"train.grad_accum_steps must be at least 1 (got {t.grad_accum_steps})")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        f"train.batch_size {t.batch_size} is not a multiple of train.grad_accum_steps {t.grad_accum_steps}: "
        "each step's micro-batches must be equal (batch_size / grad_accum_steps windows each)",
    )
    _check(t.num_epochs >= 1, f"train.num_epochs must be at least 1 (got {t.num_epochs})")
    for key in ("lr", "initial_lr", "min_lr"):
        value = getattr(t, key)
        _check(value > 0 and math.isfinite(value), f"train.{key} must be a positive number (got {value})")
    _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {t.weight_decay})")
    _check(t.eval_freq >= 1, f"train.eval_freq must be at least 1 (got {t.eval_freq})")
    _check(t.eval_iter >= 1, f"train.eval_iter must be at least 1 (got {t.eval_iter})")
    _check(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0 (got {t.warmup_steps})")
    _check(t.grad_clip is None or t.grad_clip > 0, f"train.grad_clip must be positive or null (got {t.grad_clip})")
    _check(
        0 <= t.threads <= MAX_THREADS, f"train.threads must be from 0 (one per core) to {MAX_THREADS} (got {t.threads})"
    )
    _check(0 <= t.seed <= MAX_SEED, f"train.seed must be from 0 to 2**64-1, torch's seed range (got {t.seed})")
    _check(t.eval_batch_size >= 1, f"train.eval_batch_size must be at least 1 (got {t.eval_batch_size})")
    _check(
        t.device in DEVICES or t.device.startswith("cuda:"),
        f"train.device must be one of {', '.join(DEVICES)} or cuda:N (got {t.device!r})",
    )
    _check(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)} (got {t.precision!r})")
    _check(
        t.lr_schedule in LR_SCHEDULES,
        f"train.lr_schedule must be one of {', '.join(LR_SCHEDULES)} (got {t.lr_schedule!r})",
    )
    _check(
        0 <= cfg.sample.max_new_tokens <= MAX_NEW_TOKENS,
        f"sample.max_new_tokens must be from 0 to {MAX_NEW_TOKENS} (got {cfg.sample.max_new_tokens})",
    )
    _check(
        bool(cfg.sample.start_context.strip()),
        "sample.start_context is empty or blank: give the text each epoch's sample continues, "
        "e.g. 'Every effort moves you'",
    )
    _check(
        cfg.checkpoint.keep in KEEP, f"checkpoint.keep must be one of {', '.join(KEEP)} (got {cfg.checkpoint.keep!r})"
    )
    check_name("experiment", cfg.experiment, MAX_EXPERIMENT_NAME)


def check_name(what: str, name: str, limit: int) -> str:
    """`name` if it can name an MLflow experiment or run (`what` says which option gave it)."""
    _check(bool(name.strip()), f"{what} is blank: give a name")
    _check(len(name) <= limit, f"{what} is {len(name)} characters long; the limit is {limit}: give a shorter name")
    _check(name.isprintable(), f"{what} {name!r} holds control characters (e.g. a newline): use printable text")
    return name


def parse_override(item: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], '1e-3' parsed as a YAML scalar)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r} is not KEY=VALUE: write e.g. --set train.lr=1e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, (dict, list)):
        raise ConfigError(f"--set {key}: the value must be a scalar (got {text!r})")
    return key.split("."), value


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """raw['train']['lr'] = value for dotted 'train.lr' (unknown keys are caught by from_dict)."""
    path = dotted.split(".")
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[path[-1]] = value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """A copy of the nested dict `raw` with each KEY=VALUE set."""
    out = yaml.safe_load(yaml.safe_dump(raw)) if raw else {}
    for item in overrides:
        path, value = parse_override(item)
        set_dotted(out, ".".join(path), value)
    return out


def config_keys() -> list[str]:
    """Every dotted key a config has ('model.context_length', ..., 'experiment')."""
    return list(Config().flat())


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist: give the path of a YAML file, e.g. configs/tiny.yaml")
    try:
        raw = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} {yaml_problem(exc)}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, not a {type(raw).__name__}")
    return raw or {}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(raw, list(overrides)), origin=str(path) if path else "config")
