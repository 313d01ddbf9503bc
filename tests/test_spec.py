"""The study spec: what it accepts, what it infers, and the field path of every rejection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hpsearch.errors import SpecError
from hpsearch.spec import StudySpec, load_spec, parse_spec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def minimal(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "digits-test",
        "dataset": {"source": "builtin", "name": "digits"},
        "budget": {"n_trials": 5},
    }
    spec.update(overrides)
    return spec


def rejection(**overrides: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as caught:
        parse_spec(minimal(**overrides))
    return caught.value.errors


def test_minimal_spec_fills_defaults_from_the_task() -> None:
    spec = parse_spec(minimal())
    assert spec.task == "classification"
    assert spec.objective.metric == "val_accuracy"
    assert spec.objective.direction == "maximize"
    assert spec.training.max_epochs == 50
    assert spec.sampler.name == "gp"  # measured in bench/lcbench.py
    assert spec.sampler.n_startup_trials == 5
    assert spec.pruner.name == "none"
    assert parse_spec(minimal(pruner={"name": "median"})).pruner.n_warmup_steps == 5


@pytest.mark.parametrize(
    ("sampler", "startup"),
    [
        ({"name": "tpe"}, 5),
        ({"name": "bayes"}, 5),
        ({"name": "gp"}, 5),
        ({"name": "cmaes"}, 10),
        ({"name": "gp", "n_startup_trials": 3}, 3),  # a given count is kept
        ({"name": "tpe", "n_startup_trials": 0}, 0),
    ],
)
def test_start_up_trials_default_by_sampler(sampler: dict[str, Any], startup: int) -> None:
    assert parse_spec(minimal(sampler=sampler)).sampler.n_startup_trials == startup


@pytest.mark.parametrize(
    ("pruner", "factor"),
    [
        ({"name": "hyperband"}, 4),  # measured in bench/search_quality.py (Pruning)
        ({"name": "sha"}, 3),
        ({"name": "none"}, 3),
        ({"name": "hyperband", "reduction_factor": 3}, 3),  # a given factor is kept
        ({"name": "sha", "reduction_factor": 5}, 5),
    ],
)
def test_reduction_factor_defaults_per_pruner(pruner: dict[str, Any], factor: int) -> None:
    spec = parse_spec(minimal(pruner=pruner))
    assert spec.pruner.reduction_factor == factor
    assert parse_spec(json.loads(spec.model_dump_json())).pruner.reduction_factor == factor


def test_reduction_factor_below_two_is_rejected() -> None:
    assert rejection(pruner={"name": "hyperband", "reduction_factor": 1})[0][0] == (
        "pruner.reduction_factor"
    )


def test_regression_defaults_to_rmse_minimised() -> None:
    spec = parse_spec(minimal(dataset={"source": "builtin", "name": "diabetes"}))
    assert (spec.task, spec.objective.metric, spec.objective.direction) == (
        "regression",
        "val_rmse",
        "minimize",
    )


@pytest.mark.parametrize(
    ("overrides", "path", "reason"),
    [
        (
            {"search_space": {"learning_rate": {"low": 0.1, "high": 0.01}}},
            "search_space.learning_rate",
            "low (0.1) must be < high (0.01)",
        ),
        (
            {"search_space": {"dropout": {"low": 0.5, "high": 0.5}}},
            "search_space.dropout",
            "must be < high",
        ),
        (
            {"search_space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}},
            "search_space.learning_rate",
            "log scale needs low > 0",
        ),
        (
            {"search_space": {"weight_decay": {"low": -1, "high": 1, "log": True}}},
            "search_space.weight_decay",
            "log scale needs low > 0",
        ),
        (
            {"search_space": {"batch_size": {"low": 16.5, "high": 64}}},
            "search_space.batch_size",
            "whole numbers",
        ),
        (
            {"search_space": {"batch_size": {"choices": [32, 48.5]}}},
            "search_space.batch_size",
            "whole numbers",
        ),
        (
            {"search_space": {"dropout": {"low": 0.2, "high": 1.0}}},
            "search_space.dropout",
            "dropout must be < 1",
        ),
        (
            {"search_space": {"dropout": {"low": -0.1, "high": 0.5}}},
            "search_space.dropout",
            "dropout must be >= 0",
        ),
        ({"training": {"dropout": 1.0}}, "training.dropout", "less than 1"),
        ({"training": {"batch_size": 12.5}}, "training.batch_size", "integer"),
        (
            {
                "dataset": {"source": "builtin", "name": "diabetes"},
                "objective": {"metric": "val_accuracy"},
            },
            "objective.metric",
            "val_accuracy does not fit a regression task",
        ),
        (
            {"objective": {"metric": "val_rmse"}},
            "objective.metric",
            "does not fit a classification",
        ),
        (
            {"objective": {"metric": "val_loss", "direction": "maximize"}},
            "objective",
            "val_loss is to minimize",
        ),
        ({"sampler": {"name": "annealing"}}, "sampler.name", "'tpe'"),
        ({"pruner": {"name": "asha"}}, "pruner.name", "'hyperband'"),
        ({"dataset": {"source": "builtin", "name": "cifar10"}}, "dataset.name", "'digits'"),
        ({"dataset": {"source": "ftp", "name": "x"}}, "dataset", "source"),
        ({"name": "Digits Study"}, "name", "must start with a lower-case letter"),
        ({"name": "1digits"}, "name", "must start with a lower-case letter"),
        ({"name": "x" * 65}, "name", "at most 64"),
        (
            {"search_space": {"optimizer": {"choices": ["adam", "lbfgs"]}}},
            "search_space.optimizer",
            "lbfgs",
        ),
        (
            {"search_space": {"optimizer": {"low": 1, "high": 2}}},
            "search_space.optimizer",
            "categorical",
        ),
        (
            {"search_space": {"epochs": {"low": 1, "high": 2}}},
            "search_space.epochs",
            "Extra inputs",
        ),
        (
            {"search_space": {"learning_rate": {"low": 0.1}}},
            "search_space.learning_rate",
            "needs both",
        ),
        ({"colour": "blue"}, "colour", "Extra inputs are not permitted"),
        ({"training": {"precision": "fp16"}}, "training.precision", "'bf16'"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials", "greater than or equal to 1"),
        (
            {"sampler": {"name": "grid"}, "search_space": {"dropout": {"low": 0.1, "high": 0.5}}},
            "search_space.dropout",
            "grid sampler needs a finite set",
        ),
        (
            {"dataset": {"source": "file", "path": "data.xlsx", "target": "y"}},
            "dataset.path",
            "not a .csv, .parquet or .npz",
        ),
        ({"task": "regression"}, "task", "digits is a classification data set"),
        ({"split": {"val": 0.5, "test": 0.45}}, "split", "leaves under 10%"),
    ],
)
def test_invalid_specs_name_the_field_and_the_reason(
    overrides: dict[str, Any], path: str, reason: str
) -> None:
    errors = rejection(**overrides)
    assert any(p == path and reason in r for p, r in errors), errors


def test_every_error_is_reported_at_once() -> None:
    errors = rejection(name="Bad", budget={"n_trials": -1}, sampler={"name": "x"})
    assert {p for p, _ in errors} >= {"name", "budget.n_trials", "sampler.name"}


def test_file_dataset_task_is_implied_by_metric_or_target_list() -> None:
    by_metric = parse_spec(
        minimal(
            dataset={"source": "file", "path": "d.csv", "target": "y"},
            objective={"metric": "val_r2"},
        )
    )
    assert by_metric.task == "regression"
    multilabel = parse_spec(
        minimal(dataset={"source": "file", "path": "d.csv", "target": ["a", "b"]})
    )
    assert multilabel.task == "multilabel"
    assert multilabel.objective.metric == "val_f1"
    undecided = parse_spec(minimal(dataset={"source": "file", "path": "d.csv", "target": "y"}))
    assert undecided.task is None and undecided.objective is None
    assert undecided.with_task("classification").objective.metric == "val_accuracy"


def test_grid_accepts_choices_steps_and_integer_ranges() -> None:
    spec = parse_spec(
        minimal(
            sampler={"name": "grid"},
            search_space={
                "batch_size": {"low": 32, "high": 64, "step": 32},
                "dropout": {"low": 0.0, "high": 0.4, "step": 0.2},
                "optimizer": {"choices": ["adam", "sgd"]},
            },
        )
    )
    dims = spec.search_space.dimensions()
    assert dims["batch_size"].values() == [32, 64]
    assert dims["dropout"].values() == pytest.approx([0.0, 0.2, 0.4])


def test_yaml_and_json_files_load_to_the_same_spec(tmp_path: Path) -> None:
    from_yaml = load_spec(EXAMPLES / "digits.yaml")
    json_file = tmp_path / "digits.json"
    json_file.write_text(json.dumps(from_yaml.model_dump(mode="json")))
    assert load_spec(json_file) == from_yaml


def test_every_example_is_valid() -> None:
    specs = [load_spec(p) for p in sorted(EXAMPLES.glob("*.yaml"))]
    assert len(specs) >= 4
    assert len({s.name for s in specs}) == len(specs)


def test_unreadable_and_malformed_files_are_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(scalar)


def test_spec_round_trips_through_json() -> None:
    spec = load_spec(EXAMPLES / "diabetes-regression.yaml")
    assert StudySpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize(
    ("pruner", "max_epochs", "first_rung"),
    [
        ({"name": "hyperband"}, 52, 3),  # a sixteenth of max_epochs
        ({"name": "hyperband"}, 10, 1),  # at least 1
        ({"name": "hyperband", "min_resource": 2}, 52, 2),  # a given rung is kept
        ({"name": "sha"}, 52, 1),
    ],
)
def test_the_first_rung_defaults_by_pruner(
    pruner: dict[str, Any], max_epochs: int, first_rung: int
) -> None:
    spec = parse_spec(minimal(pruner=pruner, training={"max_epochs": max_epochs}))
    assert spec.pruner.min_resource == first_rung
    parse_spec(minimal())  # resolves the shared default pruner's rung on a copy
    assert StudySpec.model_fields["pruner"].default.min_resource is None
