"""Every use of Optuna's private names, in one module.

hpsearch reads and writes Optuna's tables directly where Optuna's public API would cost a
query per trial (listings, claims, batched writes), and reaches a running trial's ids and
in-memory copy. None of that is Optuna's public API, so it all goes through here: when a
new Optuna moves a name, this is the one module to change, and `.ci/optuna-bounds` runs the
suite against the oldest and newest Optuna that pyproject admits.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import optuna.storages._rdb.storage
from optuna.storages._rdb.models import (
    BaseModel,
    StudyDirectionModel,
    StudyModel,
    StudySystemAttributeModel,
    TrialHeartbeatModel,
    TrialIntermediateValueModel,
    TrialModel,
    TrialParamModel,
    TrialSystemAttributeModel,
    TrialUserAttributeModel,
    TrialValueModel,
)
from optuna.study.study import _SYSTEM_ATTR_METRIC_NAMES
from optuna.trial import FrozenTrial

# The system attribute of a waiting trial that `study.enqueue_trial` made: the params it is
# to train with (some or all of them), which `optuna.Trial` suggests for those params.
FIXED_PARAMS = "fixed_params"

# The study system attribute where `Study.set_metric_names` keeps the objective's name, which
# optuna-dashboard and `optuna.visualization` show instead of "Objective 0".
METRIC_NAMES_KEY = _SYSTEM_ATTR_METRIC_NAMES


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The trial's row id in Optuna's tables (its `number` counts within its study)."""
    return trial._trial_id


def study_id(study: optuna.Study) -> int:
    """The study's row id in Optuna's tables."""
    return study._study_id


def study_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage the study reads and writes through (with its cache)."""
    return study._storage


def set_system_attr(
    study: optuna.Study, trial: optuna.Trial | FrozenTrial, key: str, value: object
) -> None:
    """Write one of a trial's system attributes at once (Optuna's public API has no setter
    for them, and a sampler's `before_trial` sees only a frozen trial)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def as_asked(trial: optuna.Trial) -> FrozenTrial:
    """Optuna's in-memory copy of a running trial: as it was asked (its params, and the
    attributes a retry inherits), plus its reports since. Reading it costs no query, where
    `trial.user_attrs` or `trial.system_attrs` read the whole trial again."""
    return trial._cached_frozen_trial


def alembic_directory() -> Path:
    """Where the installed Optuna keeps the Alembic migrations of its schema."""
    return Path(optuna.storages._rdb.storage.__file__).with_name("alembic")


__all__ = [
    "METRIC_NAMES_KEY",
    "BaseModel",
    "StudyDirectionModel",
    "StudyModel",
    "StudySystemAttributeModel",
    "TrialHeartbeatModel",
    "TrialIntermediateValueModel",
    "TrialModel",
    "TrialParamModel",
    "TrialSystemAttributeModel",
    "TrialUserAttributeModel",
    "TrialValueModel",
    "alembic_directory",
    "as_asked",
    "set_system_attr",
    "study_id",
    "study_storage",
    "trial_id",
]
