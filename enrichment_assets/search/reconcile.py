"""Reconciliation: does the index agree with the fact store, and if not, make it.

The quick check compares counts per type and the versions of a random sample; ``exact`` compares
every document. Repair puts missing and stale entities back in the outbox, deletes documents the
store does not have (or has as tombstones), and syncs.

A document can also be *ahead* of the store: its version is higher than the store's, which happens
when the store's versions went back (a restore from backup, a store rebuilt beside an old index).
External versioning then refuses every write of that entity as superseded, so search would serve the
old document forever while the sync believes it current. Repair deletes such documents (a delete
without a version) before writing them again at the store's version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.policy import Policy
from enrichment_assets.search.documents import document_id
from enrichment_assets.search.index import SearchIndex
from enrichment_assets.search.sync import IndexReport, sync_index


@dataclass
class ReconcileReport:
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # type -> (fact store, index)
    checked: int = 0
    missing: list[EntityKey] = field(default_factory=list)
    stale: list[EntityKey] = field(default_factory=list)
    ahead: list[EntityKey] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    repaired: IndexReport | None = None

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.stale or self.ahead or self.extra) and all(
            a == b for a, b in self.counts.values()
        )


def reconcile(
    store: FactStore,
    index: SearchIndex,
    policy: Policy,
    *,
    exact: bool = False,
    sample: int = 200,
    repair: bool = False,
    rng: random.Random | None = None,
) -> ReconcileReport:
    index.refresh()
    report = ReconcileReport()
    expected: dict[str, tuple[EntityKey, int]] = {}
    store_counts: dict[str, int] = {}
    tombstones: set[str] = set()
    for etype, eid, version, state in store.document_versions():
        doc_id = document_id(etype, eid)
        if state == "deleted":
            tombstones.add(doc_id)
            continue
        expected[doc_id] = ((etype, eid), version)
        store_counts[etype] = store_counts.get(etype, 0) + 1
    indexed_counts = index.counts_by_type()
    report.counts = {
        t: (store_counts.get(t, 0), indexed_counts.get(t, 0)) for t in sorted(set(store_counts) | set(indexed_counts))
    }
    if exact:
        indexed = dict(index.all_versions())
        report.extra = sorted(d for d in indexed if d not in expected)
        checked = list(expected)
    else:
        checked = (rng or random.Random()).sample(sorted(expected), min(sample, len(expected)))
        indexed = index.versions(checked)
        report.extra = sorted(d for d in index.versions(sorted(tombstones)[:sample]))
    report.checked = len(checked)
    for doc_id in checked:
        key, version = expected[doc_id]
        if doc_id not in indexed:
            report.missing.append(key)
        elif indexed[doc_id] < version:
            report.stale.append(key)
        elif indexed[doc_id] > version:
            report.ahead.append(key)
    if report.ahead:
        # A drain may have written a newer version since the store was read: ahead only if still so.
        now = store.document_versions_of(report.ahead)
        report.ahead = [k for k in report.ahead if indexed[document_id(*k)] > now.get(k, 0)]
    if repair and not report.in_sync:
        index.delete_documents([document_id(*k) for k in report.ahead] + report.extra)
        store.requeue_for_index(report.missing + report.stale + report.ahead)
        report.repaired = sync_index(store, policy, index)
        index.refresh()
    return report
