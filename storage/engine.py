"""Database URLs and connections.

SQLite is the embedded default; PostgreSQL (through psycopg 3) serves many workers and nodes.
Trials live in Optuna's own schema (`RDBStorage`), so `optuna.load_study` and
`optuna-dashboard` work on an hpsearch database as they are.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from hpsearch.storage import optuna_internals

# Heartbeats and retries are Optuna features still marked experimental, and Optuna warns
# when they are used outside `Study.optimize`; hpsearch's workers use them by design.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

DEFAULT_URL = "sqlite:///hpsearch.db"
SQLITE_BUSY_TIMEOUT_S = 60
SCHEMA_RACE_RETRIES = 3
MAX_RETRIES = 10  # a trial that keeps killing its workers is given up after this many retries
# Optuna's own Alembic version table; hpsearch's is `hps_alembic_version`.
OPTUNA_VERSION_TABLE = "alembic_version"


class StorageError(Exception):
    """A database that cannot be reached or used; the message names the URL (password hidden)."""


def default_url() -> str:
    return os.environ.get("HPSEARCH_DATABASE_URL") or DEFAULT_URL


def parse_url(url: str) -> URL:
    """The URL with PostgreSQL pointed at psycopg 3, whatever driver the user wrote."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(f"not a database URL: {url!r} (e.g. {DEFAULT_URL})") from None
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    elif parsed.get_backend_name() != "sqlite":
        raise StorageError(f"unsupported database {parsed.drivername!r}: use sqlite or postgresql")
    return parsed


def safe_url(url: str | URL) -> str:
    """The URL as it may be shown to users: the password is masked."""
    try:
        return (make_url(url) if isinstance(url, str) else url).render_as_string(hide_password=True)
    except ArgumentError:
        return str(url)


def without_password(message: str, url: str) -> str:
    """A driver's message with the URL's password masked, should the driver quote it."""
    try:
        password = make_url(url).password
    except ArgumentError:
        return message
    return message.replace(str(password), "***") if password else message


def sqlite_path(url: URL) -> Path | None:
    """The database file of a SQLite URL (None for an in-memory database)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def heartbeat_interval_s() -> int:
    """Seconds between a running trial's heartbeats ($HPSEARCH_HEARTBEAT_S, default 10)."""
    return int(os.environ.get("HPSEARCH_HEARTBEAT_S", "10"))


def grace_period_s() -> int:
    """A running trial whose heartbeat is older than this is failed and retried
    ($HPSEARCH_GRACE_PERIOD_S, default six heartbeats)."""
    return int(os.environ.get("HPSEARCH_GRACE_PERIOD_S", str(6 * heartbeat_interval_s())))


def optuna_storage(
    url: str, grace_s: int | None = None, *, check_schema: bool = True
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on `url`, tuned for several local processes or many remote ones.

    Heartbeats are on: a trial whose heartbeat is older than the grace period (`grace_s`,
    by default `grace_period_s()`, judged by the database's clock) is failed by
    `optuna.storages.fail_stale_trials` and retried with the same params as a new trial.
    Optuna's tables are created where missing; `check_schema=False` opens tables of an older
    Optuna's schema too, which only `upgrade_optuna` should want.
    """
    parsed = parse_url(url)
    path = sqlite_path(parsed)
    if path is not None:
        _prepare_sqlite(path)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True, "pool_size": 2, "max_overflow": 4}
    attempt = 0
    while True:
        try:
            storage = optuna.storages.RDBStorage(
                parsed.render_as_string(hide_password=False),
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval_s(),
                grace_period=grace_period_s() if grace_s is None else grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=MAX_RETRIES
                ),
                skip_compatibility_check=not check_schema,
            )
            if path is not None:
                _serialise_sqlite_transactions(storage.engine)
            _index_trials_by_state(storage.engine)
            return storage
        except (SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            # Processes that start together on a new database race to create Optuna's
            # tables; the loser finds them made and succeeds on its next try.
            if attempt == SCHEMA_RACE_RETRIES or not _lost_schema_race(exc):
                reason = driver_reason(exc)
                raise StorageError(
                    f"cannot use the database at {safe_url(parsed)}: {reason}"
                ) from exc
            attempt += 1
            time.sleep(0.2 * attempt)


@functools.cache
def optuna_head_revision() -> str | None:
    """The newest revision of Optuna's schema, from the migrations the installed Optuna ships:
    what its `alembic_version` must read for Optuna to open the tables.

    Read from the migration files' `revision` and `down_revision` lines (the one revision
    that no migration follows), so that every process's start does not load Alembic; where
    the files do not give exactly one, Alembic decides."""
    directory = optuna_internals.alembic_directory()
    revisions, followed = set(), set()
    for script in (directory / "versions").glob("*.py"):
        text = script.read_text()
        revisions.update(_REVISION.findall(text))
        followed.update(_DOWN_REVISION.findall(text))
    heads = revisions - followed
    if len(heads) == 1 and len(revisions) > 1:
        return heads.pop()
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(directory)).get_current_head()


_REVISION = re.compile(r"""^revision\s*=\s*["']([^"']+)["']""", re.MULTILINE)
_DOWN_REVISION = re.compile(r"""^down_revision\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def upgrade_optuna(url: str) -> None:
    """Create Optuna's tables, or bring those of an older Optuna to the installed one's schema,
    as `optuna storage upgrade` does; Optuna itself refuses to open older tables."""
    storage = optuna_storage(url, check_schema=False)
    try:
        current = storage.get_current_version()
        if current == storage.get_head_version():
            return
        if current not in storage.get_all_versions():
            raise StorageError(
                f"Optuna's tables in the database at {safe_url(url)} are of a newer Optuna "
                f"(revision {current}); upgrade optuna"
            )
        storage.upgrade()
    except SQLAlchemyError as exc:
        raise StorageError(
            f"cannot use the database at {safe_url(url)}: {driver_reason(exc)}"
        ) from exc
    finally:
        storage.engine.dispose()


def _serialise_sqlite_transactions(engine: sqlalchemy.Engine) -> None:
    """Make every transaction of Optuna's SQLite engine take the write lock at BEGIN.

    In WAL mode a deferred transaction that has read cannot write once another process
    has written: SQLite answers "database is locked" at once, without waiting. Beginning
    IMMEDIATE makes writers queue for the busy timeout instead, so several local workers
    share one file without that error.
    """

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # BEGIN is ours, not the sqlite3 module's

    def on_begin(connection: sqlalchemy.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    sqlalchemy.event.listen(engine, "connect", on_connect)
    sqlalchemy.event.listen(engine, "begin", on_begin)
    engine.dispose()  # connections made before the listeners would keep the old behaviour


def _index_trials_by_state(engine: sqlalchemy.Engine) -> None:
    """An index on Optuna's trials by (study, state): claims count a study's running and
    finished trials, and leaderboards read its completed ones, at every step. Optuna's own
    schema indexes the study alone."""
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE INDEX IF NOT EXISTS ix_hps_trials_study_id_state ON trials (study_id, state)"
        )


def _lost_schema_race(exc: BaseException) -> bool:
    """Whether creating Optuna's tables failed on rows or tables another process created
    meanwhile (its version rows, on SQLite, break a UNIQUE constraint)."""
    text = str(exc).lower()
    return any(sign in text for sign in ("already exists", "duplicate", "unique constraint"))


def _prepare_sqlite(path: Path) -> None:
    """Create the file's folder and switch it to WAL, so readers never block the writer."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
    except (OSError, sqlite3.Error) as exc:
        raise StorageError(f"cannot open the SQLite database {path}: {exc}") from None


def driver_reason(exc: BaseException) -> str:
    """The first line of the driver's own message, without SQLAlchemy's boilerplate."""
    original = getattr(exc, "orig", None) or exc.__cause__ or exc
    return str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__


@contextmanager
def file_lock(path: Path, purpose: str = "claim") -> Iterator[None]:
    """An exclusive lock on a file beside `path`, held across processes of this host; one
    file per purpose, so that holding one lock never waits for another."""
    with open(f"{path}.{purpose}-lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
