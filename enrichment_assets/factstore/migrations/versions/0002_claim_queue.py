"""The claim-and-process queue: leases, forward-reference bookkeeping, and due-work indexes.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from enrichment_assets.factstore.types import JSONDocument, UTCDateTime

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

PENDING = sa.column("state").in_(("uncached", "partially_resolved"))
SCHEDULED = sa.column("next_attempt_at").is_not(None)
ENRICHED = sa.column("state") == "fully_enriched"


def upgrade() -> None:
    with op.batch_alter_table("entities") as batch:
        batch.add_column(sa.Column("waiting_on", JSONDocument, nullable=True))
        batch.add_column(sa.Column("claim_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("claim_expires_at", UTCDateTime, nullable=True))
    op.create_index(
        "ix_entities_pending_due",
        "entities",
        ["entity_type", "next_attempt_at", "first_seen_at"],
        postgresql_where=SCHEDULED,
        sqlite_where=SCHEDULED,
    )
    op.create_index(
        "ix_entities_pending_age",
        "entities",
        ["entity_type", "first_seen_at"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    op.create_index(
        "ix_entities_enriched_refresh",
        "entities",
        ["entity_type", "last_enriched_at"],
        postgresql_where=ENRICHED,
        sqlite_where=ENRICHED,
    )


def downgrade() -> None:
    op.drop_index("ix_entities_enriched_refresh", "entities")
    op.drop_index("ix_entities_pending_age", "entities")
    op.drop_index("ix_entities_pending_due", "entities")
    with op.batch_alter_table("entities") as batch:
        batch.drop_column("claim_expires_at")
        batch.drop_column("claim_owner")
        batch.drop_column("waiting_on")
