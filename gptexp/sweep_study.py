"""The Optuna side of a sweep: its storage, the seeded samplers and the pruners of a spec."""

from __future__ import annotations

import warnings
from pathlib import Path

from .provenance import redact
from .sweep_spec import SweepError, SweepSpec


def default_storage() -> str:
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/optuna.db"


def open_storage(url: str, spec: SweepSpec):
    """An Optuna storage for `url`: an RDB URL (sqlite, postgresql, mysql), journal:///path or redis://."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    try:
        if url.startswith("journal://"):
            path = url[len("journal://") :]
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if url.startswith(("redis://", "rediss://")):
            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        engine_kwargs = {}
        if url.startswith("sqlite"):
            # Workers wait for each other's writes rather than failing with "database is locked".
            engine_kwargs = {"connect_args": {"timeout": 120}}
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=spec.heartbeat_interval,
            grace_period=spec.heartbeat_grace,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or exc.name or "its database driver"
        raise SweepError(
            f"storage {redact(url)} needs {missing}: pip install it (e.g. gptexp[postgres] "
            "for PostgreSQL, gptexp[redis] for Redis)"
        ) from None
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


def quiet_optuna() -> None:
    """Optuna's INFO lines and its 'experimental' warnings for the heartbeat API would drown
    the one line per trial that the sweep prints."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def try_sampler_and_pruner(spec: SweepSpec, num_epochs: int) -> None:
    """Optuna checks most sampler options only when a trial asks: ask once on an in-memory study,
    so that a bad option is refused now rather than failing the sweep with a trial left RUNNING."""
    import optuna

    quiet_optuna()
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
        raise SweepError(
            f"sampler {spec.sampler['name']} fails on this space ({text}): check its options in the spec"
        ) from None
