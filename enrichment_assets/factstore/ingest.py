"""The ingest upsert: how a batch of thin events becomes one statement."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from enrichment_assets.events import Event, EventType
from enrichment_assets.factstore.models import EntityKey
from enrichment_assets.factstore.schema import EntityState, entities
from enrichment_assets.factstore.types import UTCDateTime


def unnest_insert() -> postgresql.Insert:
    def array(name: str, item: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
        return sa.cast(sa.bindparam(name), postgresql.ARRAY(item))

    batch = (
        sa.func.unnest(
            array("types", sa.Text()),
            array("ids", sa.Text()),
            array("states", sa.Text()),
            array("event_times", sa.DateTime(timezone=True)),
        )
        .table_valued("entity_type", "entity_id", "state", "last_event_at")
        .render_derived(name="batch")
    )
    now = sa.bindparam("now", type_=UTCDateTime)
    # Every new entity is due now; a tombstone too, so enrichment retracts its edges.
    rows = sa.select(
        batch.c.entity_type,
        batch.c.entity_id,
        batch.c.state,
        sa.literal(1),
        now,
        now,
        batch.c.last_event_at,
        sa.literal(0),
        now,
    )
    return postgresql.insert(entities).from_select(
        [
            "entity_type",
            "entity_id",
            "state",
            "version",
            "first_seen_at",
            "updated_at",
            "last_event_at",
            "attempts",
            "next_attempt_at",
        ],
        rows,
    )


def upsert_statement(stmt: Any) -> sa.Insert:
    new = stmt.excluded
    changed = sa.or_(entities.c.state != new.state, entities.c.claim_owner.is_not(None))

    def if_changed(value: sa.ColumnElement[Any], column: sa.Column[Any]) -> sa.ColumnElement[Any]:
        return sa.case((changed, value), else_=column)

    return stmt.on_conflict_do_update(
        index_elements=[entities.c.entity_type, entities.c.entity_id],
        set_={
            "state": new.state,
            "version": entities.c.version + sa.case((changed, 1), else_=0),
            "doc_version": entities.c.doc_version + sa.case((changed, 1), else_=0),
            # Always: any event says the source changed, so earlier hydrations are stale.
            "updated_at": new.updated_at,
            "attempts": if_changed(sa.literal(0), entities.c.attempts),
            "next_attempt_at": if_changed(new.next_attempt_at, entities.c.next_attempt_at),
            "last_error": if_changed(sa.null(), entities.c.last_error),
            "waiting_on": if_changed(sa.null(), entities.c.waiting_on),
            "last_event_at": sa.func.coalesce(new.last_event_at, entities.c.last_event_at),
        },
        where=sa.or_(
            new.last_event_at.is_(None),
            entities.c.last_event_at.is_(None),
            new.last_event_at >= entities.c.last_event_at,
        ),
    )


# Built once: constructing this statement and its cache key cost more than running it for one event.
POSTGRES_UPSERT = upsert_statement(unnest_insert())
SQLITE_UPSERT = upsert_statement(sqlite.insert(entities))


def state_for(event_type: EventType) -> str:
    return EntityState.DELETED.value if event_type is EventType.DELETED else EntityState.UNCACHED.value


def latest_per_entity(events: Sequence[Event]) -> dict[EntityKey, Event]:
    """The event that wins per entity: the last in batch order, unless it is older by ``occurred_at``."""
    latest: dict[EntityKey, Event] = {}
    for event in events:
        key = (event.entity_type, event.entity_id)
        seen = latest.get(key)
        if (
            seen is None
            or seen.occurred_at is None
            or event.occurred_at is None
            or event.occurred_at >= seen.occurred_at
        ):
            latest[key] = event
    return latest
