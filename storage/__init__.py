"""The SQL store: database URLs, Optuna's trial storage, the service's own tables (migrated
with Alembic), sessions, retries, and the locks that keep budgets exact."""

from storage.db import (
    claim_study,
    lock_study,
    make_engine,
    save_checkpoint,
    session_scope,
    upgrade,
    with_retries,
)
from storage.engine import (
    StorageError,
    default_url,
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
    "ApiTokenRecord",
    "Base",
    "CheckpointRecord",
    "DatasetRecord",
    "ModelRecord",
    "StorageError",
    "StudyRecord",
    "WorkerRecord",
    "claim_study",
    "default_url",
    "lock_study",
    "make_engine",
    "optuna_storage",
    "safe_url",
    "save_checkpoint",
    "session_scope",
    "upgrade",
    "with_retries",
]
