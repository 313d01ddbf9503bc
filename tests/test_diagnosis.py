"""Diagnoses of real small trainings with a planted fault, and the rules on recorded epochs."""

from __future__ import annotations

from typing import Any

import pytest

from hpsearch.data import load_dataset
from hpsearch.diagnosis import TrialFacts, advise, diagnose
from hpsearch.spec import parse_spec
from hpsearch.train import EpochRecord, TrainResult, TrialConfig, train

DIGITS = {"source": "builtin", "name": "digits"}


def spec_of(dataset: dict[str, Any] = DIGITS, **sections: Any) -> Any:
    return parse_spec(
        {"name": "diagnosis", "dataset": dataset, "budget": {"n_trials": 1}} | sections
    )


def trained(**sections: Any) -> TrainResult:
    spec = spec_of(**sections)
    return train(TrialConfig.from_spec(spec, {}), load_dataset(spec))


def test_learning_rate_10_diverges() -> None:
    assert diagnose(trained(training={"learning_rate": 10, "max_epochs": 5})) == "diverged"


def test_a_ten_layer_sigmoid_network_has_vanishing_gradients() -> None:
    result = trained(
        model={"hidden": [32] * 10, "activation": "sigmoid"}, training={"max_epochs": 5}
    )
    first, last = result.history[-1].grad_norms[0], result.history[-1].grad_norms[-1]
    assert len(result.history[-1].grad_norms) == 11 and first < 1e-3 * last
    assert diagnose(result) == "vanishing_gradients"


def test_a_wide_network_on_a_tiny_data_set_overfits() -> None:
    result = trained(
        dataset={"source": "synthetic", "n_samples": 300, "n_features": 20, "n_classes": 3},
        model={"hidden": [512, 512]},
        training={"max_epochs": 60, "early_stopping_patience": None, "scheduler": "none"},
    )
    assert diagnose(result) == "overfitting"


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
