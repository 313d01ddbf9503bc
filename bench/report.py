"""What every benchmark writes beside its numbers: the machine, the date, the versions, and
its own section of BENCHMARKS.md (the other sections stay as they are)."""

from __future__ import annotations

import os
import platform
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment(command: str, packages: tuple[str, ...], device: str | None = None) -> str:
    """Machine, date and versions as Markdown bullets, so runs can be compared."""
    versions = ", ".join(f"{name} {package_version(name)}" for name in packages)
    machine = f"{cpu_model()}, {os.cpu_count()} cores" + (f"; {device}" if device else "")
    return (
        f"- Machine: {machine}\n"
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n"
        f"- Python {platform.python_version()}, {versions}\n"
        f"- Command: `{command}`"
    )


def write_section(title: str, text: str) -> None:
    """Replace the section headed `title` in BENCHMARKS.md (or append it)."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmarks\n"
    if not old.startswith("# Benchmarks"):
        old = "# Benchmarks\n\n" + old
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + "\n\n" + text
    RESULTS.write_text(new)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with right-aligned number columns."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return "\n".join(lines)


@contextmanager
def scratch_database(kind: str, postgres: str | None, purpose: str) -> Iterator[str]:
    """A new, empty database for one measurement, removed afterwards: SQLite in a temporary
    folder, or (`kind` "postgresql") a database of its own on the server `postgres` names."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="hps-bench-") as folder:
            yield f"sqlite:///{folder}/bench.db"
        return
    import sqlalchemy

    assert postgres is not None, "a PostgreSQL measurement needs the server's URL"
    admin_url = sqlalchemy.make_url(postgres).set(drivername="postgresql+psycopg")
    name = f"hps_bench_{purpose}_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
