"""Async graph enrichment as a Dagster code location."""

__version__ = "0.1.0"
