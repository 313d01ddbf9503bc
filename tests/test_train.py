"""The trainer on real data: it learns, stops early, prunes, catches divergence, repeats."""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import torch
from torch import nn

from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import objective
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.training.model import build_mlp
from hpsearch.training.train import TrialConfig, train

pytestmark = pytest.mark.integration  # real trainings on real data: slow for the unit tier


def make_spec(dataset: str = "digits", **training: Any) -> StudySpec:
    return parse_spec(
        {
            "name": "train-test",
            "dataset": {"source": "builtin", "name": dataset},
            "training": {"max_epochs": 10, **training},
            "budget": {"n_trials": 1},
        }
    )


def run(spec: StudySpec, **params: Any):
    return train(TrialConfig.from_spec(spec, params), load_dataset(spec))


def test_learns_digits_above_90_percent_within_10_epochs() -> None:
    result = run(make_spec(max_epochs=10))
    assert result.epochs_run <= 10
    assert result.value > 0.9
    assert result.val_metrics["val_accuracy"] == pytest.approx(result.value)
    assert result.test_metrics["test_accuracy"] > 0.85
    assert 0.85 < result.val_metrics["val_f1"] <= 1.0
    assert len(result.history) == result.epochs_run
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_early_stopping_fires_and_restores_the_best_weights() -> None:
    result = run(
        make_spec(max_epochs=200, early_stopping_patience=3, scheduler="none"), learning_rate=0.01
    )
    assert result.stopped_early
    assert result.epochs_run < 200
    assert result.best_epoch == result.epochs_run - 3
    values = [r.value for r in result.history]
    assert result.value == max(values)
    # The restored network scores exactly the best epoch's validation value.
    assert result.val_metrics["val_accuracy"] == pytest.approx(result.value)


def test_same_spec_params_and_seed_give_the_same_result() -> None:
    spec = make_spec(max_epochs=4)
    first, second = run(spec, dropout=0.3), run(spec, dropout=0.3)
    assert first.history == second.history
    assert first.test_metrics == second.test_metrics
    other_seed = run(make_spec(max_epochs=4, seed=1), dropout=0.3)
    assert other_seed.history != first.history


def test_learning_rate_10_is_caught_as_divergence() -> None:
    result = run(make_spec(max_epochs=10), learning_rate=10.0)
    assert result.diverged
    assert result.epochs_run == 1
    assert result.history == []  # the exploded epoch is not reported
    # Told the untrained network's value (chance is 0.1 on ten classes), not the exploded
    # network's lucky accuracy.
    assert result.best_epoch == 0
    assert result.value < 0.3


def test_nan_loss_stops_at_once_with_a_finite_value() -> None:
    spec = make_spec(max_epochs=10, optimizer="sgd", grad_clip_norm=None)
    result = run(spec, learning_rate=10.0)
    assert result.diverged
    assert result.epochs_run <= 2
    assert torch.isfinite(torch.tensor(result.value))


def test_pruning_raises_trial_pruned_and_records_the_epochs() -> None:
    spec = make_spec(max_epochs=10)
    data = load_dataset(spec)
    # A threshold no accuracy can reach prunes every trial at its first report.
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=1.01)
    )
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        objective(trial, spec, data)
    assert trial.user_attrs["epochs"] == 1
    assert trial.user_attrs["diagnosis"] == "pruned"
    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    assert study.trials[0].intermediate_values.keys() == {1}


def test_regression_reports_metrics_in_the_targets_units() -> None:
    result = run(make_spec("diabetes", max_epochs=60), learning_rate=3e-3)
    rmse = result.val_metrics["val_rmse"]
    assert 30 < rmse < 80  # the target spans 25..346; predicting the mean gives about 77
    assert result.val_metrics["val_r2"] > 0.2
    assert result.val_metrics["val_mae"] < rmse


def test_multilabel_trains_with_bce() -> None:
    spec = parse_spec(
        {
            "name": "multi",
            "dataset": {
                "source": "synthetic",
                "task": "multilabel",
                "n_samples": 600,
                "n_features": 20,
                "n_classes": 4,
            },
            "training": {"max_epochs": 15},
            "budget": {"n_trials": 1},
        }
    )
    result = run(spec, learning_rate=3e-3)
    assert spec.objective.metric == "val_f1"
    assert 0.5 < result.value <= 1.0
    assert 0.0 <= result.val_metrics["val_accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("optimizer", "scheduler"),
    [
        ("adam", "plateau"),
        ("adamw", "cosine"),
        ("sgd", "step"),
        ("rmsprop", "exponential"),
        ("sgd", "none"),
    ],
)
def test_every_optimizer_and_scheduler_learns(optimizer: str, scheduler: str) -> None:
    spec = make_spec("iris", max_epochs=30, optimizer=optimizer, scheduler=scheduler, batch_size=16)
    lr = 0.05 if optimizer == "sgd" else 0.01
    result = run(spec, learning_rate=lr)
    assert result.value > 0.7
    lrs = [r.lr for r in result.history]
    if scheduler in ("cosine", "exponential"):
        assert lrs[-1] < lrs[0]
    if scheduler == "none":
        assert set(lrs) == {lr}


@pytest.mark.parametrize("init", ["he", "xavier", "orthogonal", "default"])
def test_mlp_layers_and_inits(init: str) -> None:
    torch.manual_seed(0)
    model = build_mlp(
        64, 10, [256, 32], activation="tanh", init=init, batch_norm=True, dropout=0.25
    )
    kinds = [type(m) for m in model]
    assert kinds == [
        nn.Linear, nn.BatchNorm1d, nn.Tanh, nn.Dropout,
        nn.Linear, nn.BatchNorm1d, nn.Tanh, nn.Dropout,
        nn.Linear,
    ]  # fmt: skip
    assert model(torch.randn(8, 64)).shape == (8, 10)
    first = model[0]
    if init != "default":
        assert torch.count_nonzero(first.bias) == 0
    if init == "orthogonal":
        gram = (
            first.weight.T @ first.weight
        )  # 256 x 64: the columns are orthogonal, scaled by the gain
        assert torch.allclose(gram, (5 / 3) ** 2 * torch.eye(64), atol=1e-4)
    if init == "he":
        assert first.weight.std().item() == pytest.approx(5 / 3 / 8, rel=0.1)  # gain/sqrt(fan_in)


def test_searched_depth_and_width_shape_the_network() -> None:
    spec = make_spec()
    config = TrialConfig.from_spec(spec, {"n_layers": 3, "hidden_units": 17, "dropout": 0.1})
    assert config.hidden == (17, 17, 17)
    assert config.dropout == 0.1
    assert TrialConfig.from_spec(spec, {}).hidden == (128,)
