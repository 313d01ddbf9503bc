"""The SQL store: database URLs, Optuna's trial storage, the service's own tables (migrated
with Alembic), sessions, retries, and the locks that keep budgets exact."""

from storage.db import (
    DATABASE_ERRORS,
    LeaseLost,
    claim_study,
    delete_checkpoints,
    keep_best_model,
    lock_study,
    make_engine,
    newest_checkpoint,
    save_checkpoint,
    session_scope,
    upgrade,
    with_retries,
)
from storage.engine import (
    StorageError,
    default_url,
    grace_period_s,
    heartbeat_interval_s,
    optuna_storage,
    safe_url,
)
from storage.models import (
    ApiTokenRecord,
    Base,
    CheckpointRecord,
    DatasetRecord,
    ModelRecord,
    StudyRecord,
    WorkerRecord,
)

__all__ = [
    "DATABASE_ERRORS",
    "ApiTokenRecord",
    "Base",
    "CheckpointRecord",
    "DatasetRecord",
    "LeaseLost",
    "ModelRecord",
    "StorageError",
    "StudyRecord",
    "WorkerRecord",
    "claim_study",
    "default_url",
    "delete_checkpoints",
    "grace_period_s",
    "heartbeat_interval_s",
    "keep_best_model",
    "lock_study",
    "make_engine",
    "newest_checkpoint",
    "optuna_storage",
    "safe_url",
    "save_checkpoint",
    "session_scope",
    "upgrade",
    "with_retries",
]
