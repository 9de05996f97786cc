"""Per-source rate limiting and circuit breaking for the hydration clients.

``LocalLimits`` limits one process on its own; ``shared_limits.SharedLimits`` draws the same limits
from a budget all processes share. A client holds one of them: ``async with limits.slot():`` and,
inside it, ``await limits.turn()`` before each request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class RateLimiter:
    """Paces request starts evenly, at most ``per_second`` in any one-second window.

    Even spacing rather than a token bucket or a sliding log: both of those let a whole second's
    budget start at once, and a burst that arrives a little late lands in the next window together
    with that window's own requests, which a source enforcing its limit answers with 429s.
    """

    # Leaves room for the jitter between a request being admitted here and arriving at the source
    # (event-loop and scheduling delays on a busy machine).
    MARGIN = 1.12

    def __init__(self, per_second: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.interval = self.MARGIN / per_second
        self._clock = clock
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
            if start > now:
                await asyncio.sleep(start - now)


class SourceLimits(Protocol):
    """A source's concurrency and rate limits, as a client uses them."""

    @property
    def round_trips(self) -> int:
        """Database calls the limits made (0 when they are the process's own)."""
        ...

    def slot(self) -> AbstractAsyncContextManager[object]:
        """Hold one of the source's concurrency slots for a request."""
        ...

    async def turn(self) -> None:
        """Wait until the next request may start."""
        ...

    async def aclose(self) -> None:
        """Give back whatever the limits hold."""
        ...


class LocalLimits:
    """One process's own limits: a ``RateLimiter`` and a semaphore. Right when the process is the only
    one calling the source (a SQLite fact store has one process)."""

    round_trips = 0

    def __init__(self, *, requests_per_second: float, max_concurrency: int) -> None:
        self.rate = RateLimiter(requests_per_second)
        self._slots = asyncio.Semaphore(max_concurrency)

    def slot(self) -> asyncio.Semaphore:
        return self._slots

    async def turn(self) -> None:
        await self.rate.acquire()

    async def aclose(self) -> None:
        return None


class CircuitBreaker:
    """Opens after ``threshold`` consecutive failures; after ``reset_seconds`` lets one probe through.

    While open, callers fail fast, so a dead source costs a few calls per cycle instead of one (plus
    retries) per entity.
    """

    def __init__(self, threshold: int, reset_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.reset_seconds = reset_seconds
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        self.times_opened = 0

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def seconds_until_retry(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(self._opened_at + self.reset_seconds - self._clock(), 0.0)

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._probing or self._clock() < self._opened_at + self.reset_seconds:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            if self._opened_at is None or self._probing:
                self.times_opened += 1
            self._opened_at = self._clock()
            self._probing = False
