"""A study's advice proposes only what the spec accepts: every proposed change, applied,
validates; a bound at the spec's own limit (n_layers at 1, dropout at 0, hidden_units at
MAX_UNITS, a grid at its size limit) is never offered for widening; and every field a
sentence names exists in the study's spec."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from hpsearch.errors import SpecError
from hpsearch.service.diagnosis import Diagnosis, TrialFacts, advise, study_advice, with_change
from hpsearch.spec import (
    INTEGER_KEYS,
    MAX_BATCH_SIZE,
    MAX_LAYERS,
    MAX_UNITS,
    StudySpec,
    load_spec,
    parse_spec,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WIDEN = re.compile(r"widen search_space\.(\w+) past (\S+?)(?:, e\.g\. (low|high): (\S+?))?\.?$")
FIELD_NAMED = re.compile(r"\b(search_space|training|model)\.(\w+)")


def spec_with(space: dict[str, Any], **sections: Any) -> StudySpec:
    return parse_spec(
        {
            "name": "advice",
            "dataset": {"source": "builtin", "name": "diabetes"},
            "search_space": space,
            "budget": {"n_trials": 30},
        }
        | sections
    )


def best_at(key: str, best: Any, rest: Any, n_best: int = 4, n_rest: int = 12) -> list[Any]:
    """Trials of a minimized objective (the RMSE) whose best ones have `key` at `best`."""
    trials = [TrialFacts({key: best}, 1.0 + i, "ok", 5) for i in range(n_best)]
    return trials + [TrialFacts({key: rest}, 100.0 + i, "ok", 5) for i in range(n_rest)]


def assert_applicable(spec: StudySpec, trials: list[TrialFacts]) -> list[Any]:
    """Every proposed change validates and shows in its sentence; every named field exists."""
    items = study_advice(trials, spec)
    for item in items:
        changed = with_change(spec, item.change)  # raises where the spec refuses it
        for path, value in item.change.items():
            assert _shown(value) in item.text, item
            assert _at(changed.model_dump(), path) == value
        assert_names_existing_fields(spec, item.text)
    assert advise(trials, spec) == [item.text for item in items]
    return items


def assert_names_existing_fields(spec: StudySpec, text: str) -> None:
    for section, name in FIELD_NAMED.findall(text):
        if section == "search_space":
            assert getattr(spec.search_space, name) is not None, text
        else:
            assert name in type(getattr(spec, section)).model_fields, text


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _at(data: Any, path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def widened(items: list[Any], key: str) -> list[dict[str, Any]]:
    return [item.change for item in items if f"widen search_space.{key} " in item.text]


# --- the example that showed it ------------------------------------------------------------


def test_every_widening_the_diabetes_example_is_told_of_is_one_the_spec_accepts() -> None:
    spec = load_spec(EXAMPLES / "diabetes-regression.yaml")
    trials = [
        TrialFacts({"n_layers": 1, "hidden_units": 128, "weight_decay": 1e-6}, 50.0 + i, "ok", 9)
        for i in range(4)
    ]
    trials += [
        TrialFacts({"n_layers": 3, "hidden_units": 20, "weight_decay": 1e-3}, 90.0 + i, "ok", 9)
        for i in range(12)
    ]
    advice = advise(trials, spec)
    widenings = [m for m in map(WIDEN.search, advice) if m]
    assert {m[1] for m in widenings} == {"hidden_units", "weight_decay"}, advice
    for match in widenings:
        key, bound = match[1], float(match[2])
        side = "low" if bound == getattr(spec.search_space, key).low else "high"
        value = float(match[4]) if match[4] else bound + (1 if side == "high" else -1)
        data = spec.model_dump(mode="json")
        data["search_space"][key][side] = int(value) if key in INTEGER_KEYS else value
        try:
            parse_spec(data)
        except SpecError as exc:
            pytest.fail(f"{match[0]!r} leads to a refused spec: {exc}")


# --- each bound of the spec ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("space", "key", "best", "rest"),
    [
        ({"n_layers": {"low": 1, "high": 3}}, "n_layers", 1, 3),
        ({"n_layers": {"low": 2, "high": MAX_LAYERS}}, "n_layers", MAX_LAYERS, 2),
        ({"hidden_units": {"low": 1, "high": 64, "log": True}}, "hidden_units", 1, 64),
        ({"hidden_units": {"low": 8, "high": MAX_UNITS}}, "hidden_units", MAX_UNITS, 8),
        ({"batch_size": {"low": 1, "high": 512}}, "batch_size", 1, 512),
        ({"batch_size": {"low": 16, "high": MAX_BATCH_SIZE}}, "batch_size", MAX_BATCH_SIZE, 16),
        ({"dropout": {"low": 0.0, "high": 0.5}}, "dropout", 0.0, 0.5),
        ({"momentum": {"low": 0.0, "high": 0.9}}, "momentum", 0.0, 0.9),
        ({"weight_decay": {"low": 0.0, "high": 0.1}}, "weight_decay", 0.0, 0.1),
    ],
)
def test_a_bound_at_the_specs_limit_is_not_offered_for_widening(
    space: dict[str, Any], key: str, best: Any, rest: Any
) -> None:
    spec = spec_with(space)
    items = assert_applicable(spec, best_at(key, best, rest))
    assert widened(items, key) == []


@pytest.mark.parametrize(
    ("space", "key", "best", "rest", "change"),
    [
        ({"n_layers": {"low": 1, "high": 3}}, "n_layers", 3, 1, {"high": 5}),
        ({"n_layers": {"low": 2, "high": 60}}, "n_layers", 60, 2, {"high": MAX_LAYERS}),
        ({"n_layers": {"low": 2, "high": 3}}, "n_layers", 2, 3, {"low": 1}),
        ({"hidden_units": {"low": 8, "high": 128, "log": True}}, "hidden_units", 8, 128,
         {"low": 1}),
        ({"dropout": {"low": 0.0, "high": 0.5}}, "dropout", 0.5, 0.0, {"high": 0.75}),
        ({"dropout": {"low": 0.1, "high": 0.5, "step": 0.1}}, "dropout", 0.5, 0.1, {"high": 0.9}),
        ({"momentum": {"low": 0.5, "high": 0.99}}, "momentum", 0.99, 0.5, {"high": 0.998}),
        ({"learning_rate": {"low": 0.01, "high": 0.1}}, "learning_rate", 0.01, 0.1,
         {"low": 0.0044}),
        ({"weight_decay": {"low": 1e-8, "high": 1e-2, "log": True}}, "weight_decay", 1e-8, 1e-2,
         {"low": 1e-9}),
        ({"grad_clip_norm": {"low": 0.5, "high": 10}}, "grad_clip_norm", 0.5, 10, {"low": 0.2}),
    ],
)  # fmt: skip
def test_a_bound_inside_the_specs_limits_is_widened_within_them(
    space: dict[str, Any], key: str, best: Any, rest: Any, change: dict[str, Any]
) -> None:
    spec = spec_with(space)
    items = assert_applicable(spec, best_at(key, best, rest))
    assert widened(items, key) == [{f"search_space.{key}.{k}": v for k, v in change.items()}]


def test_a_grid_at_its_size_limit_is_not_offered_for_widening() -> None:
    space = {"hidden_units": {"low": 1, "high": 50_000}, "n_layers": {"low": 1, "high": 2}}
    spec = spec_with(space, sampler={"name": "grid"})  # 100,000 points: the limit
    trials = [
        TrialFacts({"hidden_units": 50_000, "n_layers": 2}, 1.0 + i, "ok", 5) for i in range(4)
    ]
    trials += [TrialFacts({"hidden_units": 1, "n_layers": 1}, 9.0 + i, "ok", 5) for i in range(8)]
    assert [item.text for item in assert_applicable(spec, trials) if "widen" in item.text] == []


def test_diverging_learning_rates_from_the_ranges_low_move_the_whole_range_lower() -> None:
    spec = spec_with({"learning_rate": {"low": 0.1, "high": 10, "log": True}})
    trials = [TrialFacts({"learning_rate": lr}, None, "diverged", 1) for lr in (0.1, 0.5, 2, 9)]
    trials += [TrialFacts({"learning_rate": 0.3}, 50.0, "ok", 3)]
    items = assert_applicable(spec, trials)
    path = "search_space.learning_rate"
    assert items[0].change == {f"{path}.low": 0.01, f"{path}.high": 0.1}, items


def test_diverging_learning_rates_among_choices_keep_the_choices_under_them() -> None:
    spec = spec_with({"learning_rate": {"choices": [0.001, 0.01, 0.1, 1.0]}})
    trials = [TrialFacts({"learning_rate": lr}, 50.0, "ok", 3) for lr in (0.001, 0.01)]
    trials += [TrialFacts({"learning_rate": lr}, None, "diverged", 1) for lr in (0.1, 1.0, 1.0)]
    items = assert_applicable(spec, trials)
    assert items[0].change == {"search_space.learning_rate.choices": [0.001, 0.01]}, items


def test_diagnosis_advice_names_only_the_cures_the_spec_does_not_use() -> None:
    spec = spec_with(
        {},
        model={"hidden": [64], "activation": "relu", "init": "he", "batch_norm": True},
        training={"grad_clip_norm": None, "scheduler": "none"},
    )
    kinds = ("vanishing_gradients", "oscillating", "oscillating")
    trials = [TrialFacts({}, 50.0, kind, 1) for kind in kinds]
    trials += [TrialFacts({}, 50.0, "early_stopped", 1) for _ in range(3)]
    advice = [item.text for item in assert_applicable(spec, trials)]
    assert advice[0].startswith("3 of 6 trials stopped early"), advice
    assert "lower training.learning_rate or use a scheduler (training.scheduler)." in advice[0]
    vanishing = next(a for a in advice if "vanishing" in a)
    assert vanishing.endswith("the loss flat).")  # relu, he, batch norm and one layer already
    oscillating = next(a for a in advice if "oscillate" in a)
    assert oscillating.endswith("or clip gradients (training.grad_clip_norm).")


# --- any search space, at its bounds or not ------------------------------------------------

EDGES: dict[str, list[float]] = {
    "learning_rate": [1e-12, 1e-4, 0.01, 1.0, 10.0],
    "batch_size": [1, 2, 64, MAX_BATCH_SIZE - 1, MAX_BATCH_SIZE],
    "dropout": [0.0, 0.1, 0.5, 0.99, 0.999999],
    "weight_decay": [0.0, 1e-8, 1e-3, 0.1, 10.0],
    "momentum": [0.0, 0.5, 0.9, 0.999],
    "grad_clip_norm": [1e-6, 0.5, 5.0, 100.0],
    "n_layers": [1, 2, 3, MAX_LAYERS - 1, MAX_LAYERS],
    "hidden_units": [1, 2, 8, 128, MAX_UNITS - 1, MAX_UNITS],
}


@st.composite
def dimensions(draw: st.DrawFn, key: str) -> dict[str, Any]:
    low, high = sorted(draw(st.lists(st.sampled_from(EDGES[key]), min_size=2, max_size=2)))
    assume(low < high)
    dim: dict[str, Any] = {"low": low, "high": high, "log": low > 0 and draw(st.booleans())}
    if not dim["log"] and draw(st.booleans()):
        steps = draw(st.integers(1, 20))
        dim["step"] = max(1, (high - low) // steps) if key in INTEGER_KEYS else (high - low) / steps
    return dim


@st.composite
def studies(draw: st.DrawFn) -> tuple[StudySpec, list[TrialFacts]]:
    keys = draw(st.lists(st.sampled_from(sorted(EDGES)), min_size=1, max_size=3, unique=True))
    space = {key: draw(dimensions(key)) for key in keys}
    try:
        spec = spec_with(
            space,
            sampler={"name": draw(st.sampled_from(["tpe", "grid"]))},
            model={
                "hidden": [32] * draw(st.integers(1, 3)),
                "activation": draw(st.sampled_from(["relu", "tanh", "sigmoid"])),
                "init": draw(st.sampled_from(["he", "xavier"])),
                "batch_norm": draw(st.booleans()),
            },
            training={
                "scheduler": draw(st.sampled_from(["none", "plateau"])),
                "grad_clip_norm": draw(st.sampled_from([None, 1.0])),
            },
        )
    except SpecError:
        assume(False)
    return spec, draw(st.lists(trials(space), min_size=5, max_size=25))


@st.composite
def trials(draw: st.DrawFn, space: dict[str, Any]) -> TrialFacts:
    params = {}
    for key, dim in space.items():
        low, high = dim["low"], dim["high"]
        value = draw(st.sampled_from([low, high, low + (high - low) / 2]))
        params[key] = round(value) if key in INTEGER_KEYS else value
    diagnosis = draw(st.sampled_from(Diagnosis.__args__))
    value = None if diagnosis in ("diverged", "crashed") else draw(st.floats(0, 100))
    return TrialFacts(params, value, diagnosis, draw(st.integers(1, 5)))


@given(studies())
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_advice_on_any_search_space_is_applicable(
    study: tuple[StudySpec, list[TrialFacts]],
) -> None:
    spec, facts = study
    for item in assert_applicable(spec, facts):
        for path, value in item.change.items():
            key, side = path.split(".")[1:]
            old = getattr(getattr(spec.search_space, key), side)
            if "widen" in item.text:
                assert value > old if side == "high" else value < old, item


def test_a_refused_change_raises() -> None:
    spec = spec_with({"n_layers": {"low": 1, "high": 3}})
    with pytest.raises(ValidationError):
        with_change(spec, {"search_space.n_layers.low": 0})
