"""Warm starts: configurations enqueued into a study train before the sampler's own points,
inside the budget.

* A study warm-started from another study's best trials trains them first (its first trial
  numbers carry exactly those params; the sampler draws only the params they leave out)
  and trains exactly n_trials trials, with a worker claiming packs of 4 and one claiming
  one trial at a time, on SQLite and PostgreSQL.
* `warm_start` takes the best that fit, in the order of the source study's own objective:
  params the new space does not search are dropped, a trial with a value outside its
  bounds or choices is skipped, duplicates are removed, failed and pruned trials are not
  taken; submitting the same spec again enqueues nothing more; an unknown study is an
  error naming `warm_start.study`.
* Enqueueing through the REST API (`POST /studies/{study}/trials`) and the CLI
  (`hpsearch enqueue`, in process over `--db` and `--api`, and as a user runs it): invalid
  params are 422s naming the field, an unknown study a 404, a study without room in its
  budget, or completed, cancelled, failed or a grid, a 409.
* A retry of a crashed enqueued trial resumes as any retry does: same params, its
  checkpoint chain; an enqueued trial itself resumes from no checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from fastapi.testclient import TestClient
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

import hpsearch.client.backends
from hpsearch.api import Settings, create_app
from hpsearch.cli.commands import app as cli
from hpsearch.client.backends import ApiBackend
from hpsearch.errors import SpecError
from hpsearch.runtime.trials import _retried_trial_ids, claim_trials, open_study
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.search.space import distributions
from hpsearch.service.results import study_summary
from hpsearch.service.studies import StudyConflict, change_state, enqueue, submit_study
from hpsearch.spec import StudySpec, parse_spec
from hpsearch.storage import Store, StudyRecord, optuna_internals
from hpsearch.storage.engine import MAX_RETRIES
from tests.conftest import run_cli, write_spec
from tests.served import served

pytestmark = pytest.mark.timeout(300)

SPACE: dict[str, Any] = {
    "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
    "batch_size": {"low": 16, "high": 64, "step": 16},
    "dropout": {"low": 0.0, "high": 0.5},
    "optimizer": {"choices": ["adam", "sgd"]},
}


def spec_dict(name: str, n_trials: int, space: dict[str, Any] = SPACE, **sections: Any) -> dict:
    """Iris, a tiny network, one epoch: a trial takes some tens of milliseconds."""
    return {
        "name": name,
        "dataset": {"source": "builtin", "name": "iris"},
        "model": {"hidden": [8]},
        "search_space": space,
        "training": {"max_epochs": 1, "early_stopping_patience": None},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "budget": {"n_trials": n_trials},
        **sections,
    }


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_url")
    return f"sqlite:///{tmp_path / 'warm.db'}"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'warm.db'}"


def add_finished(store: Store, name: str, trials: list[tuple[dict, float | None, str]]) -> None:
    """Finished trials (params, value, state name) added to study `name` through Optuna."""
    record_spec = _spec_of(store, name)
    dists = distributions(record_spec)
    study = optuna.load_study(study_name=name, storage=store.optuna())
    for params, value, state in trials:
        study.add_trial(
            create_trial(
                params=params,
                distributions={k: dists[k] for k in params},
                value=value,
                state=TrialState[state],
            )
        )


def _spec_of(store: Store, name: str) -> StudySpec:
    with store.session() as session:
        record = session.query(StudyRecord).filter_by(name=name).one()
        return StudySpec.model_validate(record.spec)


def trials_of(store: Store, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = store.optuna()
    try:
        return sorted(
            optuna.load_study(study_name=name, storage=storage).get_trials(),
            key=lambda t: t.number,
        )
    finally:
        storage.engine.dispose()


def waiting_params(store: Store, name: str) -> list[dict]:
    return [
        t.system_attrs["fixed_params"]
        for t in trials_of(store, name)
        if t.state == TrialState.WAITING
    ]


# --- a warm-started study trains its enqueued points first --------------------------------

# The source searches no dropout: its configurations are partial in the new study, whose
# sampler draws the dropout of each.
SOURCE_SPACE = {k: v for k, v in SPACE.items() if k != "dropout"}
SOURCE_TRIALS = [
    ({"learning_rate": 0.01, "batch_size": 32, "optimizer": "adam"}, 0.90, "COMPLETE"),
    ({"learning_rate": 0.002, "batch_size": 16, "optimizer": "sgd"}, 0.97, "COMPLETE"),
    ({"learning_rate": 0.05, "batch_size": 64, "optimizer": "adam"}, 0.80, "COMPLETE"),
    ({"learning_rate": 0.03, "batch_size": 48, "optimizer": "sgd"}, 0.95, "COMPLETE"),
]
BEST_THREE = [SOURCE_TRIALS[i][0] for i in (1, 3, 0)]  # val_accuracy is maximised


@pytest.mark.parametrize("pack", [4, 1])
def test_a_warm_started_study_trains_the_enqueued_points_first_and_exactly_its_budget(
    url: str, pack: int
) -> None:
    store = Store.open(url)
    submit_study(store, parse_spec(spec_dict("source", 10, SOURCE_SPACE)))
    add_finished(store, "source", SOURCE_TRIALS)
    warm = {"study": "source", "top": 3}
    state = submit_study(store, parse_spec(spec_dict("target", 7, warm_start=warm)))
    assert waiting_params(store, "target") == BEST_THREE

    options = WorkerOptions(store, studies=("target",), idle_exit_s=0, pack=pack)
    assert Worker(options).run() == 0

    trials = trials_of(store, "target")
    assert [t.number for t in trials] == list(range(7))  # the budget, exactly
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 7, [t.state for t in trials]
    for trial, enqueued in zip(trials, BEST_THREE, strict=False):
        assert {k: trial.params[k] for k in enqueued} == enqueued, trial.params
        assert set(trial.params) == set(SPACE)  # the dropout was drawn
        assert 0.0 <= trial.params["dropout"] <= 0.5
        assert "retry_history" not in trial.system_attrs  # trained afresh, not retried
    drawn = [tuple(sorted(t.params.items())) for t in trials[3:]]
    assert len(set(drawn)) == 4  # then the sampler's own, distinct points
    assert study_summary(store, state.id).state == "completed"


# --- choosing a warm start's configurations ------------------------------------------------


def test_warm_start_takes_the_best_that_fit_in_the_source_order_once(sqlite_url: str) -> None:
    """The source minimises val_loss and searches dropout and rmsprop, which the new study
    does not: the new study takes the best 3 that fit, lowest loss first."""
    store = Store.open(sqlite_url)
    source_space = {
        "learning_rate": {"low": 1e-4, "high": 1.0, "log": True},
        "batch_size": {"choices": [16, 32, 64]},
        "dropout": {"low": 0.0, "high": 0.5},
        "optimizer": {"choices": ["adam", "sgd", "rmsprop"]},
    }
    objective = {"metric": "val_loss"}
    submit_study(store, parse_spec(spec_dict("source", 20, source_space, objective=objective)))
    a = {"learning_rate": 0.01, "batch_size": 32, "dropout": 0.1, "optimizer": "adam"}
    add_finished(
        store,
        "source",
        [
            ({**a, "learning_rate": 0.5}, 0.05, "COMPLETE"),  # the best, above the new high
            (a, 0.10, "COMPLETE"),
            ({**a, "dropout": 0.3}, 0.12, "COMPLETE"),  # a's configuration without dropout
            ({**a, "optimizer": "rmsprop"}, 0.15, "COMPLETE"),  # not among the new choices
            ({**a, "learning_rate": 0.005, "batch_size": 16}, 0.20, "COMPLETE"),
            ({**a, "optimizer": "sgd"}, 0.30, "COMPLETE"),
            ({**a, "learning_rate": 0.04}, 0.40, "COMPLETE"),  # fits, but fourth
            ({**a, "learning_rate": 0.002}, None, "FAIL"),
            ({**a, "learning_rate": 0.003}, 0.01, "PRUNED"),
        ],
    )
    new_space = {k: v for k, v in SPACE.items() if k != "dropout"}
    warm = {"study": "source", "top": 3}
    target = spec_dict("target", 5, new_space, warm_start=warm)
    submit_study(store, parse_spec(target))
    without_dropout = {k: v for k, v in a.items() if k != "dropout"}
    expected = [
        without_dropout,
        {**without_dropout, "learning_rate": 0.005, "batch_size": 16},
        {**without_dropout, "optimizer": "sgd"},
    ]
    assert waiting_params(store, "target") == expected
    assert all(isinstance(c["batch_size"], int) for c in waiting_params(store, "target"))

    # Submitted again, as is and with a larger budget: nothing is enqueued twice.
    submit_study(store, parse_spec(target))
    submit_study(store, parse_spec({**target, "budget": {"n_trials": 8}}))
    assert waiting_params(store, "target") == expected
    assert len(trials_of(store, "target")) == 3


def test_a_warm_start_from_an_unknown_study_is_refused_and_leaves_nothing(
    sqlite_url: str,
) -> None:
    store = Store.open(sqlite_url)
    warm = {"study": "nowhere", "top": 2}
    with pytest.raises(SpecError) as refused:
        submit_study(store, parse_spec(spec_dict("target", 5, warm_start=warm)))
    assert refused.value.errors == [
        ("warm_start.study", "no study named 'nowhere' in this database")
    ]
    client = served(Settings(database_url=sqlite_url))
    response = client.post("/api/v1/studies", json=spec_dict("target", 5, warm_start=warm))
    assert response.status_code == 422, response.text
    assert [p["field"] for p in response.json()["detail"]] == ["warm_start.study"]
    assert client.get("/api/v1/studies/target").status_code == 404
    assert optuna.get_all_study_names(store.optuna()) == []


@pytest.mark.parametrize(
    ("warm_start", "changes", "field", "reason"),
    [
        ({"study": "source", "top": 0}, {}, "warm_start.top", "greater than or equal to 1"),
        ({"study": "source", "top": 1001}, {}, "warm_start.top", "less than or equal to 1000"),
        ({"study": "source", "top": 6}, {}, "warm_start.top", "budget of 5 trials"),
        ({"study": "source"}, {}, "warm_start.top", "Field required"),
        ({"study": "Source X", "top": 1}, {}, "warm_start.study", "not a study name"),
        ({"study": "target", "top": 1}, {}, "warm_start.study", "from itself"),
        ({"study": "source", "top": 1, "x": 1}, {}, "warm_start.x", "Extra inputs"),
        (
            {"study": "source", "top": 1},
            {
                "sampler": {"name": "grid"},
                "search_space": {"learning_rate": {"choices": [0.01, 0.1]}},
            },
            "warm_start",
            "warm starts need another sampler",
        ),
    ],
)
def test_the_warm_start_spec_is_checked(
    warm_start: dict, changes: dict, field: str, reason: str
) -> None:
    with pytest.raises(SpecError) as refused:
        parse_spec(spec_dict("target", 5, warm_start=warm_start) | changes)
    [(path, message)] = refused.value.errors
    assert path == field and reason in message, refused.value.errors


# --- enqueueing through the REST API ---------------------------------------------------


@pytest.fixture
def client(sqlite_url: str) -> TestClient:
    return served(Settings(database_url=sqlite_url))


def post(client: TestClient, study: str, *configs: Any) -> Any:
    return client.post(f"/api/v1/studies/{study}/trials", json={"configs": list(configs)})


def test_configurations_enqueued_through_the_api_wait_first_in_the_budget(
    client: TestClient,
) -> None:
    assert client.post("/api/v1/studies", json=spec_dict("api", 4)).status_code == 201
    created = post(
        client,
        "api",
        {"learning_rate": 0.01, "batch_size": 32.0, "optimizer": "sgd", "dropout": 0},
        {"learning_rate": 0.05},  # partial: the sampler draws the rest
    )
    assert created.status_code == 201, created.text
    first = {"learning_rate": 0.01, "batch_size": 32, "dropout": 0.0, "optimizer": "sgd"}
    assert [(t["number"], t["state"], t["params"]) for t in created.json()] == [
        (0, "waiting", first),  # in the space's order, batch_size an int, dropout a float
        (1, "waiting", {"learning_rate": 0.05}),
    ]
    params = created.json()[0]["params"]
    assert type(params["batch_size"]) is int and type(params["dropout"]) is float
    listed = client.get("/api/v1/studies/api/trials", params={"state": "waiting"}).json()
    assert [t["params"] for t in listed["items"]] == [t["params"] for t in created.json()]
    assert client.get("/api/v1/studies/api").json()["progress"]["waiting"] == 2

    full = post(client, "api", *[{"learning_rate": 0.02}] * 3)  # room for 2 more only
    assert full.status_code == 409, full.text
    assert "room for 2 more trial(s)" in full.json()["detail"]
    assert post(client, "api", *[{"learning_rate": 0.02}] * 2).status_code == 201
    spent = post(client, "api", {"learning_rate": 0.02})
    assert spent.status_code == 409 and "no room left" in spent.json()["detail"]


@pytest.mark.parametrize(
    ("config", "field", "reason"),
    [
        ({"momentum": 0.9}, "configs.0.momentum", "not in the study's search space"),
        ({"learning_rate": 0.5}, "configs.0.learning_rate", "above the search space's high"),
        ({"learning_rate": 1e-4}, "configs.0.learning_rate", "below the search space's low"),
        ({"learning_rate": "fast"}, "configs.0.learning_rate", "takes a number, got 'fast'"),
        ({"learning_rate": True}, "configs.0.learning_rate", "takes a number, got True"),
        ({"learning_rate": None}, "configs.0.learning_rate", "takes a number, got None"),
        ({"batch_size": 24}, "configs.0.batch_size", "not on the search space's step"),
        ({"batch_size": 32.5}, "configs.0.batch_size", "takes whole numbers"),
        ({"batch_size": 10**400}, "configs.0.batch_size", "above the search space's high"),
        ({"dropout": -(10**400)}, "configs.0.dropout", "below the search space's low"),
        ({"optimizer": "rmsprop"}, "configs.0.optimizer", "must be one of ['adam', 'sgd']"),
        ({"optimizer": 1}, "configs.0.optimizer", "must be one of"),
        ({"dropout": [0.1]}, "configs.0.dropout", "takes a number"),
        ({}, "configs.0", "give at least one param"),
    ],
)
def test_an_invalid_configuration_is_a_422_naming_the_param(
    client: TestClient, config: dict, field: str, reason: str
) -> None:
    assert client.post("/api/v1/studies", json=spec_dict("api", 4)).status_code == 201
    response = post(client, "api", {"learning_rate": 0.01}, config)
    assert response.status_code == 422, response.text
    problems = [(p["field"], p["msg"]) for p in response.json()["detail"]]
    expected = field.replace("configs.0", "configs.1")
    assert [f for f, _ in problems] == [expected] and reason in problems[0][1], problems
    assert client.get("/api/v1/studies/api").json()["progress"]["waiting"] == 0  # none


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity"])
def test_a_value_that_is_not_finite_is_a_422(client: TestClient, number: str) -> None:
    assert client.post("/api/v1/studies", json=spec_dict("api", 4)).status_code == 201
    body = '{"configs": [{"dropout": ' + number + "}]}"
    response = client.post(
        "/api/v1/studies/api/trials", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert [p["field"] for p in response.json()["detail"]] == ["configs.0.dropout"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"configs": []}, "configs"),
        ({"configs": [1]}, "configs.0"),
        ({"configs": {"learning_rate": 0.01}}, "configs"),
        ({"configs": [{"learning_rate": 0.01}], "extra": 1}, "extra"),
        ({}, "configs"),
        ([{"learning_rate": 0.01}], ""),
    ],
)
def test_a_malformed_body_is_a_422(client: TestClient, body: Any, field: str) -> None:
    assert client.post("/api/v1/studies", json=spec_dict("api", 4)).status_code == 201
    response = client.post("/api/v1/studies/api/trials", json=body)
    assert response.status_code == 422, response.text
    assert field in [p["field"] for p in response.json()["detail"]], response.json()


def test_enqueueing_into_an_unknown_or_closed_study_is_refused(
    client: TestClient, sqlite_url: str
) -> None:
    config = {"learning_rate": 0.01}
    assert post(client, "nowhere", config).status_code == 404
    assert post(client, "999", config).status_code == 404
    for name in ("paused", "cancelled", "failed", "completed"):
        assert client.post("/api/v1/studies", json=spec_dict(name, 4)).status_code == 201
    store = Store(sqlite_url)
    change_state(store, "paused", "pause")
    change_state(store, "cancelled", "cancel")
    with store.session() as session:
        for name in ("failed", "completed"):
            session.query(StudyRecord).filter_by(name=name).one().state = name
    assert post(client, "paused", config).status_code == 201  # waits for `resume`
    for name, hint in [
        ("cancelled", "it is cancelled"),
        ("failed", "hpsearch resume failed"),
        ("completed", "hpsearch extend completed"),
    ]:
        response = post(client, name, config)
        assert response.status_code == 409, response.text
        assert hint in response.json()["detail"]
    grid = spec_dict(
        "grid", 4, {"learning_rate": {"choices": [0.01, 0.1]}}, sampler={"name": "grid"}
    )
    assert client.post("/api/v1/studies", json=grid).status_code == 201
    response = post(client, "grid", config)
    assert response.status_code == 409 and "grid" in response.json()["detail"]


# --- enqueueing through the CLI --------------------------------------------------------


def test_hpsearch_enqueue_takes_params_or_a_file_over_the_database(
    sqlite_url: str, tmp_path: Path
) -> None:
    store = Store.open(sqlite_url)
    submit_study(store, parse_spec(spec_dict("cli", 6)))
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(cli, ["enqueue", "cli", *args, "--db", sqlite_url])

    done = invoke("--param", "learning_rate=0.01", "-p", "optimizer=sgd", "-p", "batch_size=32")
    assert done.exit_code == 0, done.output
    assert "1 configuration(s) enqueued as trial(s) 0" in done.output
    listed = tmp_path / "configs.yaml"
    listed.write_text(yaml.safe_dump([{"learning_rate": 0.02}, {"dropout": 0.25}]))
    done = invoke("--file", str(listed), "--json")
    assert done.exit_code == 0, done.output
    assert '"number": 2' in done.output and '"dropout": 0.25' in done.output
    assert waiting_params(store, "cli") == [
        {"learning_rate": 0.01, "batch_size": 32, "optimizer": "sgd"},
        {"learning_rate": 0.02},
        {"dropout": 0.25},
    ]
    wrong = invoke("--param", "learning_rate=2", "--param", "momentum=0.9")
    assert wrong.exit_code == 2
    assert "invalid configuration" in wrong.output
    assert "configs.0.learning_rate: 2 is above the search space's high" in wrong.output
    assert "configs.0.momentum: not in the study's search space" in wrong.output
    for args, message in [
        ((), "give --param NAME=VALUE"),
        (("--param", "learning_rate=0.01", "--file", str(listed)), "one of the two"),
        (("--param", "learning_rate"), "write it as NAME=VALUE"),
        (("--file", str(tmp_path / "none.yaml")), "cannot read"),
    ]:
        refused = invoke(*args)
        assert refused.exit_code == 2 and message in refused.output, refused.output
    (tmp_path / "one.yaml").write_text("learning_rate: 0.01\n")
    refused = invoke("--file", str(tmp_path / "one.yaml"))
    assert refused.exit_code == 2 and "must hold a list" in refused.output
    assert "Traceback" not in refused.output
    unknown = runner.invoke(cli, ["enqueue", "nope", "-p", "dropout=0.1", "--db", sqlite_url])
    assert unknown.exit_code == 2 and "no study 'nope'" in unknown.output


def test_hpsearch_enqueue_over_the_api(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--api`: the same command through the REST API (the app in process)."""
    store = Store.open(sqlite_url)
    submit_study(store, parse_spec(spec_dict("cli", 2)))
    backend = ApiBackend("http://testserver", None)
    backend.http = TestClient(
        create_app(Settings(database_url=sqlite_url)), base_url="http://testserver/api/v1"
    )
    monkeypatch.setattr(hpsearch.client.backends, "connect", lambda api, db: backend)
    runner = CliRunner()
    api = ["--api", "http://testserver"]
    done = runner.invoke(cli, ["enqueue", "cli", "-p", "learning_rate=0.03", *api])
    assert done.exit_code == 0, done.output
    assert waiting_params(store, "cli") == [{"learning_rate": 0.03}]
    wrong = runner.invoke(cli, ["enqueue", "cli", "-p", "optimizer=rmsprop", *api])
    assert wrong.exit_code == 2 and "configs.0.optimizer: must be one of" in wrong.output
    full = runner.invoke(cli, ["enqueue", "cli", "-p", "dropout=0.1", "-p", "x=1", *api])
    assert full.exit_code == 2 and "configs.0.x" in full.output
    spent = runner.invoke(cli, ["enqueue", "cli", "-p", "dropout=0.1", *api])
    assert spent.exit_code == 0, spent.output
    spent = runner.invoke(cli, ["enqueue", "cli", "-p", "dropout=0.1", *api])
    assert spent.exit_code == 2 and "no room left" in spent.output
    missing = runner.invoke(cli, ["enqueue", "nope", "-p", "dropout=0.1", *api])
    assert missing.exit_code == 2 and "no study 'nope'" in missing.output


@pytest.mark.system
def test_a_user_warm_starts_enqueues_and_runs_from_the_command_line(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    write_spec(tmp_path / "source.yaml", **spec_dict("source", 3, SOURCE_SPACE))
    assert run_cli("run", "source.yaml", "--db", db, cwd=tmp_path).returncode == 0
    warm = {"study": "source", "top": 2}
    write_spec(tmp_path / "target.yaml", **spec_dict("target", 5, warm_start=warm))
    submitted = run_cli("submit", "target.yaml", "--db", db, cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    (tmp_path / "more.json").write_text('[{"learning_rate": 0.02, "optimizer": "sgd"}]')
    enqueued = run_cli("enqueue", "target", "--file", "more.json", "--db", db, cwd=tmp_path)
    assert enqueued.returncode == 0, enqueued.stderr
    assert "enqueued as trial(s) 2" in enqueued.stdout
    ran = run_cli("run", "target.yaml", "--db", db, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    store = Store(db)
    source = sorted(
        (t for t in trials_of(store, "source") if t.state == TrialState.COMPLETE),
        key=lambda t: (-t.value, t.number),
    )
    target = trials_of(store, "target")
    assert len(target) == 5 and all(t.state == TrialState.COMPLETE for t in target)
    for trial, best in zip(target[:2], source[:2], strict=True):
        assert {k: trial.params[k] for k in best.params} == best.params
    assert {k: target[2].params[k] for k in ("learning_rate", "optimizer")} == {
        "learning_rate": 0.02,
        "optimizer": "sgd",
    }


# --- retries -----------------------------------------------------------------------------


def test_a_crashed_enqueued_trial_is_retried_as_any_trial_is(sqlite_url: str) -> None:
    """The enqueued trial resumes from no checkpoint; once it crashes, its retry holds all
    its params (the enqueued and the drawn ones) and its retry chain, and the budget holds
    one place for the two."""
    store = Store.open(sqlite_url)
    state = submit_study(store, parse_spec(spec_dict("retry", 3)))
    enqueue(store, "retry", [{"learning_rate": 0.01, "optimizer": "sgd"}])
    study = open_study(state, store)
    [first] = claim_trials(study, state, store, 1)
    assert first.trial.number == 0
    assert first.trial.params["learning_rate"] == 0.01 and len(first.trial.params) == 4
    assert _retried_trial_ids(first.trial) == []  # no checkpoint to look for
    storage = optuna_internals.study_storage(study)
    trial_id = optuna_internals.trial_id(first.trial)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)  # lost, as a crash leaves it
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)(
        study, storage.get_trial(trial_id)
    )
    claims = claim_trials(study, state, store, 5)
    assert [c.trial.number for c in claims] == [1, 2, 3]  # the retry first, then 2 new
    retry = claims[0].trial
    assert retry.params == first.trial.params
    assert _retried_trial_ids(retry) == [trial_id]  # resumes from its checkpoint chain
    with pytest.raises(StudyConflict, match="no room left"):
        enqueue(store, "retry", [{"learning_rate": 0.02}])
