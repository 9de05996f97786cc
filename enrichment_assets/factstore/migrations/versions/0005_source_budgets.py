"""Source budgets: each source's request rate and concurrency, shared by every process that calls it.

Used on PostgreSQL only (a SQLite fact store has one process, which limits itself); created on both so
the two schemas stay the same.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

from enrichment_assets.factstore.types import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "source_budgets",
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("booked_until", UTCDateTime, nullable=False),
        sa.Column("rate", sa.Float, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("slots_wanted_until", UTCDateTime, nullable=True),
        sa.Column("slots_wanted_by", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("source", name="pk_source_budgets"),
    )
    op.create_table(
        "source_slots",
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("holder", sa.String(128), nullable=True),
        sa.Column("expires_at", UTCDateTime, nullable=False),
        sa.PrimaryKeyConstraint("source", "slot", name="pk_source_slots"),
    )


def downgrade() -> None:
    op.drop_table("source_slots")
    op.drop_table("source_budgets")
