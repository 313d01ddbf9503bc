"""Many trials written in one transaction, row for row as Optuna's `RDBStorage` writes them
one at a time.

A worker that trains a pack of trials would otherwise pay Optuna's commit per value, per
parameter and per state change for each member: dozens of commits per trial, each a disk
flush on PostgreSQL. Here a pack is started (counted, created, given heartbeats), given its
params, written each epoch and told in a handful of transactions. The rows are those
Optuna writes (a test compares both field by field through `optuna.load_study`), so
Optuna, its samplers, its heartbeat callbacks and optuna-dashboard read them as their own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hpsearch.storage import optuna_internals
from hpsearch.storage.models import CheckpointRecord
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

if TYPE_CHECKING:
    from hpsearch.storage.history import TrialHistory


class LeaseLost(Exception):
    """The trial is no longer running (failed as stale and retried elsewhere, or finished):
    its old worker must drop it, not write to it."""


@dataclass(frozen=True)
class StartedTrial:
    """A trial a claim started: a new one, or one that waited in the study's queue
    (`queued`): a retry, whose params and attributes it inherited, or a configuration
    enqueued by a user (its params in FIXED_PARAMS). `datetime_start` is naive local time,
    as in Optuna's trials."""

    trial_id: int
    number: int
    datetime_start: datetime
    queued: bool


def stored_time(local: datetime) -> datetime:
    """A trial's time as Optuna's `RDBStorage` stores it: naive UTC (its trials in memory
    hold naive local time, which its models convert on the way in and out)."""
    return local.astimezone(UTC).replace(tzinfo=None)


def local_time(stored: datetime | None) -> datetime | None:
    """A stored trial time as Optuna's trials hold it: naive local time."""
    return None if stored is None else stored.replace(tzinfo=UTC).astimezone().replace(tzinfo=None)


def start_trials(
    session: Session, study_id: int, *, retries: int, new: int, system_attrs: Mapping[str, Any]
) -> list[StartedTrial]:
    """Start up to `retries` waiting trials (oldest first: retries and enqueued
    configurations alike) and `new` fresh ones of Optuna
    study `study_id`, each running with a first heartbeat and `system_attrs`: what
    `study.ask()`, `record_heartbeat` and `set_trial_system_attr` write per trial.

    The caller holds the study's claim lock; Optuna's study row is locked too (as
    Optuna's `create_new_trial` locks it), so a trial created through Optuna meanwhile
    cannot take a number given here.
    """
    trials = TrialModel.__table__
    _lock_optuna_study(session, study_id)
    started = _pop_waiting(session, study_id, retries) if retries else []
    if new:
        now = datetime.now()
        base = session.scalar(select(func.count()).where(trials.c.study_id == study_id)) or 0
        rows = [
            {"number": base + i, "study_id": study_id, "state": TrialState.RUNNING}
            | {"datetime_start": stored_time(now)}
            for i in range(new)
        ]
        inserted = session.execute(
            trials.insert().returning(trials.c.trial_id, trials.c.number),
            rows,
        ).all()
        started += [StartedTrial(tid, number, now, queued=False) for tid, number in inserted]
    ids = [t.trial_id for t in started]
    record_heartbeats(session, ids)
    _set_attrs(
        session,
        TrialSystemAttributeModel.__table__,
        [(i, k, v) for i in ids for k, v in system_attrs.items()],
    )
    return sorted(started, key=lambda t: t.number)


def enqueue_trials(
    session: Session, study_id: int, configs: list[dict[str, Any]]
) -> list[tuple[int, int]]:
    """Waiting trials of Optuna study `study_id`, one per configuration (param name ->
    value), as Optuna's `study.enqueue_trial` makes each: a WAITING trial, no start time,
    the configuration in its FIXED_PARAMS system attribute. Claims start them before any
    new trial (`start_trials`). Returns (trial id, number) of each, in order.

    Numbered under Optuna's study-row lock, as `start_trials` numbers; raises
    `LookupError` when there is no such Optuna study."""
    if not configs:
        return []
    trials = TrialModel.__table__
    if not _lock_optuna_study(session, study_id):
        raise LookupError(f"no Optuna study with id {study_id}")
    base = session.scalar(select(func.count()).where(trials.c.study_id == study_id)) or 0
    rows = [
        {"number": base + i, "study_id": study_id, "state": TrialState.WAITING}
        for i in range(len(configs))
    ]
    inserted = session.execute(
        trials.insert().returning(trials.c.trial_id, trials.c.number), rows
    ).all()
    by_number = sorted(inserted, key=lambda row: row[1])
    _set_attrs(
        session,
        TrialSystemAttributeModel.__table__,
        [(tid, FIXED_PARAMS, config) for (tid, _), config in zip(by_number, configs, strict=True)],
    )
    return [(tid, number) for tid, number in by_number]


def record_heartbeats(session: Session, trial_ids: list[int]) -> None:
    """The trials' heartbeats, now by the database's clock, as Optuna's `record_heartbeat`
    stores one."""
    rows = [{"trial_id": trial_id} for trial_id in trial_ids]  # `heartbeat` defaults to now
    _upsert(session, TrialHeartbeatModel.__table__, rows, ("trial_id",), ("heartbeat",))


def _lock_optuna_study(session: Session, study_id: int) -> bool:
    """Optuna's row of the study, locked until the transaction ends (PostgreSQL; SQLite's
    immediate transaction holds the whole database already); whether there is one."""
    studies = StudyModel.__table__
    query = select(studies.c.study_id).where(studies.c.study_id == study_id)
    if _dialect(session) == "postgresql":
        query = query.with_for_update()
    return session.scalar(query) is not None


def _pop_waiting(session: Session, study_id: int, n: int) -> list[StartedTrial]:
    """The `n` oldest waiting trials set running, as Optuna's `ask` pops them one by one."""
    trials = TrialModel.__table__
    now = datetime.now()
    waiting = (
        select(trials.c.trial_id)
        .where(trials.c.study_id == study_id, trials.c.state == TrialState.WAITING)
        .order_by(trials.c.trial_id)
        .limit(n)
    )
    popped = session.execute(
        update(trials)
        .where(trials.c.trial_id.in_(waiting.scalar_subquery()))
        .values(state=TrialState.RUNNING, datetime_start=stored_time(now))
        .returning(trials.c.trial_id, trials.c.number)
    ).all()
    return [StartedTrial(tid, number, now, queued=True) for tid, number in popped]


@dataclass(frozen=True)
class TrialWrite:
    """What a worker writes to its running trial: the epochs reported since its last write
    ({epoch: value}), user and system attributes (the rungs a pruner recorded), its newest
    checkpoint, and how it ended (`ending`), if it did."""

    trial_id: int
    number: int
    reports: dict[int, float] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    system_attrs: dict[str, Any] = field(default_factory=dict)
    checkpoint: tuple[int, bytes] | None = None  # (epoch, payload)
    ending: Ending | None = None


@dataclass(frozen=True)
class Ending:
    """A trial's final state and value, as Optuna's `tell` stores them."""

    state: TrialState
    value: float | None


def write_trials(session: Session, study_id: int, writes: list[TrialWrite]) -> dict[int, str]:
    """Write to running trials of one study (hpsearch's id `study_id`) in the caller's
    transaction, after checking their leases: the rows Optuna's `report`, `set_user_attr`,
    `set_system_attr` and `tell` write, without their commit per value, each trial's newest
    checkpoint (whole or not at all), and the ended trials' states and values. Returns the
    trials no longer running (their leases lost: id -> state), to which nothing was written.
    """
    lost = lost_leases(session, [w.trial_id for w in writes])
    writes = [w for w in writes if w.trial_id not in lost]
    _upsert(
        session,
        TrialIntermediateValueModel.__table__,
        [_report_row(w.trial_id, step, v) for w in writes for step, v in w.reports.items()],
        key=("trial_id", "step"),
        updated=(),  # a step stored before keeps its first value, as with Optuna's `report`
    )
    for table, attrs_of in (
        (TrialUserAttributeModel.__table__, lambda w: w.attrs),
        (TrialSystemAttributeModel.__table__, lambda w: w.system_attrs),
    ):
        _set_attrs(
            session, table, [(w.trial_id, k, v) for w in writes for k, v in attrs_of(w).items()]
        )
    checkpoints = [
        {
            "study_id": study_id,
            "trial_id": w.trial_id,
            "trial_number": w.number,
            "epoch": w.checkpoint[0],
            "payload": w.checkpoint[1],
            "size_bytes": len(w.checkpoint[1]),
        }
        for w in writes
        if w.checkpoint is not None
    ]
    _upsert(
        session,
        CheckpointRecord.__table__,
        checkpoints,
        key=("trial_id",),
        updated=("trial_number", "epoch", "payload", "size_bytes"),
        touched="updated_at",
    )
    _end(session, {w.trial_id: w.ending for w in writes if w.ending is not None})
    return lost


def lost_leases(session: Session, trial_ids: list[int]) -> dict[int, str]:
    """Those of these trials that are no longer running, with their states ("GONE" for a
    deleted one). On PostgreSQL the running ones stay
    locked (in id order, so two writers never deadlock) until the transaction ends, so none
    can be failed as stale while it is written."""
    trials = TrialModel.__table__
    query = select(trials.c.trial_id, trials.c.state).where(trials.c.trial_id.in_(trial_ids))
    if _dialect(session) == "postgresql":
        query = query.order_by(trials.c.trial_id).with_for_update()
    states = {tid: state.name for tid, state in session.execute(query)}
    return {
        tid: states.get(tid, "GONE")
        for tid in trial_ids
        if states.get(tid) != TrialState.RUNNING.name
    }


def _end(session: Session, endings: Mapping[int, Ending]) -> None:
    """Trials' final states and values, as Optuna's `set_trial_state_values` stores them."""
    if not endings:
        return
    trials, values = TrialModel.__table__, TrialValueModel.__table__
    now = stored_time(datetime.now())
    for state in {e.state for e in endings.values()}:
        ids = [tid for tid, e in endings.items() if e.state == state]
        session.execute(
            update(trials)
            .where(trials.c.trial_id.in_(ids))
            .values(state=state, datetime_complete=now)
        )
    rows = []
    for tid, ending in endings.items():
        if ending.value is not None:
            stored, kind = TrialValueModel.value_to_stored_repr(ending.value)
            rows.append({"trial_id": tid, "objective": 0, "value": stored, "value_type": kind})
    if rows:
        _insert_many(session, values.insert(), rows)


def write_params(
    session: Session,
    params: Iterable[tuple[int, str, float, BaseDistribution]],
    system_attrs: Iterable[tuple[int, str, Any]],
) -> None:
    """Trials' params (trial id, name, internal value, distribution) and the system
    attributes their sampler set, as Optuna's `set_trial_param` and `set_trial_system_attr`
    store them, in the caller's transaction."""
    param_rows = [
        {
            "trial_id": tid,
            "param_name": name,
            "param_value": internal,
            "distribution_json": distribution_to_json(distribution),
        }
        for tid, name, internal, distribution in params
    ]
    if param_rows:
        _insert_many(session, TrialParamModel.__table__.insert(), param_rows)
    _set_attrs(session, TrialSystemAttributeModel.__table__, system_attrs)


def _set_attrs(session: Session, table: Any, attrs: Iterable[tuple[int, str, Any]]) -> None:
    """Trials' user or system attributes (trial id, key, value), each replacing the one of
    its key, as Optuna's `set_trial_user_attr` and `set_trial_system_attr` store them."""
    rows = [{"trial_id": tid, "key": k, "value_json": json.dumps(v)} for tid, k, v in attrs]
    _upsert(session, table, rows, key=("trial_id", "key"), updated=("value_json",))


def _report_row(trial_id: int, step: int, value: float) -> dict[str, Any]:
    """The row of Optuna's intermediate values table for one report (inf and NaN typed)."""
    stored, kind = TrialIntermediateValueModel.intermediate_value_to_stored_repr(value)
    return {
        "trial_id": trial_id,
        "step": step,
        "intermediate_value": stored,
        "intermediate_value_type": kind,
    }


def _upsert(
    session: Session,
    table: Any,
    rows: list[dict[str, Any]],
    key: tuple[str, ...],
    updated: tuple[str, ...],
    touched: str | None = None,
) -> None:
    """Insert `rows` (one statement, executed for all); a row whose `key` exists already
    gets the new `updated` columns (and `touched` set to now), or is left alone when none
    are named."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite  # loaded by workers only

    dialect = postgresql if _dialect(session) == "postgresql" else sqlite
    statement = dialect.insert(table)
    index = [table.c[k] for k in key]
    if updated:
        changes: dict[str, Any] = {c: statement.excluded[c] for c in updated}
        if touched is not None:
            changes[touched] = func.now()
        statement = statement.on_conflict_do_update(index_elements=index, set_=changes)
    else:
        statement = statement.on_conflict_do_nothing(index_elements=index)
    _insert_many(session, statement, rows)


def _insert_many(session: Session, statement: Any, rows: list[dict[str, Any]]) -> None:
    """Execute an INSERT for many rows as a few multi-row statements. Asking for a column
    back makes SQLAlchemy batch the rows into one VALUES list per page ("insertmanyvalues"),
    from a statement compiled once; without it, psycopg sends every row as a statement of
    its own, which costs PostgreSQL a statement's overhead per report."""
    session.execute(statement.returning(statement.table.c.trial_id), rows).all()


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


class PendingTrials:
    """Optuna's storage as a sampler sees it while claimed trials are given their params:
    those trials are read from and written to memory, everything else goes to `storage`.

    The sampler sees the pending trials among the study's running ones, with the params
    drawn so far, so the points of one pack differ as they would if asked one by one. What
    it wrote waits in `params` and `system_attrs` for one transaction (`write_params`);
    `release` then hands every read and write to `storage` again.
    """

    def __init__(self, storage: Any, trials: Iterable[FrozenTrial], history: TrialHistory) -> None:
        self._storage = storage
        self._history = history
        self._study_ids: dict[str, int] = {}
        self._pending = {optuna_internals.trial_id(t): t for t in trials}
        self.params: list[tuple[int, str, float, BaseDistribution]] = []
        self.system_attrs: list[tuple[int, str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def get_study_id_from_name(self, study_name: str) -> int:
        """Looked up once per drawing: a hyperband pruner's view of a trial's bracket is a
        study of its own, made (and looked up by name) at every param drawn."""
        if study_name not in self._study_ids:
            self._study_ids[study_name] = self._storage.get_study_id_from_name(study_name)
        return self._study_ids[study_name]

    def release(self) -> None:
        """From now on, every call goes to the storage: the pending trials are written."""
        self._pending.clear()
        self.params.clear()
        self.system_attrs.clear()

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._pending:
            return copy.deepcopy(self._pending[trial_id])
        return self._storage.get_trial(trial_id)

    def get_trial_params(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).params

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).user_attrs

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        return self.get_trial(trial_id).system_attrs

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        stored = [
            copy.deepcopy(t) if deepcopy else t
            for t in self._history.trials(states)
            if optuna_internals.trial_id(t) not in self._pending
        ]
        pending = [
            copy.deepcopy(t) if deepcopy else t
            for t in self._pending.values()
            if states is None or t.state in states
        ]
        return sorted(stored + pending, key=lambda t: t.number)

    def set_trial_param(
        self, trial_id: int, name: str, internal: float, distribution: BaseDistribution
    ) -> None:
        if trial_id not in self._pending:
            self._storage.set_trial_param(trial_id, name, internal, distribution)
            return
        trial = self._pending[trial_id]
        trial.params[name] = distribution.to_external_repr(internal)
        trial.distributions[name] = distribution
        self.params.append((trial_id, name, internal, distribution))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if trial_id not in self._pending:
            self._storage.set_trial_system_attr(trial_id, key, value)
            return
        self._pending[trial_id].system_attrs[key] = value
        self.system_attrs.append((trial_id, key, value))
