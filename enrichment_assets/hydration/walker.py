"""The multi-hop walker: hydrate claimed entities and everything their policy paths reach, hop by hop,
then derive the direct edges.

Every hop is fetched for the whole claimed batch at once, de-duplicated per type (a pipeline run shared
by fifty model instances is fetched once) and reusing hydrations still fresh in the fact store; the
types needed at one hop are fetched from their sources concurrently.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from enrichment_assets.factstore import (
    Claim,
    DerivedEdge,
    EntityKey,
    FactStore,
    FinishResult,
    Outcome,
    ReferenceFact,
    RetryPolicy,
)
from enrichment_assets.hydration.client import Fetched
from enrichment_assets.hydration.paths import MalformedField, extract_ids
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.propagation import affected_roots
from enrichment_assets.policy import EffectivePolicy, Policy

Trail = tuple[EntityKey, ...]
# Bodies fetched and not stored yet, by entity; see ``Walker``.
PendingHydrations = dict[EntityKey, dict[str, Any]]


@dataclass
class WalkReport:
    """What one walk over a claimed batch did; the Dagster assets turn it into metadata."""

    entity_type: str
    claimed: int = 0
    fetched: int = 0
    cache_hits: int = 0
    # Due entities fetched ahead of their own claim to fill a part-full batch request.
    prefetched: int = 0
    errors_by_source: Counter[str] = field(default_factory=Counter)
    result: FinishResult = field(default_factory=FinishResult)
    # Roots that were processed plus both ends of every asserted or retracted edge: what search
    # has to re-index.
    changed: set[EntityKey] = field(default_factory=set)
    # Settled roots made due again because an entity on their paths changed at its source.
    propagated: int = 0

    def absorb(self, other: WalkReport) -> None:
        """Add another batch's report of the same type into this one."""
        self.claimed += other.claimed
        self.fetched += other.fetched
        self.cache_hits += other.cache_hits
        self.prefetched += other.prefetched
        self.propagated += other.propagated
        self.errors_by_source.update(other.errors_by_source)
        self.changed |= other.changed
        mine, theirs = self.result, other.result
        self.result = FinishResult(
            **{
                name: getattr(mine, name) + getattr(theirs, name)
                for name in (
                    "enriched",
                    "partial",
                    "failed",
                    "quarantined",
                    "deferred",
                    "deleted",
                    "superseded",
                    "lost",
                    "edge_changes",
                    "edges_confirmed",
                    "attributes_changed",
                )
            }
        )


@dataclass
class Walk:
    """A walked batch before it is settled: each root's outcome, the hop entities it fetched and their
    references (stored by ``Walker.record``), and, once recorded, the hops whose stored attributes it
    changed (their other referrers must be re-walked)."""

    entity_type: str
    outcomes: list[Outcome]
    report: WalkReport
    changed_hops: tuple[EntityKey, ...] = ()
    hops: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    references: dict[EntityKey, list[ReferenceFact]] = field(default_factory=dict)


@dataclass
class _RootState:
    claim: Claim
    edges: dict[tuple[str, str, str], DerivedEdge] = field(default_factory=dict)
    waiting_on: set[EntityKey] = field(default_factory=set)
    error: str | None = None
    unavailable: str | None = None


class Walker:
    """Walks one entity type's policy paths for a batch of claims.

    A batch goes through three stages: ``walk`` (source calls only), ``record`` (the hops' hydrations and
    references stored) and ``settle`` (the roots' outcomes and edges). A driver may walk the next batch
    while the previous one is recorded and settled; hops a walk fetched are reused by the walks after it
    until they are recorded, so overlapping batches call a source no more often than sequential ones.
    A walker without a pool (``pool=None``) can only record and settle.

    ``pending`` holds what walks fetched and the store does not hold yet (hops until recorded, roots until
    settled); later walks reuse it as if read from the store. Walkers that share one (the steps of one run,
    the rounds of one cycle) fetch an entity once even when one type's roots are another's hops and every
    branch walks before any settles.
    """

    # Beyond this many bodies waiting to be stored, walks stop adding to ``pending`` (they fetch instead).
    MAX_PENDING = 100_000

    def __init__(
        self, store: FactStore, policy: Policy, pool: SourcePool | None, *, pending: PendingHydrations | None = None
    ) -> None:
        self.store = store
        self.policy = policy
        self._pool = pool
        self._pending: PendingHydrations = {} if pending is None else pending

    @property
    def pool(self) -> SourcePool:
        if self._pool is None:
            raise RuntimeError("this walker has no source pool: it only records and settles walks")
        return self._pool

    async def run(self, entity_type: str, claims: Sequence[Claim], *, owner: str) -> WalkReport:
        """Walk a claimed batch, record and settle it: the whole enrichment of one batch."""
        walk = await self.walk(entity_type, claims)
        await self.record(walk)
        return await self.settle(walk, owner=owner)

    async def walk(self, entity_type: str, claims: Sequence[Claim]) -> Walk:
        """Hydrate the claimed roots and every hop of their paths and decide each root's outcome.
        Nothing is written: ``record`` stores the hops, ``settle`` the roots."""
        effective = self.policy.effective(entity_type)
        report = WalkReport(entity_type, claimed=len(claims))
        memo: dict[EntityKey, Fetched] = {}
        roots = {c.key: _RootState(c) for c in claims if c.state != "deleted"}
        await self._hydrate(entity_type, [k[1] for k in roots], memo, report)
        for key, state in roots.items():
            self._classify(state, key, memo[key])
        await self._walk(effective, roots, memo, report)

        hops = [
            (t, i, f.body)
            for (t, i), f in memo.items()
            if f.status == "found" and f.body is not None and (t, i) not in roots and not isinstance(f, _Reused)
        ]
        fetched_roots = [
            (k, memo[k].body) for k in roots if memo[k].status == "found" and not isinstance(memo[k], _Reused)
        ]
        if len(self._pending) < self.MAX_PENDING:
            self._pending.update(((t, i), body) for t, i, body in hops)
            self._pending.update((key, body) for key, body in fetched_roots if body is not None)
        now = self.store.now()
        outcomes = [self._outcome(state, memo[key], now) for key, state in roots.items()]
        outcomes += [Outcome.of(c, "deleted") for c in claims if c.state == "deleted"]
        return Walk(entity_type, outcomes, report, hops=hops, references=self._references(memo))

    async def record(self, walk: Walk, *, exclude: Iterable[EntityKey] = ()) -> None:
        """Store a walk's hop hydrations and references, then make due again the settled roots whose
        paths went through a hop whose attributes changed (other than the walk's roots and ``exclude``)."""
        changed = await asyncio.to_thread(self.store.record_walk, walk.hops, walk.references)
        for entity_type, entity_id, _ in walk.hops:
            self._pending.pop((entity_type, entity_id), None)
        walk.changed_hops = tuple(changed)
        if changed:
            stale = await asyncio.to_thread(affected_roots, self.store, self.policy, changed)
            skip = {o.key for o in walk.outcomes} | set(exclude)
            walk.report.propagated += await asyncio.to_thread(self.store.mark_dirty, stale - skip)

    async def settle(self, walk: Walk, *, owner: str) -> WalkReport:
        """Store a recorded walk's outcomes with their edges and release the claims (one transaction),
        then make the settled roots whose paths went through a root whose attributes changed due again."""
        effective = self.policy.effective(walk.entity_type)
        retry = RetryPolicy(
            max_attempts=effective.max_attempts,
            base_delay=effective.retry_base_delay,
            max_delay=effective.retry_max_delay,
        )
        report = walk.report
        report.result = await asyncio.to_thread(self.store.finish, owner, walk.outcomes, retry)
        roots = {o.key for o in walk.outcomes}
        for key in roots:
            self._pending.pop(key, None)
        changed = list(report.result.attributes_changed)
        if changed:
            stale = await asyncio.to_thread(affected_roots, self.store, self.policy, changed)
            report.propagated += await asyncio.to_thread(self.store.mark_dirty, stale - roots)
        report.changed = roots - set(report.result.lost)
        for change in report.result.edge_changes:
            report.changed.update(change.ends)
        return report

    async def _hydrate(
        self, entity_type: str, ids: Sequence[str], memo: dict[EntityKey, Fetched], report: WalkReport
    ) -> None:
        needed = [i for i in dict.fromkeys(ids) if (entity_type, i) not in memo]
        if not needed:
            return
        ttl = self.policy.effective(entity_type).hydration_ttl
        pending = {i: self._pending[(entity_type, i)] for i in needed if (entity_type, i) in self._pending}
        fresh = pending | await asyncio.to_thread(
            self.store.fresh_attributes, entity_type, [i for i in needed if i not in pending], ttl
        )
        for entity_id, attributes in fresh.items():
            memo[(entity_type, entity_id)] = _Reused("found", attributes)
        report.cache_hits += len(fresh)
        rest = [i for i in needed if i not in fresh]
        fillers = await self._fillers(entity_type, rest, memo)
        fetched = await self.pool.fetch(entity_type, [*rest, *fillers])
        report.fetched += len(rest)
        report.prefetched += len(fillers)
        opportunistic = set(fillers)
        for entity_id, result in fetched.items():
            memo[(entity_type, entity_id)] = result
            if result.status in ("error", "unavailable") and entity_id not in opportunistic:
                report.errors_by_source[self.policy.entity_types[entity_type].source] += 1

    async def _fillers(self, entity_type: str, ids: list[str], memo: dict[EntityKey, Fetched]) -> list[str]:
        """Due entities of the type to top up the last, part-full batch request for ``ids``.

        The request is made anyway, so the extra ids cost no call; their hydrations are stored with
        the walk's other hops and reused while fresh when their own claim comes, which then needs
        no call for them. Without this, every hop of every claimed batch ends in a part-full request.
        """
        spare = self.pool.spare_slots(entity_type, len(ids))
        if not spare:
            return []
        exclude = [*ids, *(i for t, i in memo if t == entity_type)]
        ttl = self.policy.effective(entity_type).hydration_ttl
        return await asyncio.to_thread(self.store.prefetchable, entity_type, limit=spare, exclude=exclude, ttl=ttl)

    async def _walk(
        self,
        effective: EffectivePolicy,
        roots: dict[EntityKey, _RootState],
        memo: dict[EntityKey, Fetched],
        report: WalkReport,
    ) -> None:
        # frontier[(root, rule index)] = trails from the root whose last entity was found
        frontier: dict[tuple[EntityKey, int], list[Trail]] = {
            (key, index): [(key,)]
            for key, state in roots.items()
            if state.error is None and state.unavailable is None and memo[key].status == "found"
            for index in range(len(effective.edges))
        }
        done: dict[tuple[EntityKey, int], list[Trail]] = {}
        depth = max((len(rule.path) for rule in effective.edges), default=0)
        for level in range(depth):
            expanded: dict[tuple[EntityKey, int], list[Trail]] = {}
            needed: dict[str, list[str]] = {}
            for (root, index), trails in frontier.items():
                hop = effective.edges[index].path[level]
                state = roots[root]
                for trail in trails:
                    reference = self.policy.entity_types[trail[-1][0]].references[hop]
                    try:
                        ids = extract_ids(memo[trail[-1]].body or {}, reference.field)
                    except MalformedField as error:
                        state.error = state.error or f"{trail[-1][0]} {trail[-1][1]}: {error}"
                        continue
                    for target in ids:
                        expanded.setdefault((root, index), []).append((*trail, (reference.type, target)))
                        needed.setdefault(reference.type, []).append(target)
            await asyncio.gather(*(self._hydrate(t, ids, memo, report) for t, ids in needed.items()))
            frontier = {}
            for (root, index), trails in expanded.items():
                last_hop = level + 1 == len(effective.edges[index].path)
                for trail in trails:
                    if self._classify(roots[root], trail[-1], memo[trail[-1]]):
                        (done if last_hop else frontier).setdefault((root, index), []).append(trail)
        for (root, index), trails in done.items():
            relation = effective.edges[index].relation
            for trail in trails:
                dst_type, dst_id = trail[-1]
                roots[root].edges.setdefault(
                    (relation, dst_type, dst_id), DerivedEdge(relation, dst_type, dst_id, trail)
                )

    @staticmethod
    def _classify(state: _RootState, key: EntityKey, fetched: Fetched) -> bool:
        """Fold one fetched entity into its root's state; True if the walk can go on through it."""
        if fetched.status == "found":
            return True
        if fetched.status == "missing":
            state.waiting_on.add(key)
        elif fetched.status == "unavailable":
            state.unavailable = state.unavailable or fetched.error
        else:
            state.error = state.error or f"{key[0]} {key[1]}: {fetched.error}"
        return False

    def _outcome(self, state: _RootState, root: Fetched, now: Any) -> Outcome:
        claim = state.claim
        # A hydration reused from the store is not re-stored: hydrated_at keeps saying when the
        # source was last asked.
        attributes = root.body if root.status == "found" and not isinstance(root, _Reused) else None
        if state.error:
            return Outcome.of(claim, "failed", attributes=attributes, error=state.error)
        if state.unavailable:
            source = self.pool.client_for(claim.entity_type)
            wait = max(source.breaker.reset_seconds, 5.0)
            return Outcome.of(
                claim,
                "deferred",
                attributes=attributes,
                error=state.unavailable,
                retry_at=now + timedelta(seconds=wait),
            )
        edges = tuple(state.edges.values())
        if state.waiting_on:
            return Outcome.of(
                claim, "partial", attributes=attributes, edges=edges, waiting_on=tuple(sorted(state.waiting_on))
            )
        return Outcome.of(claim, "enriched", attributes=attributes, edges=edges)

    def _references(self, memo: dict[EntityKey, Fetched]) -> dict[EntityKey, list[ReferenceFact]]:
        """Every declared 1-hop reference of every entity found; resolved when its target was found."""
        facts: dict[EntityKey, list[ReferenceFact]] = {}
        for key, fetched in memo.items():
            if fetched.status != "found" or fetched.body is None:
                continue
            for name, reference in self.policy.entity_types[key[0]].references.items():
                try:
                    ids = extract_ids(fetched.body, reference.field)
                except MalformedField:
                    continue
                for target in ids:
                    target_key = (reference.type, target)
                    resolved = target_key in memo and memo[target_key].status == "found"
                    facts.setdefault(key, []).append(ReferenceFact(name, reference.type, target, resolved))
            facts.setdefault(key, [])
        return facts


@dataclass(frozen=True)
class _Reused(Fetched):
    """A hydration reused from the fact store (not re-stored, not counted as a source call)."""

    reused: bool = True
