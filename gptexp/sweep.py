"""`gptexp sweep`: Optuna studies whose trials are runs of the one runner, nested in MLflow.

One parent MLflow run per study (the same one when the study resumes), one child run per trial
(tagged with the study and trial number, holding the trial's full config as params). Child
status tells the truth: complete -> FINISHED, pruned -> KILLED with optuna.state=PRUNED,
failed -> FAILED with the error. The objective is the best epoch's validation loss, measured on
the same validation tokens for every trial (see gptexp.evaluation.evaluate_split).

Workers share the Optuna storage; a lock held while counting and asking keeps the number of
finished trials exact; trials heartbeat (RDB storages), so the trial of a killed worker is
failed once stale and retried once. Ctrl-C or SIGTERM stops every worker at a safe point: each
ends its trial FAIL and its child run KILLED, then the parent run ends KILLED.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing as mp
import re
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from . import interrupts
from .config import Config, ConfigError, apply_overrides, config_keys, flatten, from_dict, read_yaml, set_dotted
from .errors import INTERRUPTS, GptexpError
from .provenance import redact
from .runner import Callback, EpochEvent, StopTraining
from .runtime import physical_cores

OBJECTIVES = {
    "epoch_val_loss": ("val_loss", "minimize"),
    "epoch_train_loss": ("train_loss", "minimize"),
    "epoch_val_ppl": ("val_ppl", "minimize"),
    "epoch_train_ppl": ("train_ppl", "minimize"),
}
SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
PARAM_TYPES = ("int", "float", "categorical")
TAG_STUDY, TAG_TRIAL = "gptexp.study", "gptexp.trial"
SEARCH_ATTR = "gptexp.search"  # the study user attr that records what the study searches


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

    def suggest(self, trial):
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, self.choices)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def grid_values(self) -> list:
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise SweepError(f"space.{self.key}: the grid sampler needs choices or a step for a float range")
        step = self.step or 1
        n = int(math.floor((self.high - self.low) / step + 1e-9)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(v) for v in values] if self.type == "int" else values

    def edges(self) -> list:
        """The values a trial can reach at the ends of the range (every value of a categorical)."""
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "float":
            return [self.low, self.high]
        step = int(self.step or 1)
        return [int(self.low), int(self.low) + (int(self.high) - int(self.low)) // step * step]

    def fixed(self, value: Any) -> Any:
        """An enqueued value as this parameter takes it, or SweepError when the space does not hold it."""
        where = f"enqueue point {self.key}={value!r}"
        if self.type == "categorical":
            _need(any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in self.choices),
                  f"{where} is not one of space.{self.key}.choices")
            return value
        number = _number(where, value)
        _need(self.type == "float" or number == int(number), f"{where} must be an integer")
        _need(self.low <= number <= self.high, f"{where} is outside space.{self.key} [{self.low:g}, {self.high:g}]")
        return int(number) if self.type == "int" else number


@dataclass
class SweepSpec:
    study: str
    base_config: str | None
    base_overrides: dict[str, Any]
    objective: str
    direction: str
    reduce: str  # best | last epoch's value
    sampler: dict
    pruner: dict
    n_trials: int
    space: list[Param]
    experiment: str | None
    heartbeat_interval: int
    heartbeat_grace: int
    max_failures: int
    enqueue: list[dict] = field(default_factory=list)  # points tried first, once, in a new study
    source: str = ""
    config_overrides: list[str] = field(default_factory=list)  # --set on the command line

    def base_raw(self) -> dict:
        raw = read_yaml(self.base_config) if self.base_config else {}
        for key, value in self.base_overrides.items():
            set_dotted(raw, key, value)
        return apply_overrides(raw, self.config_overrides)

    def trial_config(self, params: dict[str, Any], threads: int) -> Config:
        raw = self.base_raw()
        for key, value in params.items():
            set_dotted(raw, key, value)
        set_dotted(raw, "train.threads", threads)
        return from_dict(raw, origin=f"sweep {self.study} trial")


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise SweepError(message)


def _number(where: str, value: Any) -> float:
    """A finite number; YAML 1.1 reads 1e-4 (no dot) as a string, so numeric strings count too."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
          f"{where} must be a finite number (got {value!r})")
    return float(value)


# What Optuna's suggest_categorical stores; anything else (a list, a mapping) fails at the first trial.
CHOICE_TYPES = (type(None), bool, int, float, str)


def _parse_param(key: str, body: Any, valid_keys: set[str]) -> Param:
    _need(key in valid_keys, f"space.{key} is not a config key: use one of e.g. model.context_length, "
                             "data.stride_fraction, train.batch_size, train.lr")
    _need(isinstance(body, dict), f"space.{key} must be a mapping with a type (int, float or categorical)")
    unknown = set(body) - {"type", "low", "high", "log", "step", "choices"}
    _need(not unknown, f"space.{key} has unknown field(s) {', '.join(sorted(unknown))}")
    kind = body.get("type")
    _need(kind in PARAM_TYPES, f"space.{key}.type must be one of {', '.join(PARAM_TYPES)} (got {kind!r})")
    if kind == "categorical":
        choices = body.get("choices")
        _need(isinstance(choices, list) and len(choices) > 0, f"space.{key}.choices must be a non-empty list")
        for choice in choices:
            _need(isinstance(choice, CHOICE_TYPES) and not (isinstance(choice, float) and math.isnan(choice)),
                  f"space.{key}.choices must be numbers, strings, booleans or null (got {choice!r})")
        ignored = set(body) & {"low", "high", "log", "step"}
        _need(not ignored, f"space.{key}: a categorical takes choices only, not {', '.join(sorted(ignored))}")
        return Param(key, kind, choices=choices)
    _need("choices" not in body, f"space.{key}: an {kind} range takes low and high, not choices "
                                 "(use type: categorical for a list)")
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


def load_spec(path: str | Path, *, overrides: list[str] = (), n_trials: int | None = None,
              study: str | None = None) -> SweepSpec:
    """Read and validate a sweep spec; the base config it names is validated too."""
    path = Path(path)
    try:
        raw = read_yaml(path)
    except ConfigError as exc:
        raise SweepError(str(exc).replace("config file", "sweep spec")) from None
    allowed = {"study", "experiment", "base", "objective", "sampler", "pruner", "n_trials", "space", "heartbeat",
               "max_failures", "enqueue"}
    unknown = set(raw) - allowed
    _need(not unknown, f"unknown key(s) {', '.join(sorted(unknown))} in sweep spec {path}: it takes {', '.join(sorted(allowed))}")

    base = raw.get("base") or {}
    _need(isinstance(base, dict) and set(base) <= {"config", "overrides"},
          "sweep spec base must be a mapping with config (a preset path) and overrides")
    base_config = base.get("config")
    _need(base_config is None or isinstance(base_config, str),
          f"sweep spec base.config must be a preset path, e.g. configs/tiny.yaml (got {base_config!r})")
    if base_config is not None:
        candidate = Path(base_config)
        # A preset path is relative to the spec file or, failing that, to the working directory.
        if not candidate.is_absolute() and (path.parent / candidate).is_file():
            candidate = path.parent / candidate
        _need(candidate.is_file(), f"sweep spec base.config {base_config} does not exist: give a preset path, e.g. configs/tiny.yaml")
        base_config = str(candidate)
    base_overrides = base.get("overrides") or {}
    _need(isinstance(base_overrides, dict) and all(isinstance(k, str) for k in base_overrides),
          "sweep spec base.overrides must be a mapping of config keys to values")

    metric, direction, reduce = _parse_objective(raw.get("objective"))
    sampler = _parse_choice(raw.get("sampler"), "sampler", SAMPLERS, "tpe")
    seed = sampler.get("seed")
    _need(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0),
          f"sampler.seed must be a non-negative integer or null (got {seed!r})")
    pruner = _parse_choice(raw.get("pruner"), "pruner", PRUNERS, "median")

    space_raw = raw.get("space") or {}
    _need(isinstance(space_raw, dict) and space_raw, "sweep spec has no space: give at least one config key to search")
    valid = set(config_keys())
    space = [_parse_param(k, v, valid) for k, v in space_raw.items()]

    enqueue = raw.get("enqueue") or []
    _need(isinstance(enqueue, list) and all(isinstance(e, dict) for e in enqueue),
          "sweep spec enqueue must be a list of {config key: value} points")
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
    _need(isinstance(name, (str, int)) and not isinstance(name, bool) and str(name).strip() != "",
          f"sweep spec study must be a name (got {name!r}): e.g. study: tiny-lr, or --study NAME")
    experiment = raw.get("experiment")
    if experiment is not None:
        experiment = from_dict({"experiment": experiment}, origin=f"sweep spec {path}").experiment
    spec = SweepSpec(
        study=str(name), base_config=base_config, base_overrides=dict(base_overrides), objective=metric,
        direction=direction, reduce=reduce, sampler=sampler, pruner=pruner, n_trials=trials, space=space,
        experiment=experiment, heartbeat_interval=interval, heartbeat_grace=grace,
        max_failures=max_failures, enqueue=enqueue, source=str(path),
        config_overrides=list(overrides),
    )
    if sampler["name"] == "grid":
        for p in space:
            p.grid_values()
    # The base config and the extremes of the space must be valid configs before any trial.
    base_raw = spec.base_raw()
    base_cfg = from_dict(base_raw, origin=f"sweep {spec.study} base config")
    _check_space(spec, base_raw)
    _try_sampler_and_pruner(spec, base_cfg.train.num_epochs)
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
            _check_point(base_raw, {p.key: value}, searched, f"space.{p.key} reaches {value!r}, which the config refuses")
    for point in spec.enqueue:
        _check_point(base_raw, point, searched, f"enqueue point {_fmt(point)} is refused by the config")


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


def _try_sampler_and_pruner(spec: SweepSpec, num_epochs: int) -> None:
    """Optuna checks most sampler options only when a trial asks: ask once on an in-memory study,
    so that a bad option is refused now rather than failing the sweep with a trial left RUNNING."""
    import optuna

    _quiet_optuna()
    make_pruner(spec, num_epochs)
    sampler = make_sampler(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = optuna.create_study(sampler=sampler, direction=spec.direction).ask()
            for p in spec.space:
                p.suggest(trial)
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweepError(f"sampler {spec.sampler['name']} fails on this space ({text}): check its options in the spec") from None


def _positive_int(where: str, value: Any) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"{where} must be a positive integer (got {value!r})")
    return value


def _parse_objective(objective: Any) -> tuple[str, str, str]:
    objective = objective or {}
    if isinstance(objective, str):
        objective = {"metric": objective}
    _need(isinstance(objective, dict), f"objective must be a metric name or a mapping of metric, direction, reduce "
                                       f"(got {objective!r})")
    unknown = set(objective) - {"metric", "direction", "reduce"}
    _need(not unknown, f"objective has unknown field(s) {', '.join(sorted(map(str, unknown)))}: "
                       "it takes metric, direction and reduce")
    metric = objective.get("metric", "epoch_val_loss")
    _need(isinstance(metric, str) and metric in OBJECTIVES,
          f"objective.metric must be one of {', '.join(OBJECTIVES)} (got {metric!r})")
    direction = objective.get("direction", OBJECTIVES[metric][1])
    _need(direction in ("minimize", "maximize"), f"objective.direction must be minimize or maximize (got {direction!r})")
    reduce = objective.get("reduce", "best")
    _need(reduce in ("best", "last"), f"objective.reduce must be best or last (got {reduce!r})")
    return metric, direction, reduce


def _parse_choice(value: Any, what: str, names: tuple[str, ...], default: str) -> dict:
    """A sampler or pruner: a name, or a mapping of name and the options of its Optuna class."""
    value = value or {"name": default}
    value = {"name": value} if isinstance(value, str) else value
    _need(isinstance(value, dict) and all(isinstance(k, str) for k in value),
          f"{what} must be a name ({', '.join(names)}) or a mapping with a name and options (got {value!r})")
    _need(value.get("name") in names, f"{what} {value.get('name')!r} is unknown: use one of {', '.join(names)}")
    return dict(value)


def _parse_heartbeat(beat: Any) -> tuple[int, int]:
    beat = beat or {}
    _need(isinstance(beat, dict) and set(beat) <= {"interval", "grace"},
          f"heartbeat must be a mapping of interval and grace, in seconds (got {beat!r})")
    interval = _positive_int("heartbeat.interval (seconds)", beat.get("interval", 10))
    grace = _positive_int("heartbeat.grace (seconds)", beat.get("grace", 30))
    _need(grace > interval, f"heartbeat.grace ({grace}) must exceed heartbeat.interval ({interval})")
    return interval, grace


# --- storage, samplers, pruners ---------------------------------------------------------------

def default_storage() -> str:
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/optuna.db"


def open_storage(url: str, spec: SweepSpec):
    """An Optuna storage for `url`: an RDB URL (sqlite, postgresql, mysql), journal:///path or redis://."""
    import optuna

    try:
        if url.startswith("journal://"):
            path = url[len("journal://"):]
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
        if url.startswith(("redis://", "rediss://")):
            return optuna.storages.JournalStorage(optuna.storages.journal.JournalRedisBackend(url))
        engine_kwargs = {}
        if url.startswith("sqlite"):
            # Workers wait for each other's writes rather than failing with "database is locked".
            engine_kwargs = {"connect_args": {"timeout": 120}}
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs,
            heartbeat_interval=spec.heartbeat_interval, grace_period=spec.heartbeat_grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or exc.name or "its database driver"
        raise SweepError(f"storage {redact(url)} needs {missing}: pip install it (e.g. gptexp[postgres] "
                         "for PostgreSQL, gptexp[redis] for Redis)") from None
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SweepError(f"cannot open Optuna storage {redact(url)} ({redact(text)[:200]}): check --storage") from None


def sampler_seed(spec: SweepSpec, worker: int = 0, trials_before: int = 0) -> int | None:
    """The seed of one worker's sampler: the spec's seed (default 123), the worker's index and the
    number of trials the study held when the worker started, mixed by NumPy's SeedSequence.

    A seeded sampler draws the same numbers each time it is built, and TPE's first trials (like every
    trial of the random sampler) are plain draws: seeded as before, a resumed study would propose its
    first trials again. Counting the trials already there gives every (re)start a stream of its own,
    while the same history still gives the same seed, so a sweep re-run from scratch is reproduced.
    Workers differ by their index; machines that each run worker 0 on one storage by the count."""
    seed = spec.sampler.get("seed", 123)
    if seed is None:
        return None
    import numpy as np

    return int(np.random.SeedSequence([int(seed), worker, trials_before]).generate_state(1)[0])


def make_sampler(spec: SweepSpec, worker: int = 0, trials_before: int = 0):
    import optuna

    s = dict(spec.sampler)
    name = s.pop("name")
    s.pop("seed", None)
    seed = sampler_seed(spec, worker, trials_before)
    try:
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, **s)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed, **s)
        if name == "grid":
            return _grid_sampler({p.key: p.grid_values() for p in spec.space}, seed=seed, **s)
        return optuna.samplers.CmaEsSampler(seed=seed, **s)
    except (TypeError, ValueError) as exc:
        raise SweepError(f"sampler {name}: {exc}") from None


def _grid_sampler(search_space: dict, **kwargs):
    import optuna

    class GridSampler(optuna.samplers.GridSampler):
        """Optuna's grid sampler, minus its study.stop() (only legal inside optimize()); the
        worker loop stops asking once the grid is exhausted."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler(search_space, **kwargs)


def make_pruner(spec: SweepSpec, num_epochs: int):
    import optuna

    p = dict(spec.pruner)
    name = p.pop("name")
    try:
        if name == "median":
            p.setdefault("n_startup_trials", 3)
            p.setdefault("n_warmup_steps", 1)
            return optuna.pruners.MedianPruner(**p)
        if name == "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(**p)
        if name == "hyperband":
            p.setdefault("min_resource", 1)
            p.setdefault("max_resource", num_epochs)
            return optuna.pruners.HyperbandPruner(**p)
        return optuna.pruners.NopPruner()
    except (TypeError, ValueError) as exc:
        raise SweepError(f"pruner {name}: {exc}") from None


# --- trials ------------------------------------------------------------------------------------

class PruneOnEpoch(Callback):
    """Reports each epoch's objective to Optuna and stops the run when the pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial = trial
        self.attr = OBJECTIVES[metric][0]

    def on_epoch_end(self, event: EpochEvent) -> None:
        self.trial.report(getattr(event, self.attr), step=event.epoch)
        if self.trial.should_prune():
            raise StopTraining(f"pruned at epoch {event.epoch}", status="pruned")


class Heartbeat:
    """Records the trial's heartbeat in the storage while it runs (RDB storages only)."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self.enabled = hasattr(storage, "record_heartbeat") and bool(storage.get_heartbeat_interval())

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.storage.record_heartbeat(self.trial_id)
            self._stop.wait(self.interval)

    def __enter__(self):
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled:
            self._thread.join(timeout=5)


def _objective_value(spec: SweepSpec, epochs: list[EpochEvent]) -> float:
    attr = OBJECTIVES[spec.objective][0]
    values = [getattr(e, attr) for e in epochs]
    if spec.reduce == "last":
        return values[-1]
    return min(values) if spec.direction == "minimize" else max(values)


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


@dataclass
class Context:
    spec: SweepSpec
    storage_url: str
    parent_run_id: str
    threads: int
    worker: int
    sampler_seed: int | None = None  # recorded on each trial, so a reader can reproduce its proposal


def run_trial(ctx: Context, study, trial, client) -> str:
    """Run one trial as a child MLflow run; tell Optuna its outcome; return its state name."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from . import jobs

    spec = ctx.spec
    t0 = time.monotonic()
    try:
        params = {p.key: p.suggest(trial) for p in spec.space}
    except BaseException:
        # load_spec tries the space on the sampler; should a suggestion still fail, the asked
        # trial must not stay RUNNING in the storage.
        study.tell(trial, state=TrialState.FAIL)
        raise
    tags = {"gptexp.job": "trial", TAG_STUDY: spec.study, TAG_TRIAL: str(trial.number),
            "optuna.study_name": spec.study, "optuna.trial_number": str(trial.number),
            "gptexp.sampler_seed": str(ctx.sampler_seed)}
    trial.set_user_attr("sampler_seed", ctx.sampler_seed)
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(study._storage.get_trial(trial._trial_id))
    if retried is not None:
        tags["gptexp.retry_of_trial"] = str(retried)
    run_ids: list[str] = []

    def created(run_id: str) -> None:
        run_ids.append(run_id)
        trial.set_user_attr("mlflow_run_id", run_id)

    state, value, note = "FAIL", None, ""
    with Heartbeat(study._storage, trial._trial_id, spec.heartbeat_interval):
        try:
            config = spec.trial_config(params, ctx.threads)
            outcome = jobs.train(config, experiment=spec.experiment, run_name=f"{spec.study}-trial-{trial.number}",
                                 tags=tags, parent_run_id=ctx.parent_run_id, callbacks=[PruneOnEpoch(trial, spec.objective)],
                                 client=client, console=False, on_created=created)
            value = _objective_value(spec, outcome.result.epochs)
            state = "COMPLETE"
        except StopTraining as exc:
            state, note = "PRUNED", str(exc)
        except INTERRUPTS:
            _tag_child(client, run_ids, "FAIL")
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as exc:  # a trial that fails, fails alone
            note = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            if not run_ids:
                # Its config was refused before a run existed: record the failure as a child run anyway
                # (if MLflow cannot, the trial is still told FAIL below rather than left RUNNING).
                with contextlib.suppress(Exception):
                    created(_refused_run(client, ctx, trial.number, tags, note))
    _tag_child(client, run_ids, state, value)
    if state == "COMPLETE":
        study.tell(trial, value)
    else:
        study.tell(trial, state=TrialState.PRUNED if state == "PRUNED" else TrialState.FAIL)
    seconds = time.monotonic() - t0
    result = {"COMPLETE": f"{spec.objective} {value:.4f}" if value is not None else "",
              "PRUNED": note, "FAIL": f"failed: {note}"}[state]
    print(f"trial {trial.number}: {_fmt(params)} -> {redact(result)} ({seconds:.1f} s)", flush=True)
    if state == "COMPLETE":
        _log_best(ctx, study, trial.number, value, params, run_ids[0] if run_ids else None, client)
    return state


def _refused_run(client, ctx: Context, number: int, tags: dict, error: str) -> str:
    from .tracking import TAG_ERROR, experiment_id

    run = client.create_run(experiment_id(client, ctx.spec.experiment), run_name=f"{ctx.spec.study}-trial-{number}",
                            tags={**tags, "mlflow.parentRunId": ctx.parent_run_id, TAG_ERROR: redact(error)[:5000]})
    client.set_terminated(run.info.run_id, status="FAILED")
    return run.info.run_id


def _tag_child(client, run_ids: list[str], state: str, value: float | None = None) -> None:
    for rid in run_ids:
        with contextlib.suppress(Exception):
            client.set_tag(rid, "optuna.state", {"COMPLETE": "COMPLETE", "PRUNED": "PRUNED"}.get(state, "FAIL"))
            if value is not None:
                client.set_tag(rid, "optuna.value", repr(value))


def _log_best(ctx: Context, study, number: int, value: float, params: dict, run_id: str | None, client) -> None:
    try:
        best = study.best_trial
    except ValueError:
        return
    if best.number != number:
        return
    client.log_metric(ctx.parent_run_id, "best_value", value, step=number)
    client.set_tag(ctx.parent_run_id, "best.trial", str(number))
    if run_id:
        client.set_tag(ctx.parent_run_id, "best.run_id", run_id)
    for k, v in params.items():
        client.set_tag(ctx.parent_run_id, f"best.{k}", str(v))


def _fail_stale(study, client, checked: set[int]) -> None:
    """Fail trials whose worker stopped heartbeating (the retry callback re-enqueues them once),
    and end their child runs FAILED so MLflow does not show them running forever."""
    import optuna
    from optuna.trial import TrialState

    optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        rid = t.user_attrs.get("mlflow_run_id")
        if not rid or t.number in checked:
            continue
        checked.add(t.number)
        with contextlib.suppress(Exception):
            if client.get_run(rid).info.status == "RUNNING":
                client.set_tag(rid, "gptexp.error", "its worker stopped (no heartbeat): the trial was failed and retried")
                client.set_tag(rid, "optuna.state", "FAIL")
                client.set_terminated(rid, status="FAILED")


def work(ctx: Context, lock, current_trial=None) -> dict[str, int]:
    """A worker: ask, run and tell trials until the study holds n_trials finished ones.

    `current_trial.value` (a shared integer, when given) holds the id of the trial being run, -1
    between trials, so that the parent can fail it should this worker be killed.
    """
    import optuna
    from optuna.trial import TrialState

    from .tracking import get_client

    spec = ctx.spec
    client = get_client()
    storage = open_storage(ctx.storage_url, spec)
    num_epochs = spec.trial_config({p.key: _any_value(p) for p in spec.space}, ctx.threads).train.num_epochs
    study = optuna.load_study(study_name=spec.study, storage=storage, pruner=make_pruner(spec, num_epochs))
    trials_before = len(study.get_trials(deepcopy=False))
    study.sampler = sampler = make_sampler(spec, ctx.worker, trials_before)
    ctx = replace(ctx, sampler_seed=sampler_seed(spec, ctx.worker, trials_before))
    counts = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0}
    checked: set[int] = set()
    while True:
        interrupts.check()
        trial = None
        with lock:
            _fail_stale(study, client, checked)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if finished >= spec.n_trials:
                break
            if isinstance(sampler, optuna.samplers.GridSampler) and sampler.is_exhausted(study):
                print(f"worker {ctx.worker}: every grid point has been tried", flush=True)
                break
            if counts["FAIL"] >= spec.max_failures:
                print(f"worker {ctx.worker}: stopping after {counts['FAIL']} failed trials", flush=True)
                break
            if finished + running < spec.n_trials:
                with warnings.catch_warnings():
                    # Optuna warns that heartbeats are meant for optimize(); Heartbeat does them here.
                    warnings.simplefilter("ignore", UserWarning)
                    trial = study.ask()
        if trial is None:
            # Trials still running elsewhere (or stale, awaiting the heartbeat grace period).
            interrupts.sleep(min(2.0, spec.heartbeat_interval))
            continue
        if current_trial is not None:
            current_trial.value = trial._trial_id
        counts[run_trial(ctx, study, trial, client)] += 1
        if current_trial is not None:
            current_trial.value = -1
    return counts


def _any_value(p: Param):
    return p.choices[0] if p.type == "categorical" else (int(p.low) if p.type == "int" else p.low)


def _quiet_optuna() -> None:
    """Optuna's INFO lines and its 'experimental' warnings for the heartbeat API would drown
    the one line per trial that the sweep prints."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _worker_main(ctx: Context, lock, queue, current_trial) -> None:
    # The terminal's Ctrl-C reaches every process of the group, and the parent forwards SIGTERM:
    # either is honoured at the worker's safe points, so its trial and child run end in a final state.
    interrupts.install()
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _quiet_optuna()
    import torch

    torch.set_num_threads(ctx.threads)
    try:
        with interrupts.deferred():
            counts = work(ctx, lock, current_trial)
        queue.put((ctx.worker, "ok", counts))
    except INTERRUPTS:
        queue.put((ctx.worker, "interrupted", None))
    except Exception as exc:  # reported by the parent process as one line
        queue.put((ctx.worker, "error", f"{type(exc).__name__}: {exc}"))


# --- the sweep ---------------------------------------------------------------------------------

def _parent_run(client, spec: SweepSpec, study, storage_url: str) -> str:
    from .tracking import experiment_id, log_flat_params

    rid = study.user_attrs.get("mlflow_parent_run_id")
    if rid:
        with contextlib.suppress(Exception):
            run = client.get_run(rid)
            if run.info.lifecycle_stage == "active":
                client.update_run(rid, status="RUNNING")
                return rid
    run = client.create_run(experiment_id(client, spec.experiment), run_name=f"sweep-{spec.study}",
                            tags={"gptexp.job": "sweep", TAG_STUDY: spec.study, "optuna.storage": redact(storage_url)})
    rid = run.info.run_id
    params = {f"sweep.{k}": v for k, v in {
        "study": spec.study, "objective": spec.objective, "direction": spec.direction, "reduce": spec.reduce,
        "sampler": spec.sampler.get("name"), "pruner": spec.pruner.get("name"),
        "base_config": spec.base_config, "space": ",".join(p.key for p in spec.space)}.items()}
    log_flat_params(client, rid, params)
    client.log_text(rid, yaml.safe_dump(_spec_dict(spec), sort_keys=False), "sweep/spec.yaml")
    study.set_user_attr("mlflow_parent_run_id", rid)
    return rid


def _spec_dict(spec: SweepSpec) -> dict:
    d = asdict(spec)
    d["space"] = {p["key"]: {k: v for k, v in p.items() if k != "key" and v not in (None, False)} for p in d["space"]}
    return d


def _finish_parent(client, spec: SweepSpec, study, parent: str, threads: int) -> dict:
    """Trials table, study plots and the best trial's config as artifacts of the parent run."""
    from optuna.trial import TrialState

    summary: dict[str, Any] = {"best": None}
    df = study.trials_dataframe()
    client.log_text(parent, df.to_csv(index=False), "trials/trials.csv")
    _log_plots(client, parent, study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        config = spec.trial_config(best.params, threads)
        text = config.to_yaml()
        client.log_text(parent, text, "best/config.yaml")
        client.log_metric(parent, "best_value", best.value, step=best.number)
        path = _local_best_config(client, parent, text)
        summary["best"] = {"number": best.number, "value": best.value, "params": best.params,
                           "run_id": best.user_attrs.get("mlflow_run_id"), "config": str(path)}
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    summary["states"] = {s: states.count(s) for s in sorted(set(states))}
    for name, n in summary["states"].items():
        client.log_metric(parent, f"trials_{name.lower()}", n)
    return summary


def _local_best_config(client, parent: str, text: str) -> Path:
    from .tracking import local_artifact_dir

    local = local_artifact_dir(client, parent)
    if local is not None and (local / "best" / "config.yaml").is_file():
        return local / "best" / "config.yaml"
    path = Path(tempfile.mkdtemp(prefix="gptexp-best-")) / "config.yaml"
    path.write_text(text)
    return path


def _log_plots(client, parent: str, study) -> None:
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history, "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate, "intermediate_values": ovm.plot_intermediate_values}
    for name, fn in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = fn(study)
            fig = (ax[0] if hasattr(ax, "__len__") and not hasattr(ax, "figure") else ax).figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            client.log_figure(parent, fig, f"plots/{name}.png")
            plt.close(fig)
        except Exception as exc:  # e.g. importances need two complete trials with varied params
            print(f"(plot {name} skipped: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", flush=True)


def run_sweep(spec: SweepSpec, *, storage_url: str | None = None, workers: int = 1) -> dict:
    """Create or resume the study and run it to n_trials finished trials; returns a summary."""
    import optuna

    from .tracking import get_client, tracked_run

    _quiet_optuna()
    if workers < 1:
        raise SweepError(f"--workers must be at least 1 (got {workers})")
    storage_url = storage_url or default_storage()
    storage = open_storage(storage_url, spec)
    cores = physical_cores()
    threads = max(1, cores // workers)
    base = spec.trial_config({p.key: _any_value(p) for p in spec.space}, threads)
    from .jobs import preflight

    preflight(from_dict(spec.base_raw(), origin="sweep base config"))  # corpus and splits, before any trial
    try:
        study = optuna.create_study(study_name=spec.study, storage=storage, direction=spec.direction,
                                    sampler=make_sampler(spec), pruner=make_pruner(spec, base.train.num_epochs),
                                    load_if_exists=True)
    except ValueError as exc:
        raise SweepError(f"study {spec.study}: {exc}") from None
    if study.direction.name.lower() != spec.direction:
        raise SweepError(f"study {spec.study} exists with direction {study.direction.name.lower()}: "
                         "use another --study name")
    _check_same_search(study, spec)
    if not study.trials:
        with interrupts.deferred():  # all of them: a resumed study (it has trials) never enqueues the rest
            for point in spec.enqueue:
                study.enqueue_trial(point)
    client = get_client()
    with interrupts.deferred():  # from the parent run's (re)opening until it has ended
        parent = _parent_run(client, spec, study, storage_url)
        print(f"sweep {spec.study}: {spec.n_trials} trials of {spec.objective} ({spec.direction}), "
              f"{workers} worker(s) x {threads} thread(s), storage {redact(storage_url)}, MLflow parent run {parent}",
              flush=True)
        ctx = Context(spec, storage_url, parent, threads, 0)
        with tracked_run(client, spec.experiment, resume_run_id=parent):
            if workers == 1:
                import torch

                torch.set_num_threads(threads)
                work(ctx, contextlib.nullcontext())
            else:
                _run_workers(ctx, workers)
            summary = _finish_parent(client, spec, study, parent, threads)
    summary.update(parent_run_id=parent, study=spec.study)
    _print_summary(spec, summary)
    return summary


def search_definition(spec: SweepSpec) -> dict:
    """What a study searches: the objective, the space and the base config its trials start from
    (searched keys and train.threads aside, which each trial sets). The number of trials, the sampler
    and the pruner are how far and how it is searched, not what: trials stay comparable across them."""
    config = flatten(from_dict(spec.base_raw(), origin=f"sweep {spec.study} base config").to_dict())
    searched = {p.key for p in spec.space} | {"train.threads", "experiment"}
    space = {p.key: {k: v for k, v in asdict(p).items() if k != "key" and v is not None} for p in spec.space}
    definition = {"objective": spec.objective, "direction": spec.direction, "reduce": spec.reduce,
                  "space": dict(sorted(space.items())),
                  "base config": {k: v for k, v in config.items() if k not in searched}}
    return json.loads(json.dumps(definition))  # as the storage gives it back


def _check_same_search(study, spec: SweepSpec) -> None:
    """Refuse to resume a study with a changed search. Merged, two searches would share one parent
    run whose best.* tags, trials table and sweep/spec.yaml (the first spec) no longer say what was
    searched, and the sampler would model two objectives as one. A new study name keeps them apart."""
    definition = search_definition(spec)
    recorded = study.user_attrs.get(SEARCH_ATTR)
    if recorded is None:
        # A new study, or one made before gptexp recorded its search: from now on it is this one.
        study.set_user_attr(SEARCH_ATTR, definition)
        return
    changes = _search_changes(recorded, definition)
    if changes:
        raise SweepError(f"study {spec.study} holds another search ({'; '.join(changes)}): "
                         f"give this one its own study with --study NAME (or restore the spec to resume it)")


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


# After SIGTERM, how long workers get to end their trials and runs before they are killed.
WORKER_GRACE_S = 30.0


def _run_workers(ctx: Context, workers: int) -> None:
    spawn = mp.get_context("spawn")
    lock, queue = spawn.Lock(), spawn.Queue()
    current = [spawn.RawValue("q", -1) for _ in range(workers)]  # each worker's trial id, -1 between trials
    procs = [spawn.Process(target=_worker_main, args=(Context(ctx.spec, ctx.storage_url, ctx.parent_run_id,
                                                              ctx.threads, i), lock, queue, current[i]), daemon=False)
             for i in range(workers)]
    for p in procs:
        p.start()
    results = _collect(procs, queue)
    for i in range(workers):
        if i not in results and current[i].value >= 0:
            _fail_abandoned(ctx, current[i].value)
    interrupts.check()
    kinds = [kind for kind, _ in results.values()]
    if "interrupted" in kinds:  # a worker alone was stopped
        raise KeyboardInterrupt
    errors = [msg for kind, msg in results.values() if kind == "error"]
    errors += [f"worker {i} ended without a result (exit code {procs[i].exitcode})"
               for i in range(workers) if i not in results]
    if errors:
        raise SweepError(f"a sweep worker stopped: {errors[0]}")


def _collect(procs: list, queue) -> dict[int, tuple[str, Any]]:
    """Each worker's (kind, payload), by worker number, once every worker has ended.

    A polling wait, so that a stop asked of this process (Ctrl-C, SIGTERM) is seen: it is
    forwarded to the workers as SIGTERM, and those still alive after WORKER_GRACE_S are killed.
    """
    from queue import Empty

    results: dict[int, tuple[str, Any]] = {}
    deadline = None
    while True:
        try:
            number, kind, payload = queue.get(timeout=0.2)
            results[number] = (kind, payload)
            continue
        except Empty:
            if not any(p.is_alive() for p in procs):
                break  # a process that has ended has flushed what it sent: the queue is drained
        if deadline is None and interrupts.requested() is not None:
            deadline = time.monotonic() + WORKER_GRACE_S
            for p in procs:
                if p.is_alive():
                    p.terminate()
        elif deadline is not None and time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
    for p in procs:
        p.join()
    return results


def _fail_abandoned(ctx: Context, trial_id: int) -> None:
    """Fail the trial of a worker that ended without telling it, and end its child run."""
    import optuna
    from optuna.trial import TrialState

    from .tracking import TAG_ERROR, TAG_STOP, get_client

    storage = open_storage(ctx.storage_url, ctx.spec)
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return
    rid = trial.user_attrs.get("mlflow_run_id")
    if rid:
        # KILLED when the sweep was being stopped (as an interrupted run ends), else FAILED.
        status, tags = (("KILLED", {TAG_STOP: "its worker was stopped", "gptexp.status": "interrupted"})
                        if interrupts.requested() else
                        ("FAILED", {TAG_ERROR: "its worker ended without finishing the trial", "gptexp.status": "failed"}))
        client = get_client()
        with contextlib.suppress(Exception):
            if client.get_run(rid).info.status == "RUNNING":
                for key, value in {**tags, "optuna.state": "FAIL"}.items():
                    client.set_tag(rid, key, value)
                client.set_terminated(rid, status=status)
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _print_summary(spec: SweepSpec, summary: dict) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items())
    print(f"study {spec.study}: {states}")
    best = summary["best"]
    if best is None:
        print("no trial completed")
        return
    print(f"best trial {best['number']}: {spec.objective} {best['value']:.4f} with {_fmt(best['params'])}")
    print(f"  MLflow run {best['run_id']} (parent {summary['parent_run_id']})")
    print(f"  re-train it: gptexp train --config {best['config']}")


# --- command line ------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="an Optuna sweep; each trial a nested MLflow run")
    p.add_argument("--config", required=True, metavar="PATH", help="sweep spec YAML, e.g. configs/sweep.yaml")
    p.add_argument("--n-trials", type=int, metavar="N", help="finished (complete or pruned) trials to reach")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="processes sharing the storage (default 1)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the spec's, else its file name)")
    p.add_argument("--storage", metavar="URL",
                   help="Optuna storage: sqlite:///..., postgresql://..., mysql://..., journal:///path, redis://... "
                        "(default sqlite:///mlruns/optuna.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the base run config (repeatable)")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    spec = load_spec(args.config, overrides=args.overrides, n_trials=args.n_trials, study=args.study)
    run_sweep(spec, storage_url=args.storage, workers=args.workers)
    return 0

