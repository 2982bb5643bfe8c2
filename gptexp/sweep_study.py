"""The Optuna side of a sweep: its storage, the seeded samplers and the pruners of a spec."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from .provenance import redact
from .sweep_spec import SweepError, SweepSpec


def default_storage() -> str:
    root = Path("mlruns").resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root}/optuna.db"


# SQLSTATEs of a PostgreSQL error that a second try can get past: two processes creating the same
# table or type at once (unique_violation on pg_type, duplicate_table, duplicate_object), a deadlock or
# serialization failure between them, and a server that is full or starting up.
_TRANSIENT_SQLSTATES = {"23505", "42P07", "42710", "40P01", "40001", "53300", "57P03"}
OPEN_ATTEMPTS = 6


def _transient(exc: BaseException) -> bool:
    """Whether opening an RDB storage failed for a reason another try can get past."""
    import sqlalchemy.exc

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # Optuna wraps SQLAlchemy's error, which wraps the driver's
        seen.add(id(exc))
        if isinstance(exc, sqlalchemy.exc.IntegrityError):
            return True
        code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if code in _TRANSIENT_SQLSTATES:
            return True
        if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.orig is not None:
            exc = exc.orig
        else:
            exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def _describe(exc: BaseException) -> str:
    """The first line of `exc` and of the error it wraps (Optuna's 'exception during the commit'
    says nothing of its cause)."""

    def line(e: BaseException) -> str:
        text = str(e).strip()
        return text.splitlines()[0] if text else type(e).__name__

    text = line(exc)
    cause = exc.__cause__
    if cause is not None and line(cause) not in text:
        text += f": {type(cause).__name__}: {line(cause)}"
    return text


def _rdb_engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Workers wait for each other's writes rather than failing with "database is locked".
        return {"connect_args": {"timeout": 120}}
    # A database server admits a fixed number of connections (PostgreSQL: 100) for every worker of
    # every sweep and the MLflow server: a worker needs two at once (its trial, its heartbeat), so
    # it keeps at most that many, checked before use (a server restart drops them).
    return {"pool_size": 2, "max_overflow": 3, "pool_pre_ping": True}


def open_storage(url: str, spec: SweepSpec):
    """An Optuna storage for `url`: an RDB URL (sqlite, postgresql, mysql), journal:///path or redis://.

    An RDB storage creates its tables on first use: the study lock (gptexp.sweep_lock) keeps
    workers that start together from doing it at once, and an error that one process racing
    another can still cause (one not using the lock, e.g. `optuna` itself) is retried a few times.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalRedisBackend

    from .sweep_lock import StudyLock

    try:
        if url.startswith("journal://"):
            path = url[len("journal://") :]
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        if url.startswith(("redis://", "rediss://")):
            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        for attempt in range(OPEN_ATTEMPTS):
            try:
                with StudyLock(url, spec.study):
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=_rdb_engine_kwargs(url),
                        heartbeat_interval=spec.heartbeat_interval,
                        grace_period=spec.heartbeat_grace,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                    )
            except Exception as exc:
                if attempt + 1 == OPEN_ATTEMPTS or not _transient(exc):
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")
    except ImportError as exc:
        missing = getattr(exc.__cause__, "name", None) or exc.name or "its database driver"
        raise SweepError(
            f"storage {redact(url)} needs {missing}: pip install it (e.g. gptexp[postgres] "
            "for PostgreSQL, gptexp[redis] for Redis)"
        ) from None
    except Exception as exc:
        raise SweepError(
            f"cannot open Optuna storage {redact(url)} ({redact(_describe(exc))[:300]}): check --storage"
        ) from None


# make_sampler's default: the spec's own seed.
SPEC_SEED = -1


def make_sampler(spec: SweepSpec, seed: int | None = SPEC_SEED):
    """The spec's sampler, seeded with `seed` (default: the spec's seed, 123 unless given)."""
    import optuna

    s = dict(spec.sampler)
    name = s.pop("name")
    spec_seed = s.pop("seed", 123)
    if seed == SPEC_SEED:
        seed = spec_seed
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


def study_sampler(spec: SweepSpec):
    """The sampler a worker asks trials of: the grid (trial n takes grid point n, so each point is
    run once whatever the workers), else the spec's sampler seeded per trial, never repeating a
    point (gptexp.sweep_sampler)."""
    if spec.sampler["name"] == "grid":
        return make_sampler(spec)
    from .sweep_sampler import DistinctSampler

    seed = spec.sampler.get("seed", 123)
    return DistinctSampler(spec, lambda s: make_sampler(spec, s), None if seed is None else int(seed))


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
