"""Alembic environment: always handed a live connection by ``factstore.migrations.upgrade``."""

from alembic import context

from enrichment_assets.factstore.migrations import VERSION_TABLE
from enrichment_assets.factstore.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
