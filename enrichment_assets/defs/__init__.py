"""The code location: a thin Dagster adapter over the enrichment steps."""
