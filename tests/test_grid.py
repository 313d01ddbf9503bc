"""Grid studies: every point trained exactly once, whatever the budget and the number of
workers, and the study completed once the grid is spent."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.runtime.trials import TrialContext, claim_trial, hand_back, open_study
from hpsearch.search.pruning import StudyPruning
from hpsearch.service import results
from hpsearch.service.studies import (
    StudyState,
    change_state,
    get_study,
    mark_completed_if_done,
    submit_study,
)
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage
from tests.conftest import run_cli, write_spec

LEARNING_RATES = [0.01, 0.1]
BATCH_SIZES = [16, 32]
POINTS = set(itertools.product(LEARNING_RATES, BATCH_SIZES))  # a grid of 4


def grid_spec(name: str, n_trials: int) -> dict[str, Any]:
    return {
        "name": name,
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [4]},
        "search_space": {
            "learning_rate": {"choices": LEARNING_RATES},
            "batch_size": {"choices": BATCH_SIZES},
        },
        "training": {"max_epochs": 1},
        "sampler": {"name": "grid"},
        "budget": {"n_trials": n_trials},
    }


def point(trial: optuna.trial.FrozenTrial | optuna.Trial) -> tuple[float, int]:
    return trial.params["learning_rate"], trial.params["batch_size"]


def submitted(tmp_path: Path, n_trials: int) -> tuple[str, StudyState, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    store = Store.open(url)
    state = submit_study(store, parse_spec(grid_spec("grid", n_trials)))
    return url, state, open_study(state, store)


def claim_all(study: optuna.Study, state: StudyState, url: str) -> list[optuna.Trial]:
    """Claim until the study gives no more trials (with a bound, should it never stop)."""
    claimed = []
    store = Store.open(url)
    while (claim := claim_trial(study, state, store)) is not None and len(claimed) < 10:
        claimed.append(claim.trial)
    return claimed


# --- claims, in one process ------------------------------------------------------------


def test_a_failed_point_is_trained_again_and_no_point_twice(tmp_path: Path) -> None:
    url, state, study = submitted(tmp_path, n_trials=4)
    store = Store.open(url)
    failed = claim_trial(study, state, store).trial
    study.tell(failed, state=TrialState.FAIL)  # frees its point, as it frees its budget
    claimed = claim_all(study, state, url)
    assert sorted(map(point, claimed)) == sorted(POINTS)
    assert point(claimed[-1]) == point(failed)  # points never tried come first


def test_claims_stop_once_every_point_is_taken_and_the_last_to_end_completes(
    tmp_path: Path,
) -> None:
    url, state, study = submitted(tmp_path, n_trials=6)
    claimed = claim_all(study, state, url)
    assert sorted(map(point, claimed)) == sorted(POINTS)
    store = Store.open(url)
    for i, trial in enumerate(claimed):
        assert get_study(store, "grid").state == "running"
        study.tell(trial, 0.5 + i / 10)
        mark_completed_if_done(store, state)  # as a worker does after each trial
    assert get_study(store, "grid").state == "completed"
    assert results.study_summary(store, "grid").progress.budget == 4  # the grid's size


def test_a_retried_trial_keeps_its_point(tmp_path: Path) -> None:
    url, state, study = submitted(tmp_path, n_trials=6)
    store = Store.open(url)
    first, second = claim_trial(study, state, store).trial, claim_trial(study, state, store).trial
    context = TrialContext(store, state.id, StudyPruning(store, study, state.spec))
    hand_back(study, first, context)  # failed and queued again, as a stopping worker does
    retry = claim_trial(study, state, store).trial
    assert retry.number != first.number
    assert point(retry) == point(first)
    rest = claim_all(study, state, url)
    assert sorted(map(point, [second, retry, *rest])) == sorted(POINTS)


def test_a_budget_raised_after_the_grid_is_spent_completes_the_study_again(
    tmp_path: Path,
) -> None:
    url, state, study = submitted(tmp_path, n_trials=4)
    for trial in claim_all(study, state, url):
        study.tell(trial, 0.5)
    store = Store.open(url)
    mark_completed_if_done(store, state)
    assert get_study(store, "grid").state == "completed"
    assert change_state(store, "grid", "extend", n_trials=3).state == "running"
    assert claim_trial(study, state, store) is None  # and no trial would end to complete it
    assert get_study(store, "grid").state == "completed"
    assert len(study.get_trials(deepcopy=False)) == 4


# --- `hpsearch run` end to end ---------------------------------------------------------


def run_grid(tmp_path: Path, url: str, name: str, n_trials: int, jobs: int) -> None:
    """`hpsearch run` on a grid study; it must end with exit 0 and no traceback."""
    spec = write_spec(tmp_path / f"{name}-{n_trials}.yaml", **grid_spec(name, n_trials))
    result = run_cli("run", str(spec), "--db", url, "--jobs", str(jobs), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output and "stopped early" not in output, output


def assert_trained(url: str, name: str, n_points: int) -> list[optuna.trial.FrozenTrial]:
    """The study completed with `n_points` complete trials on distinct grid points, and no
    other trial."""
    trials = optuna.load_study(study_name=name, storage=optuna_storage(url)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_points
    points = [point(t) for t in trials]
    assert len(set(points)) == n_points and set(points) <= POINTS
    store = Store.open(url)
    assert get_study(store, name).state == "completed"
    return trials


@pytest.mark.timeout(900)
@pytest.mark.parametrize("jobs", [1, 2])
@pytest.mark.system
def test_grid_runs_end_cleanly_below_at_and_above_the_grid_size(tmp_path: Path, jobs: int) -> None:
    url = f"sqlite:///{tmp_path / 'grid.db'}"
    run_grid(tmp_path, url, "above", n_trials=6, jobs=jobs)
    assert_trained(url, "above", n_points=4)  # the grid is spent: the study ends there
    run_grid(tmp_path, url, "below", n_trials=3, jobs=jobs)
    before = assert_trained(url, "below", n_points=3)
    run_grid(tmp_path, url, "below", n_trials=4, jobs=jobs)  # its budget raised to the grid
    after = assert_trained(url, "below", n_points=4)
    assert [point(t) for t in after[:3]] == [point(t) for t in before]


@pytest.mark.postgres
@pytest.mark.timeout(600)
@pytest.mark.system
def test_grid_run_on_postgres_with_two_workers(tmp_path: Path, postgres_url: str) -> None:
    run_grid(tmp_path, postgres_url, "grid-pg", n_trials=5, jobs=2)
    assert_trained(postgres_url, "grid-pg", n_points=4)
