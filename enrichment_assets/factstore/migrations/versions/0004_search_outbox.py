"""The search outbox: a document version per entity and the version search last acknowledged.

``doc_version`` moves whenever an entity's search document would change: its own state or attributes,
or an edge at either end. ``version`` keeps its narrower meaning (what a claim's result is checked
against), so a neighbour's edge change never makes a worker's result look superseded. Entities whose
``indexed_version`` is behind are what the indexer writes next.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BEHIND = sa.column("indexed_version") < sa.column("doc_version")


def upgrade() -> None:
    with op.batch_alter_table("entities") as batch:
        batch.add_column(sa.Column("doc_version", sa.BigInteger, nullable=False, server_default="1"))
        batch.add_column(sa.Column("indexed_version", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index("ix_entities_index_due", "entities", ["entity_type"], postgresql_where=BEHIND, sqlite_where=BEHIND)


def downgrade() -> None:
    op.drop_index("ix_entities_index_due", "entities")
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("indexed_version")
        batch.drop_column("doc_version")
