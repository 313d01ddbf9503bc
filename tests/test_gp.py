"""The gp sampler learns from pruned trials, as bayes does, and leaves them pruned."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.search.gp import PrunedAwareGPSampler, _PrunedAsComplete
from tests.test_bayes import trials_in_every_state

optuna.logging.set_verbosity(optuna.logging.WARNING)

pytestmark = pytest.mark.timeout(300)


def _bowl(trial: optuna.Trial) -> float:
    """A 2-d bowl, minimum 0 at (1, -2). Every trial but the first reports its value once
    and is pruned: a pruner that stops nearly everything."""
    x = trial.suggest_float("x", -5.0, 5.0)
    y = trial.suggest_float("y", -5.0, 5.0)
    value = (x - 1.0) ** 2 + (y + 2.0) ** 2
    trial.report(value, step=1)
    if trial.number > 0:
        raise optuna.TrialPruned()
    return value


def _best_report(
    sampler: optuna.samplers.BaseSampler, n_trials: int, storage: str | None = None
) -> float:
    study = optuna.create_study(sampler=sampler, storage=storage)
    study.optimize(_bowl, n_trials=n_trials)
    assert len(study.get_trials(states=(TrialState.PRUNED,))) == n_trials - 1
    return min(t.intermediate_values[1] for t in study.trials)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_pruned_trials_steer_the_gp(tmp_path: Path, backend: str) -> None:
    """Optuna's GPSampler sees one complete trial here and samples at random throughout;
    shown the pruned trials' reports, the GP homes in on the minimum. Workers read trials
    from a database: the view must read them there as well."""
    url = f"sqlite:///{tmp_path / 'gp.db'}" if backend == "sqlite" else None
    aware = _best_report(PrunedAwareGPSampler(seed=0, n_startup_trials=5), 25, url)
    plain = _best_report(optuna.samplers.GPSampler(seed=0, n_startup_trials=5), 25)
    assert aware < 0.05, aware
    assert plain > 4 * aware, (plain, aware)


def test_the_gp_reads_pruned_trials_as_complete_at_their_last_step() -> None:
    study = optuna.create_study(direction="maximize")
    trials_in_every_state(study)

    view = _PrunedAsComplete(study)
    complete = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert [(t.number, t.state, t.value) for t in complete] == [
        (0, TrialState.COMPLETE, 5.0),
        (1, TrialState.COMPLETE, 3.0),
    ]
    both = view._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    assert [t.number for t in both] == [0, 1, 4]
    pruned_asked = view._get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    assert [t.number for t in pruned_asked] == [1, 2]  # not asked for complete: as stored
    every = view._get_trials(deepcopy=False)
    assert [t.state for t in every] == [TrialState.COMPLETE] * 2 + [
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
    ]
    # The study itself is untouched, and so is what other samplers read.
    assert [t.state for t in study.trials][:4] == [
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.PRUNED,
        TrialState.FAIL,
    ]
    assert view.directions == study.directions
