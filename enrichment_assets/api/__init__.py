"""The ingest and read HTTP API."""

from enrichment_assets.api.app import create_app

__all__ = ["create_app"]
