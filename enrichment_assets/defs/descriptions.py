"""What the Dagster UI says about each asset of a branch, apart from what the assets do."""

from __future__ import annotations

from enrichment_assets.policy import Policy


def _relations(policy: Policy, entity_type: str) -> str:
    rules = policy.effective(entity_type).edges
    return ", ".join(f"`{rule.relation}` via {' -> '.join(rule.path)}" for rule in rules) or "none"


def candidates(policy: Policy, entity_type: str) -> str:
    return f"""{entity_type} entities this run enriches, leased from the fact store's claim queue.

Incremental runs (the sensor, the schedules) take the due ones first seen in the partition: uncached,
partially resolved and due for retry, tombstones, and those last enriched more than
{policy.effective(entity_type).refresh_interval} ago. Several runs of one partition may run at once:
leases keep them apart. Any other run (a backfill, Materialize in the UI) recomputes the whole
partition. Leases expire if the run dies, so its entities are picked up again."""


def hydrated(policy: Policy, entity_type: str) -> str:
    effective = policy.effective(entity_type)
    return f"""The candidates hydrated from {policy.entity_types[entity_type].source}, with every hop of their
policy paths ({_relations(policy, entity_type)}).

Each hop is fetched for the whole batch at once, de-duplicated, and reused from the fact store while
younger than {effective.hydration_ttl}; the next batch is fetched while the last one's hops are written.
Every source's requests/second and concurrency are shared by all runs on all machines (a budget in the
fact store's PostgreSQL); requests are retried with backoff, and deferred (not failed) while a source's
circuit is open. Hop entities are stored here; the roots' outcomes are settled by `{entity_type}/edges`."""


def edges(policy: Policy, entity_type: str) -> str:
    return f"""Derived edges of {entity_type} ({_relations(policy, entity_type)}) written to the fact store
with their paths as provenance, and the candidates' new states, in one transaction per batch.

An enriched entity's edges that no longer hold are retracted (history kept); a partially resolved one
keeps what it had and waits for its forward references; an entity whose source answered differently
than before makes every entity whose path went through it due again. Rows: the edge changes."""


def index_updates(policy: Policy, entity_type: str) -> str:
    budget = policy.effective(entity_type).staleness_budget
    return f"""Search documents brought up to date: both ends of every changed edge, the
partition's own entities, and anything else waiting in the search outbox, written with external
versions so an older write never overwrites a newer one. The run's own {entity_type} documents are
written first, so they are searchable without queueing behind anything; then the rest of the outbox is
drained, one drain at a time across all runs (a lock in the fact store): a run that finds another
draining leaves the rest to it.

Its freshness policy fails when no {entity_type} enrichment has completed within the type's staleness
budget ({budget}); the `staleness_budget` check holds each entity to that budget."""


def source(policy: Policy, name: str) -> str:
    spec = policy.sources[name]
    owned = len([t for t in policy.entity_types.values() if t.source == name])
    return (
        f"The {name} API: {owned} entity type(s), at most {spec.requests_per_second:g} requests/s and "
        f"{spec.max_concurrency} at once, for all runs together."
    )


SEARCH_INDEX = (
    "The Elasticsearch index (behind its alias) that search and the read API answer from. "
    "Written by every branch's index_updates; its check compares it with the fact store."
)
