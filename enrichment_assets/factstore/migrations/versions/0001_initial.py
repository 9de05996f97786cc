"""Entities, references and edges.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from enrichment_assets.factstore.types import JSONDocument, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

STATES = ("uncached", "partially_resolved", "fully_enriched", "quarantined", "deleted")


def upgrade() -> None:
    op.create_table(
        "entities",
        sa.Column("entity_type", sa.String(128), nullable=False),
        sa.Column("entity_id", sa.String(512), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("attributes", JSONDocument, nullable=True),
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("last_event_at", UTCDateTime, nullable=True),
        sa.Column("hydrated_at", UTCDateTime, nullable=True),
        sa.Column("last_enriched_at", UTCDateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", UTCDateTime, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("entity_type", "entity_id", name="pk_entities"),
        sa.CheckConstraint(sa.column("state").in_(STATES), name="ck_entities_state"),
    )
    op.create_index("ix_entities_type_first_seen", "entities", ["entity_type", "first_seen_at"])
    op.create_table(
        "references",
        sa.Column("from_type", sa.String(128), nullable=False),
        sa.Column("from_id", sa.String(512), nullable=False),
        sa.Column("field", sa.String(256), nullable=False),
        sa.Column("to_type", sa.String(128), nullable=False),
        sa.Column("to_id", sa.String(512), nullable=False),
        sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("first_seen_at", UTCDateTime, nullable=False),
        sa.Column("resolved_at", UTCDateTime, nullable=True),
        sa.Column("retracted_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("from_type", "from_id", "field", "to_type", "to_id", name="pk_references"),
    )
    op.create_index("ix_references_to", "references", ["to_type", "to_id"])
    op.create_table(
        "edges",
        sa.Column("edge_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), nullable=False, autoincrement=True),
        sa.Column("src_type", sa.String(128), nullable=False),
        sa.Column("src_id", sa.String(512), nullable=False),
        sa.Column("relation", sa.String(128), nullable=False),
        sa.Column("dst_type", sa.String(128), nullable=False),
        sa.Column("dst_id", sa.String(512), nullable=False),
        sa.Column("policy", sa.String(128), nullable=False),
        sa.Column("path", JSONDocument, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False, server_default="deterministic"),
        sa.Column("confidence", sa.Float, nullable=False, server_default="1.0"),
        sa.Column("asserted_at", UTCDateTime, nullable=False),
        sa.Column("confirmed_at", UTCDateTime, nullable=False),
        sa.Column("retracted_at", UTCDateTime, nullable=True),
        sa.PrimaryKeyConstraint("edge_id", name="pk_edges"),
        sa.UniqueConstraint(
            "src_type",
            "src_id",
            "relation",
            "dst_type",
            "dst_id",
            name="uq_edges_src_type_src_id_relation_dst_type_dst_id",
        ),
        sa.CheckConstraint(sa.column("kind").in_(("deterministic", "inferred")), name="ck_edges_kind"),
    )
    op.create_index("ix_edges_dst", "edges", ["dst_type", "dst_id"])


def downgrade() -> None:
    op.drop_table("edges")
    op.drop_table("references")
    op.drop_table("entities")
