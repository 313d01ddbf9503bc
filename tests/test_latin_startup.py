"""Start-up trials of the model-based samplers lie on a Latin hypercube."""

from __future__ import annotations

import math
from typing import Any

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from hpsearch.search.space import distributions, make_sampler, suggest_params
from hpsearch.search.startup import LatinStartupSampler, at_quantile
from hpsearch.spec import StudySpec, parse_spec
from tests.test_search import points_drawn

N_STARTUP = 6
SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"low": 0.0, "high": 0.6},
    "batch_size": {"low": 16, "high": 512, "log": True},
    "hidden_units": {"low": 10, "high": 60, "step": 10},
    "optimizer": {"choices": ["adam", "sgd", "rmsprop"]},
}


def make_spec(sampler: str, seed: int | None = 3) -> StudySpec:
    return parse_spec(
        {
            "name": "latin",
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": SPACE,
            "sampler": {"name": sampler, "seed": seed, "n_startup_trials": N_STARTUP},
            "budget": {"n_trials": 20},
        }
    )


def startup_params(spec: StudySpec, n_workers: int = 1) -> list[dict[str, Any]]:
    """The first N_STARTUP trials' params, asked in turn by `n_workers` processes' samplers."""
    points = points_drawn(spec, n_workers, N_STARTUP, objective=lambda params: 0.0)
    return [dict(zip(distributions(spec), point, strict=True)) for point in points]


def stratum(low: float, high: float, value: float, log: bool) -> int:
    """Which of N_STARTUP equal strata of [low, high] (on the log scale if `log`) holds value."""
    if log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return min(int((value - low) / (high - low) * N_STARTUP), N_STARTUP - 1)


@pytest.mark.parametrize("sampler", ["tpe", "bayes", "gp", "cmaes"])
def test_each_continuous_param_takes_every_stratum_once(sampler: str) -> None:
    drawn = startup_params(make_spec(sampler))
    for key in ("learning_rate", "dropout"):
        dim = SPACE[key]
        strata = [stratum(dim["low"], dim["high"], p[key], dim.get("log", False)) for p in drawn]
        assert sorted(strata) == list(range(N_STARTUP)), (key, strata)


def test_discrete_params_spread_over_their_values() -> None:
    drawn = startup_params(make_spec("tpe"))
    # 6 values of hidden_units for 6 trials: each once; 3 choices: each twice.
    assert sorted(p["hidden_units"] for p in drawn) == [10, 20, 30, 40, 50, 60]
    choices = [p["optimizer"] for p in drawn]
    assert sorted(choices.count(c) for c in SPACE["optimizer"]["choices"]) == [2, 2, 2]


def test_workers_sharing_a_study_complete_one_design() -> None:
    spec = make_spec("bayes")
    assert startup_params(spec, n_workers=3) == startup_params(spec, n_workers=1)
    assert startup_params(make_spec("bayes", seed=4)) != startup_params(spec)


def test_the_model_takes_over_after_the_startup_trials() -> None:
    """Trial N_STARTUP's params come from the inner sampler: TPE's, given the same history."""
    spec = make_spec("tpe")
    study = optuna.create_study(sampler=make_sampler(spec))
    for number in range(N_STARTUP + 1):
        trial = study.ask()
        suggest_params(trial, spec)
        if number < N_STARTUP:
            study.tell(trial, float(number))
    inner = make_sampler(spec)
    assert isinstance(inner, LatinStartupSampler)
    replay = optuna.create_study(sampler=inner._inner)
    replay.add_trials(study.trials[:N_STARTUP])
    assert suggest_params(replay.ask(), spec) == study.trials[-1].params


def test_without_a_seed_the_startup_is_still_a_design() -> None:
    drawn = startup_params(make_spec("tpe", seed=None))
    dim = SPACE["dropout"]
    assert sorted(stratum(dim["low"], dim["high"], p["dropout"], False) for p in drawn) == list(
        range(N_STARTUP)
    )


DISTRIBUTIONS: list[BaseDistribution] = [
    FloatDistribution(1e-5, 1.0, log=True),
    FloatDistribution(0.0, 0.99),
    FloatDistribution(0.0, 0.5, step=0.1),
    IntDistribution(16, 512, log=True),
    IntDistribution(1, 5),
    IntDistribution(10, 70, step=20),
    CategoricalDistribution(["a", None, 3]),
]


@given(st.sampled_from(DISTRIBUTIONS), st.floats(0.0, 1.0, exclude_max=True))
def test_every_quantile_is_a_value_of_the_distribution(dist: BaseDistribution, u: float) -> None:
    value = at_quantile(dist, u)
    assert dist._contains(dist.to_internal_repr(value)), (dist, u, value)
    if not isinstance(dist, CategoricalDistribution):
        assert type(value) is (int if isinstance(dist, IntDistribution) else float)


@given(st.sampled_from(DISTRIBUTIONS[:6]), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_quantiles_keep_their_order(dist: BaseDistribution, u: float, v: float) -> None:
    u, v = sorted((min(u, 0.999999), min(v, 0.999999)))
    assert at_quantile(dist, u) <= at_quantile(dist, v)
