"""Every source's rate and concurrency budget, shared through the fact store's PostgreSQL.

**Rate: booked spans of time.** ``source_budgets`` keeps, per source, ``booked_until``: the end of
the last span of request starts handed out. A process books a span for ``count`` requests
``interval`` seconds apart with one ``UPDATE ... RETURNING``: the span starts at ``booked_until`` or
now, whichever is later, and ``booked_until`` moves to its end. Spans never overlap, so if each
process starts its requests ``interval`` apart inside its own spans, every source sees them at most
that close together, however many processes there are; one process alone books span after span and
gets the whole rate. "Now" is the database's ``clock_timestamp()``, so the machines' clocks never
meet. (This is a token bucket that holds no burst: a burst arriving late lands in the next second
with that second's own requests, see ``RateLimiter``.)

**Concurrency: leased slots.** ``source_slots`` has one row per slot (``max_concurrency`` of them
per source). A process takes free slots (lease expired) for a short lease, renews those it holds,
and hands them back; a process that dies frees its slots when their leases run out. A process that
finds too few free slots while it holds less than its fair share (the limit over the processes
holding slots, rounded up) says so in ``slots_wanted_until``/``slots_wanted_by``. Each booking tells
its process how many others hold slots and whether one of them wants more; a holder then hands back
the slots it holds beyond its share, and the others after a turn with them, keeping its name on
them for a cooldown so that only another process may take them meanwhile (``keep_out``). A process
alone is never asked to.

**Cost.** Each call is one prebuilt statement in autocommit on a pool without ping or reset (the same
kind of pool as the store's reader), so one round trip, and its commit does not wait for the WAL to
reach disk (losing the last bookings in a server crash costs nothing: they are seconds old). Per
request, the limiter (``hydration/shared_limits.py``) costs a fraction of a round trip, off the event
loop: a busy process books a block of up to a tenth of a second's requests at once (8 at 100/s), and
only a process that uses its turns one at a time (a single slot on a slow source) books per request;
slots are taken in groups and kept while in use, with one renewal per third of a lease. A connection
the server dropped is retried once on a fresh one; a retried booking or take may have happened
twice, which only costs rate (an unused span) or a slot until its lease runs out, never an excess.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from enrichment_assets.factstore.engine import create_read_engine
from enrichment_assets.factstore.schema import source_budgets, source_slots

_T = TypeVar("_T")
log = logging.getLogger(__name__)

_NOW = sa.func.clock_timestamp()
_SOURCE = sa.bindparam("for_source")
_HOLDER = sa.bindparam("for_holder")
_SLOTS = sa.bindparam("for_slots", expanding=True)
_LEASE = sa.bindparam("lease", type_=sa.Interval())

_COUNT = sa.bindparam("count")
_LIMIT = sa.bindparam("limit")
_B, _S = source_budgets.c, source_slots.c

_FREE = (
    sa.select(_S.source, _S.slot)
    .where(
        _S.source == _SOURCE,
        _S.slot < _LIMIT,
        _S.expires_at <= _NOW,
        sa.or_(
            _S.holder.is_(None),
            _S.holder != _HOLDER,
            _S.expires_at <= _NOW - sa.bindparam("cooldown", type_=sa.Interval()),
        ),
    )
    .order_by(_S.slot)
    .limit(_COUNT)
    .with_for_update(skip_locked=True)
    .cte("free")
)
_TAKEN = (
    sa.update(source_slots)
    .where(_S.source == _FREE.c.source, _S.slot == _FREE.c.slot)
    .values(holder=_HOLDER, expires_at=_NOW + _LEASE)
    .returning(_S.slot)
    .cte("taken")
)
# Processes other than the caller holding slots now (the statement's snapshot: before the take).
_OTHERS = (
    sa.select(sa.func.count(sa.distinct(_S.holder)))
    .where(_S.source == _SOURCE, _S.expires_at > _NOW, _S.holder != _HOLDER)
    .scalar_subquery()
)
_WANTED_BY_OTHER = sa.func.coalesce(sa.and_(_B.slots_wanted_until > _NOW, _B.slots_wanted_by != _HOLDER), False)
_BOOK = (
    sa.update(source_budgets)
    .where(_B.source == _SOURCE)
    .values(
        # A span starts no sooner than its booking can reach the caller (``lead``): a span already over
        # when its answer arrives could only be used late, overlapping the spans booked after it.
        booked_until=sa.func.greatest(_B.booked_until, _NOW + sa.bindparam("lead", type_=sa.Interval()))
        + sa.bindparam("span", type_=sa.Interval()),
        rate=sa.bindparam("per_second"),
        updated_at=_NOW,
    )
    .returning(
        sa.cast(sa.extract("epoch", _B.booked_until), sa.Float),
        sa.cast(sa.extract("epoch", _B.updated_at), sa.Float),
        _OTHERS,
        _WANTED_BY_OTHER,
    )
)
_TAKEN_COUNT = sa.select(sa.func.count()).select_from(_TAKEN).scalar_subquery()
# In the same statement: if the caller got fewer slots than it asked for and holds less than its fair
# share (limit / holders, rounded up), tell the holders that slots are wanted.
_WANTED = (
    sa.update(source_budgets)
    .where(_B.source == _SOURCE, _TAKEN_COUNT < _COUNT, (sa.bindparam("held") + _TAKEN_COUNT) * (_OTHERS + 1) < _LIMIT)
    .values(slots_wanted_until=_NOW + sa.bindparam("wanted_for", type_=sa.Interval()), slots_wanted_by=_HOLDER)
    .returning(_B.source)
    .cte("wanted")
)
_TAKE = sa.select(_OTHERS, sa.func.array_agg(_TAKEN.c.slot)).add_cte(_WANTED)
_HELD = (_S.source == _SOURCE, _S.slot.in_(_SLOTS), _S.holder == _HOLDER)
_RENEW = sa.update(source_slots).where(*_HELD, _S.expires_at > _NOW).values(expires_at=_NOW + _LEASE).returning(_S.slot)
_GIVE_BACK = sa.update(source_slots).where(*_HELD).values(holder=None, expires_at=_NOW)
_GIVE_BACK_KEEPING_OUT = sa.update(source_slots).where(*_HELD).values(expires_at=_NOW)


@dataclass(frozen=True)
class SlotDemand:
    """How many processes other than the caller hold slots of a source, and whether another process
    recently found too few free slots while short of its share."""

    other_holders: int
    wanted_by_other: bool


@dataclass(frozen=True)
class Booking:
    """A span of ``count`` request starts from ``begins_at`` for ``seconds``, and the database's time
    ``at`` which it was booked (both on the database's clock, seconds since the epoch)."""

    begins_at: float
    seconds: float
    count: int
    at: float
    slots: SlotDemand

    @property
    def starts_in(self) -> float:
        return max(self.begins_at - self.at, 0.0)


@dataclass(frozen=True)
class Taken:
    """Slots just leased, and how many other processes held slots of the source at that moment."""

    slots: list[int]
    other_holders: int


class SourceBudgets:
    """The statements on ``source_budgets`` and ``source_slots`` (PostgreSQL only). Blocking: call
    them off the event loop. ``dispose()`` closes the connections."""

    def __init__(self, engine: sa.Engine) -> None:
        if engine.dialect.name != "postgresql":
            raise ValueError("shared source budgets need PostgreSQL; one SQLite process limits itself")
        self._engine = create_read_engine(engine, on_connect=_commit_without_flush)

    def dispose(self) -> None:
        self._engine.dispose()

    def ensure(self, source: str, *, slots: int, per_second: float) -> None:
        """Create the source's budget row and slots ``0 .. slots-1`` if they do not exist yet."""
        budget = postgresql.insert(source_budgets).values(
            source=source, booked_until=_NOW, rate=per_second, updated_at=_NOW
        )
        rows = [{"source": source, "slot": slot, "holder": None, "expires_at": _NOW} for slot in range(slots)]

        def work(conn: sa.Connection) -> None:
            conn.execute(budget.on_conflict_do_nothing())
            conn.execute(postgresql.insert(source_slots).values(rows).on_conflict_do_nothing())

        self._run(work)

    def book(self, source: str, *, holder: str, count: int, interval: float, lead: float = 0.0) -> Booking:
        """Book the next span for ``count`` request starts ``interval`` seconds apart, starting ``lead``
        seconds from now at the earliest (the time the answer takes to reach the caller); also say how
        much others want the source's slots (``holder`` is the caller)."""
        span = timedelta(seconds=count * interval)  # as stored: whole microseconds
        params = {
            "for_source": source,
            "for_holder": holder,
            "span": span,
            "lead": timedelta(seconds=max(lead, 0.0)),
            "per_second": 1 / interval,
        }
        row = self._run(lambda conn: conn.execute(_BOOK, params).one_or_none())
        if row is None:
            raise LookupError(f"no budget row for source {source!r}: call ensure() first")
        ends_at, at, others, wanted = row
        seconds = span.total_seconds()
        return Booking(
            begins_at=ends_at - seconds,
            seconds=seconds,
            count=count,
            at=at,
            slots=SlotDemand(other_holders=others, wanted_by_other=wanted),
        )

    def take_slots(
        self,
        source: str,
        *,
        holder: str,
        held: int,
        limit: int,
        count: int,
        lease: float,
        cooldown: float,
        wanted_for: float,
    ) -> Taken:
        """Lease up to ``count`` free slots below ``limit`` to ``holder``, which holds ``held`` already,
        for ``lease`` seconds. Slots this holder handed back with ``keep_out`` in the last ``cooldown``
        seconds are not free to it. Short of ``count`` and of its fair share, holders are told for
        ``wanted_for`` seconds that slots are wanted."""
        params = {
            "for_source": source,
            "for_holder": holder,
            "held": held,
            "limit": limit,
            "count": count,
            "lease": timedelta(seconds=lease),
            "cooldown": timedelta(seconds=cooldown),
            "wanted_for": timedelta(seconds=wanted_for),
        }
        others, slots = self._run(lambda conn: conn.execute(_TAKE, params).one())
        return Taken(slots=sorted(slots or ()), other_holders=others)

    def renew_slots(self, source: str, *, holder: str, slots: Sequence[int], lease: float) -> list[int]:
        """Extend the leases ``holder`` still has on ``slots``; returns the slots renewed (a lease that
        had already run out is lost: another process may have taken the slot)."""
        if not slots:
            return []
        return sorted(
            self._scalars(
                _RENEW, for_source=source, for_holder=holder, for_slots=list(slots), lease=timedelta(seconds=lease)
            )
        )

    def give_back(self, source: str, *, holder: str, slots: Sequence[int], keep_out: bool = False) -> None:
        """End ``holder``'s leases on ``slots``. ``keep_out``: keep the holder's name on them, so its
        own ``take_slots`` passes them over for the cooldown and another process can take them first."""
        if slots:
            stmt = _GIVE_BACK_KEEPING_OUT if keep_out else _GIVE_BACK
            self._run(
                lambda conn: conn.execute(stmt, {"for_source": source, "for_holder": holder, "for_slots": list(slots)})
            )

    def _scalars(self, stmt: sa.Executable, **params: Any) -> list[Any]:
        return self._run(lambda conn: list(conn.execute(stmt, params).scalars()))

    def _run(self, work: Callable[[sa.Connection], _T]) -> _T:
        """``work(conn)`` on a pooled autocommit connection, once more on a fresh one if the server had
        dropped the first (SQLAlchemy then discards every older pooled connection too)."""
        for attempt in (1, 2):
            try:
                with self._engine.connect() as conn:
                    return work(conn)
            except sa.exc.DBAPIError as error:
                if attempt == 2 or not error.connection_invalidated:
                    raise
                log.warning("source budget connection lost (%s); retrying once", type(error.orig).__name__)
        raise AssertionError("unreachable")


def _commit_without_flush(dbapi_connection: Any, _connection_record: Any) -> None:
    """``connect`` listener: this pool's commits need not wait for the WAL flush (see the module doc)."""
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
