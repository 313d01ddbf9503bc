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

from hpsearch.errors import Conflict, NotFound
from hpsearch.service.views import TokenView
from hpsearch.storage import records
from hpsearch.storage.store import Store

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


def create_token(store: Store, name: str) -> tuple[TokenView, str]:
    """A new token; the plain text is returned here and never again."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with store.session(immediate=True) as session:
        if records.token_id(session, name):
            raise Conflict(f"a token named {name!r} exists already; revoke it or pick another")
        record = records.add_token(session, name, hash_token(token))
        return TokenView.model_validate(record), token


def list_tokens(store: Store) -> list[TokenView]:
    with store.session() as session:
        return [TokenView.model_validate(r) for r in records.all_tokens(session)]


def revoke_token(store: Store, name: str) -> TokenView:
    with store.session(immediate=True) as session:
        record = records.active_token(session, name)
        if record is None:
            raise TokenNotFound(f"no active token named {name!r}")
        records.mark_revoked(session, record)
        return TokenView.model_validate(record)


def stored_token_hashes(store: Store) -> tuple[list[str], bool]:
    """The active tokens' hashes, and whether any token was ever created: once one was, the
    API stays closed even after every token is revoked."""
    with store.session() as session:
        rows = records.token_hashes(session)
    return [token_hash for token_hash, revoked in rows if revoked is None], bool(rows)


def matches(presented: str, hashes: list[str]) -> str | None:
    """The hash `presented` matches, compared with every hash in constant time."""
    candidate = hash_token(presented)
    found = None
    for known in hashes:
        if hmac.compare_digest(candidate, known):
            found = known
    return found


def mark_used(store: Store, token_hash: str) -> None:
    """Record when a stored token was last used, at most once a minute per token."""
    now = datetime.now(UTC)
    with store.session() as session:
        records.mark_token_used(session, token_hash, now, now - LAST_USED_RESOLUTION)
