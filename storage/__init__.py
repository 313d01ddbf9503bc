"""The SQL store: database URLs, Optuna's trial storage, and the locks that keep budgets exact."""

from storage.engine import (
    StorageError,
    claim_lock,
    default_url,
    optuna_storage,
    safe_url,
)

__all__ = ["StorageError", "claim_lock", "default_url", "optuna_storage", "safe_url"]
