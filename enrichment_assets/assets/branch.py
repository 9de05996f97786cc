"""The branch factory: one partitioned asset chain per entity type with a policy.

    sources/<system> ...  (external: the APIs each branch calls)
          \\
    <type>/candidates -> <type>/hydrated -> <type>/edges -> <type>/index_updates -> search/entities

Each step's state lives in the fact store, not in Dagster: ``candidates`` leases entities to the run,
``hydrated`` fetches them and every hop of their paths, ``edges`` settles the leases with their derived
edges in one transaction, ``index_updates`` drains the search outbox. The DataFrames passed between the
steps are the run's own record of what it did, and what the UI shows.
"""

# No `from __future__ import annotations` here: Dagster inspects the context annotation at runtime.

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pandas as pd
import pydantic

from enrichment_assets.factstore import Claim, DerivedEdge, Outcome, Staleness
from enrichment_assets.hydration.propagation import affected_roots
from enrichment_assets.hydration.walker import Walk, Walker, WalkReport
from enrichment_assets.partitions import partitions_for
from enrichment_assets.policy import Policy
from enrichment_assets.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.search.sync import IndexReport, sync_changed

MODE_TAG = "enrichment/mode"
TRIGGER_TAG = "enrichment/trigger"
INCREMENTAL = "incremental"
RECOMPUTE = "recompute"
SEARCH_INDEX_KEY = dg.AssetKey(["search", "entities"])
# A branch's assets, keyed [entity type, step].
BRANCH_STEPS = ("candidates", "hydrated", "edges", "index_updates")

CANDIDATE_COLUMNS = ["entity_type", "entity_id", "version", "state", "attempts", "first_seen_at", "reason"]
HYDRATED_COLUMNS = ["entity_type", "entity_id", "version", "outcome", "error", "retry_at", "waiting_on",
                    "edges", "attributes"]
EDGE_COLUMNS = ["src_type", "src_id", "relation", "dst_type", "dst_id", "change"]
INDEX_COLUMNS = ["entity_type", "entity_id"]


class CandidatesConfig(dg.Config):
    """How a run picks its candidates. Incremental runs take at most ``limit`` due entities (the sensor
    asks again for the rest); a recompute takes every entity of the partition."""

    # Positive, or a claim loop asking for nothing would never end.
    limit: int = pydantic.Field(default=5000, gt=0)
    batch_size: int = pydantic.Field(default=500, gt=0)
    lease_minutes: float = pydantic.Field(default=30.0, gt=0)


class HydrateConfig(dg.Config):
    batch_size: int = pydantic.Field(default=500, gt=0)


def source_key(system: str) -> dg.AssetKey:
    return dg.AssetKey(["sources", system])


def pool_name(policy: Policy, entity_type: str) -> str:
    """The Dagster pool of a branch's hydration step: its type's own source system."""
    return f"source_{policy.entity_types[entity_type].source}"


def branch_types(policy: Policy) -> list[str]:
    return sorted(policy.policies)


def rate_shares(policy: Policy) -> dict[str, float]:
    """Each source's rate divided among the pools whose hydration steps may call it concurrently.

    A pool admits one hydration step at a time (``concurrency.pools.default_limit: 1``), so a source
    called from k pools sees at most k steps at once; giving each 1/k of the rate keeps the sum within
    the source's limit even when every branch runs in parallel.
    """
    pools: dict[str, set[str]] = {}
    for entity_type in branch_types(policy):
        for system in policy.sources_touched(entity_type):
            pools.setdefault(system, set()).add(pool_name(policy, entity_type))
    return {system: 1.0 / len(names) for system, names in pools.items()}


def source_specs(policy: Policy) -> list[dg.AssetSpec]:
    """The source systems as external assets: Dagster does not materialize them, but lineage shows
    which feed each branch."""
    return [
        dg.AssetSpec(
            source_key(name),
            group_name="sources",
            kinds={"http"},
            description=f"The {name} API: {len([t for t in policy.entity_types.values() if t.source == name])} "
            f"entity type(s), at most {source.requests_per_second:g} requests/s and "
            f"{source.max_concurrency} at once.",
            metadata={
                "owns": ", ".join(sorted(t for t, e in policy.entity_types.items() if e.source == name)),
                "requests_per_second": source.requests_per_second,
                "base_url_env": source.base_url_env or "(fixed)",
            },
        )
        for name, source in sorted(policy.sources.items())
    ]


def search_index_spec(policy: Policy) -> dg.AssetSpec:
    return dg.AssetSpec(
        SEARCH_INDEX_KEY,
        group_name="search",
        kinds={"elasticsearch"},
        deps=[dg.AssetKey([t, "index_updates"]) for t in branch_types(policy)],
        description="The Elasticsearch index (behind its alias) that search and the read API answer from. "
        "Written by every branch's index_updates; its check compares it with the fact store.",
    )


def _staleness_metadata(staleness: Staleness) -> dict[str, dg.MetadataValue]:
    return {
        "entities_in_slice": dg.MetadataValue.int(staleness.count),
        "staleness_p50_seconds": dg.MetadataValue.float(round(staleness.p50, 1)),
        "staleness_p95_seconds": dg.MetadataValue.float(round(staleness.p95, 1)),
    }


def _window(context: dg.AssetExecutionContext) -> tuple[datetime, datetime]:
    window = context.partition_time_window
    return window.start.astimezone(UTC), window.end.astimezone(UTC)


def _mode(context: dg.AssetExecutionContext) -> str:
    """Runs the sensor or a schedule starts say ``incremental``; any other run (a backfill, a click on
    Materialize) recomputes its partition."""
    return context.run.tags.get(MODE_TAG, RECOMPUTE)


def _owner(context: dg.AssetExecutionContext) -> str:
    """The lease owner: the first run of a re-execution family, so re-executing a failed run from its
    failed step settles the leases the original run took."""
    return f"dagster:{context.run.root_run_id or context.run.run_id}"


def _claims(frame: pd.DataFrame) -> list[Claim]:
    return [
        Claim(row.entity_type, row.entity_id, int(row.version), row.state, int(row.attempts),
              row.first_seen_at.to_pydatetime() if hasattr(row.first_seen_at, "to_pydatetime") else row.first_seen_at)
        for row in frame.itertuples(index=False)
    ]


def _reason(claim: Claim) -> str:
    return {"fully_enriched": "refresh", "deleted": "tombstone"}.get(claim.state, claim.state)


def _markdown(frame: pd.DataFrame, rows: int = 20) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    shown = frame.head(rows).astype(str)
    more = f"\n\n… and {len(frame) - rows} more" if len(frame) > rows else ""
    return dg.MetadataValue.md(shown.to_markdown(index=False) + more)


def build_branch(policy: Policy, entity_type: str) -> list[dg.AssetsDefinition]:
    """The four assets of one entity type's branch."""
    effective = policy.effective(entity_type)
    partitions = partitions_for(policy)
    group = entity_type
    source = policy.entity_types[entity_type].source
    touched = policy.sources_touched(entity_type)
    owners = ["team:data-platform"]
    relations = ", ".join(f"`{rule.relation}` via {' -> '.join(rule.path)}" for rule in effective.edges) or "none"
    tags = {"entity_type": entity_type}
    # What every asset of the branch shares.
    common: dict[str, Any] = {"group_name": group, "partitions_def": partitions, "owners": owners, "tags": tags}

    @dg.asset(
        key=[entity_type, "candidates"],
        kinds={"postgres", "pandas"},
        **common,
        description=f"""{entity_type} entities this run enriches, leased from the fact store's claim queue.

Incremental runs (the sensor, the schedules) take the due ones first seen in the partition: uncached,
partially resolved and due for retry, tombstones, and those last enriched more than
{effective.refresh_interval} ago. Any other run (a backfill, Materialize in the UI) recomputes the whole
partition. Leases expire if the run dies, so its entities are picked up again.""",
    )
    def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig,
                   fact_store: FactStoreResource) -> pd.DataFrame:
        store = fact_store.store
        window = _window(context)
        mode = _mode(context)
        before = store.staleness(entity_type, window)
        claims: list[Claim] = []
        refresh_before = store.now() - effective.refresh_interval
        while mode == RECOMPUTE or len(claims) < config.limit:
            want = config.batch_size if mode == RECOMPUTE else min(config.batch_size, config.limit - len(claims))
            batch = store.claim(entity_type, limit=want, owner=_owner(context),
                                lease=timedelta(minutes=config.lease_minutes), window=window,
                                refresh_before=refresh_before, force=mode == RECOMPUTE)
            claims += batch
            if len(batch) < want:
                break
        frame = pd.DataFrame(
            [{"entity_type": c.entity_type, "entity_id": c.entity_id, "version": c.version, "state": c.state,
              "attempts": c.attempts, "first_seen_at": c.first_seen_at, "reason": _reason(c)} for c in claims],
            columns=CANDIDATE_COLUMNS,
        )
        reasons = Counter(frame["reason"])
        context.add_output_metadata({
            "mode": mode,
            "claimed": dg.MetadataValue.int(len(frame)),
            **{f"claimed_{reason}": dg.MetadataValue.int(count) for reason, count in sorted(reasons.items())},
            **_staleness_metadata(before),
            "preview": _markdown(frame[["entity_id", "reason", "attempts"]]),
        })
        context.log.info(f"{mode}: leased {len(frame)} {entity_type} entities of {context.partition_key}")
        return frame

    @dg.asset(
        key=[entity_type, "hydrated"],
        ins={"candidates": dg.AssetIn(key=[entity_type, "candidates"])},
        deps=[source_key(s) for s in touched],
        kinds={"http", "pandas"},
        **common,
        pool=pool_name(policy, entity_type),
        description=f"""The candidates hydrated from {source}, with every hop of their policy paths
({relations}).

Each hop is fetched for the whole batch at once, de-duplicated, and reused from the fact store while
younger than {effective.hydration_ttl}; requests are rate-limited per source, retried with backoff, and
deferred (not failed) while a source's circuit is open. Hop entities' attributes and references are
stored here; the roots' outcomes are settled by `{entity_type}/edges`.""",
    )
    def hydrated(context: dg.AssetExecutionContext, config: HydrateConfig, candidates: pd.DataFrame,
                 fact_store: FactStoreResource, sources: SourcesResource) -> pd.DataFrame:
        store = fact_store.store
        claims = _claims(candidates)
        owner = _owner(context)

        async def walk_all() -> tuple[list[Walk], dict[str, dict[str, Any]]]:
            walks = []
            async with sources.pool(policy, rate_shares(policy)) as pool:
                walker = Walker(store, policy, pool)
                for start in range(0, len(claims), config.batch_size):
                    batch = claims[start : start + config.batch_size]
                    await asyncio.to_thread(store.renew, owner, [c.key for c in claims[start:]],
                                            timedelta(minutes=30))
                    walk = await walker.walk(entity_type, batch)
                    if walk.changed_hops:
                        stale = await asyncio.to_thread(affected_roots, store, policy, list(walk.changed_hops))
                        walk.report.propagated = await asyncio.to_thread(
                            store.mark_dirty, stale - {c.key for c in claims})
                    walks.append(walk)
                    context.log.info(f"walked {min(start + config.batch_size, len(claims))}/{len(claims)}")
                return walks, pool.stats()

        try:
            walks, stats = asyncio.run(walk_all())
        except BaseException:
            released = store.release(owner, [c.key for c in claims])
            context.log.error(f"hydration failed; released {released} leases so the next run takes them")
            raise
        report = WalkReport(entity_type)
        for walk in walks:
            report.absorb(walk.report)
        outcomes = [o for walk in walks for o in walk.outcomes]
        frame = pd.DataFrame(
            [{"entity_type": o.entity_type, "entity_id": o.entity_id, "version": o.version, "outcome": o.status,
              "error": o.error, "retry_at": o.retry_at, "waiting_on": [f"{t}:{i}" for t, i in o.waiting_on],
              "edges": [{"relation": e.relation, "dst_type": e.dst_type, "dst_id": e.dst_id,
                         "path": [list(k) for k in e.path]} for e in o.edges],
              "attributes": o.attributes} for o in outcomes],
            columns=HYDRATED_COLUMNS,
        )
        by_outcome = Counter(frame["outcome"])
        context.add_output_metadata({
            "hydrated": dg.MetadataValue.int(report.fetched),
            "cache_hits": dg.MetadataValue.int(report.cache_hits),
            "prefetched": dg.MetadataValue.int(report.prefetched),
            "propagated": dg.MetadataValue.int(report.propagated),
            **{f"outcome_{name}": dg.MetadataValue.int(by_outcome.get(name, 0))
               for name in ("enriched", "partial", "failed", "deferred", "deleted")},
            **{f"source_calls/{name}": dg.MetadataValue.int(stats[name]["requests"]) for name in touched},
            **{f"source_errors/{name}": dg.MetadataValue.int(stats[name]["errors"]) for name in touched},
            **{f"source_throttled/{name}": dg.MetadataValue.int(stats[name]["throttled"]) for name in touched},
            "errors_by_source": dg.MetadataValue.json(dict(report.errors_by_source)),
            "preview": _markdown(frame[["entity_id", "outcome", "error"]]),
        })
        return frame

    @dg.asset(
        key=[entity_type, "edges"],
        ins={"hydrated": dg.AssetIn(key=[entity_type, "hydrated"])},
        kinds={"postgres", "pandas"},
        **common,
        description=f"""Derived edges of {entity_type} ({relations}) written to the fact store with their
paths as provenance, and the candidates' new states, in one transaction per batch.

An enriched entity's edges that no longer hold are retracted (history kept); a partially resolved one
keeps what it had and waits for its forward references; an entity whose source answered differently
than before makes every entity whose path went through it due again. Rows: the edge changes.""",
    )
    def edges(context: dg.AssetExecutionContext, hydrated: pd.DataFrame,
              fact_store: FactStoreResource) -> pd.DataFrame:
        store = fact_store.store
        outcomes = [_outcome(row) for row in hydrated.itertuples(index=False)]
        report = WalkReport(entity_type, claimed=len(outcomes))

        async def settle() -> None:
            walker = Walker(store, policy, _NoSources())  # settling never calls a source
            for start in range(0, len(outcomes), 500):
                batch = outcomes[start : start + 500]
                report.absorb(await walker.settle(Walk(entity_type, batch, WalkReport(entity_type)),
                                                  owner=_owner(context)))

        asyncio.run(settle())
        result = report.result
        frame = pd.DataFrame(
            [{"src_type": c.src_type, "src_id": c.src_id, "relation": c.relation, "dst_type": c.dst_type,
              "dst_id": c.dst_id, "change": c.change} for c in result.edge_changes],
            columns=EDGE_COLUMNS,
        )
        context.add_output_metadata({
            "edges_asserted": dg.MetadataValue.int(result.edges_asserted),
            "edges_retracted": dg.MetadataValue.int(result.edges_retracted),
            "edges_confirmed": dg.MetadataValue.int(result.edges_confirmed),
            "enriched": dg.MetadataValue.int(result.enriched),
            "partial": dg.MetadataValue.int(result.partial),
            "failed": dg.MetadataValue.int(result.failed),
            "quarantined": dg.MetadataValue.int(result.quarantined),
            "deferred": dg.MetadataValue.int(result.deferred),
            "deleted": dg.MetadataValue.int(result.deleted),
            "superseded_by_newer_events": dg.MetadataValue.int(result.superseded),
            "leases_lost": dg.MetadataValue.int(len(result.lost)),
            "propagated": dg.MetadataValue.int(report.propagated),
            "preview": _markdown(frame),
        })
        return frame

    @dg.asset(
        key=[entity_type, "index_updates"],
        ins={"edges": dg.AssetIn(key=[entity_type, "edges"]), "hydrated": dg.AssetIn(key=[entity_type, "hydrated"])},
        kinds={"elasticsearch", "pandas"},
        **common,
        freshness_policy=_freshness(effective.staleness_budget),
        description=f"""Search documents brought up to date: both ends of every changed edge, the
partition's own entities, and anything else waiting in the search outbox, written with external
versions so an older write never overwrites a newer one. The run's own {entity_type} documents are
written first, so they are searchable without queueing behind anything; then the rest of the outbox is
drained, one drain at a time across all runs (a lock in the fact store): a run that finds another
draining leaves the rest to it.

Its freshness policy fails when no {entity_type} enrichment has completed within the type's staleness
budget ({effective.staleness_budget}); the `staleness_budget` check holds each entity to that budget.""",
    )
    def index_updates(context: dg.AssetExecutionContext, edges: pd.DataFrame, hydrated: pd.DataFrame,
                      fact_store: FactStoreResource, search: SearchResource) -> pd.DataFrame:
        store = fact_store.store
        ends = sorted({(r.src_type, r.src_id) for r in edges.itertuples(index=False)}
                      | {(r.dst_type, r.dst_id) for r in edges.itertuples(index=False)})
        index = search.index
        metadata: dict[str, Any] = {}
        written: set[tuple[str, str]] = set()
        if index is None:
            metadata["search"] = "off: set ELASTICSEARCH_URL to index"
            context.log.warning("search is off (ELASTICSEARCH_URL is not set); documents stay in the outbox")
        else:
            roots = {(r.entity_type, r.entity_id) for r in hydrated.itertuples(index=False)}
            own, drained = sync_changed(store, policy, index, roots)
            result = own if drained is None else IndexReport().merge(own).merge(drained)
            written = result.changed
            metadata.update({
                "documents_indexed": dg.MetadataValue.int(result.indexed),
                "documents_deleted": dg.MetadataValue.int(result.deleted),
                "own_documents_indexed": dg.MetadataValue.int(own.indexed + own.deleted),
                "outbox_drained_here": dg.MetadataValue.bool(drained is not None),
                "superseded": dg.MetadataValue.int(result.superseded),
                "failures": dg.MetadataValue.int(len(result.failures)),
            })
            if result.failures:
                context.log.warning(f"{len(result.failures)} documents stay in the outbox for the next sync: "
                                    f"{list(result.failures.items())[:3]}")
        metadata["edge_ends"] = dg.MetadataValue.int(len(ends))
        metadata["edge_ends_behind"] = dg.MetadataValue.int(len(store.index_behind(ends)))
        metadata.update(_staleness_metadata(store.staleness(entity_type, _window(context))))
        frame = pd.DataFrame(sorted(written), columns=INDEX_COLUMNS)
        context.add_output_metadata(metadata)
        return frame

    return [candidates, hydrated, edges, index_updates]


def _freshness(budget: timedelta) -> dg.FreshnessPolicy | None:
    """Fail after the staleness budget, warn at half of it; Dagster needs both windows >= 1 minute."""
    fail = max(budget, timedelta(minutes=1))
    warn = fail / 2
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=warn if warn >= timedelta(minutes=1) else None)


def _outcome(row: Any) -> Outcome:
    retry_at = row.retry_at
    if retry_at is not None and pd.isna(retry_at):
        retry_at = None
    elif hasattr(retry_at, "to_pydatetime"):
        retry_at = retry_at.to_pydatetime()
    error = None if row.error is None or (isinstance(row.error, float) and pd.isna(row.error)) else row.error
    return Outcome(
        row.entity_type, row.entity_id, int(row.version), row.outcome,
        attributes=row.attributes if isinstance(row.attributes, dict) else None,
        waiting_on=tuple(tuple(k.split(":", 1)) for k in row.waiting_on),  # type: ignore[misc]
        error=error,
        edges=tuple(DerivedEdge(e["relation"], e["dst_type"], e["dst_id"], tuple(tuple(k) for k in e["path"]))
                    for e in row.edges),
        retry_at=retry_at,
    )


class _NoSources:
    """Stands in for the source pool where a walker only settles."""

    def client_for(self, entity_type: str) -> Any:
        raise RuntimeError("settling a walk does not call sources")

