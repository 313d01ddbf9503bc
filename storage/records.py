"""Statements over hpsearch's own tables: studies, models, workers, API tokens, datasets.

Every function takes the caller's `Session` and neither commits nor opens a transaction, so
the service decides what happens together: it opens `store.session()` (or
`immediate=True` where a read is followed by a write) and calls these inside. The rules
about what a change means (which states may change to which, what an error says) stay in
the service; these say only how the database is asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from optuna.trial import TrialState
from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, defer

from hpsearch.storage.models import (
    ApiTokenRecord,
    DatasetRecord,
    ModelRecord,
    StudyRecord,
    WorkerRecord,
)
from hpsearch.storage.optuna_internals import TrialModel

# --- studies ---


def study_by_id(session: Session, study_id: int) -> StudyRecord | None:
    """The study's row, read with a query rather than from the session's identity map, so
    a row deleted by another process is seen to be gone."""
    return session.scalar(select(StudyRecord).where(StudyRecord.id == study_id))


def study_by_name(session: Session, name: str) -> StudyRecord | None:
    """The study of that name (names are unique), if there is one."""
    return session.scalar(select(StudyRecord).where(StudyRecord.name == name))


def add_study(
    session: Session, *, name: str, spec: dict[str, Any], n_trials: int, optuna_study_id: int
) -> StudyRecord:
    """A new queued study, flushed so that a name taken meanwhile by another process
    raises IntegrityError here, inside the caller's transaction, and the id is known."""
    record = StudyRecord(
        name=name, spec=spec, state="queued", n_trials=n_trials, optuna_study_id=optuna_study_id
    )
    session.add(record)
    session.flush()
    return record


def studies_in_states(
    session: Session, states: Sequence[str], names: Sequence[str] = ()
) -> list[StudyRecord]:
    """The studies in one of `states` (and of `names`, when given), oldest first: one
    query, since every idle worker asks for them every few seconds."""
    query = select(StudyRecord).where(StudyRecord.state.in_(states))
    if names:
        query = query.where(StudyRecord.name.in_(names))
    return list(session.scalars(query.order_by(StudyRecord.id)))


def count_studies(session: Session) -> int:
    """How many studies there are, for a listing's total."""
    return session.scalar(select(func.count()).select_from(StudyRecord)) or 0


def study_page(session: Session, limit: int, offset: int) -> list[StudyRecord]:
    """One page of studies, newest first, limited by the database."""
    query = select(StudyRecord).order_by(StudyRecord.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(query))


def study_counts_by_state(session: Session) -> list[tuple[str, int]]:
    """(state, count) of the states that have studies, counted by the database."""
    query = select(StudyRecord.state, func.count()).group_by(StudyRecord.state)
    return [(state, count) for state, count in session.execute(query)]


def move_study(session: Session, study_id: int, before: str, after: str) -> None:
    """`before` -> `after` in one statement, so a study that changed state meanwhile (a
    pause, a cancel) is left as it is."""
    session.execute(
        update(StudyRecord)
        .where(StudyRecord.id == study_id, StudyRecord.state == before)
        .values(state=after)
    )


def fail_study_in_states(
    session: Session, study_id: int, states: Sequence[str], reason: str
) -> bool:
    """Fail the study with `reason` if it is in one of `states`, in one statement; whether
    it was (False too when the study is gone)."""
    result = session.execute(
        update(StudyRecord)
        .where(StudyRecord.id == study_id, StudyRecord.state.in_(states))
        .values(state="failed", reason=reason)
    )
    return bool(result.rowcount)


def complete_study_if_filled(session: Session, study_id: int, grid_points: int | None) -> None:
    """running -> completed once the study's complete and pruned trials fill its budget (or
    number `grid_points`, a grid study's size): counted and compared by the database in one
    statement, so an `extend` committed meanwhile keeps the study running."""
    finished = (
        select(func.count())
        .select_from(TrialModel)
        .where(
            TrialModel.study_id == StudyRecord.optuna_study_id,
            TrialModel.state.in_((TrialState.COMPLETE, TrialState.PRUNED)),
        )
        .scalar_subquery()
    )
    filled = StudyRecord.n_trials <= finished
    if grid_points is not None:  # a study's grid never changes, unlike its n_trials
        filled = or_(filled, finished >= grid_points)
    session.execute(
        update(StudyRecord)
        .where(StudyRecord.id == study_id, StudyRecord.state == "running", filled)
        .values(state="completed")
    )


def delete_study_record(session: Session, record: StudyRecord) -> None:
    """Delete the study's row; its checkpoints and models go with it (ON DELETE CASCADE),
    and its workers' current study is cleared (ON DELETE SET NULL). Optuna's rows are
    `db.delete_optuna_study`'s to delete."""
    session.delete(record)


# --- kept models ---


def has_model(session: Session, trial_id: int) -> bool:
    """Whether the trial's weights are kept."""
    return bool(session.scalar(select(func.count()).where(ModelRecord.trial_id == trial_id)))


def model_payload(session: Session, study_id: int, trial_number: int) -> bytes | None:
    """The kept weights of the study's trial of that number, None when none are kept; only
    the payload is read, never the whole row."""
    return session.scalar(
        select(ModelRecord.payload).where(
            ModelRecord.study_id == study_id, ModelRecord.trial_number == trial_number
        )
    )


# --- workers ---


def add_worker(session: Session, *, host: str, pid: int, device: str) -> WorkerRecord:
    """A new idle worker's row, flushed so that its id is known."""
    record = WorkerRecord(host=host, pid=pid, device=device, state="idle")
    session.add(record)
    session.flush()
    return record


def update_worker(session: Session, worker_id: int, **values: object) -> None:
    """Set columns of the worker's row; the heartbeat moves with every update, by the
    database's clock (a worker's own may be off)."""
    session.execute(
        update(WorkerRecord)
        .where(WorkerRecord.id == worker_id)
        .values(heartbeat_at=func.now(), **values)
    )


def workers_not_stopped(session: Session) -> list[tuple[WorkerRecord, str | None]]:
    """(worker, name of the study it works on) of every worker that has not stopped, newest
    first, in one query."""
    query = (
        select(WorkerRecord, StudyRecord.name)
        .outerjoin(StudyRecord, StudyRecord.id == WorkerRecord.current_study_id)
        .where(WorkerRecord.state != "stopped")
        .order_by(WorkerRecord.id.desc())
    )
    return [(worker, name) for worker, name in session.execute(query)]


def alive_workers_by_device(session: Session, alive_after: datetime) -> list[tuple[str, int]]:
    """(device, count) of the workers not stopped that beat at or after `alive_after`."""
    query = (
        select(WorkerRecord.device, func.count())
        .where(WorkerRecord.state != "stopped", WorkerRecord.heartbeat_at >= alive_after)
        .group_by(WorkerRecord.device)
    )
    return [(device, count) for device, count in session.execute(query)]


def database_now(session: Session) -> datetime:
    """The database's clock, which heartbeats are written with: ages compare against it,
    never against this machine's. As the driver returns it (naive UTC on SQLite)."""
    return session.scalar(select(func.now()))


# --- API tokens ---


def token_id(session: Session, name: str) -> int | None:
    """The id of the token of that name, revoked or not, if there is one."""
    return session.scalar(select(ApiTokenRecord.id).where(ApiTokenRecord.name == name))


def add_token(session: Session, name: str, token_hash: str) -> ApiTokenRecord:
    """A new token's row, read back so that its server-set creation time is there."""
    record = ApiTokenRecord(name=name, token_hash=token_hash)
    session.add(record)
    session.flush()
    session.refresh(record)
    return record


def all_tokens(session: Session) -> list[ApiTokenRecord]:
    """Every token, revoked ones too, oldest first."""
    return list(session.scalars(select(ApiTokenRecord).order_by(ApiTokenRecord.id)))


def active_token(session: Session, name: str) -> ApiTokenRecord | None:
    """The token of that name if it is not revoked."""
    return session.scalar(
        select(ApiTokenRecord).where(
            ApiTokenRecord.name == name, ApiTokenRecord.revoked_at.is_(None)
        )
    )


def mark_revoked(session: Session, record: ApiTokenRecord) -> None:
    """Revoke the token now, by the database's clock, and read the time back."""
    record.revoked_at = func.now()
    session.flush()
    session.refresh(record)


def token_hashes(session: Session) -> list[tuple[str, datetime | None]]:
    """(hash, revoked at) of every token, in one query."""
    query = select(ApiTokenRecord.token_hash, ApiTokenRecord.revoked_at)
    return [(token_hash, revoked) for token_hash, revoked in session.execute(query)]


def mark_token_used(
    session: Session, token_hash: str, now: datetime, used_before: datetime
) -> None:
    """Set the token's last use to `now` unless it was last used at or after
    `used_before`: one conditional statement, so most requests write nothing."""
    session.execute(
        update(ApiTokenRecord)
        .where(
            ApiTokenRecord.token_hash == token_hash,
            or_(
                ApiTokenRecord.last_used_at.is_(None),
                ApiTokenRecord.last_used_at < used_before,
            ),
        )
        .values(last_used_at=now)
    )


# --- uploaded datasets ---


def dataset(session: Session, dataset_id: int) -> DatasetRecord | None:
    """The upload with its content, for a worker to load."""
    return session.get(DatasetRecord, dataset_id)


def dataset_without_content(session: Session, dataset_id: int) -> DatasetRecord | None:
    """The upload's description; its content, up to the upload limit, is left unread."""
    return session.get(DatasetRecord, dataset_id, options=[defer(DatasetRecord.content)])


def all_datasets(session: Session) -> list[DatasetRecord]:
    """Every upload's description, oldest first, their contents left unread."""
    query = select(DatasetRecord).options(defer(DatasetRecord.content))
    return list(session.scalars(query.order_by(DatasetRecord.id)))


def add_dataset(session: Session, **columns: Any) -> DatasetRecord:
    """A new upload's row (`columns` are DatasetRecord's), read back so that its id and
    server-set creation time are there."""
    record = DatasetRecord(**columns)
    session.add(record)
    session.flush()
    session.refresh(record)
    return record
