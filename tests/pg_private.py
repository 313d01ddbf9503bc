"""A private PostgreSQL server for one test: made with `initdb`, on a free port, in a temporary
folder, so that the test may stop and start it (a database outage) without touching the
shared test server."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy

DATABASE = "hpsearch"


@dataclass(frozen=True)
class PrivatePostgres:
    bin_dir: Path
    root: Path  # owned by the postgres user: the data folder, the socket, the server log
    port: int

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{DATABASE}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._pg_ctl("start", "-l", str(self.log), "-o", options)

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def server_log(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _pg_ctl(self, *args: str) -> None:
        _as_postgres(
            str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-w", "-t", "60", *args
        )


def _as_postgres(*command: str) -> subprocess.CompletedProcess[str]:
    """PostgreSQL refuses to run as root: run its tools as the postgres user then."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    result = subprocess.run(
        [*prefix, *command], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stdout}{result.stderr}")
    return result


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A running server with an empty database `hpsearch`; stopped and deleted afterwards."""
    initdbs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = initdbs[-1] if initdbs else shutil.which("initdb")
    if initdb is None:
        pytest.fail("initdb is not installed: the PostgreSQL server package is needed")
    root = Path(tempfile.mkdtemp(prefix="hpsearch-pg-"))
    server = PrivatePostgres(Path(initdb).parent, root, _free_port())
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        _as_postgres(
            initdb, "-D", str(server.data_dir), "-A", "trust", "-U", "postgres", "--no-sync"
        )
        server.start()
        admin = sqlalchemy.create_engine(
            server.url.rsplit("/", 1)[0] + "/postgres",
            isolation_level="AUTOCOMMIT",
            poolclass=sqlalchemy.NullPool,
        )
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {DATABASE}"))
        admin.dispose()
        yield server
    finally:
        if (server.data_dir / "postmaster.pid").exists():
            with suppress(RuntimeError, subprocess.TimeoutExpired):
                server.stop("immediate")
        shutil.rmtree(root, ignore_errors=True)
