"""End to end: `hpsearch serve` as a real uvicorn process with a token, two `hpsearch worker`
processes on PostgreSQL, and a client speaking HTTP (httpx, and the CLI's `--api` mode)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from hpsearch import load_model
from tests.conftest import REPO, hpsearch_command

pytestmark = [pytest.mark.postgres, pytest.mark.system]

TOKEN = "hps_end-to-end-token"
SPEC: dict[str, Any] = {
    "name": "digits-e2e",
    "dataset": {"source": "builtin", "name": "digits"},
    "model": {"hidden": [64]},
    "search_space": {
        "learning_rate": {"low": 1e-3, "high": 3e-2, "log": True},
        "dropout": {"low": 0.0, "high": 0.3},
    },
    "training": {"max_epochs": 12, "early_stopping_patience": None},
    "sampler": {"name": "tpe", "seed": 0},
    "budget": {"n_trials": 8},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(every)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")


def environment(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"HPSEARCH_DATA_DIR": str(tmp_path), "COLUMNS": "200"}


@contextmanager
def serving(url: str, cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """`hpsearch serve` on `url` in its own process, its output in `cwd`/serve.log; yields
    its base URL once it answers HTTP, and stops it (SIGTERM) at the end."""
    port = free_port()
    log_path = cwd / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            hpsearch_command("serve", "--port", str(port), "--db", url),
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log_path.read_text()}")
        try:
            httpx.get(f"{base}/openapi.json", timeout=5)
        except httpx.HTTPError:
            return False
        return True

    try:
        wait_for(answers, 120, "the API server")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def server(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    env = environment(tmp_path) | {"HPSEARCH_API_TOKENS": TOKEN}
    with serving(postgres_url, tmp_path, env) as base:
        yield base


@pytest.fixture
def workers(postgres_url: str, tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    processes = [
        subprocess.Popen(
            hpsearch_command("worker", "--db", postgres_url, "--device", "cpu"),
            cwd=tmp_path,
            env=environment(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / f"worker-{i}.log").open("w"),
        )
        for i in range(2)
    ]
    try:
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            assert process.wait(timeout=60) == 0


def test_a_study_submitted_over_http_runs_on_workers_and_is_served_back(
    server: str, workers: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    api = httpx.Client(
        base_url=f"{server}/api/v1", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
    )
    assert httpx.get(f"{server}/api/v1/studies").status_code == 401

    created = api.post("/studies", json=SPEC)
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]

    def progress() -> dict[str, int]:
        return api.get(f"/studies/{study_id}").json()["progress"]

    # Pause once a trial finished: the running ones finish, no new one starts.
    wait_for(lambda: progress()["finished"] >= 1, 120, "the first finished trial")
    assert api.post("/studies/digits-e2e/pause").json()["state"] == "paused"
    wait_for(lambda: progress()["running"] == 0, 60, "the running trials to finish")
    paused = progress()
    time.sleep(3)
    assert progress() == paused
    assert paused["finished"] < SPEC["budget"]["n_trials"]
    assert api.post("/studies/digits-e2e/pause").status_code == 409

    assert api.post("/studies/digits-e2e/resume").json()["state"] == "running"
    wait_for(
        lambda: api.get(f"/studies/{study_id}").json()["state"] == "completed",
        240,
        "the study to complete",
        every=0.5,
    )
    done = progress()
    assert (done["finished"], done["running"], done["failed"]) == (8, 0, 0)

    # The leaderboard is the complete trials ranked by value.
    board = api.get("/studies/digits-e2e/leaderboard", params={"top": 5}).json()
    complete = api.get("/studies/digits-e2e/trials", params={"state": "complete"}).json()
    ranked = sorted(complete["items"], key=lambda t: (-t["value"], t["number"]))
    assert [(r["rank"], r["number"], r["value"]) for r in board] == [
        (i + 1, t["number"], t["value"]) for i, t in enumerate(ranked[:5])
    ]

    # The best trial's learning curve has one point per epoch it trained.
    best = api.get(f"/studies/digits-e2e/trials/{board[0]['number']}").json()
    assert len(best["curve"]) == best["epochs"] == 12
    assert [p["epoch"] for p in best["curve"]] == list(range(1, 13))
    assert max(p["value"] for p in best["curve"]) == pytest.approx(best["value"])
    assert best["has_model"] is True

    # Its downloaded model file scores the stored test accuracy on raw digits, the test
    # rows drawn as the default split draws them; `hpsearch predict --api` agrees.
    weights = api.get(f"/studies/digits-e2e/trials/{board[0]['number']}/model")
    assert weights.headers["content-type"] == "application/octet-stream"
    digits = load_digits()
    rows = np.arange(len(digits.target))
    test = train_test_split(rows, test_size=0.1, random_state=0, stratify=digits.target)[1]
    predicted = load_model(weights.content).predict(digits.data[test])
    right = np.float32((predicted == digits.target[test]).sum())
    assert float(right / np.float32(len(test))) == best["metrics"]["test_accuracy"]
    frame = pd.DataFrame(digits.data[test], columns=digits.feature_names)
    frame.to_csv(tmp_path / "digits.csv", index=False)
    cli = run_client(tmp_path, "predict", "digits-e2e", str(tmp_path / "digits.csv"), api=server)
    assert cli.returncode == 0, cli.stderr
    assert list(pd.read_csv(io.StringIO(cli.stdout))["prediction"]) == list(predicted)

    workers_seen = api.get("/workers").json()
    assert len(workers_seen) == 2 and all(w["alive"] and w["device"] == "cpu" for w in workers_seen)

    # The client CLI over --api prints the same leaderboard.
    cli = run_client(tmp_path, "leaderboard", "digits-e2e", "--top", "5", "--json", api=server)
    assert cli.returncode == 0, cli.stderr
    assert [row["number"] for row in json.loads(cli.stdout)] == [r["number"] for r in board]
    table = run_client(tmp_path, "studies", api=server)
    assert "digits-e2e" in table.stdout and "8/8" in table.stdout

    # Cancel and delete: a second study is cancelled before any worker takes it, then both go.
    other = api.post("/studies", json={**SPEC, "name": "cancelled-e2e"}).json()
    assert api.post(f"/studies/{other['id']}/cancel").json()["state"] == "cancelled"
    time.sleep(3)  # workers poll every 2 s; a cancelled study gets no trial
    assert api.get("/studies/cancelled-e2e").json()["progress"]["finished"] == 0
    assert api.get("/studies/cancelled-e2e").json()["progress"]["running"] == 0
    assert api.delete("/studies/cancelled-e2e").status_code == 204
    assert api.delete("/studies/digits-e2e").status_code == 204
    assert api.get("/studies").json()["total"] == 0
    assert api.get("/studies/digits-e2e/trials/0/model").status_code == 404


def run_client(
    tmp_path: Path, *args: str, api: str, token: str = TOKEN
) -> subprocess.CompletedProcess[str]:
    env = environment(tmp_path) | {"HPSEARCH_API_TOKEN": token}
    return subprocess.run(
        hpsearch_command(*args, "--api", api),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_client_says_in_one_line_when_the_api_is_down_or_refuses_it(
    server: str, tmp_path: Path
) -> None:
    refused = run_client(tmp_path, "studies", api=server, token="hps_wrong")
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("error: the API at")
    assert "refused the request (a wrong token): set HPSEARCH_API_TOKEN" in refused.stderr
    down = run_client(tmp_path, "studies", api=f"http://127.0.0.1:{free_port()}")
    assert down.returncode == 2
    assert "cannot reach the API at http://127.0.0.1:" in down.stderr
    for result in (refused, down):
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = run_client(tmp_path, "status", "nope", api=server)
    assert missing.returncode == 2 and "no study 'nope'" in missing.stderr


def test_without_a_token_the_server_listens_on_loopback_only_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in environment(tmp_path).items() if k != "HPSEARCH_API_TOKENS"}
    process = subprocess.Popen(
        hpsearch_command(
            "serve", "--host", "0.0.0.0", "--port", str(port), "--db", f"sqlite:///{tmp_path}/o.db"
        ),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def up() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).is_success
            except httpx.HTTPError:
                return False

        wait_for(up, 60, "the API server")
        sockets = subprocess.run(
            ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        assert [line.split()[3] for line in sockets] == [f"127.0.0.1:{port}"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert "no API token configured: listening on 127.0.0.1 only" in stderr
