"""Bearer tokens on every `/api/v1` route, `/metrics` and the dashboard, once any exist
(revoking every token does not open the server again).

With no token configured the server is open, which is why `hpsearch serve` then binds to
loopback only. A browser cannot send a bearer header to the dashboard, so opening
`/dashboard?token=...` once stores the token in an HTTP-only cookie.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from hpsearch.api.settings import Settings
from hpsearch.service.tokens import mark_used, matches, stored_token_hashes

COOKIE = "hpsearch_token"
bearer = HTTPBearer(auto_error=False, description="a token from `hpsearch token create`")


def configured_hashes(settings: Settings) -> tuple[list[str], bool]:
    """The hashes of every valid token (the environment's and the database's active ones),
    and whether a token is required at all."""
    stored, ever_created = stored_token_hashes(settings.store)
    hashes = [*settings.env_token_hashes, *stored]
    return hashes, bool(settings.env_token_hashes) or ever_created


def authorized(settings: Settings, presented: str | None) -> bool:
    """Whether a request presenting `presented` (or nothing) may pass."""
    hashes, required = configured_hashes(settings)
    if not required:
        return True
    if not presented:
        return False
    found = matches(presented, hashes)
    if found is not None and found not in settings.env_token_hashes:
        mark_used(settings.store, found)
    return found is not None


def require_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """FastAPI dependency: 401 unless the request carries a valid token (when any exist)."""
    presented = credentials.credentials if credentials else request.cookies.get(COOKIE)
    if not authorized(request.app.state.settings, presented):
        reason = "a wrong token" if presented else "no token"
        raise HTTPException(
            status_code=401,
            detail=f"{reason}: send 'Authorization: Bearer TOKEN' (see hpsearch token create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
