"""The service's own tables on real SQLite files and a real PostgreSQL server: migrations,
constraints, row locks and retries."""

from __future__ import annotations

import multiprocessing
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError

from hpsearch.storage.bulk import TrialWrite, write_trials
from hpsearch.storage.db import (
    MIGRATIONS,
    SCHEMA_HEAD,
    VERSION_TABLE,
    Weights,
    keep_best_models,
    lock_study,
    make_engine,
    own_tables_only,
    session_scope,
    upgrade,
    with_retries,
)
from hpsearch.storage.engine import StorageError, optuna_head_revision, optuna_storage
from hpsearch.storage.models import (
    Base,
    CheckpointRecord,
    ModelRecord,
    StudyRecord,
    WorkerRecord,
)

TABLES = {
    "hps_studies",
    "hps_checkpoints",
    "hps_models",
    "hps_datasets",
    "hps_workers",
    "hps_api_tokens",
}
INDEXES = {
    "hps_studies": {"ix_hps_studies_state"},
    "hps_checkpoints": {"ix_hps_checkpoints_study_id"},
    "hps_models": {"ix_hps_models_study_id_value"},
    "hps_workers": {"ix_hps_workers_heartbeat_at"},
}


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database: a SQLite file, or a database on the PostgreSQL server."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'hpsearch.db'}"


@pytest.fixture
def migrated(url: str) -> str:
    upgrade(url)
    return url


def add_study(url: str, name: str = "digits") -> int:
    with session_scope(url) as session:
        study = StudyRecord(name=name, spec={"name": name}, n_trials=10)
        session.add(study)
        session.flush()
        return study.id


def version_rows(url: str) -> list[Any]:
    with make_engine(url).connect() as connection:
        return connection.execute(sqlalchemy.text(f"SELECT * FROM {VERSION_TABLE}")).all()


def test_upgrade_creates_tables_and_indexes(migrated: str) -> None:
    inspector = sqlalchemy.inspect(make_engine(migrated))
    assert TABLES | {VERSION_TABLE} <= set(inspector.get_table_names())
    for table, indexes in INDEXES.items():
        found = inspector.get_indexes(table)
        assert {i["name"] for i in found if not i.get("duplicates_constraint")} == indexes
    assert version_rows(migrated) == [(SCHEMA_HEAD,)]


def test_schema_head_is_the_newest_migration() -> None:
    """`upgrade` compares the database with SCHEMA_HEAD instead of asking Alembic: a new
    migration must move it, or databases would never be migrated to it."""
    assert ScriptDirectory(str(MIGRATIONS)).get_current_head() == SCHEMA_HEAD


def test_optuna_head_revision_is_alembics() -> None:
    """Read from Optuna's migration files without Alembic, it must be what Alembic says."""
    directory = Path(optuna.storages._rdb.storage.__file__).with_name("alembic")
    assert optuna_head_revision() == ScriptDirectory(str(directory)).get_current_head()


def test_migrated_schema_matches_models(migrated: str) -> None:
    with make_engine(migrated).connect() as connection:
        context = MigrationContext.configure(
            connection,
            opts={
                "version_table": VERSION_TABLE,
                "compare_server_default": True,
                "include_name": own_tables_only,
            },
        )
        assert compare_metadata(context, Base.metadata) == []


def test_check_constraints_reject_unknown_states(migrated: str) -> None:
    """compare_metadata does not see CHECK constraints, so test them directly."""
    with pytest.raises(IntegrityError), session_scope(migrated) as session:
        session.add(StudyRecord(name="x", spec={}, n_trials=1, state="exploded"))


def test_upgrade_at_head_runs_one_query(migrated: str) -> None:
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    engine = make_engine(migrated)
    event.listen(engine, "before_cursor_execute", record)
    try:
        upgrade(migrated)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [s for s in statements if not s.startswith("BEGIN")] == [
        f"SELECT version_num FROM {VERSION_TABLE}"
    ]
    assert version_rows(migrated) == [(SCHEMA_HEAD,)]


def test_upgrade_refuses_a_schema_from_a_newer_version(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'newer.db'}"
    upgrade(url)
    with make_engine(url).begin() as connection:
        connection.execute(sqlalchemy.text(f"UPDATE {VERSION_TABLE} SET version_num = '9999'"))
    with pytest.raises(StorageError, match="9999"):
        upgrade(url)


def upgrade_together(barrier: Any, url: str) -> None:
    """Runs in a spawned process: start the upgrade at the same moment as the others."""
    barrier.wait(timeout=60)
    upgrade(url)


@pytest.mark.integration
def test_concurrent_upgrades_on_a_fresh_database(url: str) -> None:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(4)
    processes = [context.Process(target=upgrade_together, args=(barrier, url)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    assert version_rows(url) == [(SCHEMA_HEAD,)]
    assert set(sqlalchemy.inspect(make_engine(url)).get_table_names()) >= TABLES


def running_trial(url: str) -> optuna.Trial:
    """A real running Optuna trial in the same database: checkpoints need one."""
    return optuna.create_study(storage=optuna_storage(url)).ask()


def test_deleting_a_study_deletes_its_rows(migrated: str) -> None:
    study_id = add_study(migrated)
    trial = running_trial(migrated)
    with session_scope(migrated) as session:
        write_trials(session, study_id, [TrialWrite(trial._trial_id, 0, checkpoint=(3, b"w"))])
        session.add(
            ModelRecord(study_id=study_id, trial_id=1, trial_number=0, value=0.9, payload=b"m")
        )
        session.add(WorkerRecord(host="h", pid=1, device="cpu", current_study_id=study_id))
    with session_scope(migrated) as session:
        session.execute(sqlalchemy.delete(StudyRecord).where(StudyRecord.id == study_id))
    with session_scope(migrated) as session:
        assert session.scalar(select(func.count()).select_from(CheckpointRecord)) == 0
        assert session.scalar(select(func.count()).select_from(ModelRecord)) == 0
        assert session.scalars(select(WorkerRecord.current_study_id)).all() == [None]


def test_a_trial_keeps_only_its_newest_checkpoint(migrated: str) -> None:
    study_id = add_study(migrated)
    trial_id = running_trial(migrated)._trial_id
    for epoch, payload in [(1, b"first"), (2, b"second!")]:
        with session_scope(migrated) as session:
            write = TrialWrite(trial_id, 3, checkpoint=(epoch, payload))
            assert write_trials(session, study_id, [write]) == {}
    with session_scope(migrated) as session:
        (checkpoint,) = session.scalars(select(CheckpointRecord)).all()
        assert (checkpoint.epoch, checkpoint.payload, checkpoint.size_bytes) == (2, b"second!", 7)
        assert checkpoint.updated_at.tzinfo is not None
    with pytest.raises(IntegrityError), session_scope(migrated) as session:
        session.add(
            CheckpointRecord(
                study_id=study_id,
                trial_id=trial_id,
                trial_number=3,
                epoch=3,
                payload=b"",
                size_bytes=0,
            )
        )


def test_a_finished_trial_refuses_a_late_checkpoint_and_the_others_are_written(
    migrated: str,
) -> None:
    study_id = add_study(migrated)
    trial = running_trial(migrated)
    trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)  # failed as stale, say
    live = running_trial(migrated)
    writes = [
        TrialWrite(trial._trial_id, 0, checkpoint=(4, b"x")),
        TrialWrite(live._trial_id, 0, checkpoint=(4, b"y")),
    ]
    with session_scope(migrated) as session:
        assert write_trials(session, study_id, writes) == {trial._trial_id: "FAIL"}
    with session_scope(migrated) as session:
        (kept,) = session.scalars(select(CheckpointRecord.trial_id)).all()
        assert kept == live._trial_id  # the live trial of the same write is written


@pytest.mark.parametrize("maximize", [True, False])
def test_only_the_best_models_are_kept(migrated: str, maximize: bool) -> None:
    study_id = add_study(migrated)
    serialized: list[int] = []
    for number, value in enumerate([0.5, 0.9, 0.7, 0.1, 0.7]):

        def payload(number: int = number) -> bytes:
            serialized.append(number)
            return b"w"

        with session_scope(migrated, immediate=True) as session:
            stored = keep_best_models(
                session,
                study_id,
                [Weights(100 + number, number, value, payload)],
                maximize=maximize,
                keep=2,
            )
        assert stored == ([number] if number in serialized else [])
    with session_scope(migrated) as session:
        kept = sorted(session.scalars(select(ModelRecord.trial_number)).all())
    assert kept == ([1, 2] if maximize else [0, 3])
    # Weights that cannot make the best two are never serialized; maximising, the last 0.7
    # ties with a kept model and loses to the older trial.
    assert serialized == ([0, 1, 2] if maximize else [0, 1, 2, 3])


def test_weights_offered_together_are_ranked_with_those_kept(migrated: str) -> None:
    study_id = add_study(migrated)
    serialized: list[int] = []

    def offer(number: int, value: float) -> Weights:
        return Weights(100 + number, number, value, lambda: serialized.append(number) or b"w")

    with session_scope(migrated, immediate=True) as session:
        keep_best_models(session, study_id, [offer(0, 0.8)], maximize=True, keep=2)
    with session_scope(migrated, immediate=True) as session:
        offered = [offer(1, 0.5), offer(2, 0.9), offer(3, 0.8), offer(4, 0.85)]
        stored = keep_best_models(session, study_id, offered, maximize=True, keep=2)
    assert stored == [2, 4]  # 0.8 of trial 3 ties with trial 0's and loses to the older
    assert serialized == [0, 2, 4]
    with session_scope(migrated) as session:
        assert sorted(session.scalars(select(ModelRecord.trial_number)).all()) == [2, 4]


def test_two_workers_keeping_models_at_once_keep_only_the_best(migrated: str) -> None:
    """The second keeps after the first commits, and ranks its model against the first's."""
    study_id = add_study(migrated)
    kept, release = threading.Event(), threading.Event()

    def keep(number: int, value: float, hold: bool = False) -> None:
        with session_scope(migrated, immediate=True) as session:
            keep_best_models(
                session,
                study_id,
                [Weights(100 + number, number, value, lambda: b"w")],
                maximize=True,
                keep=1,
            )
            kept.set()
            if hold:
                assert release.wait(timeout=30)

    first = threading.Thread(target=keep, args=(0, 0.9, True))
    first.start()
    assert kept.wait(timeout=30)
    second = threading.Thread(target=keep, args=(1, 0.8))
    second.start()
    time.sleep(0.5)  # the second would rank and commit now if nothing held it back
    release.set()
    first.join(timeout=30)
    second.join(timeout=30)
    with session_scope(migrated) as session:
        assert session.scalars(select(ModelRecord.trial_number)).all() == [0]


def test_lock_study_blocks_a_second_claim_until_the_first_commits(migrated: str) -> None:
    study_id = add_study(migrated)
    locked = threading.Event()
    committed_at: list[float] = []

    def first() -> None:
        with session_scope(migrated, immediate=True) as session:
            lock_study(session, study_id).state = "running"
            locked.set()
            time.sleep(1.0)
        committed_at.append(time.monotonic())

    thread = threading.Thread(target=first)
    thread.start()
    assert locked.wait(timeout=30)
    with session_scope(migrated, immediate=True) as session:
        state = lock_study(session, study_id).state
        acquired_at = time.monotonic()
    thread.join(timeout=30)
    assert state == "running"  # it waited for the first transaction's commit
    assert acquired_at >= committed_at[0] - 0.5


def test_lock_study_on_sqlite_needs_an_immediate_session(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    study_id = add_study(url)
    with pytest.raises(ValueError, match="immediate"), session_scope(url) as session:
        lock_study(session, study_id)


@pytest.fixture
def locked_sqlite_file(tmp_path: Path) -> Iterator[str]:
    """A SQLite file whose write lock another connection holds for a second."""
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(1.0, holder.execute, args=("COMMIT",))
    release.start()
    yield f"sqlite:///{path}"
    release.join()
    holder.close()


@pytest.mark.postgres
def test_with_retries_waits_for_a_free_connection_slot(postgres_url: str) -> None:
    role = f"hps_limited_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 1')
    limited = sqlalchemy.make_url(postgres_url).set(username=role)
    engine = sqlalchemy.create_engine(limited, poolclass=sqlalchemy.pool.NullPool)
    attempts = 0

    def select_one() -> int:
        nonlocal attempts
        attempts += 1
        with engine.connect() as connection:
            return connection.execute(sqlalchemy.text("SELECT 1")).scalar_one()

    try:
        holder = engine.connect()  # takes the role's only slot for half a second
        threading.Timer(0.5, holder.close).start()
        assert with_retries(select_one, url=postgres_url, total_wait_s=10, base_delay_s=0.05) == 1
        assert attempts > 1
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        admin.dispose()


def test_with_retries_outlasts_a_transient_lock(locked_sqlite_file: str) -> None:
    url = locked_sqlite_file
    # A short busy timeout, so that the lock surfaces as "database is locked" at once.
    engine = sqlalchemy.create_engine(url, connect_args={"timeout": 0.01})
    attempts = 0

    def insert() -> int:
        nonlocal attempts
        attempts += 1
        with engine.begin() as connection:
            return connection.execute(sqlalchemy.text("INSERT INTO t VALUES (1)")).rowcount

    assert with_retries(insert, url=url, total_wait_s=10, base_delay_s=0.05) == 1
    assert attempts > 1
    engine.dispose()


def test_with_retries_raises_other_errors_at_once(migrated: str) -> None:
    add_study(migrated, "taken")
    attempts = 0

    def duplicate() -> None:
        nonlocal attempts
        attempts += 1
        add_study(migrated, "taken")

    with pytest.raises(IntegrityError):
        with_retries(duplicate, url=migrated, total_wait_s=10)
    assert attempts == 1


@pytest.mark.integration
def test_with_retries_gives_up_on_a_refused_port_naming_the_url() -> None:
    url = "postgresql://postgres:secret@127.0.0.1:9/test"
    attempts = 0

    def connect() -> None:
        nonlocal attempts
        attempts += 1
        make_engine(url).connect().close()

    with pytest.raises(StorageError, match=re.escape("127.0.0.1:9")) as raised:
        with_retries(connect, url=url, total_wait_s=0.5, base_delay_s=0.05)
    assert attempts > 1
    assert "secret" not in str(raised.value)


def test_optuna_trials_are_indexed_by_study_and_state(url: str) -> None:
    optuna_storage(url)
    optuna_storage(url)  # a second process finds the index made
    indexes = sqlalchemy.inspect(make_engine(url)).get_indexes("trials")
    assert {"name": "ix_hps_trials_study_id_state", "columns": ["study_id", "state"]} in [
        {"name": index["name"], "columns": index["column_names"]} for index in indexes
    ]


@pytest.mark.postgres
def test_weights_are_stored_uncompressed_on_postgresql(postgres_url: str) -> None:
    """Float tensors do not compress: PostgreSQL's compression only costs time."""
    upgrade(postgres_url)
    query = (
        "SELECT attrelid::regclass::text, attstorage FROM pg_attribute "
        "WHERE attname = 'payload' AND attrelid IN "
        "('hps_checkpoints'::regclass, 'hps_models'::regclass) ORDER BY 1"
    )
    with make_engine(postgres_url).connect() as connection:
        rows = connection.exec_driver_sql(query).all()
    assert [tuple(row) for row in rows] == [("hps_checkpoints", "e"), ("hps_models", "e")]
