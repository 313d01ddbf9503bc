"""Every error a client can cause, mapped to a status and a JSON `{"detail": ...}` body.

Validation errors keep FastAPI's shape (a list of `{loc, msg, type}`) and add `field`, the
dotted path a user edits in the spec (`dataset.name`), the same path the CLI prints.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from hpsearch.errors import (
    Conflict,
    DatasetError,
    DatasetTooLarge,
    HpsearchError,
    NotFound,
    SpecError,
)
from hpsearch.spec import field_errors
from hpsearch.storage import DATABASE_ERRORS, StorageError, safe_url
from hpsearch.storage.db import is_transient

log = logging.getLogger("hpsearch.api")


class Message(BaseModel):
    detail: str


class FieldProblem(BaseModel):
    loc: list[str | int]
    field: str
    msg: str
    type: str


class ValidationProblems(BaseModel):
    detail: list[FieldProblem]


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer."""
    described = {
        401: "no token, or a wrong one",
        404: "no such study, trial or dataset",
        409: "the name is taken by a different spec, or the state forbids the change",
        413: "the body is larger than the server accepts",
        422: "invalid input; each problem names its field",
        503: "the database cannot be reached",
    }
    return {
        code: {
            "model": ValidationProblems if code == 422 else Message,
            "description": described[code],
        }
        for code in codes
    }


def install(app: FastAPI, database_url: str) -> None:
    """Register the handlers on `app`."""

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err, (path, message) in zip(exc.errors(), _paths(exc.errors()), strict=True):
            problems.append(
                {"loc": list(err["loc"]), "field": path, "msg": message, "type": err["type"]}
            )
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(SpecError)
    async def invalid_spec(_: Request, exc: SpecError) -> JSONResponse:
        return _problems([(path, reason) for path, reason in exc.errors])

    @app.exception_handler(DatasetError)
    async def invalid_data(_: Request, exc: DatasetError) -> JSONResponse:
        return _problems([(exc.field, str(exc))])

    @app.exception_handler(DatasetTooLarge)
    async def data_too_large(_: Request, exc: DatasetTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, exc: Conflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(HpsearchError)
    async def bad_request(_: Request, exc: HpsearchError) -> JSONResponse:
        return _problems([("", str(exc))])

    async def database_down(_: Request, exc: Exception) -> JSONResponse:
        if not is_transient(exc):
            log.error("database error", exc_info=exc)
            return JSONResponse({"detail": "internal error; see the server's log"}, 500)
        log.warning("database unavailable: %s", exc)
        detail = f"the database at {safe_url(database_url)} cannot be reached; try again"
        return JSONResponse({"detail": detail}, status_code=503)

    for error_type in DATABASE_ERRORS:
        app.add_exception_handler(error_type, database_down)

    @app.exception_handler(StorageError)  # after the loop above, which would replace it
    async def storage_down(_: Request, exc: StorageError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body FastAPI could not parse (JSON, form) is bad input
            return _problems([("", f"the body cannot be parsed: {exc.detail}")])
        return JSONResponse(
            {"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )


def _paths(errors: Any) -> list[tuple[str, str]]:
    """Spec paths for body errors; `query.top`-style paths for the rest."""
    paths = []
    for err in errors:
        loc = list(err["loc"])
        if loc and loc[0] == "body":
            [(path, message)] = field_errors([{**err, "loc": loc[1:]}])
        else:
            path, message = ".".join(str(p) for p in loc), err["msg"]
        paths.append((path, message))
    return paths


def _problems(problems: list[tuple[str, str]]) -> JSONResponse:
    detail = [
        {
            "loc": ["body", *path.split(".")] if path else ["body"],
            "field": path,
            "msg": reason,
            "type": "value_error",
        }
        for path, reason in problems
    ]
    return JSONResponse({"detail": detail}, status_code=422)
