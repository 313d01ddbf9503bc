"""The REST API in process (FastAPI's test client, a real SQLite file): every error class a
client can cause, uploads, auth, the dashboard and /metrics."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from hpsearch.api import Settings, create_app
from hpsearch.data.tensors import load_dataset
from hpsearch.service.datasets import StoredUploads
from hpsearch.service.tokens import create_token, hash_token, revoke_token
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_storage
from tests.served import ASSET_URL, external_assets, served

SPEC: dict[str, Any] = {
    "name": "api-test",
    "dataset": {"source": "builtin", "name": "iris"},
    "search_space": {"learning_rate": {"low": 1e-4, "high": 1e-1, "log": True}},
    "training": {"max_epochs": 2},
    "budget": {"n_trials": 3},
}


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'api.db'}"


@pytest.fixture
def client(url: str) -> TestClient:
    return served(Settings(database_url=url, max_upload_bytes=20_000))


def with_(**changes: Any) -> dict[str, Any]:
    return {**SPEC, **changes}


def fields(response: Any) -> list[str]:
    assert response.status_code == 422, response.text
    return [problem["field"] for problem in response.json()["detail"]]


def test_a_submitted_study_is_listed_and_shown(client: TestClient) -> None:
    created = client.post("/api/v1/studies", json=SPEC)
    assert created.status_code == 201
    body = created.json()
    assert body["state"] == "queued" and body["metric"] == "val_accuracy"
    assert body["progress"] == {
        "budget": 3, "complete": 0, "pruned": 0, "running": 0, "waiting": 0, "failed": 0,
        "handed_back": 0, "lost": 0, "finished": 0,
    }  # fmt: skip
    assert body["spec"]["task"] == "classification"
    again = client.post("/api/v1/studies", json=with_(budget={"n_trials": 5}))
    assert again.status_code == 201 and again.json()["progress"]["budget"] == 5
    listing = client.get("/api/v1/studies").json()
    assert listing["total"] == 1 and listing["items"][0]["name"] == "api-test"
    by_id = client.get(f"/api/v1/studies/{body['id']}").json()
    assert by_id["name"] == "api-test" and by_id["best_trial"] is None
    assert client.get("/api/v1/studies/api-test/leaderboard").json() == []


@pytest.mark.parametrize(
    ("spec", "field", "reason"),
    [
        ({k: v for k, v in SPEC.items() if k != "budget"}, "budget", "Field required"),
        (with_(name="Bad Name"), "name", "must start with a lower-case letter"),
        (with_(dataset={"source": "builtin", "name": "nope"}), "dataset.name", "digits"),
        (with_(budget={"n_trials": 0}), "budget.n_trials", "greater than or equal to 1"),
        (with_(training={"max_epochs": "many"}), "training.max_epochs", "valid integer"),
        (
            with_(search_space={"learning_rate": {"low": 1, "high": 0.1}}),
            "search_space.learning_rate",
            "must be < high",
        ),
        (with_(objective={"metric": "val_rmse"}), "objective.metric", "does not fit"),
        (with_(colour="blue"), "colour", "Extra inputs are not permitted"),
        (
            with_(dataset={"source": "uploaded", "id": 99}),
            "dataset.id",
            "no uploaded dataset with id 99",
        ),
        (
            with_(dataset={"source": "file", "path": "missing.csv", "target": "y"}),
            "dataset",
            "not found in the data directory",
        ),
    ],
)
def test_an_invalid_spec_is_a_422_naming_the_field(
    client: TestClient, spec: dict[str, Any], field: str, reason: str
) -> None:
    response = client.post("/api/v1/studies", json=spec)
    assert field in fields(response)
    problem = next(p for p in response.json()["detail"] if p["field"] == field)
    assert reason in problem["msg"]
    assert client.get("/api/v1/studies").json()["total"] == 0  # nothing stored


def test_a_body_that_is_not_json_is_a_422(client: TestClient) -> None:
    response = client.post(
        "/api/v1/studies", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422


def test_unknown_things_are_404(client: TestClient) -> None:
    assert client.get("/api/v1/studies/nope").status_code == 404
    assert client.get("/api/v1/studies/123").json()["detail"] == "no study '123'"
    client.post("/api/v1/studies", json=SPEC)
    assert client.get("/api/v1/studies/api-test/trials/0").status_code == 404
    assert client.get("/api/v1/studies/api-test/trials/0/model").status_code == 404
    assert client.get("/api/v1/datasets/7").status_code == 404
    assert client.post("/api/v1/studies/nope/pause").status_code == 404


def test_conflicts_are_409(client: TestClient) -> None:
    client.post("/api/v1/studies", json=SPEC)
    taken = client.post("/api/v1/studies", json=with_(model={"hidden": [5]}))
    assert taken.status_code == 409 and "already exists with a different spec" in taken.text
    assert client.post("/api/v1/studies/api-test/pause").json()["state"] == "paused"
    again = client.post("/api/v1/studies/api-test/pause")
    assert again.status_code == 409 and again.json()["detail"].endswith("it is paused")
    assert client.post("/api/v1/studies/api-test/cancel").json()["state"] == "cancelled"
    for change in ("pause", "resume", "cancel"):
        assert client.post(f"/api/v1/studies/api-test/{change}").status_code == 409
    assert client.post("/api/v1/studies/api-test/extend", json={"n_trials": 2}).status_code == 409


def test_state_changes_and_delete(client: TestClient, url: str) -> None:
    client.post("/api/v1/studies", json=SPEC)
    assert client.delete("/api/v1/studies/api-test").status_code == 409  # still queued
    extended = client.post("/api/v1/studies/api-test/extend", json={"n_trials": 4})
    assert extended.json()["progress"]["budget"] == 7
    assert client.post("/api/v1/studies/api-test/pause").json()["state"] == "paused"
    resumed = client.post("/api/v1/studies/api-test/resume").json()
    assert resumed["state"] == "running" and resumed["freed_trials"] == 0
    client.post("/api/v1/studies/api-test/cancel")
    assert client.delete("/api/v1/studies/api-test").status_code == 204
    assert client.get("/api/v1/studies/api-test").status_code == 404
    assert optuna.get_all_study_names(optuna_storage(url)) == []


def test_an_oversized_spec_is_a_413(client: TestClient) -> None:
    huge = with_(description="x" * 1_100_000)
    response = client.post("/api/v1/studies", json=huge)
    assert response.status_code == 413
    assert "larger than this server accepts" in response.json()["detail"]


def csv_bytes(rows: int = 60, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "a": rng.normal(size=rows),
            "b": rng.normal(size=rows),
            "colour": rng.choice(["red", "blue"], size=rows),
        }
    )
    frame["label"] = np.where(frame["a"] + frame["b"] > 0, "yes", "no")
    return frame.to_csv(index=False).encode()


def upload(client: TestClient, name: str, content: bytes, target: str = "label") -> Any:
    return client.post(
        "/api/v1/datasets", files={"file": (name, io.BytesIO(content))}, data={"target": target}
    )


def test_an_uploaded_dataset_is_checked_stored_and_usable_by_a_study(
    client: TestClient, url: str
) -> None:
    response = upload(client, "people.csv", csv_bytes())
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["task"] == "classification" and dataset["n_rows"] == 60
    assert dataset["columns"] == ["a", "b", "colour", "label"]
    assert client.get("/api/v1/datasets").json() == [dataset]
    assert client.get(f"/api/v1/datasets/{dataset['id']}").json() == dataset
    spec = with_(name="uploaded", dataset={"source": "uploaded", "id": dataset["id"]})
    created = client.post("/api/v1/studies", json=spec)
    assert created.status_code == 201 and created.json()["spec"]["task"] == "classification"
    store = Store.open(url)
    data = load_dataset(parse_spec(spec), uploads=StoredUploads(store))  # as a worker reads it
    assert data.classes == ["no", "yes"]
    assert data.n_features == 4  # a, b and colour one-hot
    assert len(data.x_train) + len(data.x_val) + len(data.x_test) == 60


def test_npz_and_parquet_uploads(client: TestClient) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(40.0).reshape(20, 2), y=np.arange(20) % 2)
    assert upload(client, "d.npz", buffer.getvalue(), target="y").json()["columns"] == [
        "x_0", "x_1", "y",
    ]  # fmt: skip
    parquet = io.BytesIO()
    pd.read_csv(io.BytesIO(csv_bytes())).to_parquet(parquet)
    assert upload(client, "d.parquet", parquet.getvalue()).json()["format"] == "parquet"


@pytest.mark.parametrize(
    ("name", "content", "target", "reason"),
    [
        ("x.txt", b"a,label\n1,0\n", "label", "name it .csv, .parquet or .npz"),
        ("x.csv", b"a,label\n1,0\n2,1\n", "nope", "target column 'nope' not found"),
        ("x.csv", b"a,label\n1,0\n,1\n", "label", "missing values (NaN)"),
        ("x.csv", b"label\n0\n1\n", "label", "no feature columns"),
        ("x.npz", b"not a zip archive", "y", "cannot read x.npz"),
        ("x.parquet", b"PAR1 broken", "y", "cannot read x.parquet"),
        ("x.csv", b"a,label\n1,3\n2,3\n", "label", "single value"),
    ],
)
def test_a_malformed_upload_is_a_422_and_stores_nothing(
    client: TestClient, name: str, content: bytes, target: str, reason: str
) -> None:
    response = upload(client, name, content, target)
    assert response.status_code == 422, response.text
    assert reason in response.json()["detail"][0]["msg"]
    assert client.get("/api/v1/datasets").json() == []


def test_an_upload_without_its_target_is_a_422(client: TestClient) -> None:
    response = client.post("/api/v1/datasets", files={"file": ("x.csv", csv_bytes())})
    assert "target" in fields(response)


def test_an_oversized_upload_is_a_413_and_stores_nothing(client: TestClient) -> None:
    big = csv_bytes(rows=2000)  # ~ 100 kB against the fixture's 20 kB limit
    response = upload(client, "big.csv", big)
    assert response.status_code == 413
    assert client.get("/api/v1/datasets").json() == []


def test_tokens_guard_every_route_once_one_exists(client: TestClient, url: str) -> None:
    assert client.get("/api/v1/studies").status_code == 200  # none yet: open
    store = Store.open(url)
    _, token = create_token(store, "ci")
    for method, path in [
        ("GET", "/api/v1/studies"),
        ("POST", "/api/v1/studies"),
        ("GET", "/api/v1/workers"),
        ("GET", "/api/v1/datasets"),
        ("GET", "/metrics"),
        ("GET", "/dashboard"),
        ("GET", "/api/studies"),  # the dashboard's own API
    ]:
        assert client.request(method, path).status_code == 401, path
        wrong = client.request(method, path, headers={"Authorization": "Bearer hps_wrong"})
        assert wrong.status_code == 401, path
    missing = client.get("/api/v1/studies")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert "no token" in missing.json()["detail"]
    good = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/studies", headers=good).status_code == 200
    assert client.get("/healthz").status_code == 200  # liveness stays open
    revoke_token(store, "ci")
    assert client.get("/api/v1/studies", headers=good).status_code == 401
    assert client.get("/api/v1/studies").status_code == 401  # revoking all opens nothing


def test_tokens_from_the_environment(url: str) -> None:
    settings = Settings(database_url=url, env_token_hashes=(hash_token("s3cret"),))
    client = served(settings)
    assert client.get("/api/v1/studies").status_code == 401
    ok = client.get("/api/v1/studies", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_the_dashboard_lists_the_study_and_takes_its_token_once(
    client: TestClient, url: str
) -> None:
    client.post("/api/v1/studies", json=SPEC)
    page = client.get("/dashboard")
    assert page.status_code == 200 and "Optuna Dashboard" in page.text
    studies = client.get("/api/studies").json()["study_summaries"]
    assert [s["study_name"] for s in studies] == ["api-test"]
    store = Store.open(url)
    _, token = create_token(store, "browser")
    assert client.get("/api/studies").status_code == 401
    login = client.get(f"/dashboard?token={token}", follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/dashboard"
    assert client.get("/api/studies").status_code == 200  # the cookie carries it now
    assert client.get("/dashboard?token=wrong", follow_redirects=False).status_code == 401


def test_metrics_are_prometheus_text_with_the_database_figures(
    client: TestClient, url: str
) -> None:
    client.post("/api/v1/studies", json=SPEC)
    study = optuna.load_study(study_name="api-test", storage=optuna_storage(url))
    study.tell(study.ask(), 0.5)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    trials = {
        (s.labels["study"], s.labels["state"]): s.value for s in families["hpsearch_trials"].samples
    }
    assert trials == {("api-test", "complete"): 1.0, ("api-test", "pruned"): 1.0}
    durations = families["hpsearch_trial_duration_seconds"].samples
    assert next(s.value for s in durations if s.name.endswith("_count")) == 2
    latency = families["hpsearch_http_request_duration_seconds"].samples
    assert any(s.labels.get("route") == "/api/v1/studies" for s in latency)
    assert "hpsearch_workers_alive" in families and "hpsearch_studies" in families


@pytest.mark.integration
def test_health_reports_an_unreachable_database_as_503() -> None:
    down = "postgresql://nobody@127.0.0.1:1/none"
    client = TestClient(create_app(Settings(database_url=down)))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert "127.0.0.1:1" in response.json()["detail"]
    assert client.get("/api/v1/studies").status_code == 503


def test_the_dashboard_deletes_only_under_hpsearchs_rules_and_changes_nothing_else(
    client: TestClient, url: str
) -> None:
    client.post("/api/v1/studies", json=SPEC)
    optuna_id = optuna.load_study(study_name="api-test", storage=optuna_storage(url))._study_id
    refused = client.delete(f"/api/studies/{optuna_id}")
    assert refused.status_code == 409
    assert "pause or cancel it before deleting it" in refused.json()["reason"]
    assert client.get("/api/v1/studies/api-test").json()["state"] == "queued"
    for method, path in [
        ("POST", f"/api/studies/{optuna_id}/rename"),
        ("POST", "/api/studies"),
        ("POST", "/api/trials/1/tell"),
        ("POST", "/api/trials/1/user-attrs"),
    ]:
        answer = client.request(method, path, json={"study_name": "renamed", "state": "Fail"})
        assert answer.status_code == 403, (path, answer.text)
        assert "read-only" in answer.json()["reason"]
    note = client.put(f"/api/studies/{optuna_id}/note", json={"version": 1, "body": "kept"})
    assert note.status_code == 204  # notes touch nothing hpsearch relies on
    assert optuna.get_all_study_names(optuna_storage(url)) == ["api-test"]
    client.post("/api/v1/studies/api-test/cancel")
    assert client.delete(f"/api/studies/{optuna_id}").status_code == 204
    assert client.get("/api/v1/studies/api-test").status_code == 404
    assert optuna.get_all_study_names(optuna_storage(url)) == []
    assert client.delete(f"/api/studies/{optuna_id}").status_code == 404


def zeros_npz() -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=np.zeros((100_000, 2)), y=np.zeros(100_000))
    return buffer.getvalue()


def zeros_parquet() -> bytes:
    buffer = io.BytesIO()
    pd.DataFrame({"x": np.zeros(100_000), "y": np.arange(100_000) % 2}).to_parquet(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("bomb.npz", zeros_npz()),
        ("bomb.parquet", zeros_parquet()),
        ("empty-cells.csv", b"a,b,y\n" + b",,\n" * 5_000),  # 15,000 values in 15 kB
    ],
)
def test_a_small_file_that_decodes_to_too_many_values_is_a_413_and_stores_nothing(
    client: TestClient, name: str, content: bytes
) -> None:
    assert len(content) < 20_000  # within the fixture's upload limit
    response = upload(client, name, content, target="y")
    assert response.status_code == 413, response.text
    assert "more than" in response.json()["detail"] and "10,000" in response.json()["detail"]
    assert client.get("/api/v1/datasets").json() == []


def test_the_docs_are_served_with_their_own_assets_and_no_token(url: str) -> None:
    """/docs and /redoc work where the server has no internet: their scripts, styles and
    icon come from the server itself (fastapi-offline), none from a CDN."""
    client = served(Settings(database_url=url, env_token_hashes=(hash_token("s3cret"),)))
    for page, script in (("/docs", "swagger-ui-bundle.js"), ("/redoc", "redoc.standalone.js")):
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert external_assets(html.text) == []
        assets = [a or b for a, b in ASSET_URL.findall(html.text)]
        assert f"/docs-assets/{script}" in assets and "/docs-assets/favicon.png" in assets
        for asset in assets:
            fetched = client.get(asset)
            assert fetched.status_code == 200 and len(fetched.content) > 1000, asset
    assert '"validatorUrl": null' in client.get("/docs").text  # no badge from swagger.io
    assert client.get("/openapi.json").json()["info"]["title"] == "hpsearch"


def test_external_assets_are_found_in_html() -> None:
    html = (
        '<script src="/docs-assets/a.js"></script><link href="https://cdn.example/x.css">'
        "<img src='//fonts.example/f.png'><style>b{background:url(http://x.example/i.png)}"
        '</style><svg xmlns="http://www.w3.org/2000/svg"></svg>'
    )
    assert external_assets(html) == [
        "https://cdn.example/x.css",
        "//fonts.example/f.png",
        "http://x.example/i.png",
    ]


def test_the_root_leads_to_the_dashboard_or_else_to_the_docs(url: str) -> None:
    with_dashboard = served(Settings(database_url=url))
    assert with_dashboard.get("/", follow_redirects=False).headers["location"] == "/dashboard"
    without = served(Settings(database_url=url, dashboard=False))
    assert without.get("/", follow_redirects=False).headers["location"] == "/docs"
    assert without.get("/dashboard").status_code == 404
    assert without.get("/", follow_redirects=True).status_code == 200  # the docs


def test_the_dashboard_can_be_turned_off_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings.from_env("sqlite://").dashboard is True
    monkeypatch.setenv("HPSEARCH_DASHBOARD", "0")
    assert Settings.from_env("sqlite://").dashboard is False
