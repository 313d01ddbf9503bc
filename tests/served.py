"""The API app as `hpsearch serve` starts it: the database's schema brought to head first
(routes never migrate), then the app, behind an in-process test client."""

from __future__ import annotations

from fastapi.testclient import TestClient

from hpsearch.api import Settings, create_app


def served(settings: Settings) -> TestClient:
    settings.store.migrate()
    return TestClient(create_app(settings))
