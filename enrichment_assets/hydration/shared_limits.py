"""A source's rate and concurrency limits shared by every process that calls it, through the fact
store's PostgreSQL (``factstore/budgets.py`` holds the statements and the design).

A request first holds a slot, then waits for its turn, as with the in-process limits:

- **Turns.** Requests start ``RateLimiter.MARGIN / requests_per_second`` apart, inside spans booked
  from the shared budget. A booking is made shortly before the spans booked so far run out, so a
  process that keeps busy books back-to-back spans, and it covers the requests waiting for a turn
  plus as many more as recent spans show the process fills (at most a tenth of a second's worth in
  all). So a busy process books in blocks, and one that cannot keep up (few slots, a slow source)
  books little more than it uses, leaving the rest of the rate to other processes. Spans are placed
  on the local clock through an estimate of the database clock's offset (see ``_learn_offset``).
- **Slots.** Leased from the database and passed from request to request inside the process
  (``shared_slots.py``).

All database calls run in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable

from enrichment_assets.factstore.budgets import Booking, SourceBudgets
from enrichment_assets.hydration.limits import RateLimiter
from enrichment_assets.hydration.shared_slots import SharedSlots


class SharedRate:
    """Request starts for one source, paced within spans booked from the shared budget."""

    # How far past its span's last start a turn may begin: a request that is late for its turn (the
    # event loop was busy, the booking's answer came back slowly) still gets it, and the margin
    # (``RateLimiter.MARGIN``) absorbs the lateness.
    LATE_FRACTION = 0.5
    # How fast two clocks may drift apart, so that an old, precise offset estimate is replaced in time.
    DRIFT = 1e-4

    def __init__(
        self,
        budgets: SourceBudgets,
        source: str,
        per_second: float,
        *,
        holder: str,
        on_booking: Callable[[Booking], None] = lambda booking: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = RateLimiter.MARGIN / per_second
        # A tenth of a second's requests, so one booking serves several without holding back others.
        self.max_block = max(1, int(0.1 / self.interval))
        self.round_trips = 0
        self._budgets = budgets
        self._source = source
        self._holder = holder
        self._on_booking = on_booking
        self._clock = clock
        self._spans: deque[list[float]] = deque()  # [begin, end, turns left], on the local clock
        self._booked_until = 0.0
        self._next = 0.0
        self._unserved = 0
        # Turns booked beyond the requests waiting: grows while spans are used up before they end,
        # halves when a span's turns go unused, so a busy process books whole blocks and a slow one
        # (few slots, a slow source) books what it uses.
        self._ahead = 0
        self._booking: asyncio.Task[None] | None = None
        self._round_trip = 0.002
        # The database's clock minus the local one, and how far off that estimate may be.
        self._offset = 0.0
        self._offset_error = math.inf
        self._offset_taken = 0.0

    async def acquire(self) -> None:
        self._unserved += 1
        try:
            while (start := self._take_turn()) is None:
                if self._booking is None:
                    self._booking = asyncio.ensure_future(self._book())
                await asyncio.shield(self._booking)
        finally:
            self._unserved -= 1
        delay = start - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)

    def _take_turn(self) -> float | None:
        now = self._clock()
        while self._spans:
            span = self._spans[0]
            begin, end, left = span
            start = max(now, self._next, begin)
            if left >= 1 and start <= end - self.interval * (1 - self.LATE_FRACTION):
                span[2] -= 1
                self._next = start + self.interval
                return start
            self._spans.popleft()
            if left >= 1:
                self._ahead //= 2
            elif now < end:  # used up while it still ran: more demand than it held
                self._ahead = min(self._ahead + 1, self.max_block)
        return None

    async def _book(self) -> None:
        try:
            # While booked spans still run, waiting until just before they end lets one booking
            # cover every request that arrived meanwhile; the new span then follows on (booked a round trip
            # sooner than before spans got their lead, so the lead never opens a gap between them).
            early = self._booked_until - self._clock() - (3 * self._round_trip + 0.002)
            if early > 0:
                await asyncio.sleep(early)
            count = min(self.max_block, self._unserved + self._ahead)
            if self._unserved == 0:
                return
            called = self._clock()
            booking, sent, received = await asyncio.to_thread(self._book_now, count)
            self.round_trips += 1
            self._round_trip = 0.8 * self._round_trip + 0.2 * (self._clock() - called)
            self._learn_offset(booking.at, sent, received)
            begin = booking.begins_at - self._offset
            self._spans.append([begin, begin + booking.seconds, booking.count])
            self._booked_until = begin + booking.seconds
            self._on_booking(booking)
        finally:
            self._booking = None

    def _book_now(self, count: int) -> tuple[Booking, float, float]:
        sent = self._clock()
        # The answer is back about one round trip after the statement ran; twice that leaves room for jitter.
        lead = 2 * self._round_trip
        booking = self._budgets.book(self._source, holder=self._holder, count=count, interval=self.interval, lead=lead)
        return booking, sent, self._clock()

    def _learn_offset(self, database_time: float, sent: float, received: float) -> None:
        """Spans are placed on the local clock through one offset estimate, so spans booked back to
        back stay back to back here. The estimate is the one from the quickest round trip, which
        brackets the database's timestamp most tightly; an old one's error grows with possible drift."""
        error = (received - sent) / 2
        if error <= self._offset_error + self.DRIFT * (received - self._offset_taken):
            self._offset = database_time - (sent + received) / 2
            self._offset_error, self._offset_taken = error, received


class SharedLimits:
    """One source's limits drawn from the shared budget (the interface of ``LocalLimits``)."""

    def __init__(
        self,
        budgets: SourceBudgets,
        source: str,
        *,
        requests_per_second: float,
        max_concurrency: int,
        lease: float = 10.0,
    ) -> None:
        self.holder = f"{os.getpid()}:{uuid.uuid4().hex[:8]}:{socket.gethostname()}"[:128]
        self._budgets = budgets
        self._source = source
        self._per_second = requests_per_second
        self.slots = SharedSlots(budgets, source, max_concurrency, holder=self.holder, lease=lease)
        self.rate = SharedRate(
            budgets,
            source,
            requests_per_second,
            holder=self.holder,
            on_booking=lambda booking: self.slots.learn(booking.slots),
        )
        self._ensured = False
        self._ensuring = asyncio.Lock()

    @property
    def round_trips(self) -> int:
        """Database calls made so far (the one-time setup is two)."""
        return self.rate.round_trips + self.slots.round_trips + 2 * int(self._ensured)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if not self._ensured:
            async with self._ensuring:
                if not self._ensured:
                    await asyncio.to_thread(
                        self._budgets.ensure, self._source, slots=self.slots.limit, per_second=self._per_second
                    )
                    self._ensured = True
        async with self.slots.hold():
            yield

    async def turn(self) -> None:
        await self.rate.acquire()

    async def aclose(self) -> None:
        await self.slots.aclose()
