"""Read queries over Optuna's trial tables for listings, leaderboards and metrics.

Each answer is a bounded number of SQL statements, whatever the number of trials: counts
and best values are aggregated by the database, ranked and paged trials are limited there,
and only the trials on the page have their params and attributes read. Going through
`optuna.Study.get_trials` instead would load every trial of the study into Python.

The models are Optuna's own (through `optuna_internals`), so the column names and the
enum encodings stay Optuna's.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from optuna.distributions import json_to_distribution
from optuna.trial import TrialState
from sqlalchemy import ColumnElement, Select, and_, case, func, or_, select
from sqlalchemy.orm import Session, aliased

from hpsearch.storage.optuna_internals import (
    FIXED_PARAMS,
    StudyModel,
    TrialHeartbeatModel,
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
    TrialValueModel,
)

# The names clients see; Optuna's FAIL reads better as "failed" beside the study states.
STATE_NAMES: dict[TrialState, str] = {
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
    TrialState.COMPLETE: "complete",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
}
STATES_BY_NAME = {name: state for state, name in STATE_NAMES.items()}
# Optuna's FAIL covers three endings, told apart by the trial's `error` user attribute: a
# trial whose training raised records the error ("failed"); one handed back by a stopping
# worker records the caller's marker ("handed_back"); one failed as stale because its worker
# died records none ("lost"). Only the first says anything about the hyperparameters; the
# other two are queued again by Optuna's retry callback.
FAIL_KINDS = ("failed", "handed_back", "lost")
# Optuna's models expose these as properties; the columns themselves are the table's.
_STARTED = TrialModel.__table__.c.datetime_start
_COMPLETED = TrialModel.__table__.c.datetime_complete
# User attributes too large for a listing; only the one-trial view carries them.
BULKY_ATTRS = ("history",)
RUNG_PREFIX = "completed_rung_"  # Optuna's successive halving: a trial's value at rung N
IDS_PER_STATEMENT = 500  # within every SQLite build's limit on a statement's parameters


@dataclass
class TrialRow:
    """One trial as listings show it."""

    trial_id: int
    number: int
    state: str
    value: float | None
    started_at: datetime | None
    completed_at: datetime | None
    params: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        if self.started_at is None or self.completed_at is None:
            return None
        return (self.completed_at - self.started_at).total_seconds()


def trial_counts(
    session: Session, study_ids: list[int], handed_back_error: str | None = None
) -> dict[int, dict[str, int]]:
    """{optuna study id: {state name: count}} in one grouped query.

    With `handed_back_error` (the `error` a handed-back trial records), "failed" counts only
    the trials whose training failed, and "handed_back" and "lost" the other FAIL trials
    (FAIL_KINDS): a second grouped query, over the failed trials alone."""
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    if not study_ids:
        return counts
    query = (
        select(TrialModel.study_id, TrialModel.state, func.count())
        .where(TrialModel.study_id.in_(study_ids))
        .group_by(TrialModel.study_id, TrialModel.state)
    )
    for study_id, state, count in session.execute(query):
        counts[study_id][STATE_NAMES[state]] = count
    failing = [study_id for study_id, by_state in counts.items() if "failed" in by_state]
    if handed_back_error is not None and failing:
        for study_id in failing:
            del counts[study_id]["failed"]
        for study_id, kind, count in _fail_kind_counts(session, failing, handed_back_error):
            counts[study_id][kind] = count
    return counts


def _fail_kind_counts(
    session: Session, study_ids: list[int], handed_back_error: str
) -> list[tuple[int, str, int]]:
    """(optuna study id, fail kind, count) of the studies' FAIL trials. The kind is grouped
    on through a subquery: PostgreSQL does not take a CASE with bound parameters in GROUP BY
    for the same expression as the select list's."""
    error = aliased(TrialUserAttributeModel)
    failed = (
        select(
            TrialModel.study_id.label("study_id"),
            _fail_kind(error.value_json, handed_back_error).label("kind"),
        )
        .outerjoin(error, and_(error.trial_id == TrialModel.trial_id, error.key == "error"))
        .where(TrialModel.study_id.in_(study_ids), TrialModel.state == TrialState.FAIL)
        .subquery()
    )
    query = select(failed.c.study_id, failed.c.kind, func.count()).group_by(
        failed.c.study_id, failed.c.kind
    )
    return [(study_id, kind, count) for study_id, kind, count in session.execute(query)]


def fail_kind(error: Any, handed_back_error: str) -> str:
    """Which of FAIL_KINDS a FAIL trial is, from its `error` user attribute (None when it has
    none): what `_fail_kind` tells in SQL."""
    if error is None:
        return "lost"
    return "handed_back" if error == handed_back_error else "failed"


def _fail_kind(error_json: Any, handed_back_error: str) -> ColumnElement[str]:
    """Which of FAIL_KINDS a FAIL trial is, from the stored JSON of its `error` attribute
    (Optuna stores `json.dumps` of the value; a JSON null is no error either)."""
    return case(
        (or_(error_json.is_(None), error_json == json.dumps(None)), "lost"),
        (error_json == json.dumps(handed_back_error), "handed_back"),
        else_="failed",
    )


def best_values(session: Session, study_ids: list[int]) -> dict[int, tuple[float, float]]:
    """{optuna study id: (lowest, highest) value of its complete trials} in one query."""
    if not study_ids:
        return {}
    query = (
        select(
            TrialModel.study_id, func.min(TrialValueModel.value), func.max(TrialValueModel.value)
        )
        .join(TrialValueModel, _first_objective())
        .where(TrialModel.study_id.in_(study_ids), TrialModel.state == TrialState.COMPLETE)
        .group_by(TrialModel.study_id)
    )
    return {study_id: (low, high) for study_id, low, high in session.execute(query)}


def ranked_trials(
    session: Session, study_id: int, maximize: bool, top: int, offset: int = 0
) -> list[TrialRow]:
    """The `top` complete trials, best first (ties: the earlier trial first), after the
    first `offset`."""
    order = TrialValueModel.value.desc() if maximize else TrialValueModel.value.asc()
    query = (
        _trial_query()
        .where(TrialModel.study_id == study_id, TrialModel.state == TrialState.COMPLETE)
        .order_by(order, TrialModel.number)
        .limit(top)
        .offset(offset)
    )
    return _with_details(session, _rows(session, query))


def trial_page(
    session: Session,
    study_id: int,
    state: str | None,
    limit: int,
    offset: int,
    handed_back_error: str | None = None,
) -> tuple[list[TrialRow], int]:
    """One page of trials by number, and how many trials match in all. With
    `handed_back_error`, `state` may be any of FAIL_KINDS, and "failed" means only that kind
    (as `trial_counts` counts them)."""
    condition = TrialModel.study_id == study_id
    if state is not None:
        condition = and_(condition, _state_condition(state, handed_back_error))
    total = session.scalar(select(func.count()).select_from(TrialModel).where(condition)) or 0
    query = _trial_query().where(condition).order_by(TrialModel.number).limit(limit).offset(offset)
    return _with_details(session, _rows(session, query)), total


def _state_condition(state: str, handed_back_error: str | None) -> ColumnElement[bool]:
    if handed_back_error is None or state not in FAIL_KINDS:
        return TrialModel.state == STATES_BY_NAME[state]
    error_json = (
        select(TrialUserAttributeModel.value_json)
        .where(
            TrialUserAttributeModel.trial_id == TrialModel.trial_id,
            TrialUserAttributeModel.key == "error",
        )
        .scalar_subquery()
    )
    kind = _fail_kind(error_json, handed_back_error)
    return and_(TrialModel.state == TrialState.FAIL, kind == state)


def finished_trials(session: Session, study_id: int) -> list[TrialRow]:
    """Every complete, pruned or failed trial with its params and small attributes: the
    evidence a study's advice counts."""
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    query = _trial_query().where(TrialModel.study_id == study_id, TrialModel.state.in_(done))
    return _with_details(session, _rows(session, query))


class ScoredTrial(NamedTuple):
    trial_id: int
    number: int
    value: float


def complete_trials(session: Session, study_id: int) -> list[ScoredTrial]:
    """The study's complete trials with a finite value, by number: one query of three
    columns, cheap for 10,000 trials."""
    query = (
        select(TrialModel.trial_id, TrialModel.number, TrialValueModel.value)
        .join(TrialValueModel, _first_objective())
        .where(
            TrialModel.study_id == study_id,
            TrialModel.state == TrialState.COMPLETE,
            TrialValueModel.value_type == TrialValueModel.TrialValueType.FINITE,
        )
        .order_by(TrialModel.number)
    )
    return [ScoredTrial(*row) for row in session.execute(query)]


def internal_params(session: Session, trial_ids: Collection[int]) -> dict[int, dict[str, float]]:
    """{trial id: {param: value}} in Optuna's internal representation (a float; the index
    of a categorical choice), as `BaseDistribution.to_external_repr` reads it."""
    ids = list(trial_ids)
    params: dict[int, dict[str, float]] = {trial_id: {} for trial_id in ids}
    for low in range(0, len(ids), IDS_PER_STATEMENT):
        query = select(
            TrialParamModel.trial_id, TrialParamModel.param_name, TrialParamModel.param_value
        ).where(TrialParamModel.trial_id.in_(ids[low : low + IDS_PER_STATEMENT]))
        for trial_id, name, value in session.execute(query):
            params[trial_id][name] = value
    return params


def one_trial(session: Session, study_id: int, number: int) -> TrialRow | None:
    """The trial with every user attribute, the bulky ones included."""
    query = _trial_query().where(TrialModel.study_id == study_id, TrialModel.number == number)
    rows = _with_details(session, _rows(session, query), skip=())
    return rows[0] if rows else None


def intermediate_values(session: Session, trial_id: int) -> list[tuple[int, float | None]]:
    """The values reported at each step (epoch), in order."""
    query = (
        select(TrialIntermediateValueModel.step, TrialIntermediateValueModel.intermediate_value)
        .where(TrialIntermediateValueModel.trial_id == trial_id)
        .order_by(TrialIntermediateValueModel.step)
    )
    return [(step, value) for step, value in session.execute(query)]


def optuna_study_id(session: Session, name: str) -> int | None:
    """The id of the Optuna study of that name, if there is one."""
    query = select(StudyModel.study_id).where(StudyModel.study_name == name)
    return session.scalar(query)


def optuna_study_name(session: Session, study_id: int) -> str | None:
    """The name of the Optuna study with that id, if there is one."""
    query = select(StudyModel.study_name).where(StudyModel.study_id == study_id)
    return session.scalar(query)


def recent_endings(session: Session, study_id: int, limit: int) -> list[tuple[str, str | None]]:
    """(state name, error) of the study's `limit` trials that ended last, newest first; the
    error is a trial's `error` user attribute (None where it has none)."""
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    error = TrialUserAttributeModel
    query = (
        select(TrialModel.state, error.value_json)
        .outerjoin(error, and_(error.trial_id == TrialModel.trial_id, error.key == "error"))
        .where(TrialModel.study_id == study_id, TrialModel.state.in_(ended))
        .order_by(_COMPLETED.desc(), TrialModel.trial_id.desc())
        .limit(limit)
    )
    return [
        (STATE_NAMES[state], None if value_json is None else json.loads(value_json))
        for state, value_json in session.execute(query)
    ]


class SeenTrial(NamedTuple):
    number: int
    state: TrialState


def trials_since(
    session: Session, study_id: int, after_trial_id: int, unfinished_ids: Collection[int]
) -> dict[int, SeenTrial]:
    """{trial id: (number, state)} of the study's trials with an id above `after_trial_id`,
    and of the trials `unfinished_ids` (seen running or waiting before): what a view of the
    study needs to catch up, read on the primary key, never the trials it saw finish
    (Optuna's trial cache reads the same way)."""
    newer = and_(TrialModel.study_id == study_id, TrialModel.trial_id > after_trial_id)
    query = select(TrialModel.trial_id, TrialModel.number, TrialModel.state).where(
        or_(newer, TrialModel.trial_id.in_(list(unfinished_ids)))
    )
    return {
        trial_id: SeenTrial(number, state) for trial_id, number, state in session.execute(query)
    }


def reported_values(session: Session, trial_ids: Collection[int]) -> dict[int, dict[int, float]]:
    """{trial id: {step: value}} of these trials' reports, inf and NaN included, a bounded
    number of ids per statement (SQLite and PostgreSQL cap a statement's parameters)."""
    ids = sorted(trial_ids)
    curves: dict[int, dict[int, float]] = {trial_id: {} for trial_id in ids}
    model = TrialIntermediateValueModel
    for low in range(0, len(ids), IDS_PER_STATEMENT):
        query = select(
            model.trial_id, model.step, model.intermediate_value, model.intermediate_value_type
        ).where(model.trial_id.in_(ids[low : low + IDS_PER_STATEMENT]))
        for trial_id, step, stored, kind in session.execute(query):
            curves[trial_id][step] = model.stored_repr_to_intermediate_value(stored, kind)
    return curves


def rung_values(session: Session, trial_ids: Collection[int]) -> dict[int, dict[int, float]]:
    """{trial id: {rung: value}} of the rungs of successive halving these trials reached
    (Optuna's `completed_rung_N` system attributes), a bounded number of ids per statement."""
    ids = sorted(trial_ids)
    rungs: dict[int, dict[int, float]] = defaultdict(dict)
    model = TrialSystemAttributeModel
    for low in range(0, len(ids), IDS_PER_STATEMENT):
        query = select(model.trial_id, model.key, model.value_json).where(
            model.trial_id.in_(ids[low : low + IDS_PER_STATEMENT]),
            model.key.startswith(RUNG_PREFIX, autoescape=True),
        )
        for trial_id, key, value_json in session.execute(query):
            rungs[trial_id][int(key.removeprefix(RUNG_PREFIX))] = json.loads(value_json)
    return rungs


def trial_counts_by_study_name(session: Session) -> list[tuple[str, str, int]]:
    """(study name, state name, count) over the whole database, for /metrics."""
    query = (
        select(StudyModel.study_name, TrialModel.state, func.count())
        .join(TrialModel, TrialModel.study_id == StudyModel.study_id)
        .group_by(StudyModel.study_name, TrialModel.state)
    )
    return [(name, STATE_NAMES[state], count) for name, state, count in session.execute(query)]


def finished_trial_seconds(session: Session, buckets: tuple[float, ...]) -> tuple[list[int], float]:
    """Cumulative counts of finished trials at or under each bucket's duration, and the sum of
    all durations: a Prometheus histogram aggregated by the database."""
    seconds = _seconds_between(session, _STARTED, _COMPLETED)
    columns = [func.count(), func.coalesce(func.sum(seconds), 0.0)]
    columns += [func.sum(case((seconds <= bound, 1), else_=0)) for bound in buckets]
    query = select(*columns).where(
        TrialModel.state.in_((TrialState.COMPLETE, TrialState.PRUNED)),
        _COMPLETED.is_not(None),
    )
    count, total, *under = session.execute(query).one()
    return [int(n or 0) for n in under] + [int(count)], float(total)


def _seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", end - start)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _first_objective() -> ColumnElement[bool]:
    return and_(TrialValueModel.trial_id == TrialModel.trial_id, TrialValueModel.objective == 0)


def _trial_query() -> Select[Any]:
    return select(
        TrialModel.trial_id,
        TrialModel.number,
        TrialModel.state,
        TrialValueModel.value,
        _STARTED,
        _COMPLETED,
    ).outerjoin(TrialValueModel, _first_objective())


def _rows(session: Session, query: Select[Any]) -> list[TrialRow]:
    return [
        TrialRow(
            trial_id=trial_id,
            number=number,
            state=STATE_NAMES[state],
            value=value,
            started_at=_utc(start),
            completed_at=_utc(complete),
        )
        for trial_id, number, state, value, start, complete in session.execute(query)
    ]


def _utc(moment: datetime | None) -> datetime | None:
    """Optuna stores naive UTC timestamps."""
    return None if moment is None else moment.replace(tzinfo=UTC)


def _with_details(
    session: Session, rows: list[TrialRow], skip: tuple[str, ...] = BULKY_ATTRS
) -> list[TrialRow]:
    """Fill in the params and user attributes of `rows`: two queries for the whole page."""
    by_id = {row.trial_id: row for row in rows}
    if not by_id:
        return rows
    params = select(
        TrialParamModel.trial_id,
        TrialParamModel.param_name,
        TrialParamModel.param_value,
        TrialParamModel.distribution_json,
    ).where(TrialParamModel.trial_id.in_(by_id))
    for trial_id, name, value, distribution in session.execute(params):
        by_id[trial_id].params[name] = json_to_distribution(distribution).to_external_repr(value)
    attrs = select(
        TrialUserAttributeModel.trial_id,
        TrialUserAttributeModel.key,
        TrialUserAttributeModel.value_json,
    ).where(TrialUserAttributeModel.trial_id.in_(by_id))
    if skip:
        attrs = attrs.where(TrialUserAttributeModel.key.not_in(skip))
    for trial_id, key, value_json in session.execute(attrs):
        by_id[trial_id].attrs[key] = json.loads(value_json)
    _with_enqueued_params(session, [row for row in rows if row.state == "waiting"])
    return rows


def _with_enqueued_params(session: Session, waiting: list[TrialRow]) -> None:
    """A waiting trial enqueued with a configuration has no params yet: show the
    configuration (its `fixed_params`, as Optuna's `enqueue_trial` stores it) instead."""
    by_id = {row.trial_id: row for row in waiting if not row.params}
    if not by_id:
        return
    fixed = select(TrialSystemAttributeModel.trial_id, TrialSystemAttributeModel.value_json).where(
        TrialSystemAttributeModel.trial_id.in_(by_id),
        TrialSystemAttributeModel.key == FIXED_PARAMS,
    )
    for trial_id, value_json in session.execute(fixed):
        by_id[trial_id].params = dict(json.loads(value_json))


class RunningTrial(NamedTuple):
    trial_id: int
    number: int
    holder: Any  # the trial's holder attribute (decoded), None if it has none
    beat_age_s: float | None  # since its last heartbeat, by the database's clock


def running_trials(session: Session, study_id: int, holder_key: str) -> list[RunningTrial]:
    """The study's running trials with who holds them and how long ago they last beat: what
    decides whether a trial's worker is gone. One query on the (study, state) index."""
    holder = aliased(TrialSystemAttributeModel)
    beat = TrialHeartbeatModel.__table__.c.heartbeat
    rows = session.execute(
        select(TrialModel.trial_id, TrialModel.number, holder.value_json, beat)
        .outerjoin(holder, and_(holder.trial_id == TrialModel.trial_id, holder.key == holder_key))
        .outerjoin(TrialHeartbeatModel, TrialHeartbeatModel.trial_id == TrialModel.trial_id)
        .where(TrialModel.study_id == study_id, TrialModel.state == TrialState.RUNNING)
        .order_by(TrialModel.number)
    )
    # The heartbeats were written with the database's clock, as its local time.
    now = session.scalar(select(func.current_timestamp())).replace(tzinfo=None)
    return [
        RunningTrial(
            trial_id,
            number,
            None if value is None else json.loads(value),
            None if beaten is None else (now - beaten.replace(tzinfo=None)).total_seconds(),
        )
        for trial_id, number, value, beaten in rows
    ]
