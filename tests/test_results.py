"""The read side: listings, leaderboards and trials answered by SQL over Optuna's tables,
checked against what Optuna itself says about the same trials."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from hpsearch.cli.commands import app
from hpsearch.errors import Conflict
from hpsearch.service import results
from hpsearch.service.studies import StudyNotFound, change_state, delete_study, submit_study
from hpsearch.service.tokens import hash_token, stored_token_hashes
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage


def make_spec(name: str, metric: str = "val_accuracy", n_trials: int = 20) -> Any:
    return parse_spec(
        {
            "name": name,
            "dataset": {"source": "builtin", "name": "iris"},
            "search_space": {
                "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
                "batch_size": {"choices": [16, 32, 64]},
            },
            "objective": {"metric": metric},
            "budget": {"n_trials": n_trials},
        }
    )


def fill(url: str, name: str, values: list[float | None], history: bool = False) -> optuna.Study:
    """Trials told with `values` (None = pruned), each with params and a few attributes."""
    study = optuna.load_study(study_name=name, storage=optuna_storage(url))
    for i, value in enumerate(values):
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [16, 32, 64])
        trial.set_user_attr("epochs", i + 1)
        trial.set_user_attr("diagnosis", "ok")
        trial.set_user_attr("test_accuracy", 0.5)
        for epoch in (1, 2):
            trial.report(0.1 * epoch, epoch)
        if history:
            trial.set_user_attr("history", [[1, 0.9, 0.8, 0.1, 1e-3], [2, 0.7, 0.6, 0.2, 5e-4]])
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return study


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'r.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.parametrize(("metric", "best"), [("val_accuracy", 0.9), ("val_loss", 0.1)])
def test_leaderboard_ranks_by_the_objective_direction(url: str, metric: str, best: float) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("ranked", metric))
    study = fill(url, "ranked", [0.5, best, 0.3, None, 0.3])
    rows = results.leaderboard(store, "ranked", top=3)
    expected = sorted(
        (t for t in study.trials if t.state == TrialState.COMPLETE),
        key=lambda t: (-t.value if metric == "val_accuracy" else t.value, t.number),
    )[:3]
    assert [(r.rank, r.number, r.value) for r in rows] == [
        (i + 1, t.number, t.value) for i, t in enumerate(expected)
    ]
    assert rows[0].params == expected[0].params
    assert rows[0].epochs == expected[0].user_attrs["epochs"]
    assert rows[0].metrics == {"test_accuracy": 0.5}
    assert all(r.state == "complete" for r in rows)


def test_listing_counts_trials_by_state_and_reports_the_best_value(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("first", n_trials=10))
    submit_study(store, make_spec("second", "val_loss"))
    fill(url, "first", [0.2, 0.7, None])
    fill(url, "second", [0.4, 0.1])
    page = results.list_studies(store)
    assert page.total == 2
    by_name = {s.name: s for s in page.items}
    assert [s.name for s in page.items] == ["second", "first"]  # newest first
    first = by_name["first"].progress
    assert (first.budget, first.complete, first.pruned, first.finished) == (10, 2, 1, 3)
    assert by_name["first"].best_value == 0.7  # maximised
    assert by_name["second"].best_value == 0.1  # minimised
    assert results.list_studies(store, limit=1, offset=1).items[0].name == "first"


def test_trials_page_filters_by_state_and_pages_by_number(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("paged"))
    fill(url, "paged", [0.1, None, 0.2, None, 0.3, 0.4])
    page = results.list_trials(store, "paged", state="complete", limit=2, offset=1)
    assert page.total == 4
    assert [t.number for t in page.items] == [2, 4]
    pruned = results.list_trials(store, "paged", state="pruned")
    assert [t.number for t in pruned.items] == [1, 3]
    assert pruned.items[0].value == 0.2  # Optuna keeps the last reported value of a pruned trial


def test_one_trial_has_its_learning_curve(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("curve"))
    fill(url, "curve", [0.8], history=True)
    trial = results.trial_detail(store, "curve", 0)
    assert [(p.epoch, p.value) for p in trial.curve] == [(1, 0.1), (2, 0.2)]
    assert [p.val_loss for p in trial.curve] == [0.8, 0.6]
    assert trial.curve[1].learning_rate == 5e-4
    assert trial.has_model is False
    assert trial.seconds is not None and trial.seconds >= 0
    with pytest.raises(StudyNotFound, match="has no trial 5"):
        results.trial_detail(store, "curve", 5)
    with pytest.raises(StudyNotFound, match="no weights kept for trial 0"):
        results.model_weights(store, "curve", 0)


def test_delete_removes_the_study_and_its_trials_but_not_while_it_runs(url: str) -> None:
    store = Store.open(url)
    state = submit_study(store, make_spec("doomed"))
    fill(url, "doomed", [0.5])
    with pytest.raises(Conflict, match="pause or cancel it"):
        delete_study(store, "doomed")
    change_state(store, state.id, "cancel")
    assert delete_study(store, state.id) == "doomed"
    assert results.list_studies(store).total == 0
    assert "doomed" not in optuna.get_all_study_names(optuna_storage(url))
    with pytest.raises(StudyNotFound):
        results.study_detail(store, "doomed")
    submit_study(store, make_spec("doomed"))  # the name is free again


def test_client_commands_on_the_database_print_tables_and_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store.open(url)
    submit_study(store, make_spec("shown"))
    fill(url, "shown", [0.25, 0.75, None], history=True)
    runner = CliRunner()

    def cli(*args: str) -> str:
        result = runner.invoke(app, [*args, "--db", url], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        return result.output

    assert "shown" in cli("studies") and "3/20" in cli("studies")
    status = cli("status", "shown")
    assert "best: trial 1, val_accuracy = 0.75" in status
    assert "2 complete, 1 pruned" in status
    rows = json.loads(cli("leaderboard", "shown", "--json"))
    assert [(r["rank"], r["number"]) for r in rows] == [(1, 1), (2, 0)]
    assert "learning curve" in cli("trial", "shown", "1")
    assert json.loads(cli("trial", "shown", "1", "--json"))["curve"][1]["val_loss"] == 0.6
    missing = runner.invoke(app, ["trial", "shown", "9", "--db", url])
    assert missing.exit_code == 2 and "has no trial 9" in missing.output


def test_token_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tokens.db'}"
    runner = CliRunner()
    created = runner.invoke(app, ["token", "create", "alice", "--db", url])
    assert created.exit_code == 0
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("hps_") and len(token) > 40
    store = Store.open(url)
    assert stored_token_hashes(store) == ([hash_token(token)], True)
    again = runner.invoke(app, ["token", "create", "alice", "--db", url])
    assert again.exit_code == 2 and "exists already" in again.output
    assert "alice" in runner.invoke(app, ["token", "list", "--db", url]).output
    assert runner.invoke(app, ["token", "revoke", "alice", "--db", url]).exit_code == 0
    assert stored_token_hashes(store) == ([], True)
    gone = runner.invoke(app, ["token", "revoke", "alice", "--db", url])
    assert gone.exit_code == 2 and "no active token named 'alice'" in gone.output
