"""The service layer on SQLite and PostgreSQL: submitting, state changes, and what claims see."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages._rdb.models import BaseModel as OptunaBase
from optuna.trial import TrialState
from sqlalchemy import delete, func, select

import hpsearch.service.studies
from hpsearch.data.tensors import load_dataset
from hpsearch.errors import HpsearchError
from hpsearch.runtime.trials import claim_trial, open_study, run_trial
from hpsearch.search.space import suggest_params
from hpsearch.service.results import study_summary
from hpsearch.service.studies import (
    HANDED_BACK_ERROR,
    StudyConflict,
    StudyNotFound,
    StudyState,
    change_state,
    delete_study,
    fail_if_failing,
    get_study,
    mark_completed_if_done,
    runnable_studies,
    submit_study,
)
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, StudyRecord, delete_optuna_study, make_engine, session_scope
from tests.conftest import run_cli, write_spec


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
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
    store = Store.open(url)
    first = submit_study(store, make_spec())
    assert (first.state, first.n_trials) == ("queued", 2)
    assert submit_study(store, make_spec()).id == first.id
    bigger = submit_study(store, make_spec(budget={"n_trials": 5}))
    assert (bigger.id, bigger.n_trials, bigger.spec.budget.n_trials) == (first.id, 5, 5)
    assert (
        get_study(store, first.id).name == get_study(store, "service-test").name == "service-test"
    )


def test_same_name_with_another_spec_is_a_conflict(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec())
    with pytest.raises(StudyConflict, match="already exists with a different spec"):
        submit_study(store, make_spec(training={"max_epochs": 3}))


def test_keys_a_resubmitted_spec_leaves_out_keep_the_study_s_values(url: str) -> None:
    """As after an upgrade that changed a default: the same document, naming no sampler and
    no pruner, goes on with the study created under the old defaults, budget changes
    included; a key it does write must still match."""
    store = Store.open(url)
    created = submit_study(
        store, make_spec(sampler={"name": "bayes", "seed": 0}, pruner={"name": "median"})
    )
    omitting = make_spec().model_dump(mode="json", exclude={"sampler", "pruner"})
    again = submit_study(store, parse_spec(omitting))
    assert (again.id, again.spec.sampler.name, again.spec.pruner.name) == (
        created.id,
        "bayes",
        "median",
    )
    bigger = submit_study(store, parse_spec({**omitting, "budget": {"n_trials": 5}}))
    assert (bigger.id, bigger.n_trials) == (created.id, 5)
    stored = get_study(store, created.id).spec
    assert (stored.sampler.name, stored.pruner.name, stored.budget.n_trials) == (
        "bayes",
        "median",
        5,
    )
    with pytest.raises(StudyConflict, match="already exists with a different spec"):
        submit_study(store, parse_spec({**omitting, "sampler": {"name": "gp"}}))


def test_unknown_study_is_not_found(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec())
    with pytest.raises(StudyNotFound, match="no study 'nope'"):
        get_study(store, "nope")
    with pytest.raises(StudyNotFound):
        change_state(store, 999, "pause")


def test_state_changes_follow_the_rules(url: str) -> None:
    store = Store.open(url)
    study = submit_study(store, make_spec()).name
    assert change_state(store, study, "pause").state == "paused"
    with pytest.raises(StudyConflict, match="cannot pause study 'service-test': it is paused"):
        change_state(store, study, "pause")
    assert change_state(store, study, "resume").state == "running"
    assert change_state(store, study, "cancel").state == "cancelled"
    for change in ("pause", "resume", "cancel", "extend"):
        with pytest.raises(StudyConflict, match="it is cancelled"):
            change_state(store, study, change, 1)


def test_claims_respect_pause_budget_completion_and_extend(url: str) -> None:
    spec = make_spec()
    store = Store.open(url)
    state = submit_study(store, spec)
    study = open_study(state, store)
    data = load_dataset(spec)
    change_state(store, state.id, "pause")
    assert claim_trial(study, state, store) is None  # a paused study starts no trial
    change_state(store, state.id, "resume")

    run_all(study, state, url, data)
    assert len(study.trials) == 2
    assert get_study(store, state.id).state == "completed"
    assert claim_trial(study, state, store) is None

    extended = change_state(store, state.id, "extend", 1)
    assert (extended.state, extended.n_trials) == ("running", 3)
    run_all(study, state, url, data)
    assert len(study.trials) == 3
    assert get_study(store, state.id).state == "completed"


def run_all(study: Any, state: Any, url: str, data: Any) -> None:
    store = Store.open(url)
    while (trial := claim_trial(study, state, store)) is not None:
        run_trial(study, trial, state.spec, data)
        mark_completed_if_done(store, state)


def test_a_queued_study_turns_running_at_its_first_claim(url: str) -> None:
    store = Store.open(url)
    state = submit_study(store, make_spec())
    claim_trial(open_study(state, store), state, store)
    assert get_study(store, state.id).state == "running"


def test_extend_needs_a_positive_count_within_the_largest_budget(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec())
    with pytest.raises(HpsearchError, match="at least 1"):
        change_state(store, "service-test", "extend", 0)
    assert change_state(store, "service-test", "extend", 999_998).n_trials == 1_000_000
    with pytest.raises(HpsearchError, match="the budget 1,000,001 trials; a study may have"):
        change_state(store, "service-test", "extend", 1)


@pytest.mark.system
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


def end_trial(study: optuna.Study, state: TrialState, error: str | None = None) -> None:
    trial = study.ask()
    if error is not None:
        trial.set_user_attr("error", error)
    study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)


def test_three_failures_in_a_row_fail_the_study_with_the_last_error(url: str) -> None:
    store = Store.open(url)
    state = submit_study(store, make_spec())
    study = open_study(state, store)
    end_trial(study, TrialState.FAIL, "ValueError: first")
    end_trial(study, TrialState.FAIL, "ValueError: second")
    end_trial(study, TrialState.COMPLETE)  # breaks the row
    end_trial(study, TrialState.FAIL, "ValueError: third")
    end_trial(study, TrialState.FAIL, HANDED_BACK_ERROR)  # says nothing about the spec
    end_trial(study, TrialState.FAIL)  # failed as stale: its worker died, a retry follows
    end_trial(study, TrialState.FAIL, "ValueError: fourth")
    assert fail_if_failing(store, state) is None
    assert get_study(store, state.id).state == "queued"
    end_trial(study, TrialState.FAIL, "RuntimeError: CUDA out of memory")
    reason = fail_if_failing(store, state)
    assert reason == "3 trials in a row failed; the last: RuntimeError: CUDA out of memory"
    failed = study_summary(store, state.id)
    assert (failed.state, failed.reason) == ("failed", reason)
    assert fail_if_failing(store, state) is None  # failed once; not runnable any more
    resumed = change_state(store, state.id, "resume")
    assert resumed.state == "running" and study_summary(store, state.id).reason is None


def optuna_rows(url: str) -> dict[str, int]:
    """Rows per table of Optuna's schema."""
    with session_scope(url) as session:
        return {
            table.name: session.scalar(select(func.count()).select_from(table))
            for table in OptunaBase.metadata.sorted_tables
            if table.name != "version_info"
        }


def filled_study(url: str, name: str, n_trials: int) -> StudyState:
    """A study whose trials hold a row in every table of Optuna's schema."""
    store = Store.open(url)
    state = submit_study(store, make_spec(name=name))
    study = open_study(state, store)
    study.set_user_attr("owner", "test")
    for i in range(n_trials):
        trial = study.ask()
        suggest_params(trial, state.spec)
        trial.report(0.1 * i, 1)
        trial.set_user_attr("epochs", 1)
        study._storage.set_trial_system_attr(trial._trial_id, "rung", i)
        study._storage.record_heartbeat(trial._trial_id)
        study.tell(trial, 0.1 * i)
    return state


def test_delete_removes_every_row_of_the_study_in_a_few_statements(url: str) -> None:
    kept = filled_study(url, "kept", 5)
    before = optuna_rows(url)
    doomed = filled_study(url, "doomed", 60)
    store = Store.open(url)
    change_state(store, doomed.id, "cancel")
    statements: list[str] = []
    engine = make_engine(url)
    listen = functools.partial(sqlalchemy.event.listen, engine, "before_cursor_execute")
    listen(record := lambda *args: statements.append(args[2]))
    try:
        assert delete_study(store, "doomed") == "doomed"
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", record)
    assert len([s for s in statements if s.lstrip().upper().startswith("DELETE")]) <= 15
    assert optuna_rows(url) == before  # every row of the doomed study, and only those
    assert get_study(store, kept.id).name == "kept"
    with pytest.raises(StudyNotFound):
        delete_study(store, "doomed")


def test_a_deletion_that_stops_half_way_leaves_the_study_whole(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = filled_study(url, "whole", 4)
    store = Store.open(url)
    change_state(store, state.id, "pause")
    before = optuna_rows(url)

    def dies_after_deleting(session: Any, study_id: int) -> None:
        delete_optuna_study(session, study_id)
        raise RuntimeError("the server was killed here")

    monkeypatch.setattr(hpsearch.service.studies, "delete_optuna_study", dies_after_deleting)
    with pytest.raises(RuntimeError):
        delete_study(store, "whole")
    assert optuna_rows(url) == before
    assert get_study(store, "whole").state == "paused"


def test_a_half_deleted_study_is_deleted_by_name_and_its_name_used_again(url: str) -> None:
    state = filled_study(url, "half", 3)
    with session_scope(url) as session:  # what a deletion killed half-way once left behind
        session.execute(delete(StudyRecord).where(StudyRecord.id == state.id))
    with pytest.raises(StudyNotFound):
        store = Store.open(url)
        get_study(store, "half")
    with pytest.raises(StudyConflict, match="delete it with `hpsearch delete half`"):
        submit_study(store, make_spec(name="half"))
    assert delete_study(store, "half") == "half"
    assert sum(optuna_rows(url).values()) == 0
    assert submit_study(store, make_spec(name="half")).state == "queued"


def test_a_stored_spec_this_version_cannot_read_fails_its_study_not_the_workers(
    url: str,
) -> None:
    """A spec stored by an older version that checked less (a negative seed, say) is failed
    with the reason; the other studies are still served."""
    store = Store.open(url)
    old = submit_study(store, make_spec(name="old"))
    submit_study(store, make_spec(name="new"))
    with session_scope(url) as session:
        record = session.get(StudyRecord, old.id)
        record.spec = {**record.spec, "sampler": {**record.spec["sampler"], "seed": -1}}
    assert [state.name for state in runnable_studies(store)] == ["new"]
    with session_scope(url) as session:
        record = session.get(StudyRecord, old.id)
        assert record.state == "failed"
        assert record.reason == (
            "its stored spec is not valid: sampler.seed: Input should be greater than or equal to 0"
        )
