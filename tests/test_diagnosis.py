"""Diagnoses of real small trainings with a planted fault, and the rules on recorded epochs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from hpsearch.api import Settings
from hpsearch.cli.commands import app
from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service import results
from hpsearch.service.diagnosis import TrialFacts, advise, diagnose
from hpsearch.service.studies import submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store
from hpsearch.training.train import EpochRecord, TrainResult, TrialConfig, train
from tests.served import served

DIGITS = {"source": "builtin", "name": "digits"}


def spec_of(dataset: dict[str, Any] = DIGITS, **sections: Any) -> Any:
    return parse_spec(
        {"name": "diagnosis", "dataset": dataset, "budget": {"n_trials": 1}} | sections
    )


def trained(**sections: Any) -> TrainResult:
    spec = spec_of(**sections)
    return train(TrialConfig.from_spec(spec, {}), load_dataset(spec))


@pytest.mark.integration
def test_learning_rate_10_diverges() -> None:
    assert diagnose(trained(training={"learning_rate": 10, "max_epochs": 5})) == "diverged"


@pytest.mark.integration
def test_a_ten_layer_sigmoid_network_has_vanishing_gradients() -> None:
    result = trained(
        model={"hidden": [32] * 10, "activation": "sigmoid"}, training={"max_epochs": 5}
    )
    first, last = result.history[-1].grad_norms[0], result.history[-1].grad_norms[-1]
    assert len(result.history[-1].grad_norms) == 11 and first < 1e-3 * last
    assert diagnose(result) == "vanishing_gradients"


@pytest.mark.integration
def test_a_wide_network_on_a_tiny_data_set_overfits() -> None:
    result = trained(
        dataset={"source": "synthetic", "n_samples": 300, "n_features": 20, "n_classes": 3},
        model={"hidden": [512, 512]},
        training={"max_epochs": 60, "early_stopping_patience": None, "scheduler": "none"},
    )
    assert diagnose(result) == "overfitting"


@pytest.mark.integration
def test_a_healthy_digits_run_is_ok_or_early_stopped() -> None:
    result = trained(training={"max_epochs": 15})
    assert result.value > 0.9
    assert diagnose(result) in ("ok", "early_stopped")


def epochs(train_loss: list[float], val_loss: list[float] | None = None) -> list[EpochRecord]:
    val_loss = val_loss or train_loss
    return [
        EpochRecord(i + 1, t, v, 0.5, 1e-3, (1.0, 1.0))
        for i, (t, v) in enumerate(zip(train_loss, val_loss, strict=True))
    ]


def result_of(history: list[EpochRecord], **ending: bool) -> TrainResult:
    flags = {"stopped_early": False, "diverged": False, "pruned": False} | ending
    return TrainResult(
        0.5, 1, len(history), val_metrics={}, test_metrics={}, seconds=1.0, history=history, **flags
    )


@pytest.mark.parametrize(
    ("history", "ending", "expected"),
    [
        (epochs([1.0, 0.8, 0.6, 0.5, 0.45]), {}, "ok"),
        (epochs([1.0, 0.8, 0.6, 0.5, 0.45]), {"stopped_early": True}, "early_stopped"),
        (epochs([1.0, 0.9]), {"pruned": True}, "pruned"),
        (epochs([1.0, 1.3, 0.9, 1.2, 0.8, 1.1]), {}, "oscillating"),
        (epochs([1.0, 0.6, 0.4, 0.3, 0.2, 0.1], [1.0, 0.7, 0.6, 0.7, 0.8, 0.9]), {}, "overfitting"),
        # a pathology outranks how the run ended
        (epochs([1.0, 1.3, 0.9, 1.2, 0.8, 1.1]), {"pruned": True}, "oscillating"),
    ],
)
def test_rules_on_recorded_epochs(
    history: list[EpochRecord], ending: dict[str, bool], expected: str
) -> None:
    assert diagnose(result_of(history, **ending)) == expected


def test_exploding_gradient_norms_count_as_divergence() -> None:
    history = epochs([1.0, 0.9, 0.8, 0.7])
    history[-1] = EpochRecord(4, 0.7, 0.7, 0.5, 1e-3, (1.0, 5e3))
    assert diagnose(result_of(history)) == "diverged"


SPACE = {
    "learning_rate": {"low": 1e-4, "high": 10, "log": True},
    "dropout": {"low": 0.0, "high": 0.5},
}


def facts(lr: float, diagnosis: str, value: float | None, dropout: float = 0.25) -> TrialFacts:
    return TrialFacts({"learning_rate": lr, "dropout": dropout}, value, diagnosis, 3)


def test_advice_names_the_diverging_learning_rates_with_counts() -> None:
    trials = [facts(lr, "ok", 0.9) for lr in (1e-4, 3e-4, 1e-3, 3e-3)]
    trials += [facts(0.01, "ok", 0.8)]
    trials += [facts(lr, "diverged", None) for lr in (0.05, 0.3, 1.0, 3.0, 9.0)]
    trials += [facts(2.0, "ok", 0.2)]
    advice = advise(trials, spec_of(search_space=SPACE))
    assert (
        "5 of 6 trials with learning_rate >= 0.05 diverged, none below it: lower "
        "search_space.learning_rate.high to about 0.05." in advice
    )


def test_advice_says_to_widen_a_range_whose_best_trials_sit_at_its_edge() -> None:
    trials = [facts(lr, "ok", lr) for lr in (1e-4, 1e-3, 0.01, 0.1)]
    trials += [facts(lr, "ok", 100 * lr) for lr in (7.0, 8.0, 9.5)]
    advice = advise(trials, spec_of(search_space=SPACE))
    assert any(
        "3 of the best 3 trials have learning_rate in the upper tenth" in a
        and "widen search_space.learning_rate past 10" in a
        for a in advice
    ), advice
    assert not any("dropout" in a for a in advice)


def test_no_advice_from_too_few_trials() -> None:
    assert advise([facts(9.0, "diverged", None)] * 3, spec_of(search_space=SPACE)) == []


def finished_study(tmp_path: Path, space: dict[str, Any], n_trials: int, sampler: dict) -> str:
    """A real study of 3-epoch digits trials run to the end by an in-process worker."""
    url = f"sqlite:///{tmp_path / 'advice.db'}"
    spec = spec_of(
        name="advice",
        search_space=space,
        sampler=sampler,
        pruner={"name": "none"},
        training={"max_epochs": 3},
        budget={"n_trials": n_trials},
    )
    store = Store.open(url)
    submit_study(store, spec)
    assert Worker(WorkerOptions(store, idle_exit_s=0)).run() == 0
    return url


@pytest.mark.integration
def test_a_study_searching_learning_rates_up_to_10_is_told_which_range_diverged(
    tmp_path: Path,
) -> None:
    space = {"learning_rate": {"low": 1e-4, "high": 10, "log": True}}
    url = finished_study(tmp_path, space, 16, {"name": "random", "seed": 0})
    store = Store.open(url)
    trials = results.list_trials(store, "advice", limit=100).items
    diverged = [t.params["learning_rate"] for t in trials if t.diagnosis == "diverged"]
    assert len(trials) == 16 and len(diverged) >= 2
    advice = results.study_detail(store, "advice").advice
    found = [
        re.search(r"(\d+) of (\d+) trials with learning_rate >= (\S+) diverged", a) for a in advice
    ]
    match = next(m for m in found if m)
    count, among, threshold = int(match[1]), int(match[2]), float(match[3])
    assert count == len(diverged) and count * 2 >= among
    assert threshold == pytest.approx(min(diverged), rel=0.05)
    assert among == sum(t.params["learning_rate"] >= min(diverged) for t in trials)
    shown = CliRunner().invoke(app, ["status", "advice", "--db", url])
    assert shown.exit_code == 0 and f"{count} of {among} trials with learning_rate" in shown.output
    as_json = json.loads(
        CliRunner().invoke(app, ["status", "advice", "--db", url, "--json"]).output
    )
    assert as_json["advice"] == advice
    healthy = next(t for t in trials if t.diagnosis == "ok")
    curve = results.trial_detail(store, "advice", healthy.number).curve
    assert len(curve) == 3 and all(len(p.grad_norms) == 2 and min(p.grad_norms) > 0 for p in curve)
    shown = CliRunner().invoke(app, ["trial", "advice", str(healthy.number), "--db", url])
    assert "gradient norm per layer" in shown.output
    assert "diagnosis ok" in shown.output.splitlines()[0]


@pytest.mark.integration
def test_a_study_whose_best_trials_sit_at_the_upper_learning_rate_bound_is_told_to_widen_it(
    tmp_path: Path,
) -> None:
    space = {"learning_rate": {"low": 1e-6, "high": 1e-4, "log": True}}
    sampler = {"name": "tpe", "seed": 0, "n_startup_trials": 5}
    url = finished_study(tmp_path, space, 15, sampler)
    store = Store.open(url)
    best = results.leaderboard(store, "advice", top=3)
    assert all(t.params["learning_rate"] > 10**-4.2 for t in best)  # the upper tenth
    advice = results.study_detail(store, "advice").advice
    assert any("widen search_space.learning_rate past 0.0001" in a for a in advice), advice
    client = served(Settings(database_url=url))
    assert client.get("/api/v1/studies/advice").json()["advice"] == advice
    curve = client.get(f"/api/v1/studies/advice/trials/{best[0].number}").json()["curve"]
    assert len(curve) == 3 and all(len(point["grad_norms"]) == 2 for point in curve)
