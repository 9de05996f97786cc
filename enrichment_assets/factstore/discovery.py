"""Statements that find work and judge freshness: due work per window, staleness, quarantine, status.

The sensor, the schedules and the asset checks ask these on every tick, so each reads the partial
indexes over pending or enriched rows and grows with the rows it is about, not with the table.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from enrichment_assets.factstore.models import DueWork, Staleness, TypeStatus
from enrichment_assets.factstore.schema import PENDING_STATES, EntityState, entities
from enrichment_assets.factstore.types import UTCDateTime

Granularity = Literal["hour", "day"]
WINDOW_LENGTH: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_SQLITE_TRUNC = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}


def window_expr(dialect: str, granularity: Granularity) -> sa.ColumnElement[Any]:
    """The start of the ``first_seen_at`` window (UTC hour or day) an entity falls in."""
    if granularity not in WINDOW_LENGTH:
        raise ValueError(f"granularity must be one of {sorted(WINDOW_LENGTH)}, not {granularity!r}")
    if dialect == "postgresql":
        utc_wall = sa.func.timezone("UTC", entities.c.first_seen_at)
        return sa.func.date_trunc(granularity, utc_wall).label("window_start")
    return sa.func.strftime(_SQLITE_TRUNC[granularity], entities.c.first_seen_at).label("window_start")


def due_work(
    conn: sa.Connection, now: datetime, *, granularity: Granularity, refresh_intervals: dict[str, timedelta]
) -> list[DueWork]:
    window = window_expr(conn.dialect.name, granularity)
    free = sa.or_(entities.c.claim_owner.is_(None), entities.c.claim_expires_at <= now)
    conditions = [sa.and_(entities.c.state.in_(PENDING_STATES), entities.c.next_attempt_at <= now, free)]
    for etype, interval in refresh_intervals.items():
        conditions.append(
            sa.and_(
                entities.c.entity_type == etype,
                entities.c.state == EntityState.FULLY_ENRICHED.value,
                entities.c.last_enriched_at < now - interval,
                sa.or_(entities.c.next_attempt_at.is_(None), entities.c.next_attempt_at <= now),
                free,
            )
        )
    due_at = sa.func.coalesce(entities.c.next_attempt_at, entities.c.last_enriched_at)
    totals: Counter[tuple[str, datetime]] = Counter()
    oldest: dict[tuple[str, datetime], datetime] = {}
    for condition in conditions:
        stmt = (
            sa.select(entities.c.entity_type, window, sa.func.count(), sa.func.min(due_at))
            .where(condition)
            .group_by(entities.c.entity_type, window)
        )
        for etype, start, count, first_due in conn.execute(stmt):
            key = (etype, as_utc(start))
            totals[key] += count
            oldest[key] = min(oldest.get(key, as_utc(first_due)), as_utc(first_due))
    length = WINDOW_LENGTH[granularity]
    return [
        DueWork(etype, start, start + length, totals[(etype, start)], oldest[(etype, start)])
        for etype, start in sorted(totals, key=lambda k: (k[1], k[0]))
    ]


def _live(entity_type: str, window: tuple[datetime, datetime] | None) -> list[sa.ColumnElement[bool]]:
    where = [entities.c.entity_type == entity_type, entities.c.state != EntityState.DELETED.value]
    if window is not None:
        where += [entities.c.first_seen_at >= window[0], entities.c.first_seen_at < window[1]]
    return where


def ages(conn: sa.Connection, now: datetime, entity_type: str, window: tuple[datetime, datetime] | None) -> list[float]:
    stmt = sa.select(entities.c.first_seen_at, entities.c.last_enriched_at).where(*_live(entity_type, window))
    return sorted(max((now - as_utc(enriched or seen)).total_seconds(), 0.0) for seen, enriched in conn.execute(stmt))


def staleness(
    conn: sa.Connection,
    now: datetime,
    entity_type: str,
    window: tuple[datetime, datetime] | None,
    *,
    budget: timedelta | None,
) -> Staleness:
    if conn.dialect.name != "postgresql":
        return Staleness.of(ages(conn, now, entity_type, window), budget)
    age = sa.func.extract(
        "epoch", sa.literal(now, UTCDateTime) - sa.func.coalesce(entities.c.last_enriched_at, entities.c.first_seen_at)
    )
    over = sa.func.count().filter(age > budget.total_seconds()) if budget is not None else sa.literal(0)
    stmt = sa.select(
        sa.func.count(),
        sa.func.percentile_disc(0.5).within_group(age),
        sa.func.percentile_disc(0.95).within_group(age),
        sa.func.max(age),
        over,
    ).where(*_live(entity_type, window))
    count, p50, p95, oldest, exceeding = conn.execute(stmt).one()
    return Staleness(count, *(max(float(v or 0), 0.0) for v in (p50, p95, oldest)), int(exceeding or 0))


def quarantined(conn: sa.Connection, entity_type: str, *, limit: int) -> tuple[int, list[tuple[str, str | None]]]:
    where = [entities.c.entity_type == entity_type, entities.c.state == EntityState.QUARANTINED.value]
    count = conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one()
    sample = conn.execute(
        sa.select(entities.c.entity_id, entities.c.last_error).where(*where).order_by(entities.c.entity_id).limit(limit)
    ).all()
    return count, [(entity_id, error) for entity_id, error in sample]


def status(conn: sa.Connection) -> list[TypeStatus]:
    counts: dict[str, dict[str, int]] = {}
    for etype, state, count in conn.execute(
        sa.select(entities.c.entity_type, entities.c.state, sa.func.count()).group_by(
            entities.c.entity_type, entities.c.state
        )
    ):
        counts.setdefault(etype, {})[state] = count
    report = []
    for etype in sorted(counts):
        oldest = conn.execute(
            sa.select(entities.c.entity_id, entities.c.first_seen_at)
            .where(entities.c.entity_type == etype, entities.c.state.in_(PENDING_STATES))
            .order_by(entities.c.first_seen_at)
            .limit(1)
        ).first()
        report.append(TypeStatus(etype, counts[etype], *(oldest if oldest else (None, None))))
    return report


def as_utc(value: datetime | str) -> datetime:
    """A timestamp read back from either backend (SQLite hands some out as text), as aware UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
