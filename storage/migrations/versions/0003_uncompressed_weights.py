"""Checkpoints and kept weights are stored uncompressed on PostgreSQL.

Trained weights are float tensors, which PostgreSQL's TOAST compression (pglz) cannot shrink
but spends most of a checkpoint write on: storing them EXTERNAL (out of line, uncompressed)
made writing a pack's checkpoints four times faster. SQLite does not compress; nothing to do.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WEIGHTS = (("hps_checkpoints", "payload"), ("hps_models", "payload"))


def upgrade() -> None:
    _set_storage("EXTERNAL")


def downgrade() -> None:
    _set_storage("EXTENDED")


def _set_storage(storage: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in WEIGHTS:
        op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET STORAGE {storage}")
