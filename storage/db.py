"""Engines, sessions, migrations, retries and row locks for the service's own tables.

Every process (CLI command, worker, API server) calls `upgrade(url)` at start, then works
through `session_scope(url)`. Optuna's tables are managed by Optuna (`storage.engine`);
the tables here are managed by the Alembic migrations in `storage/migrations`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy import delete, event, exists, func, insert, select, text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    NoResultFound,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.orm import Session

from hpsearch.storage.bulk import (
    PendingTrials,
    StartedTrial,
    enqueue_trials,
    start_trials,
    write_params,
)
from hpsearch.storage.engine import (
    OPTUNA_VERSION_TABLE,
    SQLITE_BUSY_TIMEOUT_S,
    StorageError,
    driver_reason,
    file_lock,
    optuna_head_revision,
    optuna_storage,
    parse_url,
    safe_url,
    sqlite_path,
)
from hpsearch.storage.models import CheckpointRecord, ModelRecord, StudyRecord
from hpsearch.storage.optuna_internals import BaseModel as OptunaModel
from hpsearch.storage.optuna_internals import (
    TrialHeartbeatModel,
    TrialModel,
)
from hpsearch.storage.queries import RunningTrial, running_trials, trial_counts

if TYPE_CHECKING:
    from alembic.config import Config

T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
# The newest revision in `migrations` (a test checks it): whether a database is at head is
# then one query, without loading Alembic, which only migrating needs.
SCHEMA_HEAD = "0004"
# Optuna keeps its own schema version in `alembic_version`, in the same database.
VERSION_TABLE = "hps_alembic_version"
# The key of the PostgreSQL advisory lock held while migrating.
MIGRATION_LOCK_KEY = int.from_bytes(b"hpsmigr", "big")
POOL_RECYCLE_S = 1800
RETRY_WAIT_S = 45.0
# An execution option of SQLite connections: how their transactions BEGIN.
SQLITE_BEGIN = "hpsearch_sqlite_begin"

# Lower-case fragments of driver messages for errors that a later attempt may not meet.
_TRANSIENT_MESSAGES = (
    "database is locked",
    "server closed the connection",
    "connection refused",
    "could not connect",
    "connection is closed",
    "connection reset",
    "terminating connection",
    "the database system is",
    "timeout expired",
    "no route to host",
    "could not translate host name",
    "failed to resolve host",
    "consuming input failed",
    "ssl syscall error",
    # Every connection slot (of the server, a database or a role) taken: one frees as soon
    # as another client disconnects.
    "too many clients",
    "too many connections",
)
# SQLSTATEs (or their classes) of a lost connection, a server shutting down or starting up,
# or one with all its connection slots taken (53300).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57P", "53300")

_engines: dict[tuple[int, str], sqlalchemy.Engine] = {}
_engines_lock = threading.Lock()


def make_engine(url: str) -> sqlalchemy.Engine:
    """The engine for `url`, one per URL and process: a forked child makes its own, so it
    never shares its parent's pooled connections."""
    key = (os.getpid(), url)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = _create_engine(parse_url(url))
        return _engines[key]


def _create_engine(url: URL) -> sqlalchemy.Engine:
    if url.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    return sqlalchemy.create_engine(
        url, pool_pre_ping=True, pool_size=5, max_overflow=5, pool_recycle=POOL_RECYCLE_S
    )


def _sqlite_engine(url: URL) -> sqlalchemy.Engine:
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(url)
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    """Wait for locks instead of failing, let readers run beside the writer (WAL), enforce
    foreign keys (cascades), and leave BEGIN to `_begin_sqlite_transaction`: the sqlite3
    module's own BEGIN handling skips SELECTs and DDL and cannot begin IMMEDIATE."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    mode = connection.get_execution_options().get(SQLITE_BEGIN, "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


@functools.cache
def _immediate_engine(engine: sqlalchemy.Engine) -> sqlalchemy.Engine:
    """The same engine and pool, with SQLite transactions that take the write lock at BEGIN."""
    return engine.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})


def upgrade(url: str) -> None:
    """Bring the database's whole schema to head: the service's tables (its migrations) and
    Optuna's (created by Optuna where missing). Both are needed before any request: listings
    and /metrics join the two.

    Cheap when they are there already (one query, once this process has seen Optuna's tables
    at head), so every process may call it at start; safe when several start together on a
    new database: one migrates under a lock, and the others wait for it and then find
    nothing left to do. Optuna's tables of an older Optuna are not migrated here (Optuna
    asks for that to be a deliberate step): StorageError naming `hpsearch migrate`.
    """
    key = (os.getpid(), url)
    try:
        engine = make_engine(url)
    except OSError as exc:  # a SQLite file whose folder cannot be made
        raise StorageError(f"cannot use the database at {safe_url(url)}: {exc}") from exc
    at_head = _current_revision(engine) == SCHEMA_HEAD
    if at_head and key in _complete_schemas:
        return
    if not at_head:
        _migrate(engine, url)
    _require_optuna_schema(engine, url)
    _complete_schemas.add(key)


# (process id, URL) of the databases whose Optuna tables this process has found at head.
_complete_schemas: set[tuple[int, str]] = set()


def migrate_command(url: str) -> str:
    """The command that brings the database at `url` to head, as it may be shown to users
    (password masked)."""
    return f"hpsearch migrate --db {shlex.quote(safe_url(url))}"


def schema_behind(url: str) -> str | None:
    """Why the database's schema is not at head (hpsearch's tables or Optuna's missing or at
    an older revision), or None when it is. Reads the two version tables and changes
    nothing, so a health check may call it; raises when the database cannot be reached."""
    engine = make_engine(url)
    for owner, table, head in (
        ("hpsearch's", VERSION_TABLE, SCHEMA_HEAD),
        ("Optuna's", OPTUNA_VERSION_TABLE, optuna_head_revision()),
    ):
        revision = _read_version(engine, table)
        if revision is None:
            return f"{owner} tables are missing"
        if revision != head:
            return f"{owner} tables are at revision {revision}, not {head}"
    return None


def _read_version(engine: sqlalchemy.Engine, table: str) -> str | None:
    """The revision in an Alembic version table; None where the table is missing or empty.
    A lost connection is raised, not taken for a missing table."""
    try:
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text(f"SELECT version_num FROM {table}")).scalar()
    except DBAPIError as exc:
        if is_transient(exc):
            raise
        return None


@contextmanager
def _schema_lock(engine: sqlalchemy.Engine) -> Iterator[None]:
    """The migration lock, held while Optuna creates its tables on connections of its own:
    PostgreSQL's advisory lock in a transaction kept open meanwhile, or a file lock beside
    a SQLite file (its write lock would make Optuna's connections wait for ours)."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection, connection.begin():
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
            yield
        return
    path = sqlite_path(engine.url)
    with file_lock(path, "schema") if path else contextlib.nullcontext():
        yield


def _migrate(engine: sqlalchemy.Engine, url: str) -> None:
    from alembic.util import CommandError

    try:
        _migrate_under_lock(engine)
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot use the database at {safe_url(url)}: {driver_reason(exc)}"
        ) from exc
    except CommandError as exc:  # a revision unknown here: the database is a newer hpsearch's
        raise StorageError(
            f"the database at {safe_url(url)} has a schema this hpsearch does not know "
            f"({exc}); upgrade hpsearch"
        ) from exc


def _require_optuna_schema(engine: sqlalchemy.Engine, url: str) -> None:
    """Create Optuna's tables where they are missing; refuse those of another Optuna.

    Under a lock, read again inside it: processes that start together on a new database
    would otherwise all create the tables and stamp their version, and all but one fail."""
    if _read_version(engine, OPTUNA_VERSION_TABLE) == optuna_head_revision():
        return
    try:
        with _schema_lock(engine):
            if _read_version(engine, OPTUNA_VERSION_TABLE) != optuna_head_revision():
                optuna_storage(url).engine.dispose()
    except RuntimeError as exc:  # Optuna's refusal of tables from another Optuna version
        raise StorageError(
            f"Optuna's tables in the database at {safe_url(url)} are not at this Optuna's "
            f"schema ({str(exc).split('. ')[0]}); run `{migrate_command(url)}`"
        ) from exc


def _migrate_under_lock(engine: sqlalchemy.Engine) -> None:
    """Migrate in one transaction that holds a lock: PostgreSQL's advisory lock, or SQLite's
    write lock from BEGIN IMMEDIATE. Alembic reads the version inside it, so a process that
    waited finds the schema at head and does nothing."""
    from alembic import command

    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            connection.execution_options(**{SQLITE_BEGIN: "IMMEDIATE"})
        with connection.begin():
            if engine.dialect.name == "postgresql":
                connection.execute(
                    sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": MIGRATION_LOCK_KEY},
                )
            command.upgrade(_alembic_config(connection), "head")


def _current_revision(engine: sqlalchemy.Engine) -> str | None:
    """The database's revision; None where it cannot be read (no version table yet, or no
    connection), which sends `upgrade` down its locked path to decide."""
    try:
        with engine.connect() as connection:
            return connection.execute(
                sqlalchemy.text(f"SELECT version_num FROM {VERSION_TABLE}")
            ).scalar()
    except DBAPIError:
        return None


def _alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration in code: the package ships no alembic.ini."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def own_tables_only(name: str | None, type_: str, _parents: dict[str, str | None]) -> bool:
    """Alembic's `include_name` for comparing the schema with the models: hpsearch's tables
    only, since Optuna's share the database and are Optuna's to migrate."""
    return type_ != "table" or (name or "").startswith("hps_")


@contextmanager
def session_scope(url: str, *, immediate: bool = False) -> Iterator[Session]:
    """A session in one transaction: committed when the block ends, rolled back on error.

    `immediate=True` makes a SQLite transaction take the write lock at BEGIN, which a claim
    needs: a deferred transaction that reads, then writes, fails at once with "database is
    locked" when another process wrote in between. On PostgreSQL it changes nothing; lock
    rows with `lock_study` instead. Objects stay readable after the block
    (`expire_on_commit=False`), so a service function may return them.
    """
    engine = make_engine(url)
    if immediate:
        engine = _immediate_engine(engine)
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session


def ping(session: Session) -> None:
    """One round trip to the database (`SELECT 1`): whether it answers at all, the cheapest
    check a health probe can make."""
    session.execute(text("SELECT 1"))


def lock_study(session: Session, study_id: int) -> StudyRecord:
    """The study's row, locked until the session's transaction ends, so that counting its
    budget and claiming a trial cannot interleave with another worker's claim.

    PostgreSQL: `SELECT ... FOR UPDATE`. SQLite locks the whole database instead, which
    needs a session from `session_scope(url, immediate=True)`. Raises
    `sqlalchemy.exc.NoResultFound` when there is no such study.
    """
    statement = (
        select(StudyRecord)
        .where(StudyRecord.id == study_id)
        .execution_options(populate_existing=True)
    )
    if session.get_bind().dialect.name == "postgresql":
        statement = statement.with_for_update()
    elif session.connection().get_execution_options().get(SQLITE_BEGIN) != "IMMEDIATE":
        raise ValueError("on SQLite, lock_study needs a session_scope(url, immediate=True)")
    return session.execute(statement).scalar_one()


@dataclass(frozen=True)
class StudyClaim:
    """A study held under its claim lock: its row as read under the lock, and its trials
    counted under the same lock whenever the holder asks (after failing stale trials, say)."""

    record: StudyRecord
    # A session within the claim (`immediate`: one that writes, on SQLite).
    _session: Callable[[bool], contextlib.AbstractContextManager[Session]]

    def trial_counts(self) -> dict[str, int]:
        """The study's Optuna trials by state name ("complete", "running", ...), counted by
        the database now: one grouped query on the (study, state) index, however many
        trials the study holds."""
        study_id = self.record.optuna_study_id
        if study_id is None:
            return {}
        with self._session(False) as session:
            return dict(trial_counts(session, [study_id]).get(study_id, {}))

    def running_trials(self, holder_key: str) -> list[RunningTrial]:
        """The study's running trials, who holds them and how long ago each last beat."""
        study_id = self.record.optuna_study_id
        if study_id is None:
            return []
        with self._session(False) as session:
            return running_trials(session, study_id, holder_key)

    def beat_for_orphans(self) -> None:
        """Give a first heartbeat (the database's time) to the study's running trials that
        have none. Under the claim lock no claim is between its `ask`
        and its first heartbeat, so such a trial was left by a claim that broke in between
        (a crash, or the database lost mid-claim). With a heartbeat it goes stale after the
        grace period and is retried, instead of holding budget for ever."""
        study_id = self.record.optuna_study_id
        if study_id is None:
            return
        trials, beats = TrialModel.__table__, TrialHeartbeatModel.__table__
        orphans = select(trials.c.trial_id, func.current_timestamp()).where(
            trials.c.study_id == study_id,
            trials.c.state == TrialState.RUNNING,
            ~exists().where(beats.c.trial_id == trials.c.trial_id),
        )
        with self._session(True) as session:
            session.execute(insert(beats).from_select(["trial_id", "heartbeat"], orphans))

    def start_trials(
        self, *, retries: int, new: int, system_attrs: Mapping[str, Any]
    ) -> list[StartedTrial]:
        """Start waiting retries and new trials in one transaction (`bulk.start_trials`)."""
        study_id = self.record.optuna_study_id
        assert study_id is not None, "a study being claimed has its Optuna study"
        with self._session(True) as session:
            return start_trials(
                session, study_id, retries=retries, new=new, system_attrs=system_attrs
            )

    def enqueue_trials(self, configs: list[dict[str, Any]]) -> list[tuple[int, int]]:
        """Waiting trials with these configurations, in one transaction within the claim
        (`bulk.enqueue_trials`): (trial id, number) of each."""
        study_id = self.record.optuna_study_id
        if study_id is None:
            raise LookupError(f"study {self.record.name!r} has no Optuna study")
        with self._session(True) as session:
            return enqueue_trials(session, study_id, configs)

    def write_params(self, pending: PendingTrials) -> None:
        """The params drawn for started trials, within the claim (`bulk.write_params`)."""
        with self._session(True) as session:
            write_params(session, pending.params, pending.system_attrs)


@contextmanager
def claim_study(url: str, study_id: int) -> Iterator[StudyClaim]:
    """Hold the study's claim lock and yield its row as read under the lock: counting the
    budget and creating a trial inside it cannot interleave with another worker's claim.

    PostgreSQL: the row is locked (`FOR UPDATE`) until the block ends, and trials are
    counted in that same transaction (read committed: each count sees every trial committed
    before it), so a claim holds one connection of its own. SQLite: a file lock beside the
    database; an immediate transaction cannot be held instead, because Optuna creates the
    trial on a connection of its own, which would wait for ours for ever.
    """
    parsed = parse_url(url)
    if parsed.get_backend_name() == "postgresql":
        with session_scope(url) as session:
            record = lock_study(session, study_id)
            yield StudyClaim(record, lambda _immediate: contextlib.nullcontext(session))
        return
    path = sqlite_path(parsed)
    with file_lock(path) if path else contextlib.nullcontext():
        with session_scope(url) as session:
            record = session.get(StudyRecord, study_id, populate_existing=True)
        if record is None:
            raise NoResultFound(f"no study with id {study_id}")
        yield StudyClaim(record, lambda immediate: session_scope(url, immediate=immediate))


def newest_checkpoint(session: Session, trial_ids: list[int]) -> CheckpointRecord | None:
    """The checkpoint with the most epochs among these trials (a trial and its retries)."""
    return session.scalar(
        select(CheckpointRecord)
        .where(CheckpointRecord.trial_id.in_(trial_ids))
        .order_by(CheckpointRecord.epoch.desc())
        .limit(1)
    )


def delete_checkpoints(session: Session, trial_ids: list[int]) -> None:
    """Drop the checkpoints of a finished trial and of the trials it retried."""
    session.execute(delete(CheckpointRecord).where(CheckpointRecord.trial_id.in_(trial_ids)))


@dataclass(frozen=True)
class Weights:
    """A finished trial's trained weights, offered to `keep_best_models`; `payload`
    serializes them, called only for weights that are stored: most trials' are not, and a
    network's weights can be megabytes."""

    trial_id: int
    trial_number: int
    value: float
    payload: Callable[[], bytes]


def keep_best_models(
    session: Session, study_id: int, offered: list[Weights], *, maximize: bool, keep: int
) -> list[int]:
    """Store the offered weights that rank among the study's best `keep` with those stored
    already, then delete every model that falls out of them: only the top trials' weights
    are worth their space. A tie goes to the older trial. Returns the numbers of the trials
    whose weights were stored.

    Under the study's lock (`lock_study`, so on SQLite in an immediate session): two workers
    finishing at once would otherwise each rank the models without the other's and keep one
    too many."""
    if not offered:
        return []
    lock_study(session, study_id)
    order = ModelRecord.value.desc() if maximize else ModelRecord.value.asc()
    ranked = (
        select(ModelRecord.value, ModelRecord.trial_number)
        .where(ModelRecord.study_id == study_id)
        .order_by(order, ModelRecord.trial_number)
    )
    pool: list[tuple[float, int, Weights | None]] = [
        (value, number, None) for value, number in session.execute(ranked.limit(keep))
    ]
    pool += [(w.value, w.trial_number, w) for w in offered]
    pool.sort(key=lambda entry: (-entry[0] if maximize else entry[0], entry[1]))
    stored = [w for _, _, w in pool[:keep] if w is not None]
    session.add_all(
        ModelRecord(
            study_id=study_id,
            trial_id=w.trial_id,
            trial_number=w.trial_number,
            value=w.value,
            payload=w.payload(),
        )
        for w in stored
    )
    session.flush()
    surplus = ranked.with_only_columns(ModelRecord.id).offset(keep)
    session.execute(delete(ModelRecord).where(ModelRecord.id.in_(surplus.scalar_subquery())))
    return [w.trial_number for w in stored]


def delete_optuna_study(session: Session, study_id: int) -> None:
    """Delete an Optuna study with all its trials' rows, in a bulk statement per table of
    Optuna's schema (children first): what `optuna.delete_study` does through the ORM, row
    by row, in seconds for thousands of trials. Nothing happens for an id that is gone."""
    trials = TrialModel.__table__
    trial_ids = select(trials.c.trial_id).where(trials.c.study_id == study_id)
    for table in reversed(OptunaModel.metadata.sorted_tables):
        if table is not trials and "trial_id" in table.c:
            session.execute(delete(table).where(table.c.trial_id.in_(trial_ids)))
        elif "study_id" in table.c:  # the trials, the study's own rows, and the study
            session.execute(delete(table).where(table.c.study_id == study_id))


# What a database call raises: SQLAlchemy's errors, Optuna's wrapping of them, and ours (a
# database that could not be reached or used, after waiting).
DATABASE_ERRORS = (SQLAlchemyError, optuna.exceptions.StorageInternalError, StorageError)


def is_transient(exc: BaseException) -> bool:
    """Whether another attempt may succeed: a lost, refused or not yet possible connection,
    or a SQLite file locked past its busy timeout. Anything else is a bug or bad input.
    Optuna's StorageInternalError and our StorageError are judged by the error they wrap."""
    wrapper = (optuna.exceptions.StorageInternalError, StorageError)
    if isinstance(exc, wrapper) and exc.__cause__ is not None:
        return is_transient(exc.__cause__)
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    message = str(exc.orig).lower()
    return sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES) or any(
        fragment in message for fragment in _TRANSIENT_MESSAGES
    )


def with_retries(
    fn: Callable[[], T],
    *,
    url: str,
    total_wait_s: float = RETRY_WAIT_S,
    base_delay_s: float = 0.1,
    max_delay_s: float = 5.0,
) -> T:
    """`fn()`, tried again with exponential backoff and jitter while it fails transiently,
    so a worker survives a database restart of a few seconds.

    `fn` must be a whole unit of work (it opens its own session), so that a retry redoes
    it from the start. Other errors are raised at once; after `total_wait_s` of transient
    ones, a `StorageError` naming `url` (password hidden).
    """
    deadline = time.monotonic() + total_wait_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except (DBAPIError, optuna.exceptions.StorageInternalError) as exc:
            if not is_transient(exc):
                raise
            delay = min(max_delay_s, base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1)
            if time.monotonic() + delay > deadline:
                raise StorageError(
                    f"cannot use the database at {safe_url(url)} "
                    f"({attempt} attempts): {driver_reason(exc)}"
                ) from exc
            time.sleep(delay)
