"""A study's trials as Optuna's samplers read them, through a few indexed queries.

A sampler that learns from the study (TPE, GP, CMA-ES, the grid's free points) asks for
every trial. Optuna's cache answers the first such request by building each trial whole
through its ORM, every user attribute and every epoch's value included: 12 s for a study
of 10,000 trials, before a joining worker's first trial. Samplers read none of that bulk:
they read states, params, values, system attributes, and of the epochs only the last
(TPE and CMA-ES score a pruned trial by it). `TrialHistory` reads just those, one query per
table, and afterwards only the trials that are new or were still running, as Optuna's
cache does.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, json_to_distribution
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Select, and_, false, func, or_, select
from sqlalchemy.orm import Session

from hpsearch.storage.bulk import local_time
from hpsearch.storage.db import session_scope
from hpsearch.storage.optuna_internals import (
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialValueModel,
    trial_id,
)


@dataclass
class TrialHistory:
    """One study's trials for its samplers: finished ones kept, the others read again at
    every request (with the trials created since)."""

    url: str
    study_id: int
    _trials: dict[int, FrozenTrial] = field(default_factory=dict)  # by number
    _unfinished: set[int] = field(default_factory=set)  # trial ids read while running
    _last_finished_id: int = -1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def trials(self, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        """The study's trials now, in number order (`states`: only those in these)."""
        with self._lock:
            self._refresh()
            trials = sorted(self._trials.values(), key=lambda t: t.number)
        return [t for t in trials if states is None or t.state in states]

    def _refresh(self) -> None:
        with session_scope(self.url) as session:
            fresh = _read(session, self._changed())
        for trial in fresh:
            self._trials[trial.number] = trial
            if trial.state.is_finished():
                self._unfinished.discard(trial_id(trial))
            else:
                self._unfinished.add(trial_id(trial))
        finished = [trial_id(t) for t in fresh if t.state.is_finished()]
        # As Optuna's cache: trials below the newest finished one that still run are
        # tracked by id, everything above it is read again.
        self._last_finished_id = max([self._last_finished_id, *finished])

    def _changed(self) -> Select[tuple[int]]:
        """The ids of the trials to read: new since the last request, or still running."""
        trials = TrialModel.__table__
        unfinished = trials.c.trial_id.in_(self._unfinished) if self._unfinished else false()
        return select(trials.c.trial_id).where(
            trials.c.study_id == self.study_id,
            or_(trials.c.trial_id > self._last_finished_id, unfinished),
        )


def _read(session: Session, ids: Select[tuple[int]]) -> list[FrozenTrial]:
    """The trials `ids` selects, each with its params, values, system attributes and last
    reported value; no user attributes."""
    trials = TrialModel.__table__
    rows = session.execute(
        select(
            trials.c.trial_id,
            trials.c.number,
            trials.c.state,
            trials.c.datetime_start,
            trials.c.datetime_complete,
        ).where(trials.c.trial_id.in_(ids))
    ).all()
    params = _params(session, ids)
    values = _values(session, ids)
    attrs = _system_attrs(session, ids)
    last = _last_reports(session, ids)
    return [
        FrozenTrial(
            number=number,
            state=state,
            value=None,
            values=values.get(tid),
            datetime_start=local_time(start),
            datetime_complete=local_time(complete),
            params={name: p[0] for name, p in params.get(tid, {}).items()},
            distributions={name: p[1] for name, p in params.get(tid, {}).items()},
            user_attrs={},
            system_attrs=attrs.get(tid, {}),
            intermediate_values=last.get(tid, {}),
            trial_id=tid,
        )
        for tid, number, state, start, complete in rows
    ]


def _params(session: Session, ids: Select[tuple[int]]) -> dict[int, dict[str, tuple[Any, Any]]]:
    """{trial id: {name: (external value, distribution)}}."""
    table = TrialParamModel.__table__
    query = select(
        table.c.trial_id, table.c.param_name, table.c.param_value, table.c.distribution_json
    ).where(table.c.trial_id.in_(ids))
    params: dict[int, dict[str, tuple[Any, Any]]] = {}
    for tid, name, internal, dist_json in session.execute(query):
        distribution = _distribution(dist_json)
        params.setdefault(tid, {})[name] = (distribution.to_external_repr(internal), distribution)
    return params


@functools.lru_cache(maxsize=1024)
def _distribution(dist_json: str) -> BaseDistribution:
    """A parsed distribution: a study holds a handful, repeated on every trial."""
    return json_to_distribution(dist_json)


def _values(session: Session, ids: Select[tuple[int]]) -> dict[int, list[float]]:
    table = TrialValueModel.__table__
    query = (
        select(table.c.trial_id, table.c.value, table.c.value_type)
        .where(table.c.trial_id.in_(ids))
        .order_by(table.c.trial_id, table.c.objective)
    )
    values: dict[int, list[float]] = {}
    for tid, value, kind in session.execute(query):
        values.setdefault(tid, []).append(TrialValueModel.stored_repr_to_value(value, kind))
    return values


def _system_attrs(session: Session, ids: Select[tuple[int]]) -> dict[int, dict[str, Any]]:
    table = TrialSystemAttributeModel.__table__
    query = select(table.c.trial_id, table.c.key, table.c.value_json).where(
        table.c.trial_id.in_(ids)
    )
    attrs: dict[int, dict[str, Any]] = {}
    for tid, key, value_json in session.execute(query):
        attrs.setdefault(tid, {})[key] = json.loads(value_json)
    return attrs


def _last_reports(session: Session, ids: Select[tuple[int]]) -> dict[int, dict[int, float]]:
    """{trial id: {its last step: value}}: one row per trial, through the (trial, step)
    index."""
    table = TrialIntermediateValueModel.__table__
    last = (
        select(table.c.trial_id, func.max(table.c.step).label("step"))
        .where(table.c.trial_id.in_(ids))
        .group_by(table.c.trial_id)
        .subquery()
    )
    query = select(
        table.c.trial_id, table.c.step, table.c.intermediate_value, table.c.intermediate_value_type
    ).join(last, and_(table.c.trial_id == last.c.trial_id, table.c.step == last.c.step))
    return {
        tid: {step: TrialIntermediateValueModel.stored_repr_to_intermediate_value(value, kind)}
        for tid, step, value, kind in session.execute(query)
    }
