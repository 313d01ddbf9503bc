"""Optuna's own tools on an hpsearch database: the objective is named after the spec's
metric (new studies, studies taken over, and studies made before names were set, through
migration 0004), `optuna.visualization` plots it, and optuna-dashboard shows the name."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from hpsearch.api import Settings
from hpsearch.service.studies import StudyConflict, submit_study
from hpsearch.storage import Store, optuna_storage, upgrade
from hpsearch.storage.db import SCHEMA_HEAD, VERSION_TABLE, make_engine
from hpsearch.storage.optuna_internals import METRIC_NAMES_KEY
from tests.served import served
from tests.test_results import make_spec


def fill(url: str, name: str, values: list[float | None]) -> None:
    """Trials told with `values` (None = pruned), as in tests/test_results.py."""
    study = optuna.load_study(study_name=name, storage=optuna_storage(url))
    for value in values:
        trial = study.ask()
        trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [16, 32, 64])
        if value is None:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, value)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'eco.db'}"
    return request.getfixturevalue("postgres_url")


def metric_names(url: str, name: str) -> list[str] | None:
    """What Optuna's own tools read, through a storage of their own (a plain URL)."""
    return optuna.load_study(study_name=name, storage=url).metric_names


def test_a_new_study_names_its_objective_after_the_metric(url: str) -> None:
    store = Store.open(url)
    submit_study(store, make_spec("named"))
    submit_study(store, make_spec("regressed", "val_loss"))
    assert metric_names(url, "named") == ["val_accuracy"]
    assert metric_names(url, "regressed") == ["val_loss"]


def test_an_empty_optuna_study_taken_over_is_named_and_must_share_the_direction(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'eco.db'}"
    store = Store.open(url)
    optuna.create_study(study_name="empty", storage=url, direction="maximize")
    submit_study(store, make_spec("empty"))  # val_accuracy: maximised, like the empty study
    assert metric_names(url, "empty") == ["val_accuracy"]
    optuna.create_study(study_name="other-way", storage=url, direction="minimize")
    with pytest.raises(StudyConflict, match="not created by hpsearch"):
        submit_study(store, make_spec("other-way"))  # would have searched the wrong way
    assert metric_names(url, "other-way") is None


def as_before_names(url: str, optuna_ids: list[int]) -> None:
    """The database as an hpsearch before migration 0004 left it: no names, revision 0003."""
    with make_engine(url).begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "DELETE FROM study_system_attributes WHERE key = :key AND study_id IN "
                f"({', '.join(map(str, optuna_ids))})"
            ),
            {"key": METRIC_NAMES_KEY},
        )
        connection.execute(sqlalchemy.text(f"UPDATE {VERSION_TABLE} SET version_num = '0003'"))


def test_migrating_names_the_objective_of_studies_made_before(url: str) -> None:
    store = Store.open(url)
    old = submit_study(store, make_spec("old", "val_f1"))
    renamed = submit_study(store, make_spec("renamed"))
    fill(url, "old", [0.5, 0.7])
    optuna.create_study(study_name="outsider", storage=url, directions=["minimize"] * 2)
    ids = [old.optuna_study_id, renamed.optuna_study_id]
    as_before_names(url, [i for i in ids if i is not None])
    assert metric_names(url, "old") is None
    optuna.load_study(study_name="renamed", storage=url).set_metric_names(["my name"])

    upgrade(url)

    assert metric_names(url, "old") == ["val_f1"]
    assert metric_names(url, "renamed") == ["my name"]  # names already there are kept
    assert metric_names(url, "outsider") is None  # no hpsearch record: not ours to name
    with make_engine(url).connect() as connection:
        version = connection.execute(sqlalchemy.text(f"SELECT * FROM {VERSION_TABLE}")).all()
        rows = connection.execute(
            sqlalchemy.text("SELECT value_json FROM study_system_attributes WHERE key = :key"),
            {"key": METRIC_NAMES_KEY},
        ).all()
    assert version == [(SCHEMA_HEAD,)]
    assert sorted(json.loads(value) for (value,) in rows) == [["my name"], ["val_f1"]]
    upgrade(url)  # at head: nothing more to do
    assert metric_names(url, "old") == ["val_f1"]


# optuna.visualization imports matplotlib too (where installed), whose first import in a
# fresh environment runs fc-list to build its font cache: a child process.
@pytest.mark.integration
def test_optuna_visualization_plots_an_hpsearch_study_under_its_metric(url: str) -> None:
    from optuna.visualization import plot_optimization_history, plot_param_importances

    store = Store.open(url)
    submit_study(store, make_spec("plotted"))
    values = [0.61, 0.9, None, 0.72, 0.55, 0.8]
    fill(url, "plotted", values)
    study = optuna.load_study(study_name="plotted", storage=url)

    history = plot_optimization_history(study, target_name=study.metric_names[0])
    points = next(trace for trace in history.data if trace.mode == "markers")
    assert list(points.x) == [0, 1, 3, 4, 5]  # the complete trials, by number
    assert list(points.y) == [v for v in values if v is not None]
    assert history.layout.yaxis.title.text == "val_accuracy"
    best = next(trace for trace in history.data if trace.name == "Best Value")
    assert list(best.y)[:2] == [0.61, 0.9] and max(best.y) == best.y[-1] == 0.9  # maximised

    importances = plot_param_importances(study)
    assert [trace.name for trace in importances.data] == ["val_accuracy"]
    assert sorted(importances.data[0].y) == ["batch_size", "learning_rate"]


def test_optuna_dashboard_serves_the_metric_name(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'eco.db'}"
    client = served(Settings(database_url=url))
    created = client.post("/api/v1/studies", json=make_spec("dash").model_dump(mode="json"))
    assert created.status_code == 201, created.text
    fill(url, "dash", [0.4, 0.6])
    study_id = optuna.load_study(study_name="dash", storage=url)._study_id
    detail = client.get(f"/api/studies/{study_id}")
    assert detail.status_code == 200
    assert detail.json()["objective_names"] == ["val_accuracy"]
