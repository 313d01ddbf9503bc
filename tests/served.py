"""The API app as `hpsearch serve` starts it: the database's schema brought to head first
(routes never migrate), then the app, behind an in-process test client."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from hpsearch.api import Settings, create_app


def served(settings: Settings) -> TestClient:
    settings.store.migrate()
    return TestClient(create_app(settings))


# The places an HTML page names what the browser fetches with it: src and href attributes,
# and url(...) in inline styles.
ASSET_URL = re.compile(r"""(?:\bsrc|\bhref)\s*=\s*["']([^"']*)["']|url\(\s*["']?([^"')]*)""")


def external_assets(html: str) -> list[str]:
    """The URLs in `html` that a browser would fetch from another host than the page's:
    absolute (http://, https://) or protocol-relative (//host/...)."""
    urls = [a or b for a, b in ASSET_URL.findall(html)]
    return [url for url in urls if re.match(r"(?i)^\s*(https?:)?//", url)]
