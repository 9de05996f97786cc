"""Assets. The per-entity-type branch factory grows here; for now, the fact store's own summary."""

from enrichment_assets.assets.fact_store import fact_store_summary

__all__ = ["fact_store_summary"]
