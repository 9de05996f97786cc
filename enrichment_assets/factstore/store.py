"""``FactStore``: the one place that reads and writes the fact store.

Every statement is built with SQLAlchemy Core (parameterized, never from strings) and runs unchanged on
PostgreSQL and SQLite; where the two differ (row locking, date truncation) the difference is chosen
here and nowhere else.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import arrays, graph, ingest, migrations, outbox, queue, reads
from enrichment_assets.factstore.engine import create_engine, create_read_engine
from enrichment_assets.factstore.models import (
    Claim,
    DerivedEdge,
    DueWork,
    EdgeLookup,
    EntityKey,
    EntityRecord,
    FinishResult,
    IngestResult,
    Outcome,
    ReferenceFact,
    RetryPolicy,
    Staleness,
    TypeStatus,
)
from enrichment_assets.factstore.types import UTCDateTime
from enrichment_assets.factstore.schema import CLAIMABLE_STATES, PENDING_STATES, EntityState, edges, entities

Granularity = Literal["hour", "day"]
_WINDOW_LENGTH: dict[str, timedelta] = {"hour": timedelta(hours=1), "day": timedelta(days=1)}
_SQLITE_TRUNC = {"hour": "%Y-%m-%d %H:00:00", "day": "%Y-%m-%d 00:00:00"}
# Keeps IN lists well inside every driver's parameter limits.
_KEY_CHUNK = 500


# Any constant distinct from the migrations' key; the same in every process that drains this database.
_OUTBOX_LOCK_KEY = 0x656E7269636802
_SQLITE_DRAIN_LOCK = threading.Lock()


def utcnow() -> datetime:
    return datetime.now(UTC)


class _ReaderLost(Exception):
    """A reader connection turned out dead; the pool has been reset and the read may be retried."""


class ClaimError(RuntimeError):
    """A claim operation was refused (for example, an empty owner)."""


class FactStore:
    """Entities, references and edges, with the claim-and-process queue on top.

    ``clock`` and ``rng`` are injectable so tests can expire leases and check backoff without sleeping.
    """

    def __init__(
        self,
        engine: sa.Engine,
        *,
        clock: Callable[[], datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self._clock = clock
        self._rng = rng or random.Random()
        self._read_engine: sa.Engine | None = None
        self._read_engine_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> FactStore:
        return cls(create_engine(url), **kwargs)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self, revision: str = "head") -> None:
        """Bring the schema to ``revision`` (safe to call from many processes at once)."""
        migrations.upgrade(self.engine, revision)

    def revision(self) -> str | None:
        return migrations.current_revision(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()
        if self._read_engine is not None:
            self._read_engine.dispose()

    # -- ingestion ----------------------------------------------------------------------------------

    def ingest_events(self, batch: Iterable[Event]) -> IngestResult:
        """Apply a batch of thin events in one transaction and one upsert statement.

        (PostgreSQL: one ``INSERT ... SELECT FROM unnest(arrays) ON CONFLICT`` statement. SQLite, which
        runs in-process, gets an executemany of the same upsert.)

        ``created``/``updated`` make the entity ``uncached`` (due now); ``deleted`` makes it a tombstone
        (due once, so enrichment retracts its edges).
        The version is bumped only when the state changes or a claim is in flight (so the in-flight
        result knows it is stale): a duplicate event changes nothing. An event whose ``occurred_at`` is
        older than the last one applied to that entity is ignored.
        """
        events = list(batch)
        latest = ingest.latest_per_entity(events)
        if not latest:
            return IngestResult(received=0, entities=0, by_event_type={})
        now = self._clock()
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # One statement for the whole batch, its columns sent as arrays: psycopg2 would run
                # an executemany upsert row by row (SQLAlchemy does not page ON CONFLICT inserts).
                conn.execute(ingest.POSTGRES_UPSERT, {
                    "types": [e.entity_type for e in latest.values()],
                    "ids": [e.entity_id for e in latest.values()],
                    "states": [ingest.state_for(e.event_type) for e in latest.values()],
                    "event_times": [e.occurred_at for e in latest.values()],
                    "now": now,
                })
            else:
                conn.execute(ingest.SQLITE_UPSERT, [
                    {"entity_type": e.entity_type, "entity_id": e.entity_id, "state": ingest.state_for(e.event_type),
                     "version": 1, "first_seen_at": now, "updated_at": now, "last_event_at": e.occurred_at,
                     "attempts": 0, "next_attempt_at": now}
                    for e in latest.values()
                ])
        return IngestResult(
            received=len(events),
            entities=len(latest),
            by_event_type=dict(Counter(e.event_type.value for e in events)),
        )

    # -- the claim-and-process queue ----------------------------------------------------------------

    def claim(
        self,
        entity_type: str,
        *,
        limit: int,
        owner: str,
        lease: timedelta,
        window: tuple[datetime, datetime] | None = None,
        refresh_before: datetime | None = None,
        force: bool = False,
    ) -> list[Claim]:
        """Lease up to ``limit`` due candidates of one type to ``owner``, oldest due first.

        Candidates are pending entities (``uncached``/``partially_resolved``) and unprocessed tombstones
        whose ``next_attempt_at`` has come, plus, when ``refresh_before`` is given, enriched entities last
        enriched before it.
        ``window`` restricts to entities first seen in ``[start, end)``. Rows leased to someone else are
        skipped until their lease expires, so concurrent callers never get the same entity.

        ``force`` (a backfill recomputing its slice) leases every entity of the window whatever its
        state or schedule, except tombstones already processed; quarantined entities start their
        attempts afresh, since an operator asked for them again.
        """
        if not owner:
            raise ClaimError("a claim needs a non-empty owner")
        if limit <= 0:
            return []
        now = self._clock()
        scope = [entities.c.entity_type == entity_type]
        if window is not None:
            scope += [entities.c.first_seen_at >= window[0], entities.c.first_seen_at < window[1]]
        free = sa.or_(entities.c.claim_owner.is_(None), entities.c.claim_expires_at <= now)
        if force:
            return self._claim_all(scope, entity_type, limit=limit, owner=owner, expires=now + lease, free=free)
        with self.engine.begin() as conn:
            claims = queue.lease(
                conn,
                entity_type,
                [*scope, entities.c.state.in_(CLAIMABLE_STATES), entities.c.next_attempt_at <= now, free],
                order_by=entities.c.next_attempt_at,
                limit=limit,
                owner=owner,
                expires=now + lease,
            )
            if refresh_before is not None and len(claims) < limit:
                claims += queue.lease(
                    conn,
                    entity_type,
                    [
                        *scope,
                        entities.c.state == EntityState.FULLY_ENRICHED.value,
                        entities.c.last_enriched_at < refresh_before,
                        sa.or_(entities.c.next_attempt_at.is_(None), entities.c.next_attempt_at <= now),
                        free,
                    ],
                    order_by=entities.c.last_enriched_at,
                    limit=limit - len(claims),
                    owner=owner,
                    expires=now + lease,
                )
        return claims

    def _claim_all(self, scope: list[sa.ColumnElement[bool]], entity_type: str, *, limit: int, owner: str,
                   expires: datetime, free: sa.ColumnElement[bool]) -> list[Claim]:
        unprocessed_tombstone = sa.and_(
            entities.c.state == EntityState.DELETED.value, entities.c.next_attempt_at.is_not(None)
        )
        with self.engine.begin() as conn:
            return queue.lease(
                conn,
                entity_type,
                [*scope, sa.or_(entities.c.state != EntityState.DELETED.value, unprocessed_tombstone), free],
                order_by=entities.c.entity_id,
                limit=limit,
                owner=owner,
                expires=expires,
                attempts=sa.case(
                    (entities.c.state == EntityState.QUARANTINED.value, 1), else_=entities.c.attempts + 1
                ),
            )

    def finish(self, owner: str, outcomes: Sequence[Outcome], retry: RetryPolicy) -> FinishResult:
        """Record the outcomes of claimed entities, their derived edges and what partial ones wait on,
        and release the claims, all in one transaction.

        Outcomes for entities no longer leased to ``owner`` (the lease expired and someone else took
        them) are not applied and come back in ``lost``. If an event arrived after the claim (the
        version moved), hydrated attributes are kept but nothing else: the state the event set stands
        and the entity is enriched again, so a change landing mid-flight is never lost.
        """
        if not outcomes:
            return FinishResult()
        now = self._clock()
        counts: Counter[str] = Counter()
        walks: dict[EntityKey, tuple[Sequence[DerivedEdge], bool]] = {}
        waiting: dict[EntityKey, Sequence[EntityKey]] = {}
        tombstones: list[EntityKey] = []
        changed_attributes: list[EntityKey] = []
        with self.engine.begin() as conn:
            held = queue.held(conn, owner, [o.key for o in outcomes])
            before = graph.stored_attributes(conn, [o.key for o in outcomes if o.attributes is not None])
            rows = []
            for outcome in outcomes:
                if outcome.key not in held:
                    continue
                version, attempts, state = held[outcome.key]
                row = queue.outcome_row(outcome, attempts, state, retry, now, self._rng)
                rows.append(row)
                if before.get(outcome.key) not in (None, outcome.attributes):
                    changed_attributes.append(outcome.key)
                if version != outcome.version:
                    counts["superseded"] += 1
                    continue
                counts["quarantined" if row["new_state"] == EntityState.QUARANTINED else outcome.status] += 1
                waiting[outcome.key] = outcome.waiting_on if outcome.status == "partial" else ()
                if outcome.status in ("enriched", "partial"):
                    walks[outcome.key] = (outcome.edges, outcome.status == "enriched")
                elif outcome.status == "deleted":
                    tombstones.append(outcome.key)
            queue.apply_outcomes(conn, rows)
            changes, confirmed = graph.apply_edges(conn, walks, now)
            changes += graph.retract_touching(conn, tombstones, now)
            graph.replace_waits(conn, waiting, now)
            # The roots' documents moved with their own row; the other ends' move here.
            graph.touch_documents(conn, [end for c in changes for end in c.ends if end not in held])
        return FinishResult(
            enriched=counts["enriched"],
            partial=counts["partial"],
            failed=counts["failed"],
            quarantined=counts["quarantined"],
            deferred=counts["deferred"],
            deleted=counts["deleted"],
            superseded=counts["superseded"],
            lost=tuple(o.key for o in outcomes if o.key not in held),
            edge_changes=tuple(changes),
            edges_confirmed=confirmed,
            attributes_changed=tuple(changed_attributes),
        )

    def release(self, owner: str, keys: Iterable[EntityKey]) -> int:
        """Give claims back untried (the attempt is not counted). Returns how many were still held."""
        return self._update_held(owner, keys, claim_owner=None, claim_expires_at=None,
                                 attempts=entities.c.attempts - 1)

    def renew(self, owner: str, keys: Iterable[EntityKey], lease: timedelta) -> int:
        """Extend the lease on claims still held by ``owner``; returns how many were still held."""
        return self._update_held(owner, keys, claim_expires_at=self._clock() + lease)

    def _update_held(self, owner: str, keys: Iterable[EntityKey], **values: Any) -> int:
        updated = 0
        with self.engine.begin() as conn:
            for among in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), list(keys)):
                updated += conn.execute(
                    sa.update(entities)
                    .where(
                        among,
                        entities.c.claim_owner == owner,
                    )
                    .values(**values)
                ).rowcount
        return updated

    # -- what walks read and write ------------------------------------------------------------------

    def fresh_attributes(self, entity_type: str, ids: Iterable[str], ttl: timedelta) -> dict[str, dict[str, Any]]:
        """Attributes still fresh enough to reuse instead of calling the source: hydrated within ``ttl``
        and not changed by an event since."""
        now = self._clock()
        found: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(dict.fromkeys(ids)), _KEY_CHUNK):
                found.update(tuple(row) for row in conn.execute(
                    sa.select(entities.c.entity_id, entities.c.attributes).where(
                        entities.c.entity_type == entity_type,
                        entities.c.entity_id.in_(chunk),
                        entities.c.attributes.is_not(None),
                        entities.c.state != EntityState.DELETED.value,
                        entities.c.hydrated_at >= now - ttl,
                        entities.c.hydrated_at >= entities.c.updated_at,
                    )
                ))
        return found

    def prefetchable(self, entity_type: str, *, limit: int, exclude: Sequence[str], ttl: timedelta) -> list[str]:
        """Due, unleased entities of one type worth fetching ahead of their claim: nothing fresh is
        stored for them (``fresh_attributes`` would not reuse it). Used to fill a part-full batch."""
        if limit <= 0:
            return []
        with self._reader() as conn:
            return queue.prefetchable(conn, entity_type, limit=limit, exclude=exclude, now=self._clock(), ttl=ttl)

    def record_walk(
        self,
        hydrated: Sequence[tuple[str, str, dict[str, Any]]],
        references: dict[EntityKey, list[ReferenceFact]],
    ) -> list[EntityKey]:
        """Store what a walk fetched along the way and the 1-hop references it read, in one
        transaction. Returns the already-known entities whose attributes changed."""
        now = self._clock()
        with self.engine.begin() as conn:
            changed = graph.record_hydrations(conn, hydrated, now)
            graph.record_references(conn, references, now)
        return changed

    def referrers(self, field: str, to_type: str, to_ids: Sequence[str]) -> set[EntityKey]:
        """Entities whose live 1-hop reference ``field`` points at one of ``to_ids``."""
        with self.engine.connect() as conn:
            return graph.referrers(conn, field, to_type, to_ids)

    def mark_dirty(self, keys: Iterable[EntityKey]) -> int:
        """Make settled (enriched or partial) entities due now, with a new version: something their
        derived edges were walked through has changed."""
        with self.engine.begin() as conn:
            return graph.mark_dirty(conn, sorted(set(keys)), self._clock())

    def wake_waiters(self) -> int:
        """Make partially resolved entities due now when something they wait on has arrived."""
        with self.engine.begin() as conn:
            return graph.wake_waiters(conn, self._clock())

    def edges_of(self, entity_type: str, entity_id: str, *, relation: str | None = None,
                 include_retracted: bool = False, direction: Literal["out", "in"] = "out",
                 limit: int | None = None) -> list[dict[str, Any]]:
        """Derived edges from the entity (``out``) or into it (``in``), with their provenance; at most
        ``limit``, ordered by relation and the other end."""
        stmt = reads.edges_stmt(entity_type, entity_id, relation, direction, include_retracted, limit)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(stmt).mappings()]

    def edge_total(self, entity_type: str, entity_id: str, *, relation: str | None = None,
                   direction: Literal["out", "in"] = "out") -> int:
        """How many live edges ``edges_of`` would return without a limit."""
        with self.engine.connect() as conn:
            return conn.execute(reads.edge_total_stmt(entity_type, entity_id, relation, direction)).scalar_one()

    def entity_edges(self, entity_type: str, entity_id: str, *, relation: str | None = None,
                     direction: Literal["out", "in"] = "out", limit: int) -> EdgeLookup | None:
        """The read API's edge lookup, in one statement and one round trip: the entity's state and
        ``last_enriched_at``, its first ``limit`` live edges and their total; None if unknown.

        PostgreSQL: a statement prepared on a reader connection, run through the driver's cursor
        (``reads.prepared_edge_lookup``); a connection the server dropped costs one retry."""
        args = (entity_type, entity_id)
        kwargs: dict[str, Any] = {"relation": relation, "direction": direction, "limit": limit}
        if self.dialect != "postgresql":
            with self.engine.connect() as conn:
                return reads.edge_lookup(conn, *args, **kwargs)
        try:
            return self._on_reader_cursor(lambda cursor: reads.prepared_edge_lookup(cursor, *args, **kwargs))
        except _ReaderLost:
            return self._on_reader_cursor(lambda cursor: reads.prepared_edge_lookup(cursor, *args, **kwargs))

    def _on_reader_cursor(self, read: Callable[[Any], Any]) -> Any:
        """``read(cursor)`` on a pooled reader connection's driver cursor."""
        engine = self._reader_engine()
        raw = engine.raw_connection()
        try:
            with raw.cursor() as cursor:
                return read(cursor)
        except engine.dialect.loaded_dbapi.Error as error:
            if not engine.dialect.is_disconnect(error, raw.dbapi_connection, None):
                raise
            # The server went away under the pool: every pooled connection is as dead as this one.
            raw.invalidate(error)
            engine.dispose()
            raise _ReaderLost from error
        finally:
            raw.close()

    def _reader(self) -> sa.Connection:
        """A connection for single-statement reads. SQLite's engine begins every transaction as a
        writer, so there reads share the one engine."""
        return self._reader_engine().connect() if self.dialect == "postgresql" else self.engine.connect()

    def _reader_engine(self) -> sa.Engine:
        """PostgreSQL: a second pool, in autocommit, with no ping or reset round trips around a read,
        whose connections prepare the read API's statements when they open."""
        if self._read_engine is None:
            with self._read_engine_lock:
                if self._read_engine is None:
                    self._read_engine = create_read_engine(self.engine, on_connect=reads.prepare_statements)
        return self._read_engine

    def edge_counts(self) -> dict[tuple[str, str, str], int]:
        """Live derived edges per (source type, relation, target type)."""
        with self.engine.connect() as conn:
            return {
                (src, relation, dst): count
                for src, relation, dst, count in conn.execute(
                    sa.select(edges.c.src_type, edges.c.relation, edges.c.dst_type, sa.func.count())
                    .where(edges.c.retracted_at.is_(None))
                    .group_by(edges.c.src_type, edges.c.relation, edges.c.dst_type)
                )
            }

    def edge_sources(self, entity_type: str, relation: str, *, limit: int = 1) -> list[str]:
        """Ids of entities of ``entity_type`` with a live ``relation`` edge (examples for people)."""
        with self.engine.connect() as conn:
            return list(conn.scalars(
                sa.select(edges.c.src_id).distinct()
                .where(edges.c.src_type == entity_type, edges.c.relation == relation, edges.c.retracted_at.is_(None))
                .order_by(edges.c.src_id).limit(limit)
            ))

    def enrichment_lags(self) -> list[float]:
        """Seconds from first seen to last enriched, for every enriched entity, ascending."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(entities.c.first_seen_at, entities.c.last_enriched_at)
                .where(entities.c.state == EntityState.FULLY_ENRICHED.value)
            )
            return sorted((enriched - seen).total_seconds() for seen, enriched in rows)

    # -- the search outbox ---------------------------------------------------------------------------

    @contextmanager
    def draining_outbox(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold the search outbox's drain lock: one drain at a time across every process. Yields
        whether the lock is held: with ``wait=False`` it is not taken when another drain holds it.

        Concurrent drains read the same head of the outbox and write the same documents, so all but
        one write per document is refused as superseded: pure waste. PostgreSQL: a session advisory
        lock on a connection held for the drain (released by the server if the process dies). SQLite
        serializes writers by itself and is single-machine, so there the lock is per process.
        """
        if self.dialect != "postgresql":
            if not _SQLITE_DRAIN_LOCK.acquire(blocking=wait):
                yield False
                return
            try:
                yield True
            finally:
                _SQLITE_DRAIN_LOCK.release()
            return
        with self.engine.connect() as conn:
            take = sa.func.pg_advisory_lock if wait else sa.func.pg_try_advisory_lock
            held = conn.execute(sa.select(take(_OUTBOX_LOCK_KEY))).scalar() is not False
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(sa.select(sa.func.pg_advisory_unlock(_OUTBOX_LOCK_KEY)))
                    conn.commit()

    def index_backlog(self, *, limit: int) -> list[EntityKey]:
        """Entities whose search document is behind the fact store."""
        with self.engine.connect() as conn:
            return outbox.backlog(conn, limit)

    def document_sources(self, keys: Sequence[EntityKey], *, cap: int = outbox.RELATIONSHIP_CAP
                         ) -> list[outbox.DocumentSource]:
        with self.engine.connect() as conn:
            return outbox.document_sources(conn, keys, cap=cap)

    def mark_indexed(self, written: Sequence[tuple[EntityKey, int]]) -> None:
        with self.engine.begin() as conn:
            outbox.mark_indexed(conn, written)

    def requeue_for_index(self, keys: Sequence[EntityKey]) -> None:
        with self.engine.begin() as conn:
            outbox.requeue(conn, keys)

    def index_behind(self, keys: Sequence[EntityKey]) -> set[EntityKey]:
        """Which of ``keys`` are still waiting in the search outbox."""
        with self.engine.connect() as conn:
            return outbox.behind(conn, keys)

    def index_backlog_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return outbox.backlog_counts(conn)

    def document_versions(self) -> Iterator[tuple[str, str, int, str]]:
        """(type, id, doc_version, state) of every entity, in key order."""
        with self.engine.connect() as conn:
            yield from outbox.versions(conn)

    # -- discovery and reads ------------------------------------------------------------------------

    def due_work(
        self,
        *,
        granularity: Granularity = "day",
        refresh_intervals: dict[str, timedelta] | None = None,
    ) -> list[DueWork]:
        """Due candidates grouped by (entity type, window of ``first_seen_at``), oldest window first.

        Scans the partial index of scheduled rows (plus the enriched-by-age index for refresh) and the
        rows it points to, so its cost follows the amount of due work rather than the size of the table.
        """
        now = self._clock()
        window = self._window_expr(granularity)
        free = sa.or_(entities.c.claim_owner.is_(None), entities.c.claim_expires_at <= now)
        conditions = [
            sa.and_(entities.c.state.in_(PENDING_STATES), entities.c.next_attempt_at <= now, free)
        ]
        for etype, interval in (refresh_intervals or {}).items():
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
        with self.engine.connect() as conn:
            for condition in conditions:
                stmt = (
                    sa.select(entities.c.entity_type, window, sa.func.count(), sa.func.min(due_at))
                    .where(condition)
                    .group_by(entities.c.entity_type, window)
                )
                for etype, start, count, first_due in conn.execute(stmt):
                    start = _as_utc(start)
                    key = (etype, start)
                    totals[key] += count
                    first_due = _as_utc(first_due)
                    oldest[key] = min(oldest.get(key, first_due), first_due)
        length = _WINDOW_LENGTH[granularity]
        return [
            DueWork(etype, start, start + length, totals[(etype, start)], oldest[(etype, start)])
            for etype, start in sorted(totals, key=lambda k: (k[1], k[0]))
        ]

    def _window_expr(self, granularity: Granularity) -> sa.ColumnElement[Any]:
        if granularity not in _WINDOW_LENGTH:
            raise ValueError(f"granularity must be one of {sorted(_WINDOW_LENGTH)}, not {granularity!r}")
        if self.dialect == "postgresql":
            utc_wall = sa.func.timezone("UTC", entities.c.first_seen_at)
            return sa.func.date_trunc(granularity, utc_wall).label("window_start")
        return sa.func.strftime(_SQLITE_TRUNC[granularity], entities.c.first_seen_at).label("window_start")

    def ages(self, entity_type: str, window: tuple[datetime, datetime] | None = None) -> list[float]:
        """Staleness in seconds of every live entity of a type (optionally first seen in ``window``),
        ascending: time since last enriched, or since first seen for one never enriched yet."""
        now = self._clock()
        stmt = sa.select(entities.c.first_seen_at, entities.c.last_enriched_at).where(*self._live(entity_type, window))
        with self.engine.connect() as conn:
            return sorted(
                max((now - _as_utc(enriched or seen)).total_seconds(), 0.0) for seen, enriched in conn.execute(stmt)
            )

    def staleness(self, entity_type: str, window: tuple[datetime, datetime] | None = None, *,
                  budget: timedelta | None = None) -> Staleness:
        """p50/p95/max staleness (see ``ages``) of a type's live entities, and how many exceed ``budget``.
        On PostgreSQL the percentiles are computed in the database, so a million entities stay there."""
        if self.dialect != "postgresql":
            return Staleness.of(self.ages(entity_type, window), budget)
        now = self._clock()
        age = sa.func.extract("epoch", sa.literal(now, UTCDateTime) - sa.func.coalesce(
            entities.c.last_enriched_at, entities.c.first_seen_at))
        over = sa.func.count().filter(age > budget.total_seconds()) if budget is not None else sa.literal(0)
        stmt = sa.select(
            sa.func.count(),
            sa.func.percentile_disc(0.5).within_group(age),
            sa.func.percentile_disc(0.95).within_group(age),
            sa.func.max(age),
            over,
        ).where(*self._live(entity_type, window))
        with self.engine.connect() as conn:
            count, p50, p95, oldest, exceeding = conn.execute(stmt).one()
        return Staleness(count, *(max(float(v or 0), 0.0) for v in (p50, p95, oldest)), int(exceeding or 0))

    def _live(self, entity_type: str, window: tuple[datetime, datetime] | None) -> list[sa.ColumnElement[bool]]:
        where = [entities.c.entity_type == entity_type, entities.c.state != EntityState.DELETED.value]
        if window is not None:
            where += [entities.c.first_seen_at >= window[0], entities.c.first_seen_at < window[1]]
        return where

    def quarantined(self, entity_type: str, *, limit: int = 10) -> tuple[int, list[tuple[str, str | None]]]:
        """How many entities of a type are quarantined, and the first ``limit`` of them with their error."""
        where = [entities.c.entity_type == entity_type, entities.c.state == EntityState.QUARANTINED.value]
        with self.engine.connect() as conn:
            count = conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one()
            sample = conn.execute(
                sa.select(entities.c.entity_id, entities.c.last_error).where(*where)
                .order_by(entities.c.entity_id).limit(limit)
            ).all()
        return count, [(entity_id, error) for entity_id, error in sample]

    def get_entity(self, entity_type: str, entity_id: str) -> EntityRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(reads.entity_stmt(entity_type, entity_id)).first()
        return EntityRecord(*row) if row else None

    def status(self) -> list[TypeStatus]:
        """Entity counts by type and state, with the longest-waiting pending entity of each type."""
        with self.engine.connect() as conn:
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
                report.append(
                    TypeStatus(etype, counts[etype], oldest[0] if oldest else None, oldest[1] if oldest else None)
                )
        return report

    def now(self) -> datetime:
        return self._clock()


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _as_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
