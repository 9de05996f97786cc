"""Walk: hydrate claimed entities and every hop of their policy paths, batch after batch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import timedelta

from enrichment_assets.factstore import Claim, FactStore
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.walker import PendingHydrations, Walk, Walker
from enrichment_assets.policy import Policy


async def walk_claims(
    store: FactStore,
    policy: Policy,
    pool: SourcePool,
    entity_type: str,
    claims: Sequence[Claim],
    *,
    owner: str,
    batch_size: int = 500,
    lease: timedelta = timedelta(minutes=30),
    progress: Callable[[int, int], None] | None = None,
    pending: PendingHydrations | None = None,
) -> list[Walk]:
    """Walk ``claims`` in batches and record each batch's hops; the roots are left to ``settle_outcomes``.

    Batch ``i + 1`` is fetched while batch ``i``'s hops are written, so the slower of the sources and the
    fact store sets the pace, not their sum. Each batch renews the leases of the claims still ahead of it.
    If anything fails, every lease is given back untried, so the next run takes them at once. ``pending``
    (see ``Walker``) is shared with the other walks and settles of one run or cycle.
    """
    walker = Walker(store, policy, pool, pending=pending)
    keys = [c.key for c in claims]
    walks: list[Walk] = []
    recording: asyncio.Task[None] | None = None
    try:
        for start in range(0, len(claims), batch_size):
            await asyncio.to_thread(store.renew, owner, keys[start:], lease)
            walk = await walker.walk(entity_type, claims[start : start + batch_size])
            if recording is not None:
                await recording
            recording = asyncio.create_task(walker.record(walk, exclude=keys))
            walks.append(walk)
            if progress is not None:
                progress(min(start + batch_size, len(claims)), len(claims))
        if recording is not None:
            await recording
    except BaseException:
        if recording is not None and not recording.done():
            recording.cancel()
        await asyncio.to_thread(store.release, owner, keys)
        raise
    return walks
