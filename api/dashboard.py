"""optuna-dashboard on the same database, served by the API's process.

The dashboard's page lives at `/dashboard`, but its script fetches `/api/...` and
`/static/...` from the site's root, so those paths go to it as well (our own API is under
`/api/v1`, which never reaches it). It is a WSGI (Bottle) app, run in a thread pool.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import optuna_dashboard
from a2wsgi import WSGIMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from hpsearch.api.auth import COOKIE, authorized
from hpsearch.api.settings import Settings
from hpsearch.errors import Conflict, NotFound
from hpsearch.service.studies import delete_study
from hpsearch.storage.queries import optuna_study_name

DASHBOARD_PREFIXES = ("/dashboard", "/static/", "/csv/", "/favicon.ico")
READING_METHODS = ("GET", "HEAD", "OPTIONS")
# Writes of the dashboard's own that touch nothing hpsearch relies on: notes on a study or a
# trial (kept in Optuna's system attributes).
HARMLESS_WRITES = re.compile(r"/api/studies/\d+(/\d+)?/note")
STUDY_DELETION = re.compile(r"/api/studies/(\d+)")


def is_dashboard_path(path: str) -> bool:
    if path.startswith("/api/"):
        return not path.startswith("/api/v1/") and path != "/api/v1"
    return path.startswith(DASHBOARD_PREFIXES)


class DashboardMiddleware:
    """Send the dashboard's paths to optuna-dashboard, behind the API's tokens."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    @functools.cached_property
    def dashboard(self) -> ASGIApp:
        wsgi = optuna_dashboard.wsgi(self.settings.store.optuna())
        return WSGIMiddleware(wsgi)  # type: ignore[arg-type]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_dashboard_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and scope["path"].startswith("/dashboard"):
            await self._remember(given, scope, receive, send)
            return
        presented = _bearer(request) or request.cookies.get(COOKIE)
        if not await run_in_threadpool(authorized, self.settings, presented):
            response = JSONResponse(
                {"detail": "the dashboard needs a token: open /dashboard?token=TOKEN once"},
                status_code=401,
            )
            await response(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method in READING_METHODS or (method == "PUT" and HARMLESS_WRITES.fullmatch(path)):
            await self.dashboard(scope, receive, send)
            return
        deletion = STUDY_DELETION.fullmatch(path) if method == "DELETE" else None
        if deletion is not None:
            response = await run_in_threadpool(self._delete, int(deletion[1]))
        else:
            response = _refused(
                "this dashboard is read-only: hpsearch changes studies and trials through "
                "/api/v1 and the CLI (submit, pause, resume, cancel, extend, delete), so that "
                "its rules and the workers' state stay whole"
            )
        await response(scope, receive, send)

    def _delete(self, optuna_study_id: int) -> Response:
        """The dashboard's study deletion, under hpsearch's rules: a queued or running study
        is refused (pause or cancel it first), as `DELETE /api/v1/studies/...` does."""
        store = self.settings.store
        try:
            with store.session() as session:
                name = optuna_study_name(session, optuna_study_id)
            if name is None:
                return _refused(f"study_id={optuna_study_id} is not found", status_code=404)
            delete_study(store, name)
        except Conflict as exc:
            return _refused(str(exc), status_code=409)
        except NotFound as exc:
            return _refused(str(exc), status_code=404)
        return Response(status_code=204)

    async def _remember(self, token: str, scope: Scope, receive: Receive, send: Send) -> None:
        """Keep a valid token in a cookie and drop it from the address bar."""
        if not await run_in_threadpool(authorized, self.settings, token):
            response: Any = JSONResponse({"detail": "a wrong token"}, status_code=401)
        else:
            response = RedirectResponse("/dashboard", status_code=303)
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        await response(scope, receive, send)


def _refused(message: str, status_code: int = 403) -> JSONResponse:
    """An error the dashboard shows (it reads `reason`) and API clients read (`detail`)."""
    return JSONResponse({"reason": message, "detail": message}, status_code=status_code)


def _bearer(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    return credentials if scheme.lower() == "bearer" and credentials else None
