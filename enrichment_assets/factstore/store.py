"""``FactStore``: the one place that reads and writes the fact store.

Every statement is built with SQLAlchemy Core (parameterized, never from strings) and runs unchanged on
PostgreSQL and SQLite; where the two differ (row locking, date truncation) the difference is chosen
here and nowhere else.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypeVar

import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import arrays, discovery, graph, ingest, migrations, queue, reads
from enrichment_assets.factstore.discovery import Granularity
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
from enrichment_assets.factstore.schema import EntityState, entities
from enrichment_assets.factstore.store_outbox import OutboxMethods

# PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back whole.
_RETRYABLE = frozenset({"40P01", "40001"})
_WRITE_ATTEMPTS = 4
_T = TypeVar("_T")
log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(UTC)


class _ReaderLost(Exception):
    """A reader connection turned out dead; the pool has been reset and the read may be retried."""


class ClaimError(RuntimeError):
    """A claim operation was refused (for example, an empty owner)."""


class FactStore(OutboxMethods):
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

    def _write(self, work: Callable[[sa.Connection], _T]) -> _T:
        """Run ``work(conn)`` in one transaction, again from the start if PostgreSQL aborted it as a
        deadlock or serialization failure (its work rolled back whole, so a retry is safe).

        Writers lock shared rows in key order, but a plan may not follow its input's order (an
        ``UPDATE ... FROM unnest(...)`` hash join, say), and several runs settle overlapping hop
        entities at once; the server then breaks the cycle by aborting one transaction, which retries.
        """
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                with self.engine.begin() as conn:
                    return work(conn)
            except sa.exc.OperationalError as error:
                if attempt == _WRITE_ATTEMPTS or getattr(error.orig, "pgcode", None) not in _RETRYABLE:
                    raise
                log.warning(
                    "fact store transaction aborted (%s), attempt %d of %d; retrying",
                    type(error.orig).__name__,
                    attempt,
                    _WRITE_ATTEMPTS,
                )
                time.sleep(self._rng.uniform(0.05, 0.2) * attempt)
        raise AssertionError("unreachable")

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
        # In key order, so concurrent batches (and settling runs) lock shared rows in the same order.
        rows = [latest[key] for key in sorted(latest)]

        def upsert(conn: sa.Connection) -> None:
            if self.dialect == "postgresql":
                # One statement for the whole batch, its columns sent as arrays: psycopg2 would run
                # an executemany upsert row by row (SQLAlchemy does not page ON CONFLICT inserts).
                conn.execute(
                    ingest.POSTGRES_UPSERT,
                    {
                        "types": [e.entity_type for e in rows],
                        "ids": [e.entity_id for e in rows],
                        "states": [ingest.state_for(e.event_type) for e in rows],
                        "event_times": [e.occurred_at for e in rows],
                        "now": now,
                    },
                )
            else:
                conn.execute(
                    ingest.SQLITE_UPSERT,
                    [
                        {
                            "entity_type": e.entity_type,
                            "entity_id": e.entity_id,
                            "state": ingest.state_for(e.event_type),
                            "version": 1,
                            "first_seen_at": now,
                            "updated_at": now,
                            "last_event_at": e.occurred_at,
                            "attempts": 0,
                            "next_attempt_at": now,
                        }
                        for e in rows
                    ],
                )

        self._write(upsert)
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
        if force:
            return self._write(
                lambda conn: queue.lease_window(
                    conn, entity_type, window, now=now, limit=limit, owner=owner, expires=now + lease
                )
            )
        return self._write(
            lambda conn: queue.lease_due(
                conn,
                entity_type,
                window,
                now=now,
                limit=limit,
                owner=owner,
                expires=now + lease,
                refresh_before=refresh_before,
            )
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
        return self._write(lambda conn: self._finish(conn, owner, outcomes, retry, now))

    def _finish(
        self, conn: sa.Connection, owner: str, outcomes: Sequence[Outcome], retry: RetryPolicy, now: datetime
    ) -> FinishResult:
        counts: Counter[str] = Counter()
        walks: dict[EntityKey, tuple[Sequence[DerivedEdge], bool]] = {}
        waiting: dict[EntityKey, Sequence[EntityKey]] = {}
        tombstones: list[EntityKey] = []
        changed_attributes: list[EntityKey] = []
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
        return self._update_held(owner, keys, claim_owner=None, claim_expires_at=None, attempts=entities.c.attempts - 1)

    def release_owners(self, owners: Sequence[str]) -> int:
        """Give back, untried, every claim the given owners hold (runs that failed or were canceled, and
        will not settle them); returns how many. The next claim takes those entities at once."""
        ordered = sorted(set(owners))
        return self._write(lambda conn: queue.release_owners(conn, ordered)) if ordered else 0

    def renew(self, owner: str, keys: Iterable[EntityKey], lease: timedelta) -> int:
        """Extend the lease on claims still held by ``owner``; returns how many were still held."""
        return self._update_held(owner, keys, claim_expires_at=self._clock() + lease)

    def _update_held(self, owner: str, keys: Iterable[EntityKey], **values: Any) -> int:
        ordered = sorted(set(keys))

        def update(conn: sa.Connection) -> int:
            updated = 0
            for where in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), ordered):
                graph.lock_in_key_order(conn, where)
                statement = sa.update(entities).where(where, entities.c.claim_owner == owner).values(**values)
                updated += conn.execute(statement).rowcount
            return updated

        return self._write(update)

    # -- what walks read and write ------------------------------------------------------------------

    def fresh_attributes(self, entity_type: str, ids: Iterable[str], ttl: timedelta) -> dict[str, dict[str, Any]]:
        """Attributes still fresh enough to reuse instead of calling the source: hydrated within ``ttl``
        and not changed by an event since."""
        with self.engine.connect() as conn:
            return graph.fresh_attributes(conn, entity_type, list(dict.fromkeys(ids)), ttl=ttl, now=self._clock())

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

        def record(conn: sa.Connection) -> list[EntityKey]:
            changed = graph.record_hydrations(conn, hydrated, now)
            graph.record_references(conn, references, now)
            return changed

        return self._write(record)

    def referrers(self, field: str, to_type: str, to_ids: Sequence[str]) -> set[EntityKey]:
        """Entities whose live 1-hop reference ``field`` points at one of ``to_ids``."""
        with self.engine.connect() as conn:
            return graph.referrers(conn, field, to_type, to_ids)

    def mark_dirty(self, keys: Iterable[EntityKey]) -> int:
        """Make settled (enriched or partial) entities due now, with a new version: something their
        derived edges were walked through has changed."""
        ordered = sorted(set(keys))
        return self._write(lambda conn: graph.mark_dirty(conn, ordered, self._clock()))

    def wake_waiters(self) -> int:
        """Make partially resolved entities due now when something they wait on has arrived."""
        return self._write(lambda conn: graph.wake_waiters(conn, self._clock()))

    def edges_of(
        self,
        entity_type: str,
        entity_id: str,
        *,
        relation: str | None = None,
        include_retracted: bool = False,
        direction: Literal["out", "in"] = "out",
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Derived edges from the entity (``out``) or into it (``in``), with their provenance; at most
        ``limit``, ordered by relation and the other end."""
        stmt = reads.edges_stmt(entity_type, entity_id, relation, direction, include_retracted, limit)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(stmt).mappings()]

    def edge_total(
        self, entity_type: str, entity_id: str, *, relation: str | None = None, direction: Literal["out", "in"] = "out"
    ) -> int:
        """How many live edges ``edges_of`` would return without a limit."""
        with self.engine.connect() as conn:
            return conn.execute(reads.edge_total_stmt(entity_type, entity_id, relation, direction)).scalar_one()

    def entity_edges(
        self,
        entity_type: str,
        entity_id: str,
        *,
        relation: str | None = None,
        direction: Literal["out", "in"] = "out",
        limit: int,
    ) -> EdgeLookup | None:
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
            try:
                return self._on_reader_cursor(lambda cursor: reads.prepared_edge_lookup(cursor, *args, **kwargs))
            except _ReaderLost as lost:
                raise lost.__cause__ from None  # the driver's own error: the server is gone, not one connection

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
            return reads.edge_counts(conn)

    def edge_sources(self, entity_type: str, relation: str, *, limit: int = 1) -> list[str]:
        """Ids of entities of ``entity_type`` with a live ``relation`` edge (examples for people)."""
        with self.engine.connect() as conn:
            return reads.edge_sources(conn, entity_type, relation, limit=limit)

    def enrichment_lags(self) -> list[float]:
        """Seconds from first seen to last enriched, for every enriched entity, ascending."""
        with self.engine.connect() as conn:
            return reads.enrichment_lags(conn)

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
        with self.engine.connect() as conn:
            return discovery.due_work(
                conn, self._clock(), granularity=granularity, refresh_intervals=refresh_intervals or {}
            )

    def ages(self, entity_type: str, window: tuple[datetime, datetime] | None = None) -> list[float]:
        """Staleness in seconds of every live entity of a type (optionally first seen in ``window``),
        ascending: time since last enriched, or since first seen for one never enriched yet."""
        with self.engine.connect() as conn:
            return discovery.ages(conn, self._clock(), entity_type, window)

    def staleness(
        self, entity_type: str, window: tuple[datetime, datetime] | None = None, *, budget: timedelta | None = None
    ) -> Staleness:
        """p50/p95/max staleness (see ``ages``) of a type's live entities, and how many exceed ``budget``.
        On PostgreSQL the percentiles are computed in the database, so a million entities stay there."""
        with self.engine.connect() as conn:
            return discovery.staleness(conn, self._clock(), entity_type, window, budget=budget)

    def quarantined(self, entity_type: str, *, limit: int = 10) -> tuple[int, list[tuple[str, str | None]]]:
        """How many entities of a type are quarantined, and the first ``limit`` of them with their error."""
        with self.engine.connect() as conn:
            return discovery.quarantined(conn, entity_type, limit=limit)

    def get_entity(self, entity_type: str, entity_id: str) -> EntityRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(reads.entity_stmt(entity_type, entity_id)).first()
        return EntityRecord(*row) if row else None

    def status(self) -> list[TypeStatus]:
        """Entity counts by type and state, with the longest-waiting pending entity of each type."""
        with self.engine.connect() as conn:
            return discovery.status(conn)

    def now(self) -> datetime:
        return self._clock()
