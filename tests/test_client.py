"""`hpsearch.Client`: the same methods and answers over a database URL and over the REST API,
typed errors carrying the field and the reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import hpsearch
from hpsearch.runtime.worker import Worker, WorkerOptions
from hpsearch.storage import Store

SPEC: dict[str, Any] = {
    "name": "client-iris",
    "dataset": {"source": "builtin", "name": "iris"},
    "model": {"hidden": [16]},
    "search_space": {
        "learning_rate": {"low": 1e-3, "high": 1e-1, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
    },
    "training": {"max_epochs": 4, "early_stopping_patience": None},
    "sampler": {"name": "random", "seed": 3},
    "budget": {"n_trials": 3},
}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'client.db'}"


@pytest.fixture
def client(url: str) -> hpsearch.Client:
    return hpsearch.Client(url)


def run_worker(url: str, n: int) -> None:
    assert Worker(WorkerOptions(Store(url), "cpu", max_trials=n, idle_exit_s=0)).run() == 0


def test_a_spec_is_submitted_as_a_dict_a_yaml_path_or_a_spec(
    client: hpsearch.Client, tmp_path: Path
) -> None:
    from hpsearch.spec import parse_spec

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC | {"name": "from-yaml"}))
    studies = [
        client.submit(SPEC),
        client.submit(str(path)),
        client.submit(parse_spec(SPEC | {"name": "from-spec"})),
    ]
    assert [s.name for s in studies] == ["client-iris", "from-yaml", "from-spec"]
    assert {s.name for s in client.studies()} == {"client-iris", "from-yaml", "from-spec"}
    assert client.submit(SPEC).name == "client-iris"  # the same spec again: the same study
    status = client.study("from-yaml").status()
    assert status.state == "queued" and status.progress.budget == 3


def test_errors_are_typed_and_carry_the_field_and_the_reason(client: hpsearch.Client) -> None:
    with pytest.raises(hpsearch.SpecError) as invalid:
        client.submit(SPEC | {"budget": {"n_trials": 0}})
    assert [field for field, _ in invalid.value.errors] == ["budget.n_trials"]
    assert "greater than or equal to 1" in invalid.value.errors[0][1]
    with pytest.raises(hpsearch.NotFound, match="no-such-study"):
        client.study("no-such-study")
    study = client.submit(SPEC)
    study.cancel()
    with pytest.raises(hpsearch.Conflict, match="it is cancelled"):
        study.pause()
    assert isinstance(invalid.value, hpsearch.HpsearchError)


def test_state_changes_and_the_budget(client: hpsearch.Client) -> None:
    study = client.submit(SPEC)
    assert study.pause().state == "paused"
    assert study.wait(timeout_s=5).state == "paused"  # a paused study waits for no one
    assert study.resume().state == "running"
    assert study.extend(2).progress.budget == 5
    assert study.cancel().state == "cancelled"
    study.delete()
    with pytest.raises(hpsearch.NotFound):
        study.status()


def test_waiting_on_a_study_no_worker_serves_times_out_with_its_progress(
    client: hpsearch.Client,
) -> None:
    study = client.submit(SPEC)
    with pytest.raises(TimeoutError, match=r"still queued after 0\.2 s \(0 of 3 trials\)"):
        study.wait(timeout_s=0.2, poll_s=0.05)


def test_a_finished_study_reads_as_records_and_frames(client: hpsearch.Client, url: str) -> None:
    study = client.submit(SPEC)
    [queued] = study.enqueue({"learning_rate": 0.01})
    assert queued.state == "waiting"
    run_worker(url, 3)
    assert study.trial(0).params["learning_rate"] == 0.01  # the enqueued point came first
    final = study.wait(timeout_s=60, progress=True)
    assert final.state == "completed" and final.progress.finished == 3
    board = study.leaderboard(top=2)
    assert [entry.rank for entry in board] == [1, 2]
    frame = study.leaderboard_frame(top=5)
    assert list(frame.index) == [1, 2, 3]
    assert {"number", "value", "learning_rate", "dropout", "val_accuracy"} <= set(frame.columns)
    assert frame["value"].tolist() == sorted(frame["value"], reverse=True)
    assert frame.loc[1, "learning_rate"] == board[0].params["learning_rate"]
    assert [t.number for t in study.trials()] == [0, 1, 2]
    assert study.trials(state="pruned") == []
    curves = study.curves()
    assert sorted(set(curves["trial"])) == [0, 1, 2]
    assert curves.groupby("trial")["epoch"].max().tolist() == [4, 4, 4]
    assert study.trial(board[0].number).curve[-1].epoch == 4
    assert "at least 10 complete trials" in (study.importance().reason or "")


def test_an_empty_leaderboard_is_an_empty_frame(client: hpsearch.Client) -> None:
    frame = client.submit(SPEC).leaderboard_frame()
    assert frame.empty


@pytest.fixture
def api_url(tmp_path: Path) -> Iterator[str]:
    from tests.test_api_e2e import environment, serving

    with serving(f"sqlite:///{tmp_path / 'served.db'}", tmp_path, environment(tmp_path)) as base:
        yield base


@pytest.mark.system
def test_the_same_methods_over_the_rest_api(api_url: str, tmp_path: Path) -> None:
    client = hpsearch.Client(api_url)
    study = client.submit(SPEC)
    with pytest.raises(hpsearch.SpecError) as invalid:
        client.submit(SPEC | {"budget": {"n_trials": 0}})
    assert [field for field, _ in invalid.value.errors] == ["budget.n_trials"]
    with pytest.raises(hpsearch.NotFound):
        client.study("no-such-study")
    run_worker(f"sqlite:///{tmp_path / 'served.db'}", 3)
    assert study.wait(timeout_s=120, poll_s=0.2).state == "completed"
    frame = study.leaderboard_frame()
    assert len(frame) == 3 and "learning_rate" in frame.columns
    assert sorted(set(study.curves()["trial"])) == [0, 1, 2]
    with pytest.raises(hpsearch.ApiError, match="cannot reach the API"):
        hpsearch.Client("http://127.0.0.1:9").studies()
