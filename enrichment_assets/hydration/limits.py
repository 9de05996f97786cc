"""Per-source rate limiting and circuit breaking for the hydration clients."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """At most ``per_second`` request starts in any sliding window of one second.

    A sliding log rather than a token bucket: a bucket lets a full burst plus the refill through in one
    second, which a source that enforces its limit over a sliding window answers with 429s.
    """

    # Leaves room for the jitter between a request being admitted here and arriving at the source
    # (event-loop and scheduling delays bunch arrivals): measured up to ~8% on a busy 2-core machine.
    MARGIN = 1.12

    def __init__(self, per_second: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.capacity = max(1, math.floor(per_second))
        self.window = self.capacity / per_second * self.MARGIN
        self._clock = clock
        self._starts: deque[float] = deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                while self._starts and now - self._starts[0] >= self.window:
                    self._starts.popleft()
                if len(self._starts) < self.capacity:
                    self._starts.append(now)
                    return
                await asyncio.sleep(self.window - (now - self._starts[0]))


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
