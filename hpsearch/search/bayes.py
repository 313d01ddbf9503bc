"""Bayesian optimisation with scikit-optimize's Gaussian process, as an Optuna sampler.

optuna-integration no longer ships a scikit-optimize sampler, so this module wraps
``skopt.Optimizer(base_estimator="GP")`` itself. Several worker processes share one study
through a database, each with its own sampler instance, so the sampler keeps no optimisation
state: every ask rebuilds the optimiser from the trials in storage, and every random draw is
seeded from ``(seed, trial.number)`` so that concurrent trials differ and a seeded run repeats.
"""

from __future__ import annotations

import math
import secrets
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.samplers import BaseSampler, RandomSampler
from optuna.search_space import IntersectionSearchSpace
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from skopt import Optimizer
from skopt.space import Categorical, Dimension, Integer, Real, Space
from skopt.utils import cook_estimator
from threadpoolctl import threadpool_limits

from hpsearch.search.gp import last_report

# A GP fit costs O(n^3) in the n points it sees (an ask on all of 200 trials took 0.8-1.3 s
# here, several seconds with skopt's defaults), so it sees at most the best _MAX_BEST and the
# newest _MAX_RECENT finished trials: the region worth refining, and what was tried lately.
_MAX_BEST = 80
_MAX_RECENT = 20
# skopt's GP fits its kernel hyperparameters from the default start and then again from 2
# random ones. Every ask refits from scratch anyway; on our benchmarks the restarts made the
# search 1.3-2.3 times slower and found the same best values, so the fit starts once.
_GP_FIT_RESTARTS = 0
# skopt scores the acquisition function on 10000 random candidates and polishes the best 5
# with L-BFGS; fewer of both halve the cost of an ask at 30 trials without hurting the search.
_ACQ_OPTIMIZER_KWARGS = {"n_points": 2000, "n_restarts_optimizer": 2}
# skopt warns when the GP proposes a point it was told before; with lies for the running
# trials that is expected, and skopt then falls back to a random point itself.
_DUPLICATE_POINT_WARNING = "The objective has been evaluated at"

_PENDING_STATES = (TrialState.RUNNING, TrialState.WAITING)
_STATES_OF_INTEREST = (TrialState.COMPLETE, TrialState.PRUNED, *_PENDING_STATES)


@dataclass(frozen=True)
class _Observation:
    """A finished trial as skopt sees it: a point and a value to minimise."""

    number: int
    point: list[Any]
    value: float


class BayesSampler(BaseSampler):
    """Gaussian-process Bayesian optimisation (scikit-optimize) over the intersection space.

    While fewer than ``n_startup_trials`` trials have a usable value (COMPLETE, or PRUNED with
    an intermediate value), points are drawn at random from the space; afterwards a fresh
    ``skopt.Optimizer`` is fitted on the finished trials and asked for the next point. Running
    and waiting trials that already hold params are told the worst value seen (a constant
    liar), so workers asking at the same time are steered apart.

    To keep an ask well under a second however long the study, the GP is fitted on at most
    100 finished trials, the best 80 plus the 20 most recent (the lie is still the worst value
    over all of them); the acquisition function is scored on 2000 random candidates, and BLAS
    runs on one thread while the sampler works.

    Parameters outside the relative space (dynamic ones) come from ``independent_sampler``;
    without one they are drawn uniformly, seeded from ``(seed, trial.number, param name)``
    so that processes sharing one seed still draw different startup trials.

    Args:
        seed: Base seed of every random draw; ``None`` for a fresh one per instance.
        n_startup_trials: Finished trials to collect at random before the GP takes over.
        acq_func: skopt acquisition function. ``"EI"`` by default: ``"gp_hedge"`` learns
            its portfolio weights across asks, which a stateless sampler forgets, so it
            would only pick one of three acquisition functions at random at thrice the cost.
        independent_sampler: Sampler for params outside the relative search space.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        n_startup_trials: int = 5,
        acq_func: str = "EI",
        independent_sampler: BaseSampler | None = None,
    ) -> None:
        if seed is not None and seed < 0:
            raise ValueError(f"BayesSampler needs a non-negative seed, got {seed}.")
        self._base_seed = secrets.randbits(63) if seed is None else seed
        self._n_startup_trials = n_startup_trials
        self._acq_func = acq_func
        self._independent_sampler = independent_sampler

    def reseed_rng(self) -> None:
        """Draw a new base seed: Optuna's contract for ``optimize(n_jobs > 1)`` threads."""
        self._base_seed = secrets.randbits(63)
        if self._independent_sampler is not None:
            self._independent_sampler.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        """Params every finished trial shares with one distribution; constants are left out."""
        if len(study.directions) > 1:
            raise ValueError(
                "BayesSampler supports single-objective studies only; "
                f"this study has {len(study.directions)} objectives."
            )
        space = IntersectionSearchSpace(include_pruned=True).calculate(study)
        return {name: dist for name, dist in space.items() if not dist.single()}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """Sample every param of the space jointly: at random during startup, else by GP."""
        if not search_space:
            return {}
        dims = [to_dimension(dist) for dist in search_space.values()]
        finished, pending = _observations(study, trial, search_space)
        random_state = self._derived_seed(trial.number)
        if len(finished) < max(self._n_startup_trials, 1):  # a GP needs one point at least
            point = Space(dims).rvs(random_state=random_state)[0]
        else:
            point = self._ask_gp(dims, finished, pending, random_state)
        return {
            name: from_skopt(dist, x)
            for (name, dist), x in zip(search_space.items(), point, strict=True)
        }

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        """Sample a param outside the relative space with the independent sampler.

        The default draws from a RandomSampler seeded per trial and param rather than one
        long-lived generator, so that workers started with the same seed do not repeat
        each other's first trials (which all come from here, before any trial finished).
        """
        sampler = self._independent_sampler or RandomSampler(
            seed=self._derived_seed(trial.number, zlib.crc32(param_name.encode()))
        )
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def _derived_seed(self, *keys: int) -> int:
        """A 32-bit seed that depends only on the base seed and ``keys``, in any process."""
        return int(np.random.SeedSequence([self._base_seed, *keys]).generate_state(1)[0])

    def _ask_gp(
        self,
        dims: list[Dimension],
        finished: list[_Observation],
        pending: list[list[Any]],
        random_state: int,
    ) -> list[Any]:
        """Fit a fresh GP on the finished trials plus lies for the pending ones, and ask it."""
        has_categorical = any(isinstance(dim, Categorical) for dim in dims)
        gp = cook_estimator(
            "GP", space=dims, random_state=random_state, n_restarts_optimizer=_GP_FIT_RESTARTS
        )
        optimizer = Optimizer(
            dims,
            base_estimator=gp,
            n_initial_points=0,
            acq_func=self._acq_func,
            acq_optimizer="sampling" if has_categorical else "auto",
            acq_optimizer_kwargs=_ACQ_OPTIMIZER_KWARGS,
            random_state=random_state,
        )
        fitted = _fit_subset(finished)
        lie = max(obs.value for obs in finished)
        points = [obs.point for obs in fitted] + pending
        values = [obs.value for obs in fitted] + [lie] * len(pending)
        # The matrices are at most ~100 x 2000: BLAS threads only add overhead, and on a
        # busy machine OpenBLAS's spinning threads made each ask about three times slower.
        with warnings.catch_warnings(), threadpool_limits(1, user_api="blas"):
            warnings.filterwarnings("ignore", message=_DUPLICATE_POINT_WARNING)
            optimizer.tell(points, values)
            return optimizer.ask()


def to_dimension(dist: BaseDistribution) -> Dimension:
    """The skopt dimension a distribution is searched in (see ``from_skopt`` for the way back).

    Categoricals are searched over choice indices, since skopt cannot hold None or mixed
    types; non-log ints over the index k of ``low + k * step``, so every point is on the grid.
    Public so that a plain scikit-optimize loop can search exactly the sampler's space.
    """
    if isinstance(dist, CategoricalDistribution):
        return Categorical(list(range(len(dist.choices))))
    if isinstance(dist, IntDistribution):
        if dist.log:
            return Integer(dist.low, dist.high, prior="log-uniform")
        return Integer(0, (dist.high - dist.low) // dist.step)
    if isinstance(dist, FloatDistribution):
        return Real(dist.low, dist.high, prior="log-uniform" if dist.log else "uniform")
    raise TypeError(f"BayesSampler cannot search a {type(dist).__name__}.")


def to_skopt(dist: BaseDistribution, value: Any) -> Any:
    """A stored param value as a coordinate of the dimension from ``to_dimension``."""
    if isinstance(dist, CategoricalDistribution):
        return _choice_index(dist, value)
    if isinstance(dist, IntDistribution):
        return int(value) if dist.log else (int(value) - dist.low) // dist.step
    return float(value)


def from_skopt(dist: BaseDistribution, x: Any) -> Any:
    """A skopt coordinate as a plain Python param value inside the distribution.

    skopt returns numpy scalars, which Optuna's storages cannot always serialise.
    """
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[int(x)]
    if isinstance(dist, IntDistribution):
        if dist.log:
            return min(max(int(x), dist.low), dist.high)
        return min(dist.low + int(x) * dist.step, dist.high)
    assert isinstance(dist, FloatDistribution)
    value = float(x)
    if dist.step is not None:
        value = dist.low + round((value - dist.low) / dist.step) * dist.step
    return min(max(value, dist.low), dist.high)


def _choice_index(dist: CategoricalDistribution, value: Any) -> int:
    """The index of a choice, telling ``True`` from ``1`` where Optuna's lookup does not."""
    for index, choice in enumerate(dist.choices):
        if type(choice) is type(value) and choice == value:
            return index
    return int(dist.to_internal_repr(value))


def _observations(
    study: Study, trial: FrozenTrial, space: dict[str, BaseDistribution]
) -> tuple[list[_Observation], list[list[Any]]]:
    """Finished trials with a usable value, and the points of the other pending trials.

    Values are negated for maximisation because skopt minimises. FAIL trials, and trials
    without all params of the space, are left out.
    """
    sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
    finished: list[_Observation] = []
    pending: list[list[Any]] = []
    for other in study.get_trials(deepcopy=False, states=_STATES_OF_INTEREST):
        if other.number == trial.number or not _covers(other, space):
            continue
        point = [to_skopt(dist, other.params[name]) for name, dist in space.items()]
        if other.state in _PENDING_STATES:
            pending.append(point)
            continue
        value = _objective_value(other)
        if value is not None and math.isfinite(value):
            finished.append(_Observation(other.number, point, sign * value))
    return finished, pending


def _covers(trial: FrozenTrial, space: dict[str, BaseDistribution]) -> bool:
    """Whether the trial holds every param of the space, drawn from the same distribution."""
    return all(trial.distributions.get(name) == dist for name, dist in space.items())


def _objective_value(trial: FrozenTrial) -> float | None:
    """The value of a COMPLETE trial, or the last intermediate value of a PRUNED one.

    A pruned trial's last value understates what it would have reached, yet it is what the
    GP does best with. bench/lcbench.py's development tasks, bayes with the median pruner, 10
    seeds, regret after 100 trials: this 0.028 ± 0.005; leaving pruned trials out (Optuna's
    GPSampler does) 0.211, as the GP proposes the pruned regions again and again; telling
    them the worst value seen 0.048; the last value raised by the completed trials' median
    gain from that epoch to the end 0.025 ± 0.005 (paired: -0.003 ± 0.004, no gain)."""
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return last_report(trial)


def _fit_subset(finished: list[_Observation]) -> list[_Observation]:
    """The best and the most recent observations: what the GP needs, at a bounded cost."""
    best = sorted(finished, key=lambda obs: obs.value)[:_MAX_BEST]
    recent = sorted(finished, key=lambda obs: obs.number)[-_MAX_RECENT:]
    kept = {obs.number: obs for obs in best + recent}
    return sorted(kept.values(), key=lambda obs: obs.number)
