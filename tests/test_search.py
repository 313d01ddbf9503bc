"""From spec to Optuna: distributions, every sampler and pruner, claims within the budget."""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import claim_trial, open_study, run_trial
from hpsearch.search.space import distributions, make_pruner, make_sampler, suggest_params
from hpsearch.service.studies import submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store

SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
    "batch_size": {"low": 16, "high": 256, "log": True},
    "n_layers": {"low": 1, "high": 3},
    "optimizer": {"choices": ["adam", "sgd", "rmsprop"]},
}


def make_spec(sampler: str = "tpe", seed: int = 0, **overrides: Any) -> StudySpec:
    spec: dict[str, Any] = {
        "name": "search-test",
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [8]},
        "search_space": SPACE,
        "training": {"max_epochs": 3},
        "sampler": {"name": sampler, "seed": seed, "n_startup_trials": 4},
        "budget": {"n_trials": 6},
    }
    spec.update(overrides)
    return parse_spec(spec)


def bowl(params: dict[str, Any]) -> float:
    """A smooth function of every dimension type, best at lr=1e-2, dropout=0.1, 64, 2, adam."""
    return (
        (math.log10(params["learning_rate"]) + 2) ** 2
        + (params["dropout"] - 0.1) ** 2
        + (math.log2(params["batch_size"]) - 6) ** 2 / 4
        + (params["n_layers"] - 2) ** 2
        + (params["optimizer"] != "adam")
    )


def test_distributions_follow_the_spec() -> None:
    dists = distributions(make_spec())
    assert set(dists) == set(SPACE)
    assert isinstance(dists["learning_rate"], optuna.distributions.FloatDistribution)
    assert dists["learning_rate"].log
    assert isinstance(dists["batch_size"], optuna.distributions.IntDistribution)
    assert (dists["batch_size"].low, dists["batch_size"].high) == (16, 256)
    assert dists["optimizer"].choices == ("adam", "sgd", "rmsprop")


@pytest.mark.parametrize("sampler", ["tpe", "bayes", "gp", "random", "cmaes"])
def test_every_sampler_stays_in_the_space_and_improves(sampler: str) -> None:
    spec = make_spec(sampler)
    study = optuna.create_study(sampler=make_sampler(spec))
    study.optimize(lambda trial: bowl(suggest_params(trial, spec)), n_trials=10)
    dists = distributions(spec)
    for trial in study.trials:
        assert trial.params.keys() == dists.keys()
        for key, value in trial.params.items():
            assert dists[key]._contains(dists[key].to_internal_repr(value)), (key, value)
    first_four = min(t.value for t in study.trials[:4])
    assert study.best_value <= first_four


def test_grid_visits_every_point_once() -> None:
    spec = make_spec(
        "grid",
        search_space={
            "batch_size": {"low": 32, "high": 96, "step": 32},
            "optimizer": {"choices": ["adam", "sgd"]},
        },
    )
    study = optuna.create_study(sampler=make_sampler(spec))
    study.optimize(lambda trial: bowl_lite(suggest_params(trial, spec)), n_trials=6)
    seen = {(t.params["batch_size"], t.params["optimizer"]) for t in study.trials}
    assert seen == set(itertools.product([32, 64, 96], ["adam", "sgd"]))


def bowl_lite(params: dict[str, Any]) -> float:
    return abs(params["batch_size"] - 64) + (params["optimizer"] == "sgd")


def points_drawn(
    spec: StudySpec, n_workers: int, n_trials: int, objective: Any = bowl
) -> list[tuple[Any, ...]]:
    """The params of `n_trials` trials asked in turn by `n_workers` samplers (one per worker
    process) on one storage, each told before the next ask."""
    storage = optuna.storages.InMemoryStorage()
    studies = [optuna.create_study(storage=storage, study_name="s", sampler=make_sampler(spec))]
    studies += [
        optuna.load_study(storage=storage, study_name="s", sampler=make_sampler(spec))
        for _ in range(n_workers - 1)
    ]
    points = []
    for number in range(n_trials):
        study = studies[number % n_workers]
        trial = study.ask()
        params = suggest_params(trial, spec)
        points.append(tuple(params.values()))
        study.tell(trial, objective(params))
    return points


@pytest.mark.parametrize("sampler", ["tpe", "bayes", "gp", "random", "cmaes"])
def test_points_depend_on_the_seed_and_the_trial_not_on_the_worker(sampler: str) -> None:
    spec = make_spec(sampler, seed=7)
    alone = points_drawn(spec, n_workers=1, n_trials=4)
    shared = points_drawn(spec, n_workers=4, n_trials=8)
    assert shared[:4] == alone  # the same start-up points with 1 worker or 4
    assert len(set(shared)) == 8  # and no worker repeats another's
    assert points_drawn(make_spec(sampler, seed=8), n_workers=1, n_trials=4) != alone


def test_grid_shared_by_workers_visits_every_point_once() -> None:
    spec = make_spec(
        "grid",
        seed=3,
        search_space={
            "batch_size": {"low": 32, "high": 96, "step": 32},
            "optimizer": {"choices": ["adam", "sgd"]},
        },
    )
    assert sorted(points_drawn(spec, n_workers=3, n_trials=6, objective=bowl_lite)) == sorted(
        itertools.product([32, 64, 96], ["adam", "sgd"])
    )


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("none", optuna.pruners.NopPruner),
        ("median", optuna.pruners.MedianPruner),
        ("percentile", optuna.pruners.PercentilePruner),
        ("sha", optuna.pruners.SuccessiveHalvingPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
    ],
)
def test_pruner_factory(name: str, kind: type) -> None:
    pruner = make_pruner(make_spec(pruner={"name": name}, training={"max_epochs": 27}))
    assert isinstance(pruner, kind)
    if name == "hyperband":
        assert pruner._max_resource == 27  # the resource is the epoch
        assert pruner._reduction_factor == 4  # hyperband's own default (PrunerSpec)


def test_median_pruner_prunes_a_trial_that_falls_behind() -> None:
    spec = make_spec(pruner={"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0})
    study = optuna.create_study(direction="maximize", pruner=make_pruner(spec))
    for curve in ([0.5, 0.6, 0.7], [0.6, 0.7, 0.8]):
        trial = study.ask()
        for epoch, value in enumerate(curve, start=1):
            trial.report(value, epoch)
        study.tell(trial, curve[-1])
    laggard = study.ask()
    laggard.report(0.1, 1)
    assert laggard.should_prune()


# --- studies on a database -------------------------------------------------------------


def test_claims_stop_at_the_budget_and_trials_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    spec = make_spec("random", budget={"n_trials": 3})
    store = Store.open(url)
    state = submit_study(store, spec)
    study = open_study(state, store)
    data = load_dataset(spec)
    claimed = [claim_trial(study, state, store) for _ in range(3)]
    assert claim_trial(study, state, store) is None  # three running trials use the whole budget
    states = [run_trial(study, trial, spec, data) for trial in claimed]
    assert states == [TrialState.COMPLETE] * 3
    assert claim_trial(study, state, store) is None
    for trial in study.trials:
        assert trial.params.keys() == SPACE.keys()
        recorded = {"val_accuracy", "test_accuracy", "epochs", "history", "diagnosis"}
        assert recorded <= trial.user_attrs.keys()
        assert len(trial.user_attrs["history"]) == trial.user_attrs["epochs"]


def test_failed_trials_use_no_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    spec = make_spec("random", budget={"n_trials": 1})
    store = Store.open(url)
    state = submit_study(store, spec)
    study = open_study(state, store)
    trial = claim_trial(study, state, store).trial
    study.tell(trial, state=TrialState.FAIL)
    assert claim_trial(study, state, store) is not None


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_trial_orphaned_before_its_first_heartbeat_is_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, request: pytest.FixtureRequest
) -> None:
    monkeypatch.setenv("HPSEARCH_HEARTBEAT_S", "1")
    monkeypatch.setenv("HPSEARCH_GRACE_PERIOD_S", "1")
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'o.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    spec = make_spec("random", budget={"n_trials": 2})
    store = Store.open(url)
    state = submit_study(store, spec)
    study = open_study(state, store)
    # A claim that broke between Optuna's `ask` and the first heartbeat (the database went
    # away): the trial is running, with no heartbeat, and uses budget.
    orphan = study.ask()
    assert claim_trial(study, state, store) is not None  # the second trial of the budget
    assert claim_trial(study, state, store) is None
    time.sleep(2.5)  # past the grace period of the orphan's first heartbeat
    assert claim_trial(study, state, store) is not None
    trials = study.get_trials(deepcopy=False)
    assert trials[orphan.number].state == TrialState.FAIL
    retries = [t for t in trials if t.system_attrs.get("retry_history") == [orphan.number]]
    assert len(retries) == 1  # waiting, or claimed just now


def test_a_failing_trial_records_its_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    spec = make_spec("random", budget={"n_trials": 1})
    store = Store.open(url)
    state = submit_study(store, spec)
    study = open_study(state, store)
    claim = claim_trial(study, state, store)
    data = load_dataset(spec)
    broken = dataclasses.replace(data, x_val=data.x_val[:, :2])  # too few features to evaluate
    assert run_trial(study, claim, spec, broken) == TrialState.FAIL
    assert study.trials[0].user_attrs["error"].startswith("RuntimeError: ")
    assert study.trials[0].state == TrialState.FAIL
