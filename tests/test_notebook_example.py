"""examples/notebook.py as a user runs it: against a real `hpsearch serve` with a worker
process, and against the database URL itself, it submits, waits, reads the leaderboard as a
DataFrame and predicts with the best model on raw rows, matching the stored test accuracy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, hpsearch_command
from tests.test_api_e2e import serving

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


def environment() -> dict[str, str]:
    return os.environ | {"HPSEARCH_DATA_DIR": str(REPO), "COLUMNS": "200"}


@contextmanager
def worker(url: str, log: Path) -> Iterator[None]:
    """A worker process serving the database until the end, stopped as an operator does."""
    process = subprocess.Popen(
        hpsearch_command("worker", "--db", url, "--device", "cpu"),
        cwd=REPO,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    try:
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0, log.read_text()


def run_notebook(url: str) -> str:
    ran = subprocess.run(
        [sys.executable, "examples/notebook.py", url],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return ran.stdout


def check(output: str) -> None:
    assert "flowers-csv: completed, 12 of 12 trials" in output
    assert "test_accuracy" in output and "learning_rate" in output  # the frame's columns
    assert "on raw rows matches the stored" in output, output
    assert "setosa" in output  # labels in the CSV's own vocabulary


def test_the_notebook_over_the_rest_api(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'notebook.db'}"
    with serving(url, tmp_path, environment()) as base, worker(url, tmp_path / "worker.log"):
        check(run_notebook(base))


def test_the_notebook_over_the_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'notebook.db'}"
    with worker(url, tmp_path / "worker.log"):
        check(run_notebook(url))
