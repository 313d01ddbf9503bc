"""Trials that ended without saying anything about their hyperparameters: handed back by a
stopping worker, or lost with a worker that died. Optuna records both as FAIL (its retry
mechanism relies on it); the study's progress, the trial listings and the CLI tell them
apart from real failures."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import optuna
import pytest
from typer.testing import CliRunner

from hpsearch.api import Settings
from hpsearch.cli.commands import app
from hpsearch.data.tensors import load_dataset
from hpsearch.runtime.trials import TrialContext, claim_trial, open_study, run_trial
from hpsearch.search.pruning import StudyPruning
from hpsearch.service import results
from hpsearch.service.studies import StudyState, submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage
from tests.served import served


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'h.db'}"
    return request.getfixturevalue("postgres_url")


def submitted(url: str) -> StudyState:
    spec = parse_spec(
        {
            "name": "handing",
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": {"learning_rate": {"low": 1e-3, "high": 1e-1, "log": True}},
            "training": {"max_epochs": 3, "checkpoint_every_s": 0},
            "budget": {"n_trials": 10},
        }
    )
    store = Store.open(url)
    return submit_study(store, spec)


def hand_one_back(url: str, state: StudyState) -> int:
    """Claim a trial and run it as a worker would after SIGTERM: it checkpoints at the end
    of its first epoch and is handed back. Returns its number."""
    store = Store.open(url)
    study = open_study(state, store)
    claim = claim_trial(study, state, store)
    assert claim is not None
    stop = threading.Event()
    stop.set()
    context = TrialContext(store, state.id, StudyPruning(store, study, state.spec), stop)
    assert run_trial(study, claim, state.spec, load_dataset(state.spec), context) is None
    return claim.trial.number


def fail_one(url: str, state: StudyState) -> int:
    """A trial whose training raised: failed with its error, as a worker records it."""
    store = Store.open(url)
    study = open_study(state, store)
    trial = claim_trial(study, state, store).trial
    trial.set_user_attr("error", "RuntimeError: CUDA out of memory")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return trial.number


def lose_one(url: str, state: StudyState) -> int:
    """A trial whose worker died: its heartbeat goes stale and Optuna fails it."""
    store = Store.open(url)
    study = open_study(state, store)
    trial = claim_trial(study, state, store).trial
    time.sleep(2.1)
    stale = optuna.load_study(study_name=state.name, storage=optuna_storage(url, grace_s=1))
    optuna.storages.fail_stale_trials(stale)
    return trial.number


def test_a_handed_back_trial_is_shown_as_handed_back_not_failed(url: str) -> None:
    state = submitted(url)
    number = hand_one_back(url, state)
    study = optuna.load_study(study_name=state.name, storage=optuna_storage(url))
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.WAITING]  # Optuna's

    store = Store.open(url)
    progress = results.study_summary(store, state.id).progress
    assert (progress.handed_back, progress.failed, progress.waiting) == (1, 0, 1)
    trial = results.trial_detail(store, state.id, number)
    assert trial.state == "handed_back" and trial.diagnosis is None
    listed = results.list_trials(store, state.id, state="handed_back").items
    assert [t.number for t in listed] == [number]
    assert results.list_trials(store, state.id, state="failed").items == []

    client = served(Settings(database_url=url))
    body = client.get(f"/api/v1/studies/{state.name}").json()
    assert (body["progress"]["handed_back"], body["progress"]["failed"]) == (1, 0)
    shown = client.get(f"/api/v1/studies/{state.name}/trials/{number}").json()
    assert shown["state"] == "handed_back"
    page = client.get(f"/api/v1/studies/{state.name}/trials", params={"state": "handed_back"})
    assert [t["number"] for t in page.json()["items"]] == [number]
    status = CliRunner().invoke(app, ["status", state.name, "--db", url])
    assert status.exit_code == 0, status.output
    assert "1 handed back" in status.output and "0 failed" in status.output
    one = CliRunner().invoke(app, ["trial", state.name, str(number), "--db", url])
    assert f"trial {number}: handed back" in one.output


def test_failed_handed_back_and_lost_trials_are_counted_apart(url: str) -> None:
    state = submitted(url)
    handed_back = hand_one_back(url, state)
    failed = fail_one(url, state)
    lost = lose_one(url, state)
    store = Store.open(url)
    progress = results.study_summary(store, state.id).progress
    assert (progress.failed, progress.handed_back, progress.lost) == (1, 1, 1)
    assert progress.waiting == 1  # the lost trial's retry; the handed-back one's was claimed
    by_state = {
        name: [t.number for t in results.list_trials(store, state.id, state=name).items]
        for name in ("failed", "handed_back", "lost")
    }
    assert by_state == {"failed": [failed], "handed_back": [handed_back], "lost": [lost]}
    listing = results.list_studies(store).items[0].progress
    assert listing == progress
    table = CliRunner().invoke(app, ["studies", "--db", url])
    assert "handed back" in table.output
