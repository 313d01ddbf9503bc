"""What the API server is configured with; read from the environment once, at start."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hpsearch.service.tokens import env_token_hashes
from hpsearch.storage import Store, default_url

MB = 1_000_000


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=default_url)
    # Tokens from $HPSEARCH_API_TOKENS, hashed; those made with `hpsearch token create` are
    # read from the database at each request, so a new or revoked token needs no restart.
    env_token_hashes: tuple[str, ...] = ()
    max_spec_bytes: int = 1 * MB
    max_upload_bytes: int = 100 * MB
    # optuna-dashboard at /dashboard; $HPSEARCH_DASHBOARD=0 leaves it out (and / leads to
    # the API's docs instead).
    dashboard: bool = True

    @property
    def store(self) -> Store:
        """The database the API serves: `serve` brought its schema to head at start."""
        return Store(self.database_url)

    @property
    def max_upload_cells(self) -> int:
        """The values (rows x columns) an upload may decode to: as many as the largest CSV
        the server accepts could hold (a value and a comma, two bytes each), so that a small
        compressed npz or Parquet file cannot expand into gigabytes of memory."""
        return self.max_upload_bytes // 2

    @classmethod
    def from_env(cls, database_url: str | None = None) -> Settings:
        return cls(
            database_url=database_url or default_url(),
            env_token_hashes=tuple(env_token_hashes()),
            max_upload_bytes=int(float(os.environ.get("HPSEARCH_MAX_UPLOAD_MB", "100")) * MB),
            dashboard=os.environ.get("HPSEARCH_DASHBOARD", "1").strip().lower() not in OFF,
        )


OFF = ("0", "false", "no", "off")
