"""API tokens: created once (shown once), stored as SHA-256 hashes, revoked by name.

A token is 32 random bytes, so a plain SHA-256 is enough (no password stretching needed),
and a stolen database holds no usable token. Checks compare against every active hash in
constant time, so the answer's timing does not reveal how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select, update

from hpsearch.errors import Conflict, NotFound
from hpsearch.service.views import TokenView
from hpsearch.storage import ApiTokenRecord, session_scope, upgrade

TOKEN_PREFIX = "hps_"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # at most one write per token and minute


class TokenNotFound(NotFound):
    """No active token of that name."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def env_token_hashes() -> list[str]:
    """Hashes of the tokens in $HPSEARCH_API_TOKENS (comma-separated), for deployments that
    configure them as secrets instead of with `hpsearch token create`."""
    raw = os.environ.get("HPSEARCH_API_TOKENS", "")
    return [hash_token(token.strip()) for token in raw.split(",") if token.strip()]


def create_token(url: str, name: str) -> tuple[TokenView, str]:
    """A new token; the plain text is returned here and never again."""
    upgrade(url)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with session_scope(url, immediate=True) as session:
        if session.scalar(select(ApiTokenRecord.id).where(ApiTokenRecord.name == name)):
            raise Conflict(f"a token named {name!r} exists already; revoke it or pick another")
        record = ApiTokenRecord(name=name, token_hash=hash_token(token))
        session.add(record)
        session.flush()
        session.refresh(record)
        return TokenView.model_validate(record), token


def list_tokens(url: str) -> list[TokenView]:
    upgrade(url)
    with session_scope(url) as session:
        records = session.scalars(select(ApiTokenRecord).order_by(ApiTokenRecord.id))
        return [TokenView.model_validate(r) for r in records]


def revoke_token(url: str, name: str) -> TokenView:
    upgrade(url)
    with session_scope(url, immediate=True) as session:
        record = session.scalar(
            select(ApiTokenRecord).where(
                ApiTokenRecord.name == name, ApiTokenRecord.revoked_at.is_(None)
            )
        )
        if record is None:
            raise TokenNotFound(f"no active token named {name!r}")
        record.revoked_at = func.now()
        session.flush()
        session.refresh(record)
        return TokenView.model_validate(record)


def stored_token_hashes(url: str) -> tuple[list[str], bool]:
    """The active tokens' hashes, and whether any token was ever created: once one was, the
    API stays closed even after every token is revoked."""
    upgrade(url)
    with session_scope(url) as session:
        rows = session.execute(select(ApiTokenRecord.token_hash, ApiTokenRecord.revoked_at)).all()
    return [token_hash for token_hash, revoked in rows if revoked is None], bool(rows)


def matches(presented: str, hashes: list[str]) -> str | None:
    """The hash `presented` matches, compared with every hash in constant time."""
    candidate = hash_token(presented)
    found = None
    for known in hashes:
        if hmac.compare_digest(candidate, known):
            found = known
    return found


def mark_used(url: str, token_hash: str) -> None:
    """Record when a stored token was last used, at most once a minute per token."""
    now = datetime.now(UTC)
    with session_scope(url) as session:
        session.execute(
            update(ApiTokenRecord)
            .where(
                ApiTokenRecord.token_hash == token_hash,
                or_(
                    ApiTokenRecord.last_used_at.is_(None),
                    ApiTokenRecord.last_used_at < now - LAST_USED_RESOLUTION,
                ),
            )
            .values(last_used_at=now)
        )
