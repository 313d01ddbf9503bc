"""From the spec to Optuna: the search space's distributions, the sampler and the pruner."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpsearch.spec import INTEGER_KEYS, Dimension, StudySpec


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


def make_sampler(spec: StudySpec, stream: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler. `stream` offsets the seed so that parallel worker processes,
    each with its own sampler, do not draw the same random start-up points."""
    cfg = spec.sampler
    seed = None if cfg.seed is None else cfg.seed + stream
    if cfg.name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=cfg.n_startup_trials, multivariate=True, constant_liar=True
        )
    if cfg.name == "bayes":
        from hpsearch.bayes import BayesSampler

        return BayesSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=cfg.n_startup_trials)
    if cfg.name == "grid":
        grid = {
            key: [int(v) for v in dim.values()] if key in INTEGER_KEYS else dim.values()
            for key, dim in spec.search_space.dimensions().items()
        }
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


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
