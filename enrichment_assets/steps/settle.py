"""Settle: store the walked roots' outcomes and derived edges, and release their leases."""

from __future__ import annotations

from collections.abc import Sequence

from enrichment_assets.factstore import FactStore, Outcome
from enrichment_assets.hydration.walker import PendingHydrations, Walk, Walker, WalkReport
from enrichment_assets.policy import Policy


async def settle_outcomes(
    store: FactStore,
    policy: Policy,
    entity_type: str,
    outcomes: Sequence[Outcome],
    *,
    owner: str,
    batch_size: int = 500,
    pending: PendingHydrations | None = None,
) -> WalkReport:
    """One transaction per ``batch_size`` outcomes: states, attributes, edges asserted, confirmed or
    retracted (history kept), leases released. Settling never calls a source."""
    walker = Walker(store, policy, None, pending=pending)
    report = WalkReport(entity_type, claimed=len(outcomes))
    for start in range(0, len(outcomes), batch_size):
        batch = list(outcomes[start : start + batch_size])
        report.absorb(await walker.settle(Walk(entity_type, batch, WalkReport(entity_type)), owner=owner))
    return report
