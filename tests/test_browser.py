"""What a person sees in a browser, checked in a headless Chromium: a real `hpsearch serve`
with a study that has trials, its /docs and /redoc rendered from the server's own assets,
and optuna-dashboard showing the objective under the spec's metric name.

The browser reaches nothing but the server: every other host name fails to resolve and
everything else goes to a proxy where nothing listens, so a page that needed a CDN would
not render. Screenshots go to $HPSEARCH_SCREENSHOTS when it names a folder (`make
screenshots` keeps them in screenshots/ for a person to look at), else to the test's
temporary folder.

CI installs Debian's chromium (.ci/run); without it these tests fail, they do not skip.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest

from hpsearch.service.studies import submit_study
from hpsearch.spec import parse_spec
from hpsearch.storage import Store, optuna_internals
from tests.served import external_assets
from tests.test_api_e2e import environment, serving

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

WINDOW = (1280, 900)
# Only the server: other names do not resolve, other addresses go to a closed port.
OFFLINE = [
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--proxy-server=http://127.0.0.1:9",  # loopback bypasses it, as Chromium always does
]
SPEC: dict[str, Any] = {
    "name": "browsed",
    "dataset": {"source": "builtin", "name": "iris"},
    "search_space": {
        "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
        "batch_size": {"choices": [16, 32, 64]},
    },
    "objective": {"metric": "val_accuracy"},
    "budget": {"n_trials": 20},
}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "Chromium is not installed: `apt-get install --no-install-recommends chromium` "
            "(.ci/run installs it)",
            pytrace=False,
        )
    return found


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("browser")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[tuple[str, int]]:
    """`hpsearch serve` on a SQLite database with a study of 12 told trials; yields its base
    URL and the study's Optuna id (the dashboard's address for it)."""
    url = f"sqlite:///{home / 'browsed.db'}"
    submit_study(Store.open(url), parse_spec(SPEC))
    study = optuna.load_study(study_name="browsed", storage=url)
    for i in range(12):
        trial = study.ask()
        trial.suggest_categorical("batch_size", [16, 32, 64])
        learning_rate = trial.suggest_float("learning_rate", 1e-4, 1e-1, log=True)
        study.tell(trial, 0.5 + learning_rate + i / 100)
    with serving(url, home, environment(home)) as base:
        yield base, optuna_internals.study_id(study)


def screenshots(home: Path) -> Path:
    folder = Path(os.environ.get("HPSEARCH_SCREENSHOTS") or home / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def browse(home: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Chromium, headless and offline, with a profile of its own, on the given arguments."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={home / 'chromium-profile'}",
        *OFFLINE,
        # Virtual time stands still while requests are pending, so a loaded machine only
        # makes the page slower, never half-rendered.
        "--virtual-time-budget=20000",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def rendered(home: Path, address: str, done: str, timeout: float = 300) -> str:
    """The page's DOM once its scripts have run and `done` (a regular expression) matches
    it; loaded again while it does not (a loaded machine), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = browse(home, "--dump-dom", address)
        if re.search(done, result.stdout):
            return result.stdout
        if time.monotonic() > deadline:
            seen = result.stdout[-3000:] or result.stderr[-3000:]
            pytest.fail(f"{address} did not render {done!r} in {timeout:g} s; last: {seen}")
        time.sleep(2)


def screenshot(home: Path, address: str, name: str) -> Path:
    path = screenshots(home) / name
    path.unlink(missing_ok=True)
    size = f"--window-size={WINDOW[0]},{WINDOW[1]}"
    result = browse(home, size, f"--screenshot={path}", address)
    assert path.exists(), result.stderr[-2000:]
    return path


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_docs_render_offline_with_every_route(server: tuple[str, int], home: Path) -> None:
    base, _ = server
    for page in ("/docs", "/redoc"):
        html = httpx.get(f"{base}{page}", timeout=30).text
        assert external_assets(html) == [], page
    routes = {path for path in httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]}
    swagger = rendered(home, f"{base}/docs", r'class="opblock-summary-path"')
    listed = set(re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', swagger))
    assert listed == routes  # Swagger UI rendered the operations list, every route in it
    assert "/api/v1/studies/{study}/importance" in listed
    redoc = rendered(home, f"{base}/redoc", "Which hyperparameters mattered")
    assert "Submit a study" in redoc
    shot = screenshot(home, f"{base}/docs", "docs.png")
    assert png_size(shot) == WINDOW and shot.stat().st_size > 20_000  # more than a blank page


def test_the_dashboard_shows_the_metric_name_offline(server: tuple[str, int], home: Path) -> None:
    base, study_id = server
    assert external_assets(httpx.get(f"{base}/dashboard", timeout=30).text) == []
    page = f"{base}/dashboard/studies/{study_id}"
    dom = rendered(home, page, r">val_accuracy<")  # the history plot's axis and selector
    assert "Objective 0" not in dom  # what the dashboard shows for an unnamed objective
    shot = screenshot(home, page, "dashboard.png")
    assert png_size(shot) == WINDOW and shot.stat().st_size > 20_000
