"""Pruning decisions for a worker, at a cost that does not grow with the study.

Optuna's pruners read the study's trials at their decisions: the median and percentile
pruners every completed trial at each `should_prune` (`study.get_trials`), successive
halving every trial at each rung, and hyperband besides the trial itself and its study by
name at every epoch. At 10,000 trials that is more than training a small network for an
epoch. A worker instead keeps, per study, what those decisions compare with: the completed
trials' values at each step (`CompletedCurves`), or the values trials recorded on reaching
each rung (`RungValues`, Optuna's `completed_rung_N` system attributes), sorted in memory.
It catches up with the database at the first decision of each trial that needs the view
and then at most every `REFRESH_S`, reading only the trials it has not seen finish, and
adds what it decides itself at once; a decision is then a lookup.

The decisions are Optuna's (the same startup trials, warm-up steps and percentile with
NumPy's linear interpolation, NaN left out; the same rungs, brackets and promotion rule),
on a view of other workers' trials at most `REFRESH_S` old: a trial finishing or reaching a
rung elsewhere meanwhile is seen at the next catch-up, as in any distributed Optuna study.
A rung a trial reaches is recorded on it as Optuna records it, with the trial's next write.
"""

from __future__ import annotations

import binascii
import bisect
import math
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from hpsearch.spec import PrunerSpec, StudySpec
from hpsearch.storage import optuna_internals
from hpsearch.storage.queries import (
    RUNG_PREFIX,
    SeenTrial,
    reported_values,
    rung_values,
    trials_since,
)
from hpsearch.storage.store import Store

REFRESH_S = 2.0  # how stale the view of other workers' trials may grow
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


@dataclass(frozen=True)
class Halving:
    """The rungs of Optuna's SuccessiveHalvingPruner, or of each bracket (one successive
    halving each) of its HyperbandPruner, as `hpsearch.search.space.make_pruner` builds them."""

    min_resource: int
    reduction_factor: int
    budgets: tuple[int, ...]  # the trials allotted to each bracket, in proportion

    @classmethod
    def from_spec(cls, spec: StudySpec) -> Halving | None:
        """None for other pruners, and for hyperband without a bracket (a first rung past
        max_epochs), which never prunes, as Optuna's."""
        pruner, factor = spec.pruner, spec.pruner.reduction_factor
        assert factor is not None and pruner.min_resource is not None  # the spec's defaults
        if pruner.name == "sha":
            return cls(pruner.min_resource, factor, (1,))
        if pruner.name != "hyperband":
            return None
        # Optuna's arithmetic: floor(log_eta(max / min)) + 1 brackets, bracket b allotted
        # ceil(n * eta**s / (s + 1)) trials with s = n - 1 - b.
        ratio = spec.training.max_epochs / pruner.min_resource
        n = math.floor(math.log(ratio, factor)) + 1
        budgets = tuple(math.ceil(n * factor ** (n - 1 - b) / (n - b)) for b in range(n))
        return cls(pruner.min_resource, factor, budgets) if budgets else None

    def bracket(self, study_name: str, number: int) -> int:
        """The bracket of a trial: Optuna's hash of the study's name and the trial's number
        over the allotments."""
        left = binascii.crc32(f"{study_name}_{number}".encode()) % sum(self.budgets)
        for bracket, budget in enumerate(self.budgets):
            left -= budget
            if left < 0:
                return bracket
        raise AssertionError("unreachable: the hash is below the allotments' sum")

    def promotion_step(self, bracket: int, rung: int) -> int:
        """The step at which a trial of the bracket is judged at the rung (bracket b stops
        early at rung 0 no sooner than eta**b times the minimum resource)."""
        return self.min_resource * self.reduction_factor ** (bracket + rung)


class RungValues:
    """The value each trial recorded on reaching each rung, per (bracket, rung), sorted;
    a trial's rung is counted once, however often a catch-up reads it."""

    def __init__(self) -> None:
        self._sorted: dict[tuple[int, int], list[float]] = defaultdict(list)
        self._counted: set[tuple[int, int]] = set()  # (trial id, rung)

    def add(self, trial_id: int, bracket: int, rung: int, value: float) -> None:
        if (trial_id, rung) not in self._counted:
            self._counted.add((trial_id, rung))
            bisect.insort(self._sorted[bracket, rung], value)

    def values(self, bracket: int, rung: int) -> list[float]:
        return self._sorted.get((bracket, rung), [])


def rung_key(rung: int) -> str:
    """Optuna's system attribute holding a trial's value at the rung."""
    return f"{RUNG_PREFIX}{rung}"


def current_rung(system_attrs: Mapping[str, Any]) -> int:
    """How many rungs a trial has passed: its consecutive `completed_rung_N` attributes."""
    rung = 0
    while rung_key(rung) in system_attrs:
        rung += 1
    return rung


def halving_prunes(
    halving: Halving,
    bracket: int,
    rung: int,
    maximize: bool,
    rungs: RungValues,
    curve: dict[int, float],
) -> tuple[bool, dict[int, float]]:
    """What Optuna's SuccessiveHalvingPruner answers for a trial of `bracket` that has
    passed `rung` rungs and reported `curve`, and the rungs it reaches now, each with the
    value it records there (its latest, as Optuna's). Its competitors at a rung are the
    other trials that recorded one there, in any state."""
    if not curve:
        return False, {}
    step = max(curve)
    value = curve[step]
    reached: dict[int, float] = {}
    while step >= halving.promotion_step(bracket, rung):
        if math.isnan(value):
            return True, reached
        reached[rung] = value
        competing = list(rungs.values(bracket, rung))
        bisect.insort(competing, value)
        # The best 1 in eta go on; of the first eta - 1 competitors, only the best.
        promoted = max(len(competing) // halving.reduction_factor, 1)
        if maximize and value < competing[-promoted]:
            return True, reached
        if not maximize and value > competing[promoted - 1]:
            return True, reached
        rung += 1
    return False, reached


@dataclass(frozen=True)
class Decision:
    prune: bool
    # Optuna's system attributes the decision records on the trial: its value at each rung
    # it reached, which later trials compete with.
    system_attrs: dict[str, float] = field(default_factory=dict)


class StudyPruning:
    """A worker's pruning for one study: each decision Optuna's pruner of the spec would
    take, from a view of the study (`CompletedCurves` or `RungValues`) kept up to date."""

    def __init__(self, store: Store, study: optuna.Study, spec: StudySpec) -> None:
        self.store = store
        self.study = study
        self.pruner = spec.pruner
        self.halving = Halving.from_spec(spec)
        self.maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        self.completed = CompletedCurves()
        self.rungs = RungValues()
        self._counted: set[int] = set()  # trial ids whose curves are in `completed`
        self._brackets: dict[int, int] = {}  # trial id: bracket, of trials seen
        self._after_id = -1  # every trial up to this id was seen, finished or in _unfinished
        self._unfinished: set[int] = set()
        self._caught_up_at = -math.inf  # when the last catch-up began (monotonic) ...
        self._caught_up_since = datetime.min  # ... and on the clock trials start by

    def decide(self, trial: FrozenTrial) -> Decision:
        """Whether to prune `trial`, a running trial's in-memory copy: its reports so far
        (`intermediate_values`) and the rungs it passed (`system_attrs`)."""
        curve = trial.intermediate_values
        if self.pruner.name in PERCENTILE_PRUNERS:
            self._catch_up_for(trial)
            return Decision(percentile_prunes(self.pruner, self.maximize, self.completed, curve))
        if self.halving is None:
            return Decision(False)  # no pruner, or hyperband without a bracket
        bracket = self._bracket(optuna_internals.trial_id(trial), trial.number)
        rung = current_rung(trial.system_attrs)
        if not curve or max(curve) < self.halving.promotion_step(bracket, rung):
            return Decision(False)  # no rung to judge at: the view is not needed
        self._catch_up_for(trial)
        prune, reached = halving_prunes(
            self.halving, bracket, rung, self.maximize, self.rungs, curve
        )
        for passed, value in reached.items():
            self.rungs.add(optuna_internals.trial_id(trial), bracket, passed, value)
        return Decision(prune, {rung_key(r): value for r, value in reached.items()})

    def completed_here(self, trial_id: int, curve: dict[int, float]) -> None:
        """Count a trial this worker has just told complete, without waiting for a catch-up."""
        self._count(trial_id, curve)

    def _count(self, trial_id: int, curve: dict[int, float]) -> None:
        if trial_id not in self._counted:
            self._counted.add(trial_id)
            self.completed.add(curve)

    def _bracket(self, trial_id: int, number: int) -> int:
        if trial_id not in self._brackets:
            assert self.halving is not None
            self._brackets[trial_id] = self.halving.bracket(self.study.study_name, number)
        return self._brackets[trial_id]

    def _catch_up_for(self, trial: FrozenTrial) -> None:
        """Catch up at the first decision of a trial that started after the last catch-up,
        then every REFRESH_S: the members of a pack, started together, share one."""
        started = trial.datetime_start or datetime.max
        if started > self._caught_up_since or time.monotonic() - self._caught_up_at > REFRESH_S:
            self.store.retrying(self._catch_up)

    def _catch_up(self) -> None:
        # Before reading: a trial started meanwhile may have been missed by it.
        caught_up_at, caught_up_since = time.monotonic(), datetime.now()
        with self.store.session() as session:
            seen = trials_since(
                session, optuna_internals.study_id(self.study), self._after_id, self._unfinished
            )
            self._read_views(session, seen)
        for trial_id, trial in seen.items():
            self._after_id = max(self._after_id, trial_id)
            if trial.state in UNFINISHED:
                self._unfinished.add(trial_id)
            else:
                self._unfinished.discard(trial_id)
        self._caught_up_at, self._caught_up_since = caught_up_at, caught_up_since

    def _read_views(self, session: Session, seen: dict[int, SeenTrial]) -> None:
        """Add what the `seen` trials bring to the view: the curves of the newly complete,
        or the rungs of all (a rung is reached in any state; finished trials reach no more)."""
        if self.halving is None:
            complete = [i for i, t in seen.items() if t.state == TrialState.COMPLETE]
            new = [i for i in complete if i not in self._counted]
            for trial_id, curve in reported_values(session, new).items():
                self._count(trial_id, curve)
            return
        for trial_id, values in rung_values(session, list(seen)).items():
            bracket = self._bracket(trial_id, seen[trial_id].number)
            for rung, value in values.items():
                self.rungs.add(trial_id, bracket, rung, value)
