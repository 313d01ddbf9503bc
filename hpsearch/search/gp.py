"""Optuna's Gaussian-process sampler, taught by pruned trials as well as complete ones.

Optuna's `GPSampler` fits its GP on COMPLETE trials only and counts only those towards its
start-up trials. Beside a pruner it learns from few trials and samples at random until
`n_startup_trials` of them have completed. On bench/lcbench.py's development tasks (12 tasks
x 6 seeds, 30 trials, the median pruner) its mean regret was 0.205 ± 0.023, random search's
with the same pruner 0.237; shown each pruned trial as complete at its last reported value,
as `bayes` tells its own GP (`hpsearch.search.bayes._objective_value` says what that was
measured against), 0.081 ± 0.014 (gp without a pruner: 0.032). At equal epochs (40% of 30
full trials) 0.157 ± 0.020 against 0.228 ± 0.021.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState


class PrunedAwareGPSampler(optuna.samplers.GPSampler):
    """`GPSampler` that sees each pruned trial as complete, valued at its last report.

    Only what the GP reads changes: the study's trials, their states in storage, and what
    every other sampler or pruner sees stay as they are.
    """

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return super().infer_relative_search_space(_PrunedAsComplete(study), trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return super().sample_relative(_PrunedAsComplete(study), trial, search_space)


class _PrunedAsComplete:
    """A study whose pruned trials with a reported value read as complete ones.

    `GPSampler` reads trials through `Study._get_trials`; everything else is the study's own.
    """

    def __init__(self, study: Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        """The trials in `states` (all when None), pruned ones that reported a value read
        as complete wherever complete ones are asked for."""
        if states is not None and TrialState.COMPLETE not in states:
            return self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        asked = None if states is None else (*states, TrialState.PRUNED)  # type: ignore[misc]
        trials = self._study._get_trials(deepcopy=deepcopy, states=asked, use_cache=use_cache)
        seen = []
        for trial in trials:
            reported = last_report(trial) if trial.state == TrialState.PRUNED else None
            if reported is not None:
                seen.append(_as_complete(trial, reported))
            elif states is None or trial.state in states:
                seen.append(trial)
        return seen


def last_report(trial: FrozenTrial) -> float | None:
    """The value a trial reported for its last step (the highest step, whatever the order of
    the calls), or None if it reported none: what both GP samplers learn from a pruned trial."""
    if not trial.intermediate_values:
        return None
    return trial.intermediate_values[max(trial.intermediate_values)]


def _as_complete(trial: FrozenTrial, value: float) -> FrozenTrial:
    """A copy of a pruned trial, complete with `value`."""
    view = copy.copy(trial)
    view.state = TrialState.COMPLETE
    view.value = value
    return view
