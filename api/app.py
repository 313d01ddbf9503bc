"""`create_app(settings)`: the FastAPI application with its routes, limits and handlers.

The app holds no state of its own beyond its settings and request timings: every answer is
read from the database, so the server can be killed and started again at any time.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.auth import require_token
from api.dashboard import DashboardMiddleware
from api.metrics import CONTENT_TYPE, LatencyMiddleware, Metrics
from api.routes import router
from api.settings import Settings
from hpsearch import __version__
from storage import safe_url, session_scope, upgrade

UPLOAD_PATH = "/api/v1/datasets"
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and the target field around the file


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = FastAPI(
        title="hpsearch",
        version=__version__,
        description="Hyperparameter search for BP networks: submit studies, watch them, read "
        "the leaderboard, download the best weights. Send `Authorization: Bearer TOKEN` "
        "once tokens exist (`hpsearch token create`).",
    )
    app.state.settings = settings
    metrics = Metrics(settings.database_url)
    errors.install(app, settings.database_url)
    app.include_router(router)

    @app.get("/healthz", responses=errors.responses(503), tags=["operations"])
    def healthz() -> dict[str, str]:
        """Liveness with a database round trip (no token needed)."""
        upgrade(settings.database_url)
        with session_scope(settings.database_url) as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "database": safe_url(settings.database_url)}

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

    app.add_middleware(DashboardMiddleware, settings=settings)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(LatencyMiddleware, metrics=metrics)
    return app


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
