"""The service layer on SQLite and PostgreSQL: submitting, state changes, and what claims see."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from hpsearch.data import load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.service import (
    StudyConflict,
    StudyNotFound,
    change_state,
    get_study,
    mark_completed_if_done,
    submit_study,
)
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.study import claim_trial, open_study, run_trial
from tests.conftest import run_cli, write_spec


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'service.db'}"
    return request.getfixturevalue("postgres_url")


def make_spec(**overrides: Any) -> StudySpec:
    spec: dict[str, Any] = {
        "name": "service-test",
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [8]},
        "search_space": {"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}},
        "training": {"max_epochs": 2},
        "sampler": {"name": "random", "seed": 0},
        "budget": {"n_trials": 2},
    }
    spec.update(overrides)
    return parse_spec(spec)


def test_submit_is_idempotent_and_budget_changes_update_it(url: str) -> None:
    first = submit_study(url, make_spec())
    assert (first.state, first.n_trials) == ("queued", 2)
    assert submit_study(url, make_spec()).id == first.id
    bigger = submit_study(url, make_spec(budget={"n_trials": 5}))
    assert (bigger.id, bigger.n_trials, bigger.spec.budget.n_trials) == (first.id, 5, 5)
    assert get_study(url, first.id).name == get_study(url, "service-test").name == "service-test"


def test_same_name_with_another_spec_is_a_conflict(url: str) -> None:
    submit_study(url, make_spec())
    with pytest.raises(StudyConflict, match="already exists with a different spec"):
        submit_study(url, make_spec(training={"max_epochs": 3}))


def test_unknown_study_is_not_found(url: str) -> None:
    submit_study(url, make_spec())
    with pytest.raises(StudyNotFound, match="no study 'nope'"):
        get_study(url, "nope")
    with pytest.raises(StudyNotFound):
        change_state(url, 999, "pause")


def test_state_changes_follow_the_rules(url: str) -> None:
    study = submit_study(url, make_spec()).name
    assert change_state(url, study, "pause").state == "paused"
    with pytest.raises(StudyConflict, match="cannot pause study 'service-test': it is paused"):
        change_state(url, study, "pause")
    assert change_state(url, study, "resume").state == "running"
    assert change_state(url, study, "cancel").state == "cancelled"
    for change in ("pause", "resume", "cancel", "extend"):
        with pytest.raises(StudyConflict, match="it is cancelled"):
            change_state(url, study, change, 1)


def test_claims_respect_pause_budget_completion_and_extend(url: str) -> None:
    spec = make_spec()
    state = submit_study(url, spec)
    study = open_study(state, url)
    data = load_dataset(spec)
    change_state(url, state.id, "pause")
    assert claim_trial(study, state, url) is None  # a paused study starts no trial
    change_state(url, state.id, "resume")

    run_all(study, state, url, data)
    assert len(study.trials) == 2
    assert get_study(url, state.id).state == "completed"
    assert claim_trial(study, state, url) is None

    extended = change_state(url, state.id, "extend", 1)
    assert (extended.state, extended.n_trials) == ("running", 3)
    run_all(study, state, url, data)
    assert len(study.trials) == 3
    assert get_study(url, state.id).state == "completed"


def run_all(study: Any, state: Any, url: str, data: Any) -> None:
    while (trial := claim_trial(study, state, url)) is not None:
        run_trial(study, trial, state.spec, data)
        mark_completed_if_done(url, state.id)


def test_a_queued_study_turns_running_at_its_first_claim(url: str) -> None:
    state = submit_study(url, make_spec())
    claim_trial(open_study(state, url), state, url)
    assert get_study(url, state.id).state == "running"


def test_extend_needs_a_positive_count(url: str) -> None:
    submit_study(url, make_spec())
    with pytest.raises(HpsearchError, match="at least 1"):
        change_state(url, "service-test", "extend", 0)


def test_cli_state_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    spec_file = write_spec(tmp_path / "s.yaml", **make_spec().model_dump(mode="json"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--db", url, cwd=tmp_path)

    assert cli("run", str(spec_file)).returncode == 0
    extended = cli("extend", "service-test", "--n-trials", "2")
    assert extended.returncode == 0, extended.stderr
    assert "study service-test (id 1): running, 2/4 trials" in extended.stdout
    assert "paused" in cli("pause", "service-test").stdout
    paused_run = cli("run", str(spec_file))
    assert "hpsearch resume service-test" in paused_run.stdout
    refused = cli("pause", "service-test")
    assert refused.returncode == 2
    assert "cannot pause study 'service-test': it is paused" in refused.stderr
    assert "Traceback" not in refused.stderr
    missing = cli("cancel", "no-such-study")
    assert missing.returncode == 2 and "no study 'no-such-study'" in missing.stderr
