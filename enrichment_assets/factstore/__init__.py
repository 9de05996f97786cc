"""The fact store: the system of record for the graph, and the claim-and-process queue."""

from enrichment_assets.factstore.models import (
    Claim,
    DerivedEdge,
    DueWork,
    EdgeChange,
    EntityKey,
    EntityRecord,
    FinishResult,
    IngestResult,
    Outcome,
    ReferenceFact,
    RetryPolicy,
    Staleness,
    TypeStatus,
)
from enrichment_assets.factstore.schema import EntityState
from enrichment_assets.factstore.store import ClaimError, FactStore

__all__ = [
    "Claim",
    "DerivedEdge",
    "EdgeChange",
    "ClaimError",
    "DueWork",
    "EntityKey",
    "EntityRecord",
    "EntityState",
    "FactStore",
    "FinishResult",
    "IngestResult",
    "Outcome",
    "ReferenceFact",
    "RetryPolicy",
    "Staleness",
    "TypeStatus",
]
