"""``enrichment enrich-once``: the claim → walk → settle → index loop outside Dagster, in one process or in
worker processes that share the fact store's leases and the sources' limits.

A round claims one batch, walks it (its hops recorded as they arrive) and hands it to a background task
that settles and indexes it while the next round claims and walks: the sources and the fact store work
at the same time instead of taking turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.walker import PendingHydrations, WalkReport
from enrichment_assets.policy import Policy
from enrichment_assets.search.index import SearchIndex
from enrichment_assets.search.sync import IndexReport
from enrichment_assets.steps.claim import claim_candidates, lease_owner
from enrichment_assets.steps.index import index_changes
from enrichment_assets.steps.settle import settle_outcomes
from enrichment_assets.steps.walk import walk_claims


@dataclass
class CycleResult:
    """What a cycle did: a report per type, per-source call stats, and what it indexed (None: no index).
    Unpacks as ``reports, sources, indexed``."""

    reports: list[WalkReport]
    sources: dict[str, dict[str, Any]]
    indexed: IndexReport | None = None
    # Entities each worker claimed (one entry per worker process).
    claimed_per_worker: tuple[int, ...] = ()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.reports, self.sources, self.indexed))


async def enrich_type(
    store: FactStore,
    policy: Policy,
    pool: SourcePool,
    entity_type: str,
    *,
    owner: str,
    batch_size: int = 500,
    lease: timedelta = timedelta(minutes=10),
    window: tuple[datetime, datetime] | None = None,
    refresh: bool = True,
    max_batches: int | None = None,
    index: SearchIndex | None = None,
    indexed: IndexReport | None = None,
    pending: PendingHydrations | None = None,
) -> WalkReport:
    """Claim, walk, settle and index due entities of one type, a batch per round, until none are due."""
    report = WalkReport(entity_type)
    settling: asyncio.Task[None] | None = None
    pending = {} if pending is None else pending

    async def settle_and_index(outcomes: list[Any]) -> None:
        settled = await settle_outcomes(
            store, policy, entity_type, outcomes, owner=owner, batch_size=batch_size, pending=pending
        )
        report.absorb(settled)
        if index is not None:
            step = await asyncio.to_thread(index_changes, store, policy, index, settled.changed)
            if indexed is not None:
                indexed.merge(step.total)

    rounds = 0
    try:
        while max_batches is None or rounds < max_batches:
            claims = await asyncio.to_thread(
                claim_candidates,
                store,
                policy,
                entity_type,
                owner=owner,
                lease=lease,
                limit=batch_size,
                batch_size=batch_size,
                window=window,
                refresh=refresh,
            )
            if not claims:
                break
            walks = await walk_claims(
                store,
                policy,
                pool,
                entity_type,
                claims,
                owner=owner,
                batch_size=batch_size,
                lease=lease,
                pending=pending,
            )
            for walk in walks:
                report.fetched += walk.report.fetched
                report.cache_hits += walk.report.cache_hits
                report.prefetched += walk.report.prefetched
                report.propagated += walk.report.propagated
                report.errors_by_source.update(walk.report.errors_by_source)
            if settling is not None:
                await settling
            settling = asyncio.create_task(settle_and_index([o for w in walks for o in w.outcomes]))
            rounds += 1
    finally:
        if settling is not None:
            await settling
    return report


async def enrich_cycle(
    store: FactStore,
    policy: Policy,
    pool: SourcePool,
    *,
    owner: str,
    entity_types: Iterable[str] | None = None,
    **kwargs: Any,
) -> list[WalkReport]:
    """Wake waiters, then enrich each type in priority order (high first, so the entities a
    higher-level walk hydrates on its way are fresh when their own type's turn comes)."""
    await asyncio.to_thread(store.wake_waiters)
    chosen = sorted(entity_types or policy.entity_types, key=lambda t: (-policy.effective(t).priority, t))
    return [await enrich_type(store, policy, pool, t, owner=owner, **kwargs) for t in chosen]


def enrich_once(
    store: FactStore,
    policy: Policy,
    *,
    index: SearchIndex | None = None,
    owner: str | None = None,
    **kwargs: Any,
) -> CycleResult:
    """One cycle in this process with a fresh source pool: the reports per type, per-source stats and,
    with an ``index``, what was indexed."""
    return _run_cycle(store, policy, index=index, owner=owner or lease_owner(), **kwargs)


def _run_cycle(
    store: FactStore, policy: Policy, *, index: SearchIndex | None, owner: str, **kwargs: Any
) -> CycleResult:
    indexed = IndexReport() if index is not None else None

    async def run() -> CycleResult:
        async with SourcePool(policy, store=store) as pool:
            reports = await enrich_cycle(
                store, policy, pool, owner=owner, index=index, indexed=indexed, pending={}, **kwargs
            )
            return CycleResult(reports, pool.stats(), indexed)

    return asyncio.run(run())


def enrich_with_workers(
    database_url: str,
    policy: Policy,
    *,
    workers: int,
    elasticsearch_url: str | None = None,
    index_alias: str | None = None,
    **kwargs: Any,
) -> CycleResult:
    """Run one cycle in ``workers`` processes at once (each its own fact store connections and source
    pool), and add up what they did. Claims keep the workers apart; on PostgreSQL the sources' limits
    are shared by all of them through the fact store. Needs a PostgreSQL fact store."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as processes:
        args = (database_url, policy, elasticsearch_url, index_alias, kwargs)
        running = [processes.apply_async(_worker, args) for _ in range(workers)]
        # Every worker finishes its cycle even when another fails: ending the pool early would kill them
        # mid-walk and leave their entities leased until the leases ran out.
        results, failures = [], []
        for worker in running:
            try:
                results.append(worker.get())
            except Exception as error:  # a worker's failure, pickled back
                failures.append(f"{type(error).__name__}: {error}")
    if failures:
        raise WorkersFailed(failures, _merge(results) if results else None)
    return _merge(results)


class WorkersFailed(RuntimeError):
    """Some workers failed (their leases were given back); ``partial`` is what the others did."""

    def __init__(self, failures: list[str], partial: CycleResult | None) -> None:
        super().__init__(f"{len(failures)} worker(s) failed: {failures[0]}")
        self.failures = failures
        self.partial = partial


def _worker(
    database_url: str, policy: Policy, elasticsearch_url: str | None, index_alias: str | None, kwargs: dict[str, Any]
) -> CycleResult:
    store = FactStore.from_url(database_url)
    index = SearchIndex.from_url(elasticsearch_url, alias=index_alias) if elasticsearch_url else None
    owner = lease_owner()
    try:
        return _run_cycle(store, policy, index=index, owner=owner, **kwargs)
    except BaseException:
        # What it still held goes to the next cycle at once; if the store itself is what failed, the leases
        # expire instead.
        with contextlib.suppress(Exception):
            store.release_owners([owner])
        raise
    finally:
        store.dispose()
        if index is not None:
            index.close()


def _merge(results: list[CycleResult]) -> CycleResult:
    by_type: dict[str, WalkReport] = {}
    sources: dict[str, dict[str, Any]] = {}
    indexed = IndexReport() if any(r.indexed is not None for r in results) else None
    for result in results:
        for report in result.reports:
            by_type.setdefault(report.entity_type, WalkReport(report.entity_type)).absorb(report)
        for name, stats in result.sources.items():
            total = sources.setdefault(name, {})
            for key, value in stats.items():
                if isinstance(value, bool):
                    total[key] = total.get(key, False) or value
                elif isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
                elif isinstance(value, dict):
                    merged = total.setdefault(key, {})
                    for k, v in value.items():
                        merged[k] = merged.get(k, 0) + v
        if result.indexed is not None and indexed is not None:
            indexed.merge(result.indexed)
    claimed = tuple(sum(r.claimed for r in result.reports) for result in results)
    return CycleResult(list(by_type.values()), sources, indexed, claimed_per_worker=claimed)
