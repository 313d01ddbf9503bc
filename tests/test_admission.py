"""Admission: whatever the API or the CLI accepts can be run, and no input makes a 500.

Seeds and sizes are range-checked, a study whose trial cannot fit the device memory a trial
may take is refused naming the field and the estimate, numbers are finite, strings hold no
NUL, and a submission that fails leaves nothing behind. The API runs in process on a real
PostgreSQL database (whose JSON type refuses Infinity, and whose integers overflow) and on
SQLite; hypothesis throws generated specs at it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hpsearch.service.studies
from hpsearch.api import Settings
from hpsearch.errors import SpecError
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.service.studies import admit, submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage, upgrade
from tests.conftest import run_cli
from tests.served import served

VALID: dict[str, Any] = {
    "name": "admitted",
    "dataset": {"source": "builtin", "name": "iris"},
    "search_space": {
        "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
        "batch_size": {"choices": [16, 32]},
    },
    "training": {"max_epochs": 2},
    "sampler": {"name": "tpe", "seed": 0},
    "budget": {"n_trials": 2},
}


def changed(path: str, value: Any, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """VALID (or `spec`) with the value at a dotted path replaced."""
    spec = copy.deepcopy(spec or VALID)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value
    return spec


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'admission.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def client(url: str) -> TestClient:
    migrate(url)
    return served(Settings(database_url=url))


def migrate(url: str) -> None:
    """Both schemas made, so that counting what a refused submission left works at once."""
    upgrade(url)
    optuna_storage(url)


def studies_left(url: str) -> tuple[int, int]:
    """(Optuna studies, hpsearch study records) in the database."""
    engine = sqlalchemy.create_engine(
        sqlalchemy.make_url(url).set(
            drivername="postgresql+psycopg" if url.startswith("postgresql") else "sqlite"
        ),
        poolclass=sqlalchemy.NullPool,
    )
    with engine.connect() as connection:
        optuna_count = connection.execute(sqlalchemy.text("SELECT count(*) FROM studies"))
        ours = connection.execute(sqlalchemy.text("SELECT count(*) FROM hps_studies"))
        counts = (optuna_count.scalar_one(), ours.scalar_one())
    engine.dispose()
    return counts


def post_spec(client: TestClient, spec: Any) -> Any:
    """POST a spec as JSON, Infinity and NaN written as Python's json module writes them."""
    body = json.dumps(spec)
    headers = {"content-type": "application/json"}
    return client.post("/api/v1/studies", content=body, headers=headers)


REFUSED = [
    ("sampler.seed", -1, "greater than or equal to 0"),
    ("sampler.seed", 2**63, "less than or equal to 4294967295"),
    ("split.seed", -1, "greater than or equal to 0"),
    ("training.seed", 1e30, "integer"),
    ("dataset.seed", 2**32, "less than or equal to 4294967295"),
    ("training.learning_rate", float("inf"), "finite"),
    ("training.weight_decay", float("inf"), "finite"),
    ("training.grad_clip_norm", float("inf"), "finite"),
    ("training.checkpoint_every_s", float("inf"), "finite"),
    ("budget.timeout_s", float("inf"), "finite"),
    ("search_space.batch_size.choices", [16, float("nan")], "finite"),
    ("search_space.learning_rate.high", float("inf"), "finite"),
    ("search_space.hidden_units", {"low": 8, "high": 1e9}, "<= 65536"),
    ("search_space.n_layers", {"low": 1, "high": 1e6}, "<= 64"),
    ("search_space.batch_size", {"low": 1, "high": 10**9}, "<= 1e+06"),
    ("model.hidden", [8] * 65, "at most 64"),
    ("name", "nlname\n", "must start with a lower-case letter"),
    ("dataset", {"source": "file", "path": "a\x00.csv", "target": "y"}, "NUL"),
    ("dataset", {"source": "uploaded", "id": 1099511627776}, "less than or equal"),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("path", "value", "reason"), REFUSED)
def test_out_of_range_input_is_a_422_naming_the_field_and_leaves_nothing(
    client: TestClient, url: str, path: str, value: Any, reason: str
) -> None:
    spec = changed(path, value)
    if path == "dataset.seed":
        spec["dataset"] = {"source": "synthetic", "seed": value}
    response = post_spec(client, spec)
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(p["field"].startswith(path) and reason in p["msg"] for p in problems), problems
    assert studies_left(url) == (0, 0)


MEMORY_BOMBS = [
    ("model.hidden", [65536, 65536, 65536, 65536], "model.hidden"),
    ("search_space.hidden_units", {"low": 8, "high": 65536}, "search_space.hidden_units"),
    (
        "dataset",
        {"source": "synthetic", "n_samples": 50_000_000, "n_features": 100_000},
        "dataset",
    ),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("path", "value", "field"), MEMORY_BOMBS)
def test_a_trial_too_large_for_the_device_is_refused_with_the_estimate(
    client: TestClient, url: str, path: str, value: Any, field: str
) -> None:
    spec = changed(path, value)
    if path == "search_space.hidden_units":
        spec["search_space"]["n_layers"] = {"low": 1, "high": 8}
    response = client.post("/api/v1/studies", json=spec)
    assert response.status_code == 422, response.text
    [problem] = response.json()["detail"]
    assert problem["field"] == field
    assert "GiB of device memory" in problem["msg"] and "HPSEARCH_MAX_TRIAL_GB" in problem["msg"]
    assert studies_left(url) == (0, 0)


def test_the_memory_limit_is_configurable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'limit.db'}"
    wide = parse_spec(changed("model.hidden", [4096, 4096]))  # about 0.4 GiB per trial
    store = Store.open(url)
    assert admit(wide, store).task == "classification"
    monkeypatch.setenv("HPSEARCH_MAX_TRIAL_GB", "0.1")
    with pytest.raises(SpecError) as refused:
        admit(wide, store)
    [(field, reason)] = refused.value.errors
    assert field == "model.hidden"
    assert reason.startswith("a trial needs about 0.4 GiB of device memory")
    assert "more than the 0.1 GiB a trial may take" in reason


@pytest.mark.postgres
def test_unreachable_ids_are_404_and_422_not_500(client: TestClient) -> None:
    assert client.post("/api/v1/studies", json=VALID).status_code == 201
    assert client.get("/api/v1/studies/99999999999999999999").status_code == 404
    assert client.get("/api/v1/studies/2147483648").status_code == 404
    assert client.delete("/api/v1/studies/99999999999999999999").status_code == 404
    spec = changed("dataset", {"source": "uploaded", "id": 2147483647}, changed("name", "up"))
    response = client.post("/api/v1/studies", json=spec)
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "dataset.id"


@pytest.mark.postgres
@pytest.mark.system
def test_a_yaml_infinity_through_the_cli_is_one_line_naming_the_field(
    tmp_path: Path, postgres_url: str
) -> None:
    path = tmp_path / "inf.yaml"
    path.write_text(
        "name: inf\ndataset: {source: builtin, name: iris}\ntraining: {learning_rate: .inf}\n"
        "budget: {n_trials: 2}\n"
    )
    result = run_cli("submit", str(path), "--db", postgres_url, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "training.learning_rate: Input should be a finite number" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    migrate(postgres_url)
    assert studies_left(postgres_url) == (0, 0)


def test_a_submission_that_fails_after_creating_the_optuna_study_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'half.db'}"
    migrate(url)

    def broken(record: Any) -> Any:
        raise RuntimeError("the process failed here")

    monkeypatch.setattr(hpsearch.service.studies, "_state_of", broken)
    store = Store.open(url)
    with pytest.raises(RuntimeError):
        submit_study(store, parse_spec(VALID))
    assert studies_left(url) == (0, 0)
    monkeypatch.undo()
    assert submit_study(store, parse_spec(VALID)).name == "admitted"  # the name is free
    assert studies_left(url) == (1, 1)


def test_an_accepted_spec_runs_as_submitted(tmp_path: Path) -> None:
    """The largest accepted values still make a runnable study: seeds at their bounds."""
    spec = changed("sampler.seed", 2**32 - 1, changed("training.seed", 2**32 - 1))
    spec = changed("split.seed", 2**32 - 1, changed("training.max_epochs", 1, spec))
    url = f"sqlite:///{tmp_path}/edge.db"
    store = Store.open(url)
    submit_study(store, parse_spec(spec))
    assert Worker(WorkerOptions(store, idle_exit_s=0)).run() == 0
    trials = optuna.load_study(study_name="admitted", storage=optuna_storage(url)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]


# --- generated specs -------------------------------------------------------------------

NASTY_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 1e300, -1e-300, 0.5]),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "a\nb", "nlname\n", "../../etc/passwd", "x.csv", "é"]),
)
NASTY = st.recursive(
    NASTY_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=70_000),
    st.integers(min_value=2**31 - 2, max_value=2**32 + 1),
    st.floats(min_value=0, max_value=1, exclude_max=True),
    st.floats(min_value=1e-6, max_value=1e3),
)
RANGES = st.fixed_dictionaries(
    {"low": NUMBERS, "high": NUMBERS}, optional={"log": st.booleans(), "step": NUMBERS}
)
WORDS = st.sampled_from(
    [
        "relu",
        "adam",
        "sgd",
        "tpe",
        "random",
        "grid",
        "bayes",
        "gp",
        "cmaes",
        "median",
        "hyperband",
        "val_loss",
        "val_accuracy",
        "val_rmse",
        "classification",
        "regression",
        "iris",
        "digits",
        "diabetes",
        "synthetic",
        "builtin",
        "none",
        "plateau",
    ]
)
PLAUSIBLE = st.one_of(
    NUMBERS,
    WORDS,
    RANGES,
    st.fixed_dictionaries({"choices": st.lists(NUMBERS | WORDS, min_size=1, max_size=4)}),
    st.lists(st.integers(min_value=1, max_value=70_000), min_size=1, max_size=4),
    st.fixed_dictionaries({"name": WORDS}, optional={"seed": NUMBERS}),
)
# Three in four replacements are plausible (so that some pass admission and reach the
# database), one is arbitrary JSON.
VALUES = st.one_of(PLAUSIBLE, PLAUSIBLE, PLAUSIBLE, NASTY)
# Hypothesis leans towards the first entries: those that take numbers come first, so that
# many generated specs stay admissible and reach the database.
PATHS = [
    "sampler.seed",
    "training.seed",
    "split.seed",
    "training.max_epochs",
    "training.batch_size",
    "training.learning_rate",
    "sampler.n_startup_trials",
    "budget.n_trials",
    "budget.timeout_s",
    "split.val",
    "split.test",
    "search_space.learning_rate",
    "search_space.learning_rate.low",
    "search_space.batch_size.choices",
    "search_space.hidden_units",
    "search_space.n_layers",
    "search_space.dropout",
    "pruner.reduction_factor",
    "model.hidden",
    "model.activation",
    "objective.metric",
    "sampler.name",
    "pruner",
    "dataset",
    "dataset.name",
    "dataset.source",
    "task",
    "name",
]


@st.composite
def generated_specs(draw: st.DrawFn) -> Any:
    """A valid spec with a few values replaced by arbitrary JSON, or arbitrary JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(NASTY)
    spec = changed("name", draw(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)))
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3, unique=True)):
        spec = changed(path, draw(VALUES), spec)
    return spec


@pytest.mark.postgres
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=generated_specs())
def test_no_generated_spec_makes_a_server_error_or_an_orphan(
    postgres_client: tuple[TestClient, str], spec: Any
) -> None:
    client, url = postgres_client
    response = post_spec(client, spec)
    assert response.status_code < 500, (spec, response.text)
    optuna_studies, records = studies_left(url)
    assert optuna_studies == records  # a refused submission left no Optuna study behind


@pytest.fixture
def postgres_client(postgres_url: str) -> tuple[TestClient, str]:
    migrate(postgres_url)
    return served(Settings(database_url=postgres_url)), postgres_url


def test_a_split_that_leaves_a_part_without_every_class_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'split.db'}"
    tiny = parse_spec(changed("split", {"val": 0.01, "test": 0.01}))
    store = Store.open(url)
    with pytest.raises(SpecError) as refused:
        admit(tiny, store)
    assert refused.value.errors == [
        (
            "split",
            "splitting 150 rows leaves val 2, test 2 rows; each part needs at least 3 "
            "(one per class)",
        )
    ]
    assert admit(parse_spec(changed("split", {"val": 0.02, "test": 0.02})), store)
