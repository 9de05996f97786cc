"""Search: the entity index, incremental sync from the fact store's outbox, rebuilds, reconciliation."""

from enrichment_assets.search.documents import build_document, document_id, search_state
from enrichment_assets.search.index import DEFAULT_ALIAS, Action, SearchIndex, WriteResult
from enrichment_assets.search.reconcile import ReconcileReport, reconcile
from enrichment_assets.search.sync import IndexReport, actions_for, rebuild_index, sync_changed, sync_index

__all__ = [
    "DEFAULT_ALIAS",
    "Action",
    "IndexReport",
    "ReconcileReport",
    "SearchIndex",
    "WriteResult",
    "actions_for",
    "build_document",
    "document_id",
    "rebuild_index",
    "reconcile",
    "search_state",
    "sync_changed",
    "sync_index",
]
