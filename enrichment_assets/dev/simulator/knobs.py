"""Fault knobs per source: latency, injected errors, rate limits, outages, malformed bodies, and
entities that arrive late.

Every random decision draws from one RNG seeded from the simulator's seed, so a run with the same
requests in the same order fails the same way. Outages and late entities are deadlines on the
injectable ``clock`` (epoch seconds), so a test can move time instead of sleeping; the rate limiter
measures real elapsed time on ``monotonic``.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from enrichment_assets.dev.simulator.catalog import SOURCES

Clock = Callable[[], float]


@dataclass
class SourceKnobs:
    """The knobs of one source. ``outage_until`` is a clock time; ``math.inf`` means until cleared."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    malformed_rate: float = 0.0
    rate_limit_rps: float | None = None
    outage_until: float | None = None


SETTABLE = tuple(f.name for f in fields(SourceKnobs) if f.name != "outage_until")


class Knobs:
    """The knob state of all six sources plus the late-entity marks."""

    def __init__(self, *, seed: int, clock: Clock = time.time, monotonic: Clock = time.monotonic) -> None:
        self._seed = seed
        self.clock = clock
        self._monotonic = monotonic
        self._rng = random.Random(f"{seed}:knobs")
        self._sources = {name: SourceKnobs() for name in SOURCES}
        self._late: dict[tuple[str, str], float] = {}
        self._admitted: dict[str, deque[float]] = {name: deque() for name in SOURCES}
        self._start = (copy.deepcopy(self._sources), dict(self._late))

    def set(self, source: str | None, **values: float | None) -> None:
        """Set knobs on one source, or on all when ``source`` is None. Unnamed knobs keep their value."""
        for name, value in values.items():
            if name not in SETTABLE:
                raise ValueError(f"unknown knob {name!r}; knobs are {', '.join(SETTABLE)}")
            if name.endswith("_rate") and not (value is not None and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
            if name != "rate_limit_rps" and (value is None or value < 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
            if name == "rate_limit_rps" and value is not None and value <= 0:
                raise ValueError(f"rate_limit_rps must be positive (or null for no limit), got {value}")
        for knobs in self._targets(source):
            for name, value in values.items():
                setattr(knobs, name, value)

    def start_outage(self, source: str | None, seconds: float | None) -> None:
        """Answer every request of the source(s) 503 for ``seconds``, or until cleared when None."""
        until = math.inf if seconds is None else self.clock() + seconds
        for knobs in self._targets(source):
            knobs.outage_until = until

    def clear_outage(self, source: str | None) -> None:
        """End an outage now."""
        for knobs in self._targets(source):
            knobs.outage_until = None

    def outage_remaining(self, source: str) -> float | None:
        """Seconds the source's outage still lasts (``math.inf`` if open-ended), or None if it is up."""
        until = self._sources[source].outage_until
        if until is None:
            return None
        remaining = until - self.clock()
        return remaining if remaining > 0 else None

    def admit(self, source: str) -> float | None:
        """Count a request against the source's rate limit. None if admitted, else seconds to wait.

        A sliding window: at most ``max(1, floor(rps))`` requests in any ``that / rps`` seconds.
        Throttled requests are not counted, as a real gateway would not.
        """
        rps = self._sources[source].rate_limit_rps
        if rps is None:
            return None
        capacity = max(1, math.floor(rps))
        window = capacity / rps
        now = self._monotonic()
        admitted = self._admitted[source]
        while admitted and admitted[0] <= now - window:
            admitted.popleft()
        if len(admitted) >= capacity:
            return admitted[0] + window - now
        admitted.append(now)
        return None

    def delay_seconds(self, source: str) -> float:
        """Latency to add to this request: ``latency_ms`` plus uniform jitter up to ``jitter_ms``."""
        knobs = self._sources[source]
        jitter = self._rng.uniform(0, knobs.jitter_ms) if knobs.jitter_ms else 0.0
        return (knobs.latency_ms + jitter) / 1000.0

    def injected_error(self, source: str) -> int | None:
        """500 or 503 with probability ``error_rate``, else None."""
        rate = self._sources[source].error_rate
        if rate and self._rng.random() < rate:
            return self._rng.choice((500, 503))
        return None

    def malformed_variant(self, source: str) -> int | None:
        """Which malformed body to send (0-2) with probability ``malformed_rate``, else None."""
        rate = self._sources[source].malformed_rate
        if rate and self._rng.random() < rate:
            return self._rng.randrange(3)
        return None

    def mark_late(self, entity_type: str, ids: Iterable[str], seconds: float) -> int:
        """Make entities answer 404 (or appear in ``missing``) for ``seconds`` from now."""
        available_at = self.clock() + seconds
        marked = 0
        for entity_id in ids:
            self._late[(entity_type, entity_id)] = available_at
            marked += 1
        return marked

    def is_late(self, entity_type: str, entity_id: str) -> bool:
        """True while a late entity is not yet available."""
        available_at = self._late.get((entity_type, entity_id))
        return available_at is not None and self.clock() < available_at

    def remember_start(self) -> None:
        """Record the current knobs and late marks as what ``reset`` returns to."""
        self._start = (copy.deepcopy(self._sources), dict(self._late))

    def reset(self) -> None:
        """Back to the knobs given at start; rate windows cleared, RNG re-seeded."""
        self._sources = copy.deepcopy(self._start[0])
        self._late = dict(self._start[1])
        self._admitted = {name: deque() for name in SOURCES}
        self._rng = random.Random(f"{self._seed}:knobs")

    def as_dict(self) -> dict[str, Any]:
        """Knobs per source (outage as seconds remaining, null when up) and the count of late marks."""
        now = self.clock()
        sources: dict[str, Any] = {}
        for name, knobs in self._sources.items():
            values = asdict(knobs)
            del values["outage_until"]
            remaining = self.outage_remaining(name)
            values["outage"] = remaining is not None
            open_ended = remaining is None or math.isinf(remaining)
            values["outage_seconds_remaining"] = None if open_ended else remaining
            sources[name] = values
        pending = sum(1 for at in self._late.values() if at > now)
        return {"sources": sources, "late_entities_pending": pending}

    def _targets(self, source: str | None) -> list[SourceKnobs]:
        if source is None:
            return list(self._sources.values())
        if source not in self._sources:
            raise ValueError(f"unknown source {source!r}; sources are {', '.join(self._sources)}")
        return [self._sources[source]]
