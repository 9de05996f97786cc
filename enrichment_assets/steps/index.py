"""Index: bring the search documents of what a worker changed up to date, then drain the outbox."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.policy import Policy
from enrichment_assets.search.index import SearchIndex
from enrichment_assets.search.sync import IndexReport, sync_changed


@dataclass
class IndexStep:
    """What one index step wrote: its own documents first (``own``), then, if no other worker was
    draining, the rest of the outbox; ``total`` is both together."""

    own: IndexReport
    drained_here: bool
    total: IndexReport = field(default_factory=IndexReport)


def index_changes(store: FactStore, policy: Policy, index: SearchIndex, keys: Iterable[EntityKey]) -> IndexStep:
    """Write the documents of ``keys`` (the roots a worker settled and both ends of every edge it changed)
    with external versions, so an older write never overwrites a newer one; then drain the rest of the
    outbox, one drain at a time across all workers (a lock in the fact store): a worker that finds
    another draining leaves the rest to it. A document that fails stays in the outbox for the next drain."""
    own, drained = sync_changed(store, policy, index, keys)
    total = IndexReport().merge(own)
    if drained is not None:
        total.merge(drained)
    return IndexStep(own, drained is not None, total)
