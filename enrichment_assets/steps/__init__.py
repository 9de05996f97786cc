"""The enrichment loop as plain functions: claim, walk, settle, index. Both drivers call them: the Dagster
assets (``defs/branch.py``, one step per asset) and ``enrichment enrich-once`` (``steps/cycle.py``, all
four per batch, with worker processes)."""

from enrichment_assets.steps.claim import claim_candidates, lease_owner
from enrichment_assets.steps.index import IndexStep, index_changes
from enrichment_assets.steps.settle import settle_outcomes
from enrichment_assets.steps.walk import walk_claims

__all__ = ["IndexStep", "claim_candidates", "index_changes", "lease_owner", "settle_outcomes", "walk_claims"]
