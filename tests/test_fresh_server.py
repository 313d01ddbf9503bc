"""A server on a new database: `hpsearch token create` then `hpsearch serve` give a complete
schema (Optuna's tables and hpsearch's), every GET route answers without a server error,
and /healthz reports a database that cannot be reached or whose schema is behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from hpsearch.api import Settings, create_app
from hpsearch.service.tokens import create_token
from hpsearch.storage import Store
from hpsearch.storage.db import VERSION_TABLE, _migrate_under_lock, make_engine, upgrade
from hpsearch.storage.engine import OPTUNA_VERSION_TABLE, optuna_head_revision, optuna_storage
from tests.conftest import run_cli
from tests.test_api_e2e import environment, free_port, serving

# Statuses a GET may answer on a fresh database: never a server error, nor a 404 for a
# route the app declares.
FINE = {200, 204, 301, 302, 303, 307, 308, 401, 403}
# Paths served outside the app's routes: the dashboard's page and its own API.
EXTRA_PATHS = ("/", "/dashboard", "/api/studies")
OPTUNA_TABLES = {"studies", "trials", "trial_values", "version_info", OPTUNA_VERSION_TABLE}
HPSEARCH_TABLES = {"hps_studies", "hps_workers", "hps_api_tokens", VERSION_TABLE}


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty database: a SQLite file, or a database on the PostgreSQL server."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'fresh.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'fresh.db'}"


def tables(url: str) -> set[str]:
    return set(sqlalchemy.inspect(make_engine(url)).get_table_names())


def execute(url: str, statement: str) -> None:
    with make_engine(url).begin() as connection:
        connection.exec_driver_sql(statement)


def get_paths(openapi: dict[str, Any]) -> list[str]:
    """The GET routes without path parameters, and the paths served outside the routes."""
    declared = [path for path, ops in openapi["paths"].items() if "get" in ops and "{" not in path]
    return [*declared, "/docs", "/redoc", *EXTRA_PATHS]


@pytest.mark.system
def test_token_create_then_serve_on_a_new_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    created = run_cli("token", "create", "ops", "--db", url, cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    env = {k: v for k, v in environment(tmp_path).items() if k != "HPSEARCH_API_TOKENS"}
    with serving(url, tmp_path, env) as base, httpx.Client(base_url=base, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        metrics = http.get("/metrics", headers=auth)
        assert metrics.status_code == 200, metrics.text
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
        assert [s.value for s in families["hpsearch_database_up"].samples] == [1]
        studies = {s.labels["state"]: s.value for s in families["hpsearch_studies"].samples}
        assert studies["queued"] == 0 and set(studies.values()) == {0}
        assert families["hpsearch_trials"].samples == []
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        root = http.get("/")
        assert root.is_redirect and root.headers["location"] == "/dashboard"
        assert http.get("/", headers=auth, follow_redirects=True).status_code == 200
        paths = get_paths(http.get("/openapi.json").json())
        for headers in ({}, auth):
            answers = {path: http.get(path, headers=headers).status_code for path in paths}
            assert set(answers.values()) <= FINE, answers
    assert tables(url) >= OPTUNA_TABLES | HPSEARCH_TABLES


def test_no_get_route_is_a_server_error_on_a_new_database(url: str) -> None:
    """What `hpsearch serve` does at start (upgrade), then every GET route."""
    upgrade(url)
    store = Store.open(url)
    _, token = create_token(store, "ops")
    client = TestClient(create_app(Settings(database_url=url)))
    paths = get_paths(client.get("/openapi.json").json())
    for headers in ({}, {"Authorization": f"Bearer {token}"}):
        answers = {
            path: client.get(path, headers=headers, follow_redirects=False).status_code
            for path in paths
        }
        assert set(answers.values()) <= FINE, answers
        assert answers["/metrics"] == (200 if headers else 401)
        assert answers["/healthz"] == 200


def test_upgrade_completes_a_database_that_has_only_hpsearchs_tables(url: str) -> None:
    """A database left with hpsearch's tables at head and none of Optuna's (as `token
    create` used to leave it) is completed by the next process's upgrade."""
    _migrate_under_lock(make_engine(url))
    assert not OPTUNA_TABLES & tables(url)
    upgrade(url)
    assert tables(url) >= OPTUNA_TABLES | HPSEARCH_TABLES
    with make_engine(url).connect() as connection:
        revision = connection.exec_driver_sql(f"SELECT version_num FROM {OPTUNA_VERSION_TABLE}")
        assert revision.scalar() == optuna_head_revision()


def unhealthy(client: TestClient) -> dict[str, Any]:
    response = client.get("/healthz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable"
    return body


def test_health_is_503_naming_migrate_when_hpsearchs_schema_is_behind(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    execute(sqlite_url, f"UPDATE {VERSION_TABLE} SET version_num = '0001'")
    body = unhealthy(TestClient(create_app(Settings(database_url=sqlite_url))))
    assert body["command"] == f"hpsearch migrate --db {sqlite_url}"
    assert "revision 0001" in body["detail"] and body["command"] in body["detail"]


def test_health_is_503_while_hpsearchs_tables_are_missing_then_200(sqlite_url: str) -> None:
    optuna_storage(sqlite_url).engine.dispose()  # Optuna's tables only
    client = TestClient(create_app(Settings(database_url=sqlite_url)))
    body = unhealthy(client)
    assert "hpsearch's tables are missing" in body["detail"]
    assert body["command"] == f"hpsearch migrate --db {sqlite_url}"
    assert HPSEARCH_TABLES.isdisjoint(tables(sqlite_url))  # a health check migrates nothing
    upgrade(sqlite_url)
    assert client.get("/healthz").status_code == 200


def test_health_at_head_is_one_round_trip_once_it_was_ok(sqlite_url: str) -> None:
    upgrade(sqlite_url)
    client = TestClient(create_app(Settings(database_url=sqlite_url)))
    assert client.get("/healthz").status_code == 200
    statements: list[str] = []

    def record(*args: Any) -> None:
        statements.append(args[2])

    engine = make_engine(sqlite_url)
    event.listen(engine, "before_cursor_execute", record)
    try:
        assert client.get("/healthz").status_code == 200
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert [s for s in statements if not s.startswith(("BEGIN", "COMMIT"))] == ["SELECT 1"]


@pytest.mark.system
def test_optunas_schema_behind_fails_health_and_serve_until_migrate(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Tables of an older Optuna (one revision back): /healthz and `serve` name `hpsearch
    migrate`, which brings them to head."""
    upgrade(sqlite_url)
    execute(sqlite_url, "DROP INDEX ix_trials_study_id")  # what the newest revision adds
    execute(sqlite_url, f"UPDATE {OPTUNA_VERSION_TABLE} SET version_num = 'v3.0.0.d'")
    client = TestClient(create_app(Settings(database_url=sqlite_url)))
    body = unhealthy(client)
    assert "Optuna's tables are at revision v3.0.0.d" in body["detail"]
    assert body["command"] == f"hpsearch migrate --db {sqlite_url}"
    serve = ("serve", "--port", str(free_port()), "--db", sqlite_url)
    refused = run_cli(*serve, cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and f"hpsearch migrate --db {sqlite_url}" in refused.stderr
    migrated = run_cli("migrate", "--db", sqlite_url, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    "down",
    [
        pytest.param(  # nothing listens on port 1: a TCP connection all the same
            "postgresql://nobody:s3cret@127.0.0.1:1/none", marks=pytest.mark.integration
        ),
        "sqlite:///{tmp_path}/a-file/hpsearch.db",  # a folder that cannot be made
    ],
)
def test_health_is_503_without_a_password_when_the_database_cannot_be_reached(
    down: str, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    url = down.format(tmp_path=tmp_path)
    response = TestClient(create_app(Settings(database_url=url))).get("/healthz")
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["status"] == "unavailable" and body["command"] is None
    assert "cannot be reached" in body["detail"] and "s3cret" not in response.text


def test_metrics_that_cannot_read_the_database_are_still_prometheus_text(
    sqlite_url: str,
) -> None:
    """A scrape is never a server error: a failed read is `hpsearch_database_up 0`."""
    upgrade(sqlite_url)
    execute(sqlite_url, "DROP TABLE hps_workers")
    response = TestClient(create_app(Settings(database_url=sqlite_url))).get("/metrics")
    assert response.status_code == 200, response.text
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert [s.value for s in families["hpsearch_database_up"].samples] == [0]
    assert "hpsearch_studies" not in families
