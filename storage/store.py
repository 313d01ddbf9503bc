"""The store handle: one database as a process uses it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TypeVar

import optuna
from sqlalchemy.orm import Session

from hpsearch.storage.db import StudyClaim, claim_study, session_scope, upgrade, with_retries
from hpsearch.storage.engine import optuna_storage, safe_url

T = TypeVar("T")


@dataclass(frozen=True)
class Store:
    """One database, made once per process at its start and handed to every service
    function.

    `Store.open` brings the schema to head, so the functions that take a store never check
    it again: a CLI command, a worker, `hpsearch run` and the API server each open theirs
    when they start (the API hands its store to the routes through FastAPI's dependency
    injection). Equal stores name the same database, so a store may key a cache.
    """

    url: str

    @classmethod
    def open(cls, url: str) -> Store:
        """The store at `url` with its schema at head (migrated where behind)."""
        store = cls(url)
        store.migrate()
        return store

    def migrate(self) -> None:
        """Bring the schema to head (`db.upgrade`): once, as the process starts."""
        upgrade(self.url)

    def session(self, *, immediate: bool = False) -> AbstractContextManager[Session]:
        """A session in one transaction (`db.session_scope`)."""
        return session_scope(self.url, immediate=immediate)

    def optuna(self, grace_s: int | None = None) -> optuna.storages.RDBStorage:
        """Optuna's storage on this database (`engine.optuna_storage`)."""
        return optuna_storage(self.url, grace_s)

    def claim(self, study_id: int) -> AbstractContextManager[StudyClaim]:
        """The study's claim lock (`db.claim_study`)."""
        return claim_study(self.url, study_id)

    def retrying(self, fn: Callable[[], T]) -> T:
        """`fn()` retried while the database is briefly away (`db.with_retries`)."""
        return with_retries(fn, url=self.url)

    def __str__(self) -> str:
        return safe_url(self.url)
