"""Claim: lease a type's candidates to one worker."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from enrichment_assets.factstore import Claim, FactStore
from enrichment_assets.policy import Policy


def lease_owner() -> str:
    """The owner name of a worker outside Dagster: host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_candidates(
    store: FactStore,
    policy: Policy,
    entity_type: str,
    *,
    owner: str,
    lease: timedelta,
    limit: int | None,
    batch_size: int = 500,
    window: tuple[datetime, datetime] | None = None,
    refresh: bool = True,
    recompute: bool = False,
) -> list[Claim]:
    """Lease up to ``limit`` due candidates of a type (``limit=None``: all of them), ``batch_size`` per
    statement. Due means uncached, partial and due for retry, a tombstone, or, with ``refresh``, last
    enriched longer ago than the type's refresh interval. ``recompute`` leases every entity of
    ``window`` whatever its state (a backfill). Leases keep concurrent workers apart."""
    refresh_before = store.now() - policy.effective(entity_type).refresh_interval if refresh else None
    claims: list[Claim] = []
    while limit is None or len(claims) < limit:
        want = batch_size if limit is None else min(batch_size, limit - len(claims))
        batch = store.claim(
            entity_type,
            limit=want,
            owner=owner,
            lease=lease,
            window=window,
            refresh_before=refresh_before,
            force=recompute,
        )
        claims += batch
        if len(batch) < want:
            break
    return claims
