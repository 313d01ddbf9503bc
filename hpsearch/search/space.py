"""From the spec to Optuna: the search space's distributions, the sampler and the pruner."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FrozenTrial, TrialState

from hpsearch.search.startup import LatinStartupSampler
from hpsearch.spec import INTEGER_KEYS, Dimension, StudySpec
from hpsearch.storage import optuna_internals
from hpsearch.storage.queries import STATE_NAMES


def distributions(spec: StudySpec) -> dict[str, BaseDistribution]:
    """One Optuna distribution per searched key, in the spec's order."""
    return {key: _distribution(key, dim) for key, dim in spec.search_space.dimensions().items()}


def _distribution(key: str, dim: Dimension) -> BaseDistribution:
    if dim.choices is not None:
        return CategoricalDistribution(dim.choices)
    if key in INTEGER_KEYS:
        step = int(dim.step) if dim.step is not None else 1
        return IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=step)
    return FloatDistribution(float(dim.low), float(dim.high), log=dim.log, step=dim.step)


def suggest_params(trial: optuna.Trial, spec: StudySpec) -> dict[str, Any]:
    """Ask the trial for every searched key (a trial that already holds a value keeps it)."""
    params: dict[str, Any] = {}
    for key, dist in distributions(spec).items():
        if isinstance(dist, CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_float(
                key, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return params


def make_sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """The spec's sampler. With a seed, each trial's draws are seeded from the seed and the
    trial's number (`TrialSeededSampler`), so every worker process, each with a sampler of
    its own, gives a trial the point any other would: no two workers repeat one another's
    start-up points, and the same seed gives the same points with 1 worker or 16."""
    seed = spec.sampler.seed
    # Without a seed, each process starts from fresh entropy: workers differ, runs do not
    # repeat. The grid sampler keeps one seed, which orders its grid; it picks a point no
    # trial has taken yet by itself.
    if seed is None or spec.sampler.name == "grid":
        sampler = _sampler(spec, seed)
    else:
        sampler = TrialSeededSampler(functools.partial(_sampler, spec), seed)
    if spec.sampler.name in MODEL_BASED:
        return LatinStartupSampler(sampler, spec.sampler.n_startup_trials, seed)
    return sampler


# The samplers whose start-up trials are drawn on a Latin hypercube (`LatinStartupSampler`).
MODEL_BASED = ("tpe", "bayes", "gp", "cmaes")
# Points TPE scores by its density ratio before it picks one (Optuna's default: 24). On
# bench/lcbench.py's development tasks, 100 seeds, 30 trials: mean regret 0.105 with 128 and
# 0.106 with 64 against 0.118 with 24; after 10 trials 0.251 against 0.275. On
# bench/samplers.py's test functions (100 seeds) within noise: bowl-3d 0.0150 against 0.0157,
# mixed-5d 0.047 against 0.050. An ask costs more, still far below a trial's training.
# TPE's other options stay Optuna's: on the same tasks (seeds 20-49, 30 trials) none moved
# the regret of 0.102 ± 0.006 beyond noise (prior_weight 0.25 to 2, consider_endpoints,
# uniform weights, 3 or 4 start-up trials, gamma 0.15n, 0.2n or sqrt), and the two that
# looked best, prior_weight 0.5 (0.094) and consider_endpoints (0.097), did not hold on seeds
# 50-89 (0.106 and 0.111 against 0.104). gamma 0.25n (0.126) and no magic clip (0.173) lost.
TPE_CANDIDATES = 128


def _sampler(spec: StudySpec, seed: int | None) -> optuna.samplers.BaseSampler:
    cfg = spec.sampler
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=cfg.n_startup_trials,
            multivariate=True,
            constant_liar=True,
            n_ei_candidates=TPE_CANDIDATES,
        )
    if cfg.name == "bayes":
        from hpsearch.search.bayes import BayesSampler

        return BayesSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "gp":
        from hpsearch.search.gp import GPSampler

        return GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "grid":
        grid = {
            key: [int(v) for v in dim.values()] if key in INTEGER_KEYS else dim.values()
            for key, dim in spec.search_space.dimensions().items()
        }
        return _GridSampler(grid, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


# Trials that count against a study's n_trials, and so hold their grid point: finished,
# running, and waiting ones (retries to resume, enqueued configurations). A failed trial
# uses no budget and frees its point.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def places_held(counts: Mapping[str, int]) -> int:
    """How many of a budget's places a study's trials hold, from their counts by state name
    (`StudyClaim.trial_counts`): finished, running and waiting trials."""
    return sum(counts.get(STATE_NAMES[state], 0) for state in BUDGET_STATES)


class GridExhausted(RuntimeError):
    """Every point of the grid is held by a trial: there is nothing left to ask for."""


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, with each new trial given a point that no trial holds.

    Optuna's own picks point `number` for the first trials, which a failed trial (its number
    taken, its point free again) turns into a repeat, and once every point has started it
    repeats one; its `after_trial` stops `study.optimize`, and raises outside of it (a
    worker's `tell`). Here a new trial takes the first free point in the seed's order,
    points never tried before those whose trials failed; a retry keeps the point of the
    trial it retries. Under the study's claim lock, where `runtime.trials.claim_trial` asks,
    the sampler sees every running trial, so parallel workers never share a point; the
    claim stops once the grid is spent (`hpsearch.service.studies.effective_budget`), and asking
    for more here raises GridExhausted rather than repeating a point.
    """

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Store the trial's point (`grid_id`), which `sample_independent` reads."""
        if "grid_id" in trial.system_attrs or "fixed_params" in trial.system_attrs:
            return
        free = self.free_points(study)
        if not free:
            raise GridExhausted(
                f"all {len(self._all_grids)} points of the grid are taken by trials"
            )
        optuna_internals.set_system_attr(study, trial, "search_space", self._search_space)
        optuna_internals.set_system_attr(study, trial, "grid_id", free[0])

    def free_points(self, study: optuna.Study) -> list[int]:
        """The grid ids no trial in BUDGET_STATES holds, in the order they are handed out."""
        held: set[int] = set()
        failed: set[int] = set()
        for t in study.get_trials(deepcopy=False):
            grid_id = t.system_attrs.get("grid_id")
            if grid_id is None:
                continue
            (held if t.state in BUDGET_STATES else failed).add(grid_id)
        free = set(range(len(self._all_grids))) - held
        return sorted(free, key=lambda grid_id: (grid_id in failed, grid_id))

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        """Nothing: a study ends when its budget, capped at the grid's size, is spent."""


def grid_size(spec: StudySpec) -> int | None:
    """How many points the spec's grid has; None when the sampler is not `grid`."""
    if spec.sampler.name != "grid":
        return None
    return math.prod(dim.count() for dim in spec.search_space.dimensions().values())


def trial_seed(seed: int, number: int) -> int:
    """A 32-bit seed that depends only on the study's seed and a trial's number."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose draws for a trial depend on the study's seed and the trial's number,
    not on the process that asks.

    Each worker process holds a sampler of its own; seeded once per process, every worker
    would draw the same sequence, and a replacement worker would start it again. Here the
    inner sampler is built afresh for each trial, seeded with `trial_seed(seed, number)`;
    what it learns, it reads from the study's trials in storage, as Optuna's samplers do.
    """

    def __init__(self, build: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._build = build
        self._seed = seed
        self._current: tuple[int, optuna.samplers.BaseSampler] | None = None

    def _for(self, trial: FrozenTrial) -> optuna.samplers.BaseSampler:
        """The inner sampler of this trial, built at its first call and kept while the
        trial's params are drawn."""
        if self._current is None or self._current[0] != trial.number:
            self._current = (trial.number, self._build(trial_seed(self._seed, trial.number)))
        return self._current[1]

    def reseed_rng(self) -> None:
        """Nothing to do: threads of one process ask for trials of different numbers."""

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The spec's pruner; its resource is the epoch, so hyperband's maximum is max_epochs."""
    cfg = spec.pruner
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(
            n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
    if cfg.name == "percentile":
        return optuna.pruners.PercentilePruner(
            cfg.percentile, n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
        )
    if cfg.name == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource, reduction_factor=cfg.reduction_factor
        )
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource,
            max_resource=spec.training.max_epochs,
            reduction_factor=cfg.reduction_factor,
        )
    return optuna.pruners.NopPruner()
