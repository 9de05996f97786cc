"""Every key, tag and name the code location gives Dagster, in one place: the branch factory, the sensor,
the schedules and the checks import them from here rather than from each other."""

from __future__ import annotations

import dagster as dg

from enrichment_assets.policy import Policy

# Run tags.
MODE_TAG = "enrichment/mode"
TRIGGER_TAG = "enrichment/trigger"
# On a run of ENRICHMENT_JOB: the entity types it enriches, comma-separated.
TYPES_TAG = "enrichment/types"
# On a sensor run: which of a type's parallel runs it is (0 .. ENRICHMENT_MAX_RUNS_PER_TYPE - 1).
SLOT_TAG = "enrichment/slot"
INCREMENTAL = "incremental"
RECOMPUTE = "recompute"

# A branch's assets, keyed [entity type, step].
BRANCH_STEPS = ("candidates", "hydrated", "edges", "index_updates")
SEARCH_INDEX_KEY = dg.AssetKey(["search", "entities"])

# The job the sensor launches: every branch, partitioned alike; a run selects the branches with due work.
ENRICHMENT_JOB = "enrichment"
CHECKS_JOB = "enrichment_checks"
SENSOR_NAME = "uncached_entities_sensor"


def branch_types(policy: Policy) -> list[str]:
    """The entity types that get a branch: those with a policy."""
    return sorted(policy.policies)


def source_key(system: str) -> dg.AssetKey:
    return dg.AssetKey(["sources", system])


def step_key(entity_type: str, step: str) -> dg.AssetKey:
    return dg.AssetKey([entity_type, step])


def job_name(entity_type: str) -> str:
    return f"{entity_type}_enrichment"


def due_tag(entity_type: str) -> str:
    """The tag naming the due set a run was asked for, per type (the pair's run key)."""
    return f"enrichment/due.{entity_type}"


# How many due entities one incremental run claims at most (its candidates' default ``limit``): the sensor
# asks for another run of a type for every this many due.
RUN_CLAIM_LIMIT = 5000
