"""The service's own tables, beside Optuna's in the same database.

Trials, params, intermediate values and heartbeats live in Optuna's schema; these tables
hold what Optuna has no place for: the study spec and its life cycle, checkpoints to resume
crashed trials, the weights of the best trials, uploaded data, workers and API tokens.
Every name starts with `hps_` so it can never clash with a table of Optuna's.

The schema is created by the Alembic migrations in `storage/migrations`; a test keeps the
two from drifting apart.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STUDY_STATES = ("queued", "running", "paused", "completed", "cancelled", "failed")
WORKER_STATES = ("idle", "busy", "stopped")
DATASET_FORMATS = ("csv", "parquet", "npz")

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> str:
    """The CHECK expression that keeps a string column within `values`."""
    return f"{column} IN ({', '.join(repr(value) for value in values)})"


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that always reads back as an aware UTC datetime.

    PostgreSQL stores `timestamptz`; SQLite has no time zone type and its CURRENT_TIMESTAMP
    is naive UTC text. Without this, the same column would compare naive on one backend and
    aware on the other.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _created_at() -> Mapped[datetime]:
    """Set by the database's clock, never a worker's, whose clock may be off (see
    docs/architecture.md, "Heartbeats, writes and leases")."""
    return mapped_column(UtcDateTime(), server_default=func.now())


def _updated_at() -> Mapped[datetime]:
    return mapped_column(UtcDateTime(), server_default=func.now(), onupdate=func.now())


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class StudyRecord(Base):
    """A submitted study: its spec and life-cycle state, which Optuna does not model.

    `n_trials` repeats the spec's budget so that claims and listings need no JSON parsing,
    and so `extend` can raise it without rewriting the spec.
    """

    __tablename__ = "hps_studies"
    __table_args__ = (CheckConstraint(_one_of("state", STUDY_STATES), name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), server_default="queued", index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    n_trials: Mapped[int] = mapped_column(Integer)
    optuna_study_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class CheckpointRecord(Base):
    """The newest checkpoint of a running trial, so a retry resumes instead of restarting.

    One row per Optuna trial, replaced in place (`storage.db.write_trial`): older
    checkpoints are never needed, and keeping them would grow the database without bound.
    """

    __tablename__ = "hps_checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(
        ForeignKey("hps_studies.id", ondelete="CASCADE"), index=True
    )
    trial_id: Mapped[int] = mapped_column(Integer, unique=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()


class ModelRecord(Base):
    """The trained weights of one of a study's best trials, served by `.../model`.

    Only the top K trials keep theirs; the (study_id, value) index finds the one to evict.
    """

    __tablename__ = "hps_models"
    __table_args__ = (Index("ix_hps_models_study_id_value", "study_id", "value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("hps_studies.id", ondelete="CASCADE"))
    trial_id: Mapped[int] = mapped_column(Integer, unique=True)
    trial_number: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _created_at()


class DatasetRecord(Base):
    """An uploaded data file, kept in the database so that workers on every node can read it."""

    __tablename__ = "hps_datasets"
    __table_args__ = (CheckConstraint(_one_of("format", DATASET_FORMATS), name="format"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(16))
    target: Mapped[str | list[str]] = mapped_column(JSON)
    task: Mapped[str] = mapped_column(String(16))
    content: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    n_rows: Mapped[int] = mapped_column(BigInteger)
    columns: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = _created_at()


class WorkerRecord(Base):
    """A worker process, for `GET /workers`; the heartbeat index finds the ones gone silent."""

    __tablename__ = "hps_workers"
    __table_args__ = (CheckConstraint(_one_of("state", WORKER_STATES), name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), server_default="idle")
    started_at: Mapped[datetime] = _created_at()
    heartbeat_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), server_default=func.now(), index=True
    )
    current_study_id: Mapped[int | None] = mapped_column(
        ForeignKey("hps_studies.id", ondelete="SET NULL")
    )
    current_trial_number: Mapped[int | None] = mapped_column(Integer)


class ApiTokenRecord(Base):
    """An API token, stored as a hash only, so a leaked database leaks no usable token."""

    __tablename__ = "hps_api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
