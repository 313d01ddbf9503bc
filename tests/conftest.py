"""Shared fixtures: a private PostgreSQL database per test, running the real CLI, and the
guard that keeps the unit tier in process.

The test tiers (markers registered in pyproject.toml; `--strict-markers` refuses others):

* unit: no tier marker. Runs in this process only: no subprocess, fork or multiprocessing,
  no socket connection, no PostgreSQL. SQLite files under tmp_path, FastAPI's TestClient
  (httpx's ASGI transport, no socket), typer's CliRunner and an in-process Worker training a
  few tiny trials are unit tests while they stay fast. `make test-fast` runs this tier alone:
  pytest -m "not integration and not system" (under 2 minutes on 2 cores).
* integration (`@pytest.mark.integration`): real components together: PostgreSQL, a TCP
  connection or a real HTTP server on a port, child processes or multiprocessing, and runs
  too slow for the unit tier: real trainings on real data (test_train, test_checkpoint,
  test_fused, the planted-fault diagnoses), whole studies run by a Worker, schema fuzzing.
* system (`@pytest.mark.system`): the product as a user runs it: the `hpsearch` CLI in
  subprocesses, worker processes signalled or killed with SIGKILL, docker-compose's config,
  start-up in fresh interpreters, fleets of workers.
* postgres (`@pytest.mark.postgres`, on a test or on a parameter): needs the server named by
  HPSEARCH_TEST_DATABASE_URL; `-m "not postgres"` leaves those out. A postgres test is at
  least integration: one marked neither integration nor system is made integration here, at
  collection, so that no PostgreSQL test can land in the unit tier.
* cuda (`@pytest.mark.cuda`): needs a CUDA device, and is skipped here, at collection, where
  torch sees none (CI), so the marker alone is enough. A CUDA test is at least integration,
  like a postgres one: on a GPU, torch.compile compiles its kernels in worker processes,
  which the unit tier's guard would refuse. `bench/gpu.sh` runs them on a GPU (`-m cuda`).

`make test` (what CI runs) runs every tier. The unit tier is enforced: in a test marked
neither integration nor system, starting a process (subprocess, os.fork/posix_spawn/system,
multiprocessing) or connecting a socket or a psycopg connection raises `OutsideUnitTier`, and
fails the test even where the code under test swallowed that exception; the message names
the marker to add.
"""

from __future__ import annotations

import functools
import multiprocessing.process
import multiprocessing.util
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import sqlalchemy
import yaml

if TYPE_CHECKING:
    from tests.fleet import Workers

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEST_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"


OUTSIDE_UNIT = ("integration", "system")


def outside_unit_tier(item: pytest.Item) -> bool:
    return any(item.get_closest_marker(name) for name in OUTSIDE_UNIT)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A PostgreSQL or CUDA test is at least integration; a CUDA test without a device is
    skipped."""
    for item in items:
        needs = {name for name in ("postgres", "cuda") if item.get_closest_marker(name)}
        if needs and not outside_unit_tier(item):
            item.add_marker(pytest.mark.integration)
        if "cuda" in needs and not cuda_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


@functools.cache
def cuda_available() -> bool:
    """Asked only when a CUDA test was collected: importing torch takes seconds."""
    import torch

    return torch.cuda.is_available()


FAILED = pytest.StashKey[bool]()  # whether the test's set-up or call failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when in ("setup", "call"):
        item.stash[FAILED] = item.stash.get(FAILED, False) or report.failed
    return report


class OutsideUnitTier(RuntimeError):
    """What a unit test did that only an integration or system test may do."""


@pytest.fixture(autouse=True)
def unit_tier_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """In a unit test, refuse processes, socket connections and PostgreSQL, loudly."""
    if outside_unit_tier(request.node):
        yield
        return
    import psycopg

    refused: list[str] = []

    def refuse(what: Callable[..., str]) -> Callable[..., Any]:
        def guard(*args: Any, **kwargs: Any) -> Any:
            message = (
                f"{request.node.nodeid} {what(*args, **kwargs)}, which a unit test must not"
                " do: mark it @pytest.mark.integration (PostgreSQL, sockets, child processes,"
                " several components) or @pytest.mark.system (the CLI in subprocesses,"
                " killed workers, fleets); see tests/conftest.py"
            )
            refused.append(message)
            raise OutsideUnitTier(message)

        return guard

    def process(call: str) -> Callable[..., str]:
        return lambda *args, **kwargs: f"starts a process ({call})"

    def command(popen: Any, args: Any, *rest: Any, **kwargs: Any) -> str:
        return f"starts a subprocess ({args!r})"

    def connect(sock: socket.socket, address: Any) -> str:
        return f"connects a socket to {address!r}"

    def database(*args: Any, **kwargs: Any) -> str:
        return "opens a PostgreSQL connection (psycopg)"

    psycopg_connect = classmethod(refuse(database))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "_execute_child", refuse(command))
        for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
            if hasattr(os, name):
                patch.setattr(os, name, refuse(process(f"os.{name}")))
        patch.setattr(
            multiprocessing.process.BaseProcess, "start", refuse(process("multiprocessing"))
        )
        patch.setattr(multiprocessing.util, "spawnv_passfds", refuse(process("multiprocessing")))
        patch.setattr(socket.socket, "connect", refuse(connect))
        patch.setattr(socket.socket, "connect_ex", refuse(connect))
        patch.setattr(psycopg.Connection, "connect", psycopg_connect)
        patch.setattr(psycopg.AsyncConnection, "connect", psycopg_connect)
        patch.setattr(psycopg, "connect", psycopg.Connection.connect)
        yield
    if refused and not request.node.stash.get(FAILED, False):
        pytest.fail(f"{refused[0]} (its code caught {OutsideUnitTier.__name__})", pytrace=False)


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database on the test server, dropped afterwards."""
    if not outside_unit_tier(request.node):
        pytest.fail(
            f"{request.node.nodeid} uses PostgreSQL: mark it, or its parameter, "
            "@pytest.mark.postgres (which makes it an integration test)",
            pytrace=False,
        )
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
