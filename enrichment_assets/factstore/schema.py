"""The fact store's tables: entities, their 1-hop references, and the derived edges.

This module describes the schema at the newest migration; ``migrations/`` gets an existing database
there. A test compares the two, so a column added here without a migration fails CI.
"""

from __future__ import annotations

import enum

import sqlalchemy as sa

from enrichment_assets.factstore.types import JSONDocument, UTCDateTime


class EntityState(enum.StrEnum):
    UNCACHED = "uncached"
    PARTIALLY_RESOLVED = "partially_resolved"
    FULLY_ENRICHED = "fully_enriched"
    QUARANTINED = "quarantined"
    DELETED = "deleted"


PENDING_STATES = (EntityState.UNCACHED.value, EntityState.PARTIALLY_RESOLVED.value)
# Tombstones are claimed once more, so enrichment can retract their edges and drop their documents.
CLAIMABLE_STATES = (*PENDING_STATES, EntityState.DELETED.value)
STATE_VALUES = tuple(s.value for s in EntityState)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _pending(column: sa.Column) -> dict[str, sa.ColumnElement[bool]]:
    predicate = column.in_(PENDING_STATES)
    return {"postgresql_where": predicate, "sqlite_where": predicate}


entities = sa.Table(
    "entities",
    metadata,
    sa.Column("entity_type", sa.String(128), primary_key=True),
    sa.Column("entity_id", sa.String(512), primary_key=True),
    sa.Column("state", sa.String(32), nullable=False),
    # Bumped on every change the store sees; the search index uses it as the external version.
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
    sa.Column("waiting_on", JSONDocument, nullable=True),
    sa.Column("claim_owner", sa.String(128), nullable=True),
    sa.Column("claim_expires_at", UTCDateTime, nullable=True),
    # The search document's version (external version in Elasticsearch): moves with the entity's own
    # changes and with edges at either end. The indexer writes entities whose indexed_version is behind.
    sa.Column("doc_version", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("indexed_version", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint(sa.column("state").in_(STATE_VALUES), name="state"),
    # Claims scan rows with scheduled work (next_attempt_at set) by due time; discovery groups the
    # same rows by window. Partial indexes keep both proportional to that set, not to the table.
    sa.Index(
        "ix_entities_pending_due",
        "entity_type",
        "next_attempt_at",
        "first_seen_at",
        postgresql_where=sa.column("next_attempt_at").is_not(None),
        sqlite_where=sa.column("next_attempt_at").is_not(None),
    ),
    sa.Index("ix_entities_pending_age", "entity_type", "first_seen_at", **_pending(sa.column("state"))),
    sa.Index(
        "ix_entities_enriched_refresh",
        "entity_type",
        "last_enriched_at",
        postgresql_where=sa.column("state") == EntityState.FULLY_ENRICHED.value,
        sqlite_where=sa.column("state") == EntityState.FULLY_ENRICHED.value,
    ),
    sa.Index("ix_entities_type_first_seen", "entity_type", "first_seen_at"),
    sa.Index(
        "ix_entities_index_due",
        "entity_type",
        postgresql_where=sa.column("indexed_version") < sa.column("doc_version"),
        sqlite_where=sa.column("indexed_version") < sa.column("doc_version"),
    ),
    postgresql_with={"fillfactor": 80},
)

references = sa.Table(
    "references",
    metadata,
    sa.Column("from_type", sa.String(128), primary_key=True),
    sa.Column("from_id", sa.String(512), primary_key=True),
    sa.Column("field", sa.String(256), primary_key=True),
    sa.Column("to_type", sa.String(128), primary_key=True),
    sa.Column("to_id", sa.String(512), primary_key=True),
    sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("first_seen_at", UTCDateTime, nullable=False),
    sa.Column("resolved_at", UTCDateTime, nullable=True),
    sa.Column("retracted_at", UTCDateTime, nullable=True),
    # "Who is waiting on this entity?" when it arrives.
    sa.Index("ix_references_to", "to_type", "to_id"),
)

edges = sa.Table(
    "edges",
    metadata,
    sa.Column("edge_id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
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
    sa.UniqueConstraint("src_type", "src_id", "relation", "dst_type", "dst_id"),
    sa.CheckConstraint(sa.column("kind").in_(("deterministic", "inferred")), name="kind"),
    sa.Index("ix_edges_dst", "dst_type", "dst_id"),
)

waits = sa.Table(
    "waits",
    metadata,
    # A partially resolved entity waiting on a forward reference that its walk could not resolve.
    sa.Column("entity_type", sa.String(128), primary_key=True),
    sa.Column("entity_id", sa.String(512), primary_key=True),
    sa.Column("target_type", sa.String(128), primary_key=True),
    sa.Column("target_id", sa.String(512), primary_key=True),
    sa.Column("since", UTCDateTime, nullable=False),
    sa.Index("ix_waits_target", "target_type", "target_id"),
)

# Each source's rate and concurrency limits, shared by every process that calls it (``budgets.py``).
source_budgets = sa.Table(
    "source_budgets",
    metadata,
    sa.Column("source", sa.String(128), primary_key=True),
    # The end of the last span of request starts handed out; the next span begins here or now.
    sa.Column("booked_until", UTCDateTime, nullable=False),
    # Requests/second the last booking was paced at, for a reader of the table.
    sa.Column("rate", sa.Float, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    # Set by a process short of its share of slots (and which one): until then, holders hand back
    # slots beyond their share, and the rest after a turn.
    sa.Column("slots_wanted_until", UTCDateTime, nullable=True),
    sa.Column("slots_wanted_by", sa.String(128), nullable=True),
)

source_slots = sa.Table(
    "source_slots",
    metadata,
    sa.Column("source", sa.String(128), primary_key=True),
    sa.Column("slot", sa.Integer, primary_key=True, autoincrement=False),
    # A slot is free once its lease has expired; the holder stays recorded so that a process handing a
    # slot back for fairness can be kept from taking it again at once.
    sa.Column("holder", sa.String(128), nullable=True),
    sa.Column("expires_at", UTCDateTime, nullable=False),
)
