"""Uploaded datasets remember the task their target column implies.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The default only fills rows stored before the column existed; new rows always set it.
    with op.batch_alter_table("hps_datasets") as batch:
        batch.add_column(
            sa.Column("task", sa.String(16), nullable=False, server_default="classification")
        )
    with op.batch_alter_table("hps_datasets") as batch:
        batch.alter_column("task", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("hps_datasets") as batch:
        batch.drop_column("task")
