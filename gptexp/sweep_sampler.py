"""Proposals that no two workers share: a sampler seeded per trial, that never repeats a point.

A sampler seeded once per process proposes the same sequence in every process started with that
seed: every machine running "worker 0" of a sweep replays the others' points. Seeding each trial
from the spec's seed and the trial's number instead (numbers are unique in a study, whichever
process asks) gives every trial a stream of its own, while a sweep re-run from scratch still gets
the same seeds and so the same points. Two streams can still meet on a small (categorical) space;
a proposal equal to a point the study already holds (finished, running or queued) is drawn again,
from the next seed, a bounded number of times.

The parameters are drawn as the trial is asked, under the study lock (gptexp.sweep_lock), so the
next worker sees them. The grid sampler keeps its own scheme: Optuna gives trial n grid point n,
so each point is tried once across all machines.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

from optuna.samplers import BaseSampler, RandomSampler

from .sweep_spec import SweepSpec

# Draws of one trial before a point is picked among the untried ones (or, none left, repeated);
# the first SAMPLER_DRAWS from the spec's sampler, the rest uniform.
MAX_DRAWS = 32
SAMPLER_DRAWS = 8
# A finite space up to this many points is listed to find an untried one.
MAX_LISTED_POINTS = 100_000


def trial_seed(spec_seed: int, trial_number: int, draw: int = 0) -> int:
    """The seed of a trial's `draw`-th proposal: the spec's seed and the trial's number, mixed by
    NumPy's SeedSequence (a 32-bit integer)."""
    import numpy as np

    return int(np.random.SeedSequence([int(spec_seed), int(trial_number), int(draw)]).generate_state(1)[0])


def point_key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def taken_points(study, except_number: int) -> set[tuple]:
    """The points of the study's trials other than `except_number`: asked (params) or queued (fixed
    params of enqueue_trial and of a stale trial's retry). A failed trial's point is taken too: its
    retry, if any, is queued under its own number."""
    points = set()
    for t in study.get_trials(deepcopy=False):
        if t.number == except_number:
            continue
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if params:
            points.add(point_key(params))
    return points


def _space(spec: SweepSpec) -> dict:
    """The spec's search space as Optuna distributions, by asking an in-memory trial for them."""
    import optuna

    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    for p in spec.space:
        p.suggest(trial)
    return dict(trial.distributions)


class DistinctSampler(BaseSampler):
    """Wraps the spec's sampler (built afresh, seeded per trial and draw) to propose a whole point
    at once (Optuna's relative sampling), drawing again while the point is already in the study.
    The seed of the proposal taken is the trial's `sampler_seed` user attr."""

    def __init__(self, spec: SweepSpec, make: Callable[[int | None], Any], seed: int | None):
        self._spec, self._make, self._seed = spec, make, seed
        self._cached: dict | None = None

    @property
    def _distributions(self) -> dict:
        # Built at the first ask, so a space Optuna refuses fails that trial (told FAIL), not the worker's start.
        if self._cached is None:
            self._cached = _space(self._spec)
        return self._cached

    def infer_relative_search_space(self, study, trial) -> dict:
        return dict(self._distributions)

    def sample_relative(self, study, trial, search_space) -> dict:
        if "fixed_params" in trial.system_attrs:
            return {}  # enqueued (or a retry): its point is given
        taken = taken_points(study, trial.number)
        params: dict = {}
        seed = None
        for draw in range(MAX_DRAWS if self._seed is not None else 1):
            seed = None if self._seed is None else trial_seed(self._seed, trial.number, draw)
            # The spec's sampler first; a model-based one (TPE past its start-up trials) may keep
            # proposing its favourite point whatever the seed, so the later draws are uniform.
            inner = self._make(seed) if draw < SAMPLER_DRAWS else RandomSampler(seed=seed)
            params = self._propose(inner, study, trial)
            if point_key(params) not in taken:
                break
        else:
            params = self._untried(taken, seed) or params
        study._storage.set_trial_user_attr(trial._trial_id, "sampler_seed", seed)
        return params

    def _untried(self, taken: set[tuple], seed: int | None) -> dict | None:
        """A point of a finite space that no trial holds, chosen with `seed`; None when the space is
        exhausted, or too large to list (a continuous range: there a repeat is all but impossible)."""
        import numpy as np

        values = []
        for p in self._spec.space:
            if p.type == "float" and p.step is None:
                return None
            values.append(p.grid_values())
        if math.prod(len(v) for v in values) > MAX_LISTED_POINTS:
            return None
        keys = [p.key for p in self._spec.space]
        free = [
            point
            for combo in itertools.product(*values)
            if point_key(point := dict(zip(keys, combo, strict=True))) not in taken
        ]
        if not free:
            return None
        return free[int(np.random.default_rng(seed).integers(len(free)))]

    def _propose(self, inner, study, trial) -> dict:
        inner.before_trial(study, trial)
        relative = inner.sample_relative(study, trial, inner.infer_relative_search_space(study, trial))
        return {
            name: relative[name] if name in relative else inner.sample_independent(study, trial, name, dist)
            for name, dist in self._distributions.items()
        }

    def sample_independent(self, study, trial, param_name, param_distribution):
        # Only a parameter outside the spec's space gets here (none does when asked through the spec).
        return self._make(None).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial) -> None:
        return None

    def after_trial(self, study, trial, state, values) -> None:
        return None

    def reseed_rng(self) -> None:
        return None


def fresh_grid_points(sampler, study) -> tuple[int, int]:
    """(grid points never started, trials running) for Optuna's grid sampler: with no fresh point
    left, asking would hand out a running trial's point again, so a worker waits instead."""
    from optuna.trial import TrialState

    started, running = set(), 0
    for t in study.get_trials(deepcopy=False):
        if "grid_id" in t.system_attrs:
            started.add(t.system_attrs["grid_id"])
        running += t.state == TrialState.RUNNING
    return len(set(range(sampler._n_min_trials)) - started), running
