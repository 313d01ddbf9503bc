"""Pruning decisions for a worker, at a cost that does not grow with the study.

Optuna's median and percentile pruners read every completed trial of the study at each
`should_prune` (`study.get_trials`) and take a percentile of their values at the step: at
10,000 completed trials that is about 10 ms per epoch, more than training a small network
for one. A worker instead keeps, per study, the completed trials' values at each step sorted
in memory (`CompletedCurves`). It catches up with the database at the first decision of
each trial and then at most every `REFRESH_S`, reading only the trials it has not seen
finish, and adds the trials it completes itself at once; a decision is then a lookup.

The decisions are Optuna's (the same startup trials, warm-up steps and percentile with
NumPy's linear interpolation, NaN left out), on a view of other workers' trials at most
`REFRESH_S` old: a trial finishing elsewhere meanwhile is seen at the next catch-up, as in
any distributed Optuna study. Other pruners (sha, hyperband, none) go through Optuna.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import defaultdict

import optuna
from optuna.trial import TrialState

from hpsearch.spec import PrunerSpec
from storage import session_scope, with_retries
from storage.queries import reported_values, trials_since

REFRESH_S = 2.0  # how stale the view of other workers' completed trials may grow
PERCENTILE_PRUNERS = ("median", "percentile")
UNFINISHED = (TrialState.RUNNING, TrialState.WAITING)


class CompletedCurves:
    """The values each completed trial reported, per step, kept sorted (NaN left out)."""

    def __init__(self) -> None:
        self.count = 0  # completed trials added
        self._by_step: dict[int, list[float]] = defaultdict(list)

    def add(self, curve: dict[int, float]) -> None:
        self.count += 1
        for step, value in curve.items():
            if not math.isnan(value):
                bisect.insort(self._by_step[step], value)

    def percentile(self, step: int, q: float) -> float:
        """`numpy.nanpercentile(values at step, q)` with its default linear method; NaN
        when no completed trial reported a number at this step."""
        values = self._by_step.get(step)
        if not values:
            return math.nan
        quantile = q / 100
        n = len(values)
        virtual = n * quantile + (1 - quantile) - 1  # NumPy's index arithmetic, as written
        below = min(max(math.floor(virtual), 0), n - 1)
        above = min(below + 1, n - 1)
        return _lerp(values[below], values[above], virtual - below)


def _lerp(a: float, b: float, t: float) -> float:
    """NumPy's interpolation between neighbours (exact at both ends)."""
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def percentile_prunes(
    pruner: PrunerSpec, maximize: bool, completed: CompletedCurves, curve: dict[int, float]
) -> bool:
    """What Optuna's MedianPruner or PercentilePruner, built from `pruner`, answers for a
    trial that reported `curve` ({step: value}), given the study's completed trials."""
    if completed.count == 0 or completed.count < pruner.n_startup_trials or not curve:
        return False
    step = max(curve)
    if step < pruner.n_warmup_steps:
        return False
    finite = [value for value in curve.values() if not math.isnan(value)]
    if not finite:
        return True
    best = max(finite) if maximize else min(finite)
    q = 50.0 if pruner.name == "median" else pruner.percentile
    threshold = completed.percentile(step, 100 - q if maximize else q)
    if math.isnan(threshold):
        return False
    return best < threshold if maximize else best > threshold


class StudyPruning:
    """A worker's pruning for one study: median and percentile decisions from its
    `CompletedCurves`, kept up to date; any other pruner asked through Optuna."""

    def __init__(self, url: str, study: optuna.Study, pruner: PrunerSpec) -> None:
        self.url = url
        self.study = study
        self.pruner = pruner
        self.completed = CompletedCurves()
        self._counted: set[int] = set()  # trial ids whose curves are in `completed`
        self._after_id = -1  # every trial up to this id was seen, finished or in _unfinished
        self._unfinished: set[int] = set()
        self._fresh_for: int | None = None  # the trial of the last catch-up ...
        self._caught_up_at = -math.inf  # ... and when it was

    def should_prune(self, trial: optuna.Trial, curve: dict[int, float]) -> bool:
        """Whether to prune `trial`, which reported `curve` so far."""
        if self.pruner.name not in PERCENTILE_PRUNERS:
            return trial.should_prune()
        if trial._trial_id != self._fresh_for or time.monotonic() - self._caught_up_at > REFRESH_S:
            with_retries(self._catch_up, url=self.url)
            self._fresh_for = trial._trial_id
        maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
        return percentile_prunes(self.pruner, maximize, self.completed, curve)

    def completed_here(self, trial_id: int, curve: dict[int, float]) -> None:
        """Count a trial this worker has just told complete, without waiting for a catch-up."""
        self._count(trial_id, curve)

    def _count(self, trial_id: int, curve: dict[int, float]) -> None:
        if trial_id not in self._counted:
            self._counted.add(trial_id)
            self.completed.add(curve)

    def _catch_up(self) -> None:
        with session_scope(self.url) as session:
            states = trials_since(session, self.study._study_id, self._after_id, self._unfinished)
            completed = [i for i, s in states.items() if s == TrialState.COMPLETE]
            curves = reported_values(session, [i for i in completed if i not in self._counted])
        for trial_id, state in states.items():
            self._after_id = max(self._after_id, trial_id)
            if state in UNFINISHED:
                self._unfinished.add(trial_id)
            else:
                self._unfinished.discard(trial_id)
        for trial_id, curve in curves.items():
            self._count(trial_id, curve)
        self._caught_up_at = time.monotonic()
