"""`hpsearch run` end to end: real processes, a real database, real training."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from hpsearch.storage import optuna_storage
from tests.conftest import REPO, hpsearch_command, run_cli, write_spec

pytestmark = pytest.mark.system  # `hpsearch run` in its own process

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def quick_spec(name: str, n_trials: int, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [16]},
        "search_space": {
            "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
            "batch_size": {"choices": [8, 16, 32]},
        },
        "training": {"max_epochs": 8},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "budget": {"n_trials": n_trials},
    }
    spec.update(overrides)
    return spec


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    # Through our storage factory: it survives racing the CLI to create a new database.
    return optuna.load_study(study_name=name, storage=optuna_storage(url)).get_trials()


def test_run_prints_the_leaderboard_and_a_second_run_adds_nothing(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "iris.yaml", **quick_spec("iris-quick", 4))
    first = run_cli("run", str(spec), "--jobs", "2", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "iris-quick: top 4 of 4 complete trials by val_accuracy" in first.stdout
    assert "Traceback" not in first.stdout + first.stderr
    url = f"sqlite:///{tmp_path / 'hpsearch.db'}"  # the embedded default, in the working dir
    done = trials(url, "iris-quick")
    assert [t.state for t in done].count(TrialState.COMPLETE) == 4
    assert len(done) == 4
    best = max(t.value for t in done)
    assert f"{best:.4f}" in first.stdout
    assert all(t.user_attrs["test_accuracy"] > 0 and t.user_attrs["epochs"] >= 1 for t in done)

    second = run_cli("run", str(spec), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert [t.number for t in trials(url, "iris-quick")] == [t.number for t in done]


@pytest.mark.postgres
def test_parallel_workers_on_postgres_spend_the_budget_exactly(
    tmp_path: Path, postgres_url: str
) -> None:
    spec = write_spec(tmp_path / "pg.yaml", **quick_spec("iris-pg", 7))
    result = run_cli("run", str(spec), "--db", postgres_url, "--jobs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    done = trials(postgres_url, "iris-pg")
    assert len(done) == 7
    assert sorted(t.number for t in done) == list(range(7))
    assert {t.user_attrs["worker"] for t in done}.__len__() >= 2  # the work was shared


def test_invalid_spec_lists_each_field_without_a_traceback(tmp_path: Path) -> None:
    spec = write_spec(
        tmp_path / "bad.yaml",
        **quick_spec(
            "Bad Name",
            3,
            search_space={"learning_rate": {"low": 0.1, "high": 0.01}},
        ),
    )
    result = run_cli("run", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "search_space.learning_rate: low (0.1) must be < high (0.01)" in result.stderr
    assert "name: must start with a lower-case letter" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "hpsearch.db").exists()  # nothing was written


def test_missing_target_column_is_named(tmp_path: Path) -> None:
    (tmp_path / "plants.csv").write_text("height,colour,kind\n1.0,red,a\n2.0,blue,b\n" * 10)
    spec = write_spec(
        tmp_path / "csv.yaml",
        **quick_spec(
            "plants", 2, dataset={"source": "file", "path": "plants.csv", "target": "species"}
        ),
    )
    result = run_cli("run", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert "target column 'species' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_database_names_the_url(tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "iris.yaml", **quick_spec("iris-nodb", 2))
    url = "postgresql://hpsearch:secret@127.0.0.1:9/nowhere"
    result = run_cli("run", str(spec), "--db", url, cwd=tmp_path)
    assert result.returncode == 2
    assert "hpsearch:***@127.0.0.1:9/nowhere" in result.stderr
    assert "secret" not in result.stderr
    assert "Traceback" not in result.stderr


def test_same_name_with_another_spec_is_a_conflict(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    first = write_spec(tmp_path / "a.yaml", **quick_spec("shared-name", 1))
    assert run_cli("run", str(first), "--db", url, cwd=tmp_path).returncode == 0
    other = write_spec(
        tmp_path / "b.yaml", **quick_spec("shared-name", 1, model={"hidden": [64, 64]})
    )
    result = run_cli("run", str(other), "--db", url, cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists with a different spec" in result.stderr
    assert len(trials(url, "shared-name")) == 1


def test_the_examples_run_from_the_repository_root(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ex.db'}"
    spec = REPO / "examples" / "flowers-csv.yaml"
    result = subprocess.run(
        hpsearch_command("run", str(spec), "--db", url, "--jobs", "2"),
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "HPSEARCH_DATA_DIR"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    done = trials(url, "flowers-csv")
    assert sum(t.state == TrialState.COMPLETE for t in done) == 12
    assert max(t.value for t in done) > 0.9
