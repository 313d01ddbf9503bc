"""Which hyperparameters mattered: the service (Optuna's PED-ANOVA over the complete
trials), its answers where there can be none, the cap on large studies, the REST route and
the CLI (`hpsearch importance`, the line in `hpsearch status`)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpsearch.api import Settings
from hpsearch.cli.commands import app
from hpsearch.service import importance
from hpsearch.service.importance import evenly_spaced, param_importance, top_quantile
from hpsearch.service.studies import StudyNotFound, submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage
from hpsearch.storage.queries import ScoredTrial
from tests.served import served

SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "batch_size": {"choices": [16, 32, 64]},
    "dropout": {"low": 0.0, "high": 0.5},
}


def make_spec(name: str, space: dict[str, Any] | None = None) -> Any:
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": SPACE if space is None else space,
            "budget": {"n_trials": 100},
        }
    )


def planted(params: dict[str, Any], rng: np.random.Generator) -> float:
    """The learning rate matters most (best near 3e-3), the dropout a little, the batch
    size not at all."""
    lr = params.get("learning_rate", 1e-3)
    return (
        0.95
        - 0.1 * (math.log10(lr) + 2.5) ** 2
        - 0.05 * params.get("dropout", 0)
        + float(rng.normal(0, 0.002))
    )


def fill(
    url: str,
    name: str,
    complete: int,
    pruned: int = 0,
    failed: int = 0,
    value: Any = planted,
) -> None:
    """Trials drawn at random, told as a worker would tell them."""
    spec = make_spec(name)
    study = optuna.load_study(
        study_name=name, storage=optuna_storage(url), sampler=optuna.samplers.RandomSampler(0)
    )
    rng = np.random.default_rng(0)
    space = dict(spec.search_space.dimensions())
    states = [TrialState.COMPLETE] * complete + [TrialState.PRUNED] * pruned
    states += [TrialState.FAIL] * failed
    for state in states:
        trial = study.ask()
        params: dict[str, Any] = {}
        for key, dim in space.items():
            if dim.choices is not None:
                params[key] = trial.suggest_categorical(key, dim.choices)
            else:
                params[key] = trial.suggest_float(key, dim.low, dim.high, log=dim.log)
        if state == TrialState.COMPLETE:
            study.tell(trial, value(params, rng))
        elif state == TrialState.PRUNED:
            trial.report(0.99, 1)  # a pruned trial's value: its last report, here the best
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'imp.db'}"
    return request.getfixturevalue("postgres_url")


def test_the_hyperparameter_that_matters_comes_first_as_optuna_ranks_it(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("planted"))
    fill(url, "planted", complete=30, pruned=4, failed=2)
    answer = param_importance(store, "planted")
    assert answer.reason is None
    assert (answer.evaluator, answer.metric, answer.min_trials) == ("PED-ANOVA", "val_accuracy", 10)
    assert (answer.trials_complete, answer.trials_used) == (30, 30)  # pruned, failed left out
    assert answer.top_quantile == pytest.approx(10 / 30)  # the best 10 of 30
    ranked = [entry.param for entry in answer.importances]
    assert ranked[0] == "learning_rate" and sorted(ranked) == sorted(SPACE)
    shares = [entry.importance for entry in answer.importances]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(1.0)
    assert shares[0] > 0.5
    # The same as Optuna's own PED-ANOVA reading the study from the database, and again.
    study = optuna.load_study(study_name="planted", storage=url)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=10 / 30)
    optunas = optuna.importance.get_param_importances(study, evaluator=evaluator)
    assert {e.param: e.importance for e in answer.importances} == pytest.approx(optunas)
    assert param_importance(store, answer.study) == answer


def test_too_few_complete_trials_is_an_answer_that_says_how_many_are_needed(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("young"))
    answer = param_importance(store, "young")
    assert (answer.importances, answer.trials_complete, answer.trials_used) == ([], 0, 0)
    fill(url, "young", complete=9, pruned=6)
    answer = param_importance(store, "young")
    assert answer.importances == [] and answer.trials_complete == 9
    assert answer.reason == (
        "telling which hyperparameters mattered needs at least 10 complete trials; young has "
        "9 (pruned and failed trials do not count)"
    )
    fill(url, "young", complete=1)
    assert param_importance(store, "young").reason is None  # 10 are enough


def test_no_searched_or_no_varying_hyperparameter_is_said_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("fixed", {}))
    answer = param_importance(store, "fixed")
    assert answer.reason == "no hyperparameter is searched: the spec's search_space is empty"
    assert answer.importances == [] and answer.constant == []
    submit_study(store, make_spec("single", {"batch_size": {"choices": [32]}}))
    answer = param_importance(store, "single")
    assert answer.reason == ("no searched hyperparameter varies: each has a single possible value")
    assert answer.constant == ["batch_size"]


def test_a_constant_hyperparameter_is_named_apart_and_the_others_share_it_all(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    space = {"learning_rate": SPACE["learning_rate"], "batch_size": {"choices": [32]}}
    submit_study(store, make_spec("half", space))
    study = optuna.load_study(study_name="half", storage=url)
    rng = np.random.default_rng(1)
    for _ in range(12):
        trial = study.ask()
        lr = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [32])
        study.tell(trial, planted({"learning_rate": lr}, rng))
    answer = param_importance(store, "half")
    assert answer.constant == ["batch_size"]
    assert [(e.param, e.importance) for e in answer.importances] == [("learning_rate", 1.0)]


def test_trials_all_alike_are_said_to_show_no_difference(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("flat"))
    fill(url, "flat", complete=12, value=lambda params, rng: 0.5)
    answer = param_importance(store, "flat")
    assert answer.importances == [] and answer.trials_used == 12
    assert answer.reason == (
        "all 12 complete trials have the same val_accuracy (0.5): no hyperparameter made a "
        "difference"
    )


def test_a_large_study_is_evaluated_on_an_evenly_spaced_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("large"))
    fill(url, "large", complete=30)
    monkeypatch.setattr(importance, "MAX_TRIALS", 20)
    answer = param_importance(store, "large")
    assert (answer.trials_complete, answer.trials_used) == (30, 20)
    assert answer.top_quantile == pytest.approx(0.5)  # the best 10 of the 20
    assert answer.importances[0].param == "learning_rate"


def test_evenly_spaced_keeps_the_first_and_the_last_and_no_trial_twice() -> None:
    trials = [ScoredTrial(100 + i, i, float(i)) for i in range(2_500)]
    sample = evenly_spaced(trials, 2_000)
    numbers = [trial.number for trial in sample]
    assert len(numbers) == 2_000 == len(set(numbers)) and numbers == sorted(numbers)
    assert (numbers[0], numbers[-1]) == (0, 2_499)
    assert max(b - a for a, b in itertools.pairwise(numbers)) == 2
    assert evenly_spaced(trials[:5], 2_000) == trials[:5]


@pytest.mark.parametrize(("n", "quantile"), [(10, 0.5), (20, 0.5), (40, 0.25), (100, 0.1)])
def test_the_best_share_holds_ten_trials_or_a_tenth(n: int, quantile: float) -> None:
    assert top_quantile(n) == pytest.approx(quantile)


def test_the_route_answers_importance_and_no_server_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    client = served(Settings(database_url=url))
    created = client.post("/api/v1/studies", json=make_spec("served").model_dump(mode="json"))
    assert created.status_code == 201, created.text
    young = client.get("/api/v1/studies/served/importance")
    assert young.status_code == 200
    assert young.json()["importances"] == [] and "at least 10" in young.json()["reason"]
    fill(url, "served", complete=15)
    body = client.get(f"/api/v1/studies/{created.json()['id']}/importance").json()
    assert body["study"] == "served" and body["reason"] is None
    assert body["importances"][0]["param"] == "learning_rate"
    assert client.get("/api/v1/studies/nope/importance").status_code == 404
    assert client.get("/api/v1/studies/no%20pe/importance").status_code == 422


def test_the_cli_shows_importance_and_a_line_in_status(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'imp.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("shown"))
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*args, "--db", url], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    assert (
        "mattered most: not known yet: telling which hyperparameters mattered needs at "
        "least 10 complete trials; shown has 0" in cli("status", "shown")
    )
    assert "shown: telling which hyperparameters mattered needs at least 10" in cli(
        "importance", "shown"
    )
    fill(url, "shown", complete=20)
    answer = param_importance(store, "shown")
    shares = ", ".join(
        f"{e.param} {e.importance:.0%}" if e.importance >= 0.005 else f"{e.param} <1%"
        for e in answer.importances
    )
    assert (
        f"mattered most: {shares} (PED-ANOVA over 20 complete trials; see hpsearch importance "
        "shown)" in cli("status", "shown")
    )
    table = cli("importance", "shown")
    rows = [line.split() for line in table.splitlines() if line.strip()[:1].isdigit()]
    assert [row[:2] for row in rows] == [
        [str(rank), e.param] for rank, e in enumerate(answer.importances, start=1)
    ]
    assert "among the best 50% of its 20 complete trials" in table
    assert json.loads(cli("importance", "shown", "--json")) == answer.model_dump(mode="json")
    missing = runner.invoke(app, ["importance", "nope", "--db", url])
    assert missing.exit_code == 2 and "no study 'nope'" in missing.output
    with pytest.raises(StudyNotFound):
        param_importance(store, "nope")
