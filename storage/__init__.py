"""The SQL store: database URLs, Optuna's trial storage, the service's own tables (migrated
with Alembic), sessions, retries, and the locks that keep budgets exact."""

from hpsearch.storage.bulk import Ending, LeaseLost, TrialWrite, write_trials
from hpsearch.storage.db import (
    DATABASE_ERRORS,
    StudyClaim,
    Weights,
    claim_study,
    delete_checkpoints,
    delete_optuna_study,
    keep_best_models,
    lock_study,
    make_engine,
    newest_checkpoint,
    session_scope,
    upgrade,
    with_retries,
)
from hpsearch.storage.engine import (
    StorageError,
    default_url,
    grace_period_s,
    heartbeat_interval_s,
    optuna_storage,
    safe_url,
)
from hpsearch.storage.models import (
    ApiTokenRecord,
    Base,
    CheckpointRecord,
    DatasetRecord,
    ModelRecord,
    StudyRecord,
    WorkerRecord,
)
from hpsearch.storage.store import Store

__all__ = [
    "DATABASE_ERRORS",
    "ApiTokenRecord",
    "Base",
    "CheckpointRecord",
    "DatasetRecord",
    "Ending",
    "LeaseLost",
    "ModelRecord",
    "StorageError",
    "Store",
    "StudyClaim",
    "StudyRecord",
    "TrialWrite",
    "Weights",
    "WorkerRecord",
    "claim_study",
    "default_url",
    "delete_checkpoints",
    "delete_optuna_study",
    "grace_period_s",
    "heartbeat_interval_s",
    "keep_best_models",
    "lock_study",
    "make_engine",
    "newest_checkpoint",
    "optuna_storage",
    "safe_url",
    "session_scope",
    "upgrade",
    "with_retries",
    "write_trials",
]
