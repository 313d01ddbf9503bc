"""A fleet of `hpsearch worker` processes that nothing one study holds can stop.

Real worker processes on real databases: they draw distinct points as a function of the
study's seed and the trial's number, a study whose trials keep failing (or whose Optuna
record vanished) is failed with its reason while the others complete, and a worker started
while PostgreSQL is down waits for it instead of exiting.
"""

from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest

from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service.results import list_studies, study_summary
from hpsearch.storage import Store
from tests.conftest import run_cli, write_spec
from tests.fleet import (
    Db,
    Workers,
    assert_budget_never_exceeded,
    assert_clean_exits,
    assert_finished_exactly,
    crash_spec,
    load_trials,
    submit,
    wait_for,
    watch_until_exit,
)
from tests.pg_private import private_postgres

pytestmark = pytest.mark.timeout(600)


def one_epoch_spec(name: str, n_trials: int, sampler: str, **sampler_options: int) -> dict:
    spec = crash_spec(name, n_trials, max_epochs=1)
    spec["search_space"]["dropout"] = {"low": 0.0, "high": 0.5}
    spec["sampler"] = {"name": sampler, "seed": 0, **sampler_options}
    return spec


def params_by_number(url: str, study: str) -> dict[int, tuple[float, ...]]:
    return {t.number: tuple(t.params[k] for k in sorted(t.params)) for t in load_trials(url, study)}


@pytest.mark.postgres
@pytest.mark.system
def test_parallel_workers_draw_distinct_points_the_same_as_one_worker_would(
    tmp_path: Path, postgres_url: str, workers: Workers
) -> None:
    """Four workers share a random-sampler study and a TPE one: every point distinct, the
    budgets exact, and TPE's start-up points those one worker drew for the same seed."""
    submit(postgres_url, tmp_path, one_epoch_spec("spread", 24, "random"))
    for name in ("alone", "shared"):
        submit(postgres_url, tmp_path, one_epoch_spec(name, 8, "tpe", n_startup_trials=8))
    store = Store.open(postgres_url)
    assert Worker(WorkerOptions(store, studies=("alone",), idle_exit_s=0)).run() == 0
    for _ in range(4):
        workers.start(postgres_url, "--idle-exit", "3")
    snapshots = watch_until_exit(Db(postgres_url), workers)
    assert_clean_exits(workers)
    assert_budget_never_exceeded(snapshots, "spread", 24)
    trials = assert_finished_exactly(postgres_url, "spread", 24)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 24
    assert len({t.user_attrs["worker"] for t in trials}) > 1, "no trial was shared"
    assert_finished_exactly(postgres_url, "shared", 8)
    alone = params_by_number(postgres_url, "alone")
    shared = params_by_number(postgres_url, "shared")
    assert len(set(shared.values())) == 8
    assert shared == alone


@pytest.mark.postgres
@pytest.mark.system
def test_a_study_whose_trials_keep_failing_is_failed_and_the_others_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: Workers, postgres_url: str
) -> None:
    """(The rule itself is tested on SQLite too, in test_service.py.)"""
    monkeypatch.setenv("HPSEARCH_DATA_DIR", str(tmp_path))  # as the workers have it
    url = postgres_url
    (tmp_path / "rows.csv").write_text(
        "a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(60))
    )
    broken = crash_spec("broken", 6, max_epochs=1)
    broken["dataset"] = {"source": "file", "path": "rows.csv", "target": "label"}
    submit(url, tmp_path, broken)
    (tmp_path / "rows.csv").unlink()  # every trial of `broken` now fails to load its data
    submit(url, tmp_path, crash_spec("valid", 6, max_epochs=2))
    for _ in range(2):
        workers.start(url, "--idle-exit", "3")
    watch_until_exit(Db(url), workers)
    assert_clean_exits(workers)
    assert_finished_exactly(url, "valid", 6)
    store = Store.open(url)
    failed = study_summary(store, "broken")
    assert failed.state == "failed"
    assert failed.reason.startswith("3 trials in a row failed; the last: DatasetError")
    assert "data file 'rows.csv' not found" in failed.reason
    assert failed.progress.failed >= 3 and failed.progress.running == 0
    status = run_cli("status", "broken", "--db", url, cwd=tmp_path)
    assert "failed" in status.stdout and "reason: 3 trials in a row failed" in status.stdout


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_study_whose_optuna_record_vanished_is_failed_and_the_worker_goes_on(
    request: pytest.FixtureRequest, tmp_path: Path, backend: str
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'vanished.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    submit(url, tmp_path, crash_spec("vanished", 3, max_epochs=1))
    submit(url, tmp_path, crash_spec("kept", 3, max_epochs=1))
    storage = optuna.storages.RDBStorage(url.replace("postgresql://", "postgresql+psycopg://"))
    optuna.delete_study(study_name="vanished", storage=storage)  # as the dashboard would
    store = Store.open(url)
    assert Worker(WorkerOptions(store, idle_exit_s=0)).run() == 0
    assert study_summary(store, "kept").state == "completed"
    gone = study_summary(store, "vanished")
    assert gone.state == "failed"
    assert gone.reason == "its Optuna study was deleted outside hpsearch"


@pytest.mark.postgres
@pytest.mark.system
def test_a_worker_started_during_an_outage_waits_for_the_database(
    tmp_path: Path, workers: Workers
) -> None:
    with private_postgres() as server:
        submit(server.url, tmp_path, crash_spec("patient", 2, max_epochs=1))
        server.stop()
        waiting = workers.start(server.url, "--idle-exit", "3")
        wait_for(
            "the worker to say it waits for the database",
            lambda: "waiting for the database" in workers.stderr(waiting),
            workers,
        )
        time.sleep(1)  # a few attempts, each refused, before the server is back
        assert waiting.poll() is None, workers.report()
        server.start()
        watch_until_exit(Db(server.url), workers, tolerate_outage=True)
        assert_clean_exits(workers)
        assert "the database is back" in workers.stderr(waiting)
        assert_finished_exactly(server.url, "patient", 2)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("postgresql://postgres@127.0.0.1:5432/no_such_database_here", "does not exist"),
        ("not a url", "not a database URL"),
    ],
)
@pytest.mark.system
def test_a_worker_exits_at_once_on_what_waiting_cannot_cure(
    tmp_path: Path, url: str, reason: str
) -> None:
    result = run_cli("worker", "--db", url, "--device", "cpu", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert reason in result.stderr and "Traceback" not in result.stderr


@pytest.mark.system
def test_a_spec_too_large_for_the_device_is_refused_before_any_worker_sees_it(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'admit.db'}"
    spec = crash_spec("huge", 2, max_epochs=1)
    spec["model"] = {"hidden": [65536, 65536, 65536, 65536]}
    write_spec(tmp_path / "huge.yaml", **spec)
    result = run_cli("submit", "huge.yaml", "--db", url, cwd=tmp_path)
    assert result.returncode == 2
    assert "model.hidden: a trial needs about 288.1 GiB of device memory" in result.stderr
    store = Store.open(url)
    assert list_studies(store).total == 0
