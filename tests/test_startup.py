"""The client commands start without training's libraries: each runs here in a fresh
interpreter, as a user would run it, and must neither fail nor load torch or scikit-learn
(seconds of imports that `--help`, `status` or `leaderboard` must not pay)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli, write_spec

pytestmark = pytest.mark.system  # fresh interpreters, as a user starts them

HEAVY = ("torch", "sklearn")
# Runs the command line in this interpreter, then says which heavy modules it loaded.
PROBE = f"""
import json, os, sys
import hpsearch.__main__ as entry

def leave(code):
    loaded = [m for m in {HEAVY!r} if m in sys.modules]
    print(json.dumps({{"code": code or 0, "loaded": loaded}}), flush=True)
    os._exit(0)

entry.leave = leave
sys.argv = ["hpsearch", *sys.argv[1:]]
entry.main()
"""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database with one study whose single trial was trained, and a second spec."""
    home = tmp_path_factory.mktemp("startup")
    spec = {
        "name": "small",
        "dataset": {"source": "builtin", "name": "iris"},
        "search_space": {"learning_rate": {"low": 0.001, "high": 0.1, "log": True}},
        "training": {"max_epochs": 1},
        "budget": {"n_trials": 1},
    }
    write_spec(home / "small.yaml", **spec)
    write_spec(home / "other.yaml", **(spec | {"name": "other"}))
    trained = run_cli("run", "small.yaml", "--db", _db(home), cwd=home)
    assert trained.returncode == 0, trained.stderr
    return home


def _db(home: Path) -> str:
    return f"sqlite:///{home / 'hps.db'}"


CLIENT_COMMANDS = [
    ["--help"],
    ["status", "--help"],
    ["studies", "--db", "{db}"],
    ["status", "small", "--db", "{db}"],
    ["status", "small", "--db", "{db}", "--json"],
    ["leaderboard", "small", "--db", "{db}"],
    ["trial", "small", "0", "--db", "{db}"],
    ["run", "small.yaml", "--db", "{db}"],  # nothing left to run: it reads, never trains
    ["submit", "other.yaml", "--db", "{db}"],
    ["enqueue", "other", "--param", "learning_rate=0.01", "--db", "{db}"],
    ["pause", "other", "--db", "{db}"],
    ["resume", "other", "--db", "{db}"],
    ["extend", "other", "--n-trials", "1", "--db", "{db}"],
    ["cancel", "other", "--db", "{db}"],
    ["delete", "other", "--db", "{db}"],
    ["token", "create", "ci", "--db", "{db}"],
    ["token", "list", "--db", "{db}"],
    ["token", "revoke", "ci", "--db", "{db}"],
]


@pytest.mark.parametrize("args", CLIENT_COMMANDS, ids=" ".join)
def test_client_command_loads_no_training_library(home: Path, args: list[str]) -> None:
    answer = _probe(home, [arg.format(db=_db(home)) for arg in args])
    assert answer == {"code": 0, "loaded": []}


def test_commands_over_the_api_load_no_training_library(home: Path) -> None:
    """Over --api (here an address where nothing listens) the answer is one error line."""
    for args in (["status", "small"], ["leaderboard", "small"], ["studies"]):
        answer = _probe(home, [*args, "--api", "http://127.0.0.1:9"])
        assert answer == {"code": 2, "loaded": []}


def test_a_run_that_trains_loads_them(home: Path) -> None:
    """The probe can see a heavy import: a run with a trial to train loads both."""
    write_spec(
        home / "more.yaml",
        name="more",
        dataset={"source": "builtin", "name": "iris"},
        training={"max_epochs": 1},
        budget={"n_trials": 1},
    )
    assert _probe(home, ["run", "more.yaml", "--db", _db(home)]) == {
        "code": 0,
        "loaded": list(HEAVY),
    }


def _probe(home: Path, args: list[str]) -> dict[str, object]:
    env = os.environ | {"HPSEARCH_DATA_DIR": str(home), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
