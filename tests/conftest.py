"""Shared fixtures: a private PostgreSQL database per test, and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy
import yaml

if TYPE_CHECKING:
    from tests.fleet import Workers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    admin_url = sqlalchemy.make_url(
        os.environ.get("HPSEARCH_TEST_DATABASE_URL", DEFAULT_TEST_DATABASE_URL)
    ).set(drivername="postgresql+psycopg")
    name = f"hpsearch_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """`hpsearch worker` processes of one test; whatever is alive at its end is killed."""
    from tests.fleet import Workers  # which imports this module's helpers

    started = Workers(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


def write_spec(path: Path, **spec: Any) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def hpsearch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hpsearch", *args]


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `hpsearch ARGS` as a user would, in its own process."""
    env = os.environ | {"HPSEARCH_DATA_DIR": str(cwd), "COLUMNS": "200"}
    return subprocess.run(
        hpsearch_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
