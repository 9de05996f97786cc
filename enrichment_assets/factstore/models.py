"""Values the fact store hands out and takes in. Frozen, so nothing downstream mutates a row copy."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

EntityKey = tuple[str, str]


@dataclass(frozen=True)
class IngestResult:
    received: int
    entities: int
    by_event_type: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"received": self.received, "entities": self.entities, "by_event_type": self.by_event_type}


@dataclass(frozen=True)
class Claim:
    """A leased candidate. ``version`` is the entity's version when claimed: a result is only allowed to
    change the state if no event arrived since. ``attempts`` counts this attempt."""

    entity_type: str
    entity_id: str
    version: int
    state: str
    attempts: int
    first_seen_at: datetime

    @property
    def key(self) -> EntityKey:
        return (self.entity_type, self.entity_id)


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, and the attempt count after which an entity is quarantined."""

    max_attempts: int = 5
    base_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)
    jitter: float = 0.25

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")

    def delay(self, attempts: int, rng: random.Random) -> timedelta:
        """Delay before the next try after ``attempts`` tries: base * 2**(attempts-1), capped, +/- jitter."""
        exponent = min(max(attempts - 1, 0), 32)
        raw = min(self.base_delay * (2**exponent), self.max_delay)
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass(frozen=True)
class DerivedEdge:
    """An edge a walk derived from its root; ``path`` is every entity from the root to ``dst``."""

    relation: str
    dst_type: str
    dst_id: str
    path: tuple[EntityKey, ...]


@dataclass(frozen=True)
class EdgeChange:
    src_type: str
    src_id: str
    relation: str
    dst_type: str
    dst_id: str
    change: Literal["asserted", "retracted"]

    @property
    def ends(self) -> tuple[EntityKey, EntityKey]:
        return (self.src_type, self.src_id), (self.dst_type, self.dst_id)


@dataclass(frozen=True)
class ReferenceFact:
    """A 1-hop reference read from a source: ``field`` names the reference in the policy file."""

    field: str
    to_type: str
    to_id: str
    resolved: bool


OutcomeStatus = Literal["enriched", "partial", "failed", "deferred", "deleted"]


@dataclass(frozen=True)
class Outcome:
    """What one attempt at a claimed entity produced.

    - ``enriched``: every path resolved; the entity becomes ``fully_enriched``; ``edges`` are asserted
      and the root's other edges retracted.
    - ``partial``: some references are not there yet (``waiting_on``); ``edges`` found so far are
      asserted and none retracted; retried with backoff, never quarantined.
    - ``failed``: the attempt errored (``error``); retried with backoff, quarantined after max attempts.
    - ``deferred``: a source was unavailable; retried at ``retry_at`` and the attempt is not counted.
    - ``deleted``: a tombstone was processed; every edge touching it is retracted.
    """

    entity_type: str
    entity_id: str
    version: int
    status: OutcomeStatus
    attributes: dict[str, Any] | None = None
    waiting_on: tuple[EntityKey, ...] = ()
    error: str | None = None
    edges: tuple[DerivedEdge, ...] = ()
    retry_at: datetime | None = None

    @classmethod
    def of(cls, claim: Claim, status: OutcomeStatus, **kwargs: Any) -> Outcome:
        return cls(claim.entity_type, claim.entity_id, claim.version, status, **kwargs)

    @property
    def key(self) -> EntityKey:
        return (self.entity_type, self.entity_id)


@dataclass(frozen=True)
class FinishResult:
    enriched: int = 0
    partial: int = 0
    failed: int = 0
    quarantined: int = 0
    deferred: int = 0
    deleted: int = 0
    superseded: int = 0
    lost: tuple[EntityKey, ...] = ()
    edge_changes: tuple[EdgeChange, ...] = ()
    edges_confirmed: int = 0
    # Claimed entities whose hydrated attributes differ from what the store had.
    attributes_changed: tuple[EntityKey, ...] = ()

    @property
    def edges_asserted(self) -> int:
        return sum(1 for c in self.edge_changes if c.change == "asserted")

    @property
    def edges_retracted(self) -> int:
        return sum(1 for c in self.edge_changes if c.change == "retracted")


@dataclass(frozen=True)
class DueWork:
    """Due candidates of one entity type whose ``first_seen_at`` falls in one time window."""

    entity_type: str
    window_start: datetime
    window_end: datetime
    due: int
    oldest_due_at: datetime


@dataclass(frozen=True)
class Staleness:
    """How stale a set of entities is, in seconds (since last enriched, or first seen if never)."""

    count: int
    p50: float
    p95: float
    max: float
    over_budget: int = 0

    @classmethod
    def of(cls, ages: list[float], budget: timedelta | None = None) -> Staleness:
        """From ascending ages; percentiles are the nearest rank at or below (like percentile_disc)."""
        if not ages:
            return cls(0, 0.0, 0.0, 0.0, 0)

        def rank(q: float) -> float:  # the first value whose cumulative share reaches q
            return ages[max(0, min(len(ages) - 1, math.ceil(q * len(ages)) - 1))]

        over = sum(1 for a in ages if budget is not None and a > budget.total_seconds())
        return cls(len(ages), rank(0.5), rank(0.95), ages[-1], over)


@dataclass(frozen=True)
class EntityRecord:
    entity_type: str
    entity_id: str
    state: str
    version: int
    attributes: dict[str, Any] | None
    first_seen_at: datetime
    updated_at: datetime
    last_event_at: datetime | None
    hydrated_at: datetime | None
    last_enriched_at: datetime | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    waiting_on: list[str] | None
    claim_owner: str | None
    claim_expires_at: datetime | None
    doc_version: int
    indexed_version: int

    def staleness_seconds(self, now: datetime) -> float | None:
        """Seconds since the entity's graph was last verified against its sources; None if never."""
        return staleness_seconds(self.last_enriched_at, now)


@dataclass(frozen=True)
class EdgeLookup:
    """The read API's answer for one entity: its state and freshness, its first live edges (each a
    mapping of ``reads.EDGE_FIELDS``) and how many there are in all."""

    entity_type: str
    entity_id: str
    state: str
    last_enriched_at: datetime | None
    total: int
    edges: list[dict[str, Any]]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.edges)

    def staleness_seconds(self, now: datetime) -> float | None:
        return staleness_seconds(self.last_enriched_at, now)


@dataclass(frozen=True)
class TypeStatus:
    entity_type: str
    counts: dict[str, int]
    oldest_waiting_id: str | None
    oldest_waiting_since: datetime | None


def staleness_seconds(last_enriched_at: datetime | None, now: datetime) -> float | None:
    """Seconds since an entity's graph was last verified against its sources; None if never."""
    if last_enriched_at is None:
        return None
    return max((now - last_enriched_at).total_seconds(), 0.0)
