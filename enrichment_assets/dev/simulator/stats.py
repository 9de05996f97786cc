"""What the simulator saw: a bounded log of recent requests and counters per source.

The peak rate is exact: the most requests that arrived in any sliding one-second window, which is
what a test compares with the client's configured ``requests_per_second``.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from enrichment_assets.dev.simulator.catalog import SOURCES

DEFAULT_LOG_SIZE = 10_000


@dataclass(frozen=True)
class RequestRecord:
    """One request as received: ``path`` is the raw path with the raw query string."""

    at: float
    source: str | None
    method: str
    path: str
    status: int
    duration_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "source": self.source,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "duration_ms": round(self.duration_ms, 3),
        }


@dataclass
class SourceCounters:
    """Counters for one source since start or the last reset."""

    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    peak_rps: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)
    window: deque[float] = field(default_factory=deque)

    def as_dict(self) -> dict[str, Any]:
        batches = sum(self.batch_sizes.values())
        ids = sum(size * n for size, n in self.batch_sizes.items())
        return {
            "requests": self.requests,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "peak_rps": self.peak_rps,
            "batches": {
                "requests": batches,
                "ids": ids,
                "max": max(self.batch_sizes, default=0),
                "mean": round(ids / batches, 2) if batches else 0.0,
                "histogram": {str(size): n for size, n in sorted(self.batch_sizes.items())},
            },
        }


class Stats:
    """Request log (a ring buffer of ``log_size`` records) and per-source counters."""

    def __init__(self, *, log_size: int = DEFAULT_LOG_SIZE, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._log: deque[RequestRecord] = deque(maxlen=log_size)
        self._sources = {name: SourceCounters() for name in SOURCES}

    def arrived(self, source: str) -> None:
        """Count a request when it arrives, before any knob answers it."""
        counters = self._sources[source]
        counters.requests += 1
        now = self._monotonic()
        counters.window.append(now)
        while counters.window[0] <= now - 1.0:
            counters.window.popleft()
        counters.peak_rps = max(counters.peak_rps, len(counters.window))

    def batch(self, source: str, size: int) -> None:
        """Record the number of ids one batch request asked for."""
        self._sources[source].batch_sizes[size] += 1

    def finished(self, record: RequestRecord) -> None:
        """Log a request once its status is known."""
        self._log.append(record)
        if record.source is not None:
            self._sources[record.source].by_status[record.status] += 1

    def recent(self, limit: int, source: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` records (optionally of one source), oldest first."""
        records = [r for r in self._log if source is None or r.source == source]
        return [r.as_dict() for r in records[-limit:]] if limit > 0 else []

    def as_dict(self) -> dict[str, Any]:
        return {"sources": {name: c.as_dict() for name, c in self._sources.items()}}

    def reset(self) -> None:
        """Forget every counter and the request log."""
        self._log.clear()
        self._sources = {name: SourceCounters() for name in SOURCES}
