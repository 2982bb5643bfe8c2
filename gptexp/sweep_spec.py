"""A sweep spec: what a study searches, read and checked without Optuna.

`parse_spec` reads a spec file and checks it, with the base config it names, against the config
schema; `search_definition` is what a study records of its search, so that a resumed study can
refuse a changed one. Optuna's own check of the sampler and pruner options is made by
`gptexp.sweep.load_sweep_spec`, after `parse_spec`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from .config import Config, ConfigError, apply_overrides, config_keys, flatten, from_dict, read_yaml, set_dotted
from .errors import GptexpError

OBJECTIVES = {
    "epoch_val_loss": ("val_loss", "minimize"),
    "epoch_train_loss": ("train_loss", "minimize"),
    "epoch_val_ppl": ("val_ppl", "minimize"),
    "epoch_train_ppl": ("train_ppl", "minimize"),
}
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
PARAM_TYPES = ("int", "float", "categorical")
SEARCH_ATTR = "gptexp.search"  # the study user attr that records what the study searches
Direction = Literal["minimize", "maximize"]  # Optuna's names
DIRECTIONS = get_args(Direction)
# What each trial's checkpoints keep (spec key `trial_checkpoints`). A trial is retried from
# scratch, never resumed, so by default it keeps its best epoch's weights alone (no optimizer
# state); `base`: whatever the base config's checkpoint section says.
TRIAL_CHECKPOINTS = {
    "best_weights": {"checkpoint.keep": "best", "checkpoint.resumable": False},
    "base": {},
}
# Config keys that say how a run is recorded, not what it trains: left out of a study's search
# definition (they were not in it before they existed, so older studies resume unchanged).
_RECORDING_KEYS = ("tracking.", "checkpoint.resumable")


class SweepError(GptexpError):
    pass


@dataclass
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list | None = None

    def options(self) -> list:
        """A categorical's choices."""
        if self.choices is None:
            raise SweepError(f"space.{self.key}: a categorical needs choices")
        return self.choices

    def bounds(self) -> tuple[float, float]:
        """An int or float range's (low, high)."""
        if self.low is None or self.high is None:
            raise SweepError(f"space.{self.key}: an {self.type} range needs low and high")
        return self.low, self.high

    def suggest(self, trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.options())
        low, high = self.bounds()
        if self.type == "int":
            return trial.suggest_int(self.key, int(low), int(high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, low, high, step=self.step, log=self.log)

    def grid_values(self) -> list:
        if self.type == "categorical":
            return list(self.options())
        if self.step is None and self.type == "float":
            raise SweepError(f"space.{self.key}: the grid sampler needs choices or a step for a float range")
        low, high = self.bounds()
        step = self.step or 1
        n = int(math.floor((high - low) / step + 1e-9)) + 1
        values = [low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values

    def edges(self) -> list:
        """The values a trial can reach at the ends of the range (every value of a categorical)."""
        if self.type == "categorical":
            return list(self.options())
        low, high = self.bounds()
        if self.type == "float":
            return [low, high]
        step = int(self.step or 1)
        return [int(low), int(low) + (int(high) - int(low)) // step * step]

    def fixed(self, value: Any) -> Any:
        """An enqueued value as this parameter takes it, or SweepError when the space does not hold it."""
        where = f"enqueue point {self.key}={value!r}"
        if self.type == "categorical":
            _need(
                any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.options()),
                f"{where} is not one of space.{self.key}.choices",
            )
            return value
        number = _number(where, value)
        _need(self.type == "float" or number == int(number), f"{where} must be an integer")
        low, high = self.bounds()
        _need(low <= number <= high, f"{where} is outside space.{self.key} [{low:g}, {high:g}]")
        return int(number) if self.type == "int" else number


@dataclass
class SweepSpec:
    study: str
    base_config: str | None
    base_overrides: dict[str, Any]
    objective: str
    direction: Direction
    reduce: str  # best | last epoch's value
    sampler: dict
    pruner: dict
    n_trials: int
    space: list[Param]
    experiment: str  # the spec's, else its base config's
    heartbeat_interval: int
    heartbeat_grace: int
    max_failures: int
    enqueue: list[dict] = field(default_factory=list)  # points tried first, once, in a new study
    source: str = ""
    config_overrides: list[str] = field(default_factory=list)  # --set on the command line
    trial_checkpoints: str = "best_weights"  # a key of TRIAL_CHECKPOINTS

    def base_raw(self) -> dict:
        raw = read_yaml(self.base_config) if self.base_config else {}
        for key, value in self.base_overrides.items():
            set_dotted(raw, key, value)
        return apply_overrides(raw, self.config_overrides)

    def base(self) -> Config:
        return from_dict(self.base_raw(), origin=f"sweep {self.study} base config")

    def trial_config(self, params: dict[str, Any], threads: int, *, as_trial: bool = True) -> Config:
        """The config of a trial with `params`; `as_trial` False: the same without the trials'
        checkpoint policy, for a run of its own (the best trial's config, which `train` resumes)."""
        raw = self.base_raw()
        for key, value in params.items():
            set_dotted(raw, key, value)
        set_dotted(raw, "train.threads", threads)
        if as_trial:
            for key, value in TRIAL_CHECKPOINTS[self.trial_checkpoints].items():
                set_dotted(raw, key, value)
        return from_dict(raw, origin=f"sweep {self.study} trial")


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise SweepError(message)


def _number(where: str, value: Any) -> float:
    """A finite number; YAML 1.1 reads 1e-4 (no dot) as a string, so numeric strings count too."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    _need(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        f"{where} must be a finite number (got {value!r})",
    )
    return float(value)


# What Optuna's suggest_categorical stores; anything else (a list, a mapping) fails at the first trial.
CHOICE_TYPES = (type(None), bool, int, float, str)


def _parse_param(key: str, body: Any, valid_keys: set[str]) -> Param:
    _need(
        key in valid_keys,
        f"space.{key} is not a config key: use one of e.g. model.context_length, "
        "data.stride_fraction, train.batch_size, train.lr",
    )
    _need(isinstance(body, dict), f"space.{key} must be a mapping with a type (int, float or categorical)")
    unknown = set(body) - {"type", "low", "high", "log", "step", "choices"}
    _need(not unknown, f"space.{key} has unknown field(s) {', '.join(sorted(unknown))}")
    kind = body.get("type")
    _need(kind in PARAM_TYPES, f"space.{key}.type must be one of {', '.join(PARAM_TYPES)} (got {kind!r})")
    if kind == "categorical":
        choices = body.get("choices")
        _need(isinstance(choices, list) and len(choices) > 0, f"space.{key}.choices must be a non-empty list")
        for choice in choices:
            _need(
                isinstance(choice, CHOICE_TYPES) and not (isinstance(choice, float) and math.isnan(choice)),
                f"space.{key}.choices must be numbers, strings, booleans or null (got {choice!r})",
            )
        ignored = set(body) & {"low", "high", "log", "step"}
        _need(not ignored, f"space.{key}: a categorical takes choices only, not {', '.join(sorted(ignored))}")
        return Param(key, kind, choices=choices)
    _need(
        "choices" not in body,
        f"space.{key}: an {kind} range takes low and high, not choices (use type: categorical for a list)",
    )
    _need("low" in body and "high" in body, f"space.{key} needs numeric low and high")
    low, high = _number(f"space.{key}.low", body["low"]), _number(f"space.{key}.high", body["high"])
    step = _number(f"space.{key}.step", body["step"]) if body.get("step") is not None else None
    log = body.get("log", False)
    _need(isinstance(log, bool), f"space.{key}.log must be true or false (got {log!r})")
    _need(low <= high, f"space.{key} is an empty range: low {low:g} > high {high:g}")
    _need(not log or low > 0, f"space.{key}: a log range needs low > 0 (got {low:g})")
    _need(step is None or step > 0, f"space.{key}.step must be positive")
    _need(not (log and step), f"space.{key}: log and step cannot be combined")
    if kind == "int":
        _need(low == int(low) and high == int(high), f"space.{key}: an int range needs integer low and high")
        _need(step is None or step == int(step), f"space.{key}: an int range needs an integer step (got {step!r})")
    return Param(key, kind, low, high, log, step)


def parse_spec(
    path: str | Path, *, overrides: Sequence[str] = (), n_trials: int | None = None, study: str | None = None
) -> SweepSpec:
    """Read and validate a sweep spec; the base config it names is validated too."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise SweepError(str(exc).replace("config file", "sweep spec")) from None
    allowed = {
        "study",
        "experiment",
        "base",
        "objective",
        "sampler",
        "pruner",
        "n_trials",
        "space",
        "heartbeat",
        "max_failures",
        "enqueue",
        "trial_checkpoints",
    }
    unknown = set(raw) - allowed
    _need(
        not unknown,
        f"unknown key(s) {', '.join(sorted(unknown))} in sweep spec {path}: it takes {', '.join(sorted(allowed))}",
    )

    base = raw.get("base") or {}
    _need(
        isinstance(base, dict) and set(base) <= {"config", "overrides"},
        "sweep spec base must be a mapping with config (a preset path) and overrides",
    )
    base_config = base.get("config")
    _need(
        base_config is None or isinstance(base_config, str),
        f"sweep spec base.config must be a preset path, e.g. configs/tiny.yaml (got {base_config!r})",
    )
    if base_config is not None:
        candidate = Path(base_config)
        # A preset path is relative to the spec file or, failing that, to the working directory.
        if not candidate.is_absolute() and (path.parent / candidate).is_file():
            candidate = path.parent / candidate
        _need(
            candidate.is_file(),
            f"sweep spec base.config {base_config} does not exist: give a preset path, e.g. configs/tiny.yaml",
        )
        base_config = str(candidate)
    base_overrides = base.get("overrides") or {}
    _need(
        isinstance(base_overrides, dict) and all(isinstance(k, str) for k in base_overrides),
        "sweep spec base.overrides must be a mapping of config keys to values",
    )

    metric, direction, reduce = _parse_objective(raw.get("objective"))
    sampler = _parse_choice(raw.get("sampler"), "sampler", SAMPLERS, "tpe")
    seed = sampler.get("seed")
    _need(
        seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0),
        f"sampler.seed must be a non-negative integer or null (got {seed!r})",
    )
    pruner = _parse_choice(raw.get("pruner"), "pruner", PRUNERS, "median")

    space_raw = raw.get("space") or {}
    _need(
        isinstance(space_raw, dict) and bool(space_raw),
        "sweep spec has no space: give at least one config key to search",
    )
    valid = set(config_keys())
    space = [_parse_param(k, v, valid) for k, v in space_raw.items()]

    enqueue = raw.get("enqueue") or []
    _need(
        isinstance(enqueue, list) and all(isinstance(e, dict) for e in enqueue),
        "sweep spec enqueue must be a list of {config key: value} points",
    )
    params = {p.key: p for p in space}
    for point in enqueue:
        extra = set(point) - set(params)
        _need(not extra, f"enqueue point names {', '.join(sorted(map(str, extra)))}, which the space does not search")
    enqueue = [{k: params[k].fixed(v) for k, v in point.items()} for point in enqueue]
    trials = n_trials if n_trials is not None else raw.get("n_trials", 10)
    _positive_int("n_trials", trials)
    interval, grace = _parse_heartbeat(raw.get("heartbeat"))
    max_failures = _positive_int("max_failures", raw.get("max_failures", max(3, trials)))
    name = study or raw.get("study") or path.stem
    _need(
        isinstance(name, (str, int)) and not isinstance(name, bool) and str(name).strip() != "",
        f"sweep spec study must be a name (got {name!r}): e.g. study: tiny-lr, or --study NAME",
    )
    trial_checkpoints = raw.get("trial_checkpoints", "best_weights")
    _need(
        trial_checkpoints in TRIAL_CHECKPOINTS,
        f"sweep spec trial_checkpoints must be one of {', '.join(TRIAL_CHECKPOINTS)} (got {trial_checkpoints!r})",
    )
    experiment = raw.get("experiment")
    if experiment is not None:
        experiment = from_dict({"experiment": experiment}, origin=f"sweep spec {path}").experiment
    else:
        experiment = ""  # the base config's, below
    spec = SweepSpec(
        study=str(name),
        base_config=base_config,
        base_overrides=dict(base_overrides),
        objective=metric,
        direction=direction,
        reduce=reduce,
        sampler=sampler,
        pruner=pruner,
        n_trials=trials,
        space=space,
        experiment=experiment,
        heartbeat_interval=interval,
        heartbeat_grace=grace,
        max_failures=max_failures,
        enqueue=enqueue,
        source=str(path),
        config_overrides=list(overrides),
        trial_checkpoints=trial_checkpoints,
    )
    if sampler["name"] == "grid":
        for p in space:
            p.grid_values()
    # The base config and the extremes of the space must be valid configs before any trial.
    base_raw = spec.base_raw()
    base_cfg = from_dict(base_raw, origin=f"sweep {spec.study} base config")
    _check_space(spec, base_raw)
    spec.experiment = spec.experiment or base_cfg.experiment
    return spec


def _check_space(spec: SweepSpec, base_raw: dict) -> None:
    """Each edge of the space (every choice, both bounds) and each enqueued point must make a config
    the config accepts, so that no trial is spent on a value the spec could have been refused for.
    A refusal that names another searched key is let through: the value may be fine beside another
    value of that key (model.emb_dim beside model.n_heads, say), which each trial's config checks."""
    searched = {p.key for p in spec.space}
    for p in spec.space:
        for value in p.edges():
            _check_point(
                base_raw, {p.key: value}, searched, f"space.{p.key} reaches {value!r}, which the config refuses"
            )
    for point in spec.enqueue:
        _check_point(base_raw, point, searched, f"enqueue point {format_params(point)} is refused by the config")


def _check_point(base_raw: dict, point: dict[str, Any], searched: set[str], what: str) -> None:
    raw = copy.deepcopy(base_raw)
    for key, value in point.items():
        set_dotted(raw, key, value)
    try:
        from_dict(raw, origin="sweep trial config")
    except ConfigError as exc:
        others = searched - set(point)
        if any(re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", str(exc)) for k in others):
            return
        raise SweepError(f"{what}: {exc}") from None


def _positive_int(where: str, value: Any) -> int:
    _need(
        isinstance(value, int) and not isinstance(value, bool) and value >= 1,
        f"{where} must be a positive integer (got {value!r})",
    )
    return value


def _parse_objective(objective: Any) -> tuple[str, Direction, str]:
    objective = objective or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    _need(
        isinstance(objective, dict),
        f"objective must be a metric name or a mapping of metric, direction, reduce (got {objective!r})",
    )
    unknown = set(objective) - {"metric", "direction", "reduce"}
    _need(
        not unknown,
        f"objective has unknown field(s) {', '.join(sorted(map(str, unknown)))}: it takes metric, direction and reduce",
    )
    metric = objective.get("metric", "epoch_val_loss")
    _need(
        isinstance(metric, str) and metric in OBJECTIVES,
        f"objective.metric must be one of {', '.join(OBJECTIVES)} (got {metric!r})",
    )
    direction = objective.get("direction", OBJECTIVES[metric][1])
    _need(direction in DIRECTIONS, f"objective.direction must be minimize or maximize (got {direction!r})")
    reduce = objective.get("reduce", "best")
    _need(reduce in ("best", "last"), f"objective.reduce must be best or last (got {reduce!r})")
    return metric, cast(Direction, direction), reduce


def _parse_choice(value: Any, what: str, names: tuple[str, ...], default: str) -> dict:
    """A sampler or pruner: a name, or a mapping of name and the options of its Optuna class."""
    value = value or {"name": default}
    value = {"name": value} if isinstance(value, str) else value
    _need(
        isinstance(value, dict) and all(isinstance(k, str) for k in value),
        f"{what} must be a name ({', '.join(names)}) or a mapping with a name and options (got {value!r})",
    )
    _need(value.get("name") in names, f"{what} {value.get('name')!r} is unknown: use one of {', '.join(names)}")
    return dict(value)


def _parse_heartbeat(beat: Any) -> tuple[int, int]:
    beat = beat or {}
    _need(
        isinstance(beat, dict) and set(beat) <= {"interval", "grace"},
        f"heartbeat must be a mapping of interval and grace, in seconds (got {beat!r})",
    )
    interval = _positive_int("heartbeat.interval (seconds)", beat.get("interval", 10))
    grace = _positive_int("heartbeat.grace (seconds)", beat.get("grace", 30))
    _need(grace > interval, f"heartbeat.grace ({grace}) must exceed heartbeat.interval ({interval})")
    return interval, grace


def format_params(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def any_value(p: Param):
    if p.type == "categorical":
        return p.options()[0]
    low, _ = p.bounds()
    return int(low) if p.type == "int" else low


def spec_dict(spec: SweepSpec) -> dict:
    d = asdict(spec)
    d["space"] = {p["key"]: {k: v for k, v in p.items() if k != "key" and v not in (None, False)} for p in d["space"]}
    return d


def search_definition(spec: SweepSpec) -> dict:
    """What a study searches: the objective, the space and the base config its trials start from
    (searched keys and train.threads aside, which each trial sets). The number of trials, the sampler
    and the pruner are how far and how it is searched, not what: trials stay comparable across them."""
    config = flatten(spec.base().to_dict())
    searched = {p.key for p in spec.space} | {"train.threads", "experiment"}
    searched |= {k for k in config if k.startswith(_RECORDING_KEYS)}
    space = {p.key: {k: v for k, v in asdict(p).items() if k != "key" and v is not None} for p in spec.space}
    definition = {
        "objective": spec.objective,
        "direction": spec.direction,
        "reduce": spec.reduce,
        "space": dict(sorted(space.items())),
        "base config": {k: v for k, v in config.items() if k not in searched},
    }
    return json.loads(json.dumps(definition))  # as the storage gives it back


def check_same_search(study, spec: SweepSpec) -> None:
    """Refuse to resume a study with a changed search. Merged, two searches would share one parent
    run whose best.* tags, trials table and sweep/spec.yaml (the first spec) no longer say what was
    searched, and the sampler would model two objectives as one. A new study name keeps them apart."""
    definition = search_definition(spec)
    recorded = study.user_attrs.get(SEARCH_ATTR)
    if recorded is None:
        # A new study, or one made before gptexp recorded its search: from now on it is this one.
        study.set_user_attr(SEARCH_ATTR, definition)
        return
    changes = _search_changes(recorded, _without_new_defaults(recorded, definition))
    if changes:
        raise SweepError(
            f"study {spec.study} holds another search ({'; '.join(changes)}): "
            f"give this one its own study with --study NAME (or restore the spec to resume it)"
        )


def _without_new_defaults(recorded: dict, definition: dict) -> dict:
    """The definition less the base-config keys the recorded one lacks and that sit at their default:
    a key added to the config by a later gptexp (e.g. train.deterministic) means the same trials at its
    default, so a study recorded before it existed still resumes; set to anything else, it is a change."""
    old_base, new_base = recorded.get("base config"), definition.get("base config")
    if not isinstance(old_base, dict) or not isinstance(new_base, dict):
        return definition
    defaults = json.loads(json.dumps(flatten(Config().to_dict())))
    kept = {k: v for k, v in new_base.items() if k in old_base or k not in defaults or v != defaults[k]}
    return {**definition, "base config": kept}


def _search_changes(old: dict, new: dict, limit: int = 3) -> list[str]:
    changes = []
    for part in new.keys() | old.keys():
        a, b = old.get(part), new.get(part)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            changes += [f"{part} {k}: {_show(a.get(k))} -> {_show(b.get(k))}" for k in keys]
        else:
            changes.append(f"{part}: {_show(a)} -> {_show(b)}")
    changes.sort()
    return changes[:limit] + ([f"{len(changes) - limit} more"] if len(changes) > limit else [])


def _show(value: Any) -> str:
    if value is None:
        return "absent"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)
