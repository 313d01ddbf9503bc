"""Studies made before hpsearch named their objective get its name in Optuna.

hpsearch now calls `Study.set_metric_names([metric])` when it creates a study, so that
optuna-dashboard and `optuna.visualization` say "val_accuracy" instead of "Objective 0".
This revision names the objective of every study created before: the metric comes from the
study's stored spec, and it is written where `set_metric_names` keeps it (a study system
attribute of Optuna's). A study that already has names, that has no Optuna study, or whose
Optuna study has other than one objective is left alone.

Done here, once per database under the migration lock, every study is named whether or not
a worker or a server ever opens it again; an older hpsearch refuses a database at this
revision, so no study can be created without a name afterwards.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

from hpsearch.storage.optuna_internals import (
    METRIC_NAMES_KEY,
    StudyDirectionModel,
    StudySystemAttributeModel,
)

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STUDIES = sa.table(
    "hps_studies", sa.column("optuna_study_id", sa.Integer), sa.column("spec", sa.JSON)
)


def upgrade() -> None:
    bind = op.get_bind()
    metrics = {
        study_id: metric
        for study_id, spec in bind.execute(
            sa.select(STUDIES.c.optuna_study_id, STUDIES.c.spec).where(
                STUDIES.c.optuna_study_id.is_not(None)
            )
        )
        if (metric := _metric(spec)) is not None
    }
    if not metrics:  # a new database: Optuna's tables may not even exist yet
        return
    attrs = StudySystemAttributeModel.__table__
    directions = StudyDirectionModel.__table__
    named = set(bind.scalars(sa.select(attrs.c.study_id).where(attrs.c.key == METRIC_NAMES_KEY)))
    objectives = dict(
        bind.execute(
            sa.select(directions.c.study_id, sa.func.count()).group_by(directions.c.study_id)
        ).all()
    )
    rows = [
        {"study_id": study_id, "key": METRIC_NAMES_KEY, "value_json": json.dumps([metric])}
        for study_id, metric in sorted(metrics.items())
        if study_id not in named and objectives.get(study_id) == 1
    ]
    if rows:
        bind.execute(sa.insert(attrs), rows)


def downgrade() -> None:
    """Names stay: Optuna's own `set_metric_names` writes the same attribute."""


def _metric(spec: Any) -> str | None:
    objective = spec.get("objective") if isinstance(spec, dict) else None
    metric = objective.get("metric") if isinstance(objective, dict) else None
    return metric if isinstance(metric, str) else None
