"""Alembic environment for the service's own tables.

`storage.db.upgrade` configures Alembic in code and hands it an open connection (inside the
migration lock), so there is no alembic.ini and no URL here. The version table is
`hps_alembic_version`: Optuna keeps its own schema version in `alembic_version` in the same
database.
"""

from __future__ import annotations

from alembic import context

from hpsearch.storage.db import VERSION_TABLE, own_tables_only
from hpsearch.storage.models import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    include_name=own_tables_only,  # autogenerate must never drop Optuna's tables
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
