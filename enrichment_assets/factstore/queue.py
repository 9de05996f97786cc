"""Statements of the claim-and-process queue: leasing, checking ownership, recording outcomes."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from enrichment_assets.factstore import arrays
from enrichment_assets.factstore.models import Claim, EntityKey, Outcome, RetryPolicy
from enrichment_assets.factstore.schema import CLAIMABLE_STATES, PENDING_STATES, EntityState, entities
from enrichment_assets.factstore.types import JSONDocument, UTCDateTime


def lease(
    conn: sa.Connection,
    entity_type: str,
    where: list[sa.ColumnElement[bool]],
    *,
    order_by: sa.ColumnElement[Any],
    limit: int,
    owner: str,
    expires: datetime,
    attempts: sa.ColumnElement[Any] | None = None,
) -> list[Claim]:
    # PostgreSQL: SKIP LOCKED lets concurrent claimers pass over each other's rows instead of
    # queueing on them. SQLite: the whole transaction holds the single write lock (BEGIN IMMEDIATE).
    pick = sa.select(entities.c.entity_id).where(*where).order_by(order_by).limit(limit)
    pick = pick.with_for_update(skip_locked=True)
    if conn.dialect.name == "postgresql":
        # = ANY(ARRAY(subquery)) makes the planner look rows up by primary key at every table
        # size; IN (subquery) turned into a hash join over the whole table below ~300k rows.
        chosen = entities.c.entity_id == sa.any_(sa.func.array(pick.scalar_subquery()))
    else:
        chosen = entities.c.entity_id.in_(pick)
    stmt = (
        sa.update(entities)
        .where(entities.c.entity_type == entity_type, chosen)
        .values(
            claim_owner=owner,
            claim_expires_at=expires,
            attempts=entities.c.attempts + 1 if attempts is None else attempts,
        )
        .returning(
            entities.c.entity_type,
            entities.c.entity_id,
            entities.c.version,
            entities.c.state,
            entities.c.attempts,
            entities.c.first_seen_at,
        )
    )
    return [Claim(*row) for row in conn.execute(stmt)]


def _scope(entity_type: str, window: tuple[datetime, datetime] | None, now: datetime) -> list[sa.ColumnElement[bool]]:
    """The type, the window of ``first_seen_at`` if any, and not leased to anyone (or lease expired)."""
    scope = [
        entities.c.entity_type == entity_type,
        sa.or_(entities.c.claim_owner.is_(None), entities.c.claim_expires_at <= now),
    ]
    if window is not None:
        scope += [entities.c.first_seen_at >= window[0], entities.c.first_seen_at < window[1]]
    return scope


def lease_due(
    conn: sa.Connection,
    entity_type: str,
    window: tuple[datetime, datetime] | None,
    *,
    now: datetime,
    limit: int,
    owner: str,
    expires: datetime,
    refresh_before: datetime | None,
) -> list[Claim]:
    """Due candidates, oldest due first; then, up to ``limit``, enriched ones last enriched before
    ``refresh_before``."""
    scope = _scope(entity_type, window, now)
    claims = lease(
        conn,
        entity_type,
        [*scope, entities.c.state.in_(CLAIMABLE_STATES), entities.c.next_attempt_at <= now],
        order_by=entities.c.next_attempt_at,
        limit=limit,
        owner=owner,
        expires=expires,
    )
    if refresh_before is not None and len(claims) < limit:
        stale = [
            entities.c.state == EntityState.FULLY_ENRICHED.value,
            entities.c.last_enriched_at < refresh_before,
            sa.or_(entities.c.next_attempt_at.is_(None), entities.c.next_attempt_at <= now),
        ]
        claims += lease(
            conn,
            entity_type,
            [*scope, *stale],
            order_by=entities.c.last_enriched_at,
            limit=limit - len(claims),
            owner=owner,
            expires=expires,
        )
    return claims


def lease_window(
    conn: sa.Connection,
    entity_type: str,
    window: tuple[datetime, datetime] | None,
    *,
    now: datetime,
    limit: int,
    owner: str,
    expires: datetime,
) -> list[Claim]:
    """Every entity of the window whatever its state or schedule, except tombstones already processed;
    quarantined ones start their attempts afresh."""
    unprocessed_tombstone = sa.and_(
        entities.c.state == EntityState.DELETED.value, entities.c.next_attempt_at.is_not(None)
    )
    return lease(
        conn,
        entity_type,
        [
            *_scope(entity_type, window, now),
            sa.or_(entities.c.state != EntityState.DELETED.value, unprocessed_tombstone),
        ],
        order_by=entities.c.entity_id,
        limit=limit,
        owner=owner,
        expires=expires,
        attempts=sa.case((entities.c.state == EntityState.QUARANTINED.value, 1), else_=entities.c.attempts + 1),
    )


def prefetchable(
    conn: sa.Connection, entity_type: str, *, limit: int, exclude: Sequence[str], now: datetime, ttl: timedelta
) -> list[str]:
    """Up to ``limit`` pending entities of one type that are due, leased to nobody, and whose stored
    hydration (if any) is no longer fresh, in claim order, leaving out ``exclude``."""
    stale = sa.or_(
        entities.c.attributes.is_(None),
        entities.c.hydrated_at < now - ttl,
        entities.c.hydrated_at < entities.c.updated_at,
    )
    where = [
        entities.c.entity_type == entity_type,
        entities.c.state.in_(PENDING_STATES),
        entities.c.next_attempt_at <= now,
        sa.or_(entities.c.claim_owner.is_(None), entities.c.claim_expires_at <= now),
        stale,
    ]
    if exclude and conn.dialect.name == "postgresql":
        where.append(
            entities.c.entity_id
            != sa.all_(sa.cast(sa.bindparam("exclude", value=list(exclude)), postgresql.ARRAY(sa.Text())))
        )
    elif exclude:
        # SQLite: every id is a bound parameter; past its limit, ask for more and drop them here.
        skipped = set(exclude)
        stmt = (
            sa.select(entities.c.entity_id)
            .where(*where)
            .order_by(entities.c.next_attempt_at)
            .limit(limit + len(skipped))
        )
        return [i for (i,) in conn.execute(stmt) if i not in skipped][:limit]
    stmt = sa.select(entities.c.entity_id).where(*where).order_by(entities.c.next_attempt_at).limit(limit)
    return [i for (i,) in conn.execute(stmt)]


def held(conn: sa.Connection, owner: str, keys: Sequence[EntityKey]) -> dict[EntityKey, tuple[int, int, str]]:
    """Lock and return (version, attempts, state) of the keys still leased to ``owner``."""
    held: dict[EntityKey, tuple[int, int, str]] = {}
    for among in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), keys):
        stmt = (
            sa.select(
                entities.c.entity_type,
                entities.c.entity_id,
                entities.c.version,
                entities.c.attempts,
                entities.c.state,
            )
            .where(
                among,
                entities.c.claim_owner == owner,
            )
            .order_by(entities.c.entity_type, entities.c.entity_id)  # rows are locked in key order
            .with_for_update()
        )
        for etype, eid, version, attempts, state in conn.execute(stmt):
            held[(etype, eid)] = (version, attempts, state)
    return held


def outcome_row(
    outcome: Outcome, attempts: int, state: str, retry: RetryPolicy, now: datetime, rng: random.Random
) -> dict[str, Any]:
    """The bind parameters of ``finish_statement`` for one outcome."""
    row: dict[str, Any] = {
        "k_type": outcome.entity_type,
        "k_id": outcome.entity_id,
        "claimed_version": outcome.version,
        "attributes": outcome.attributes,
        "hydrated_at": now if outcome.attributes is not None else None,
        "last_enriched_at": None,
        "last_error": None,
        "waiting_on": None,
        "new_state": state,
        "attempts": attempts,
    }
    if outcome.status == "enriched":
        row.update(new_state=EntityState.FULLY_ENRICHED.value, attempts=0, next_attempt_at=None, last_enriched_at=now)
    elif outcome.status == "partial":
        row.update(
            new_state=EntityState.PARTIALLY_RESOLVED.value,
            next_attempt_at=now + retry.delay(attempts, rng),
            waiting_on=[list(key) for key in sorted(set(outcome.waiting_on))] or None,
        )
    elif outcome.status == "deleted":
        row.update(next_attempt_at=None, attempts=0)
    elif outcome.status == "deferred":
        # The source was down, not the entity: the attempt is given back.
        row.update(attempts=max(attempts - 1, 0), next_attempt_at=outcome.retry_at or now, last_error=outcome.error)
    elif attempts >= retry.max_attempts:
        row.update(new_state=EntityState.QUARANTINED.value, next_attempt_at=None, last_error=outcome.error or "failed")
    else:
        row.update(next_attempt_at=now + retry.delay(attempts, rng), last_error=outcome.error or "failed")
    return row


# The bind parameters of ``finish_statement``, one per key of ``outcome_row``.
_OUTCOME_COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "k_type": sa.Text(),
    "k_id": sa.Text(),
    "claimed_version": sa.BigInteger(),
    "new_state": sa.Text(),
    "attempts": sa.Integer(),
    "next_attempt_at": UTCDateTime(),
    "last_enriched_at": UTCDateTime(),
    "last_error": sa.Text(),
    "waiting_on": JSONDocument,
    "attributes": JSONDocument,
    "hydrated_at": UTCDateTime(),
}


def apply_outcomes(conn: sa.Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Run ``finish_statement`` for every row of ``outcome_row``.

    PostgreSQL gets one ``UPDATE ... FROM unnest(arrays)`` per page (psycopg2 sends an executemany
    UPDATE a hundred rows per round trip); SQLite an executemany. The rows are already locked and
    checked against their owner (``held``), so the two are the same writes.
    """
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(finish_statement(), rows)
        return
    batch = arrays.unnested(_OUTCOME_COLUMNS)
    stmt = finish_statement(lambda name: arrays.column(batch, name, _OUTCOME_COLUMNS[name]))
    for page in arrays.pages(rows):
        conn.execute(stmt, arrays.parameters(_OUTCOME_COLUMNS, page))


def finish_statement(
    value: Callable[[str], sa.ColumnElement[Any]] = lambda name: sa.bindparam(name, type_=_OUTCOME_COLUMNS[name]),
) -> sa.Update:
    """The UPDATE that records one outcome; ``value`` gives each of ``_OUTCOME_COLUMNS`` (bind
    parameters by default, the columns of an unnested batch in ``apply_outcomes``)."""
    current = entities.c.version == value("claimed_version")

    def if_current(new: sa.ColumnElement[Any], column: sa.Column[Any]) -> sa.ColumnElement[Any]:
        return sa.case((current, new), else_=column)

    return (
        sa.update(entities)
        .where(
            entities.c.entity_type == value("k_type"),
            entities.c.entity_id == value("k_id"),
        )
        .values(
            state=if_current(value("new_state"), entities.c.state),
            attempts=if_current(value("attempts"), entities.c.attempts),
            next_attempt_at=if_current(value("next_attempt_at"), entities.c.next_attempt_at),
            last_enriched_at=if_current(
                sa.func.coalesce(value("last_enriched_at"), entities.c.last_enriched_at),
                entities.c.last_enriched_at,
            ),
            last_error=if_current(value("last_error"), entities.c.last_error),
            waiting_on=if_current(value("waiting_on"), entities.c.waiting_on),
            attributes=sa.func.coalesce(value("attributes"), entities.c.attributes),
            hydrated_at=sa.func.coalesce(value("hydrated_at"), entities.c.hydrated_at),
            version=entities.c.version + 1,
            doc_version=entities.c.doc_version + 1,
            # updated_at says when the source last changed (an event or a new hydration); settling on a
            # reused hydration changes nothing there, and moving it would make that hydration stale.
            updated_at=sa.func.coalesce(value("hydrated_at"), entities.c.updated_at),
            claim_owner=None,
            claim_expires_at=None,
        )
    )


def release_owners(conn: sa.Connection, owners: Sequence[str]) -> int:
    """Clear the leases ``owners`` hold, as if never claimed (the attempt is given back)."""
    stmt = (
        sa.update(entities)
        .where(entities.c.claim_owner.in_(owners))
        .values(
            claim_owner=None,
            claim_expires_at=None,
            attempts=sa.func.max(entities.c.attempts - 1, 0)
            if conn.dialect.name == "sqlite"
            else sa.func.greatest(entities.c.attempts - 1, 0),
        )
    )
    return conn.execute(stmt).rowcount
