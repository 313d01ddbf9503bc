"""`create_app(settings)`: the FastAPI application with its routes, limits and handlers.

The app holds no state of its own beyond its settings and request timings: every answer is
read from the database, so the server can be killed and started again at any time.
"""

from __future__ import annotations

from typing import Literal

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hpsearch import __version__
from hpsearch.api import errors
from hpsearch.api.auth import require_token
from hpsearch.api.dashboard import DashboardMiddleware
from hpsearch.api.metrics import CONTENT_TYPE, LatencyMiddleware, Metrics
from hpsearch.api.routes import router
from hpsearch.api.settings import Settings
from hpsearch.storage import DATABASE_ERRORS, safe_url, session_scope
from hpsearch.storage.db import migrate_command, ping, schema_behind
from hpsearch.storage.engine import driver_reason, without_password

UPLOAD_PATH = "/api/v1/datasets"
DOCS_ASSETS = "/docs-assets"  # Swagger UI's and ReDoc's scripts, styles and icon
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and the target field around the file


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    # /docs and /redoc with the Swagger UI and ReDoc scripts that fastapi-offline ships,
    # served from DOCS_ASSETS: no CDN, so the docs work where the server has no internet.
    app = FastAPIOffline(
        title="hpsearch",
        version=__version__,
        description="Hyperparameter search for BP networks: submit studies, watch them, read "
        "the leaderboard, download the best weights. Send `Authorization: Bearer TOKEN` "
        "once tokens exist (`hpsearch token create`).",
        static_url=DOCS_ASSETS,
        # Swagger UI's default validator badge loads an image from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
    app.state.settings = settings
    metrics = Metrics(settings.store)
    errors.install(app, settings.database_url)
    app.include_router(router)

    health = HealthCheck(settings.database_url)

    @app.get(
        "/healthz",
        response_model=Healthy,
        responses={503: {"model": Unhealthy, "description": UNHEALTHY}},
        tags=["operations"],
    )
    def healthz() -> Healthy | JSONResponse:
        """Readiness: the database answers and its schema is at head (no token needed)."""
        problem = health.problem()
        if problem is not None:
            return JSONResponse(problem.model_dump(), status_code=503)
        return Healthy(status="ok", database=safe_url(settings.database_url))

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def root() -> RedirectResponse:
        """Whoever opens the server's address in a browser wants the dashboard, or the
        API's documentation where the dashboard is turned off."""
        return RedirectResponse("/dashboard" if settings.dashboard else "/docs")

    @app.get(
        "/metrics",
        response_class=Response,
        dependencies=[Depends(require_token)],
        responses={200: {"content": {CONTENT_TYPE: {}}}, **errors.responses(401, 503)},
        tags=["operations"],
    )
    def prometheus() -> Response:
        """Prometheus text: trials by state, workers alive, trial durations, request latency."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if settings.dashboard:
        app.add_middleware(DashboardMiddleware, settings=settings)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app


UNHEALTHY = "the database cannot be reached, or its schema is not at head"


class Healthy(BaseModel):
    status: Literal["ok"]
    database: str = Field(description="the database's URL, password masked")


class Unhealthy(BaseModel):
    status: Literal["unavailable"]
    database: str = Field(description="the database's URL, password masked")
    detail: str = Field(description="what is wrong, and what to do about it")
    command: str | None = Field(description="the command that fixes it, where one does")


class HealthCheck:
    """/healthz's checks, cheap enough for a load balancer's polling: a round trip to the
    database at every call (it can go away at any time), and its schema's revisions only
    until they are once at head (a schema does not go back)."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.schema_at_head = False

    def problem(self) -> Unhealthy | None:
        """What keeps the server from serving, or None when nothing does."""
        url = self.database_url
        try:
            with session_scope(url) as session:
                ping(session)
            behind = None if self.schema_at_head else schema_behind(url)
        except (*DATABASE_ERRORS, OSError) as exc:
            reason = without_password(driver_reason(exc), url)
            return self._unhealthy(f"the database at {safe_url(url)} cannot be reached: {reason}")
        if behind is not None:
            command = migrate_command(url)
            detail = f"the database at {safe_url(url)} is not at this hpsearch's schema: {behind}"
            return self._unhealthy(f"{detail}; run `{command}`", command)
        self.schema_at_head = True
        return None

    def _unhealthy(self, detail: str, command: str | None = None) -> Unhealthy:
        database = safe_url(self.database_url)
        return Unhealthy(status="unavailable", database=database, detail=detail, command=command)


class BodyLimitMiddleware:
    """413 for a body over the limit: the upload limit on `POST /api/v1/datasets`, the spec
    limit everywhere else. Counted as the body streams in, so an oversized upload is refused
    before it is buffered, whatever Content-Length claimed."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, _too_large_detail(limit))
            return message

        await self.app(scope, counted, send)

    def _limit(self, path: str) -> int:
        if path.rstrip("/") == UPLOAD_PATH:
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        return self.settings.max_spec_bytes


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large_detail(limit: int) -> str:
    return f"the request body is larger than this server accepts ({limit:,} bytes)"


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": _too_large_detail(limit)}, status_code=413)
