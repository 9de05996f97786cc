"""One enrichment cycle: wake forward-reference waiters, then claim and walk every type's due work."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from datetime import datetime, timedelta

from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.walker import Walker, WalkReport
from enrichment_assets.policy import Policy


def default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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
) -> WalkReport:
    """Claim and walk due entities of one type, batch after batch, until none are due."""
    walker = Walker(store, policy, pool)
    report = WalkReport(entity_type)
    refresh_before = store.now() - policy.effective(entity_type).refresh_interval if refresh else None
    batches = 0
    while max_batches is None or batches < max_batches:
        claims = await asyncio.to_thread(
            store.claim, entity_type, limit=batch_size, owner=owner, lease=lease, window=window,
            refresh_before=refresh_before,
        )
        if not claims:
            break
        report.absorb(await walker.run(entity_type, claims, owner=owner))
        batches += 1
    return report


async def enrich_cycle(
    store: FactStore,
    policy: Policy,
    pool: SourcePool,
    *,
    owner: str,
    entity_types: Iterable[str] | None = None,
    **kwargs: object,
) -> list[WalkReport]:
    """Wake waiters, then enrich each type in priority order (high first, so the entities a
    higher-level walk hydrates on its way are fresh when their own type's turn comes)."""
    await asyncio.to_thread(store.wake_waiters)
    chosen = sorted(entity_types or policy.entity_types, key=lambda t: (-policy.effective(t).priority, t))
    return [await enrich_type(store, policy, pool, t, owner=owner, **kwargs) for t in chosen]  # type: ignore[arg-type]


def enrich_once(store: FactStore, policy: Policy, **kwargs: object) -> tuple[list[WalkReport], dict[str, dict]]:
    """Run one cycle in-process with a fresh source pool; returns the reports and per-source stats."""

    async def run() -> tuple[list[WalkReport], dict[str, dict]]:
        async with SourcePool(policy) as pool:
            reports = await enrich_cycle(store, policy, pool, owner=str(kwargs.pop("owner", default_owner())), **kwargs)
            return reports, pool.stats()

    return asyncio.run(run())
