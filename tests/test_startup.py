"""The client commands start without training's libraries: each runs here in a fresh
interpreter, as a user would run it, and must neither fail nor load torch or scikit-learn
(seconds of imports that `--help`, `status` or `leaderboard` must not pay)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
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
    _many_trials(home, spec | {"name": "many"})
    return home


def _many_trials(home: Path, spec: dict[str, object]) -> None:
    """A study with enough complete trials for `status` and `importance` to evaluate which
    hyperparameters mattered (told through Optuna, not trained)."""
    write_spec(home / "many.yaml", **spec)
    submitted = run_cli("submit", "many.yaml", "--db", _db(home), cwd=home)
    assert submitted.returncode == 0, submitted.stderr
    study = optuna.load_study(study_name="many", storage=_db(home))
    for i in range(12):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("learning_rate", 0.001, 0.1, log=True) + i / 100)


def _db(home: Path) -> str:
    return f"sqlite:///{home / 'hps.db'}"


CLIENT_COMMANDS = [
    ["--help"],
    ["status", "--help"],
    ["predict", "--help"],  # predicting loads torch, its help must not
    ["studies", "--db", "{db}"],
    ["status", "small", "--db", "{db}"],
    ["status", "small", "--db", "{db}", "--json"],
    ["status", "many", "--db", "{db}"],  # its line on which hyperparameters mattered
    ["importance", "many", "--db", "{db}"],
    ["importance", "many", "--db", "{db}", "--json"],
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


def test_importance_loaded_without_scikit_learn_leaves_fanova_whole_for_others(
    home: Path,
) -> None:
    """hpsearch loads Optuna's importance package with scikit-learn hidden (PED-ANOVA needs
    none of it); whoever imports the package afterwards in the same process still gets
    fANOVA, which loads scikit-learn then."""
    script = f"""
import json, sys
import optuna
from hpsearch.service.importance import _optuna_importance, param_importance
from hpsearch.storage import Store

answer = param_importance(Store.open({_db(home)!r}), "many")
hidden = "sklearn" in sys.modules
study = optuna.load_study(study_name="many", storage={_db(home)!r})
fanova = optuna.importance.FanovaImportanceEvaluator(seed=0)
shares = optuna.importance.get_param_importances(study, evaluator=fanova)
print(json.dumps({{"ranked": [e.param for e in answer.importances], "sklearn_before": hidden,
                  "fanova": list(shares), "sklearn_after": "sklearn" in sys.modules,
                  "ours_kept": _optuna_importance().__name__}}))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=home, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "ranked": ["learning_rate"],
        "sklearn_before": False,
        "fanova": ["learning_rate"],
        "sklearn_after": True,
        "ours_kept": "optuna.importance",
    }


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
