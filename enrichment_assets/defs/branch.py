"""The branch factory: one partitioned asset chain per entity type with a policy.

    sources/<system> ...  (external: the APIs each branch calls)
          \\
    <type>/candidates -> <type>/hydrated -> <type>/edges -> <type>/index_updates -> search/entities

Each asset is one step of the enrichment loop (``enrichment_assets.steps``), the same functions
``enrichment enrich-once`` calls; the step's state lives in the fact store, and the DataFrames passed
between the steps are the run's own record of what it did, and what the UI shows.
"""

# No `from __future__ import annotations` here: Dagster inspects the context annotation at runtime.

import asyncio
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pandas as pd
import pydantic

from enrichment_assets.defs import descriptions, frames
from enrichment_assets.defs.names import (
    BRANCH_STEPS,
    INCREMENTAL,
    MODE_TAG,
    RECOMPUTE,
    RUN_CLAIM_LIMIT,
    SEARCH_INDEX_KEY,
    branch_types,
    source_key,
    step_key,
)
from enrichment_assets.defs.partitions import partitions_for
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.defs.run_status import lease_owner
from enrichment_assets.hydration.walker import WalkReport
from enrichment_assets.policy import Policy
from enrichment_assets.steps import claim_candidates, index_changes, settle_outcomes, walk_claims

__all__ = ["BRANCH_STEPS", "INCREMENTAL", "MODE_TAG", "build_branch", "search_index_spec", "source_specs"]


class CandidatesConfig(dg.Config):
    """How a run picks its candidates. Incremental runs take at most ``limit`` due entities (the sensor
    asks again for the rest); a recompute takes every entity of the partition."""

    # Positive, or a claim loop asking for nothing would never end.
    limit: int = pydantic.Field(default=RUN_CLAIM_LIMIT, gt=0)
    batch_size: int = pydantic.Field(default=500, gt=0)
    lease_minutes: float = pydantic.Field(default=30.0, gt=0)


class HydrateConfig(dg.Config):
    batch_size: int = pydantic.Field(default=500, gt=0)


def source_specs(policy: Policy) -> list[dg.AssetSpec]:
    """The source systems as external assets: Dagster does not materialize them, but lineage shows
    which feed each branch."""
    return [
        dg.AssetSpec(
            source_key(name),
            group_name="sources",
            kinds={"http"},
            description=descriptions.source(policy, name),
            metadata={
                "owns": ", ".join(sorted(t for t, e in policy.entity_types.items() if e.source == name)),
                "requests_per_second": source.requests_per_second,
                "max_concurrency": source.max_concurrency,
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
        deps=[step_key(t, "index_updates") for t in branch_types(policy)],
        description=descriptions.SEARCH_INDEX,
    )


def build_branch(policy: Policy, entity_type: str) -> list[dg.AssetsDefinition]:
    """The four assets of one entity type's branch."""
    common: dict[str, Any] = {
        "group_name": entity_type,
        "partitions_def": partitions_for(policy),
        "owners": ["team:data-platform"],
        "tags": {"entity_type": entity_type},
    }
    return [builder(policy, entity_type, common) for builder in (_candidates, _hydrated, _edges, _index_updates)]


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
    return lease_owner(context.run)


def _candidates(policy: Policy, entity_type: str, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(
        key=step_key(entity_type, "candidates"),
        kinds={"postgres", "pandas"},
        **common,
        description=descriptions.candidates(policy, entity_type),
    )
    def candidates(
        context: dg.AssetExecutionContext, config: CandidatesConfig, fact_store: FactStoreResource
    ) -> pd.DataFrame:
        store, window, mode = fact_store.store, _window(context), _mode(context)
        before = store.staleness(entity_type, window)
        claims = claim_candidates(
            store,
            policy,
            entity_type,
            owner=_owner(context),
            lease=timedelta(minutes=config.lease_minutes),
            limit=None if mode == RECOMPUTE else config.limit,
            batch_size=config.batch_size,
            window=window,
            recompute=mode == RECOMPUTE,
        )
        frame = frames.claims_frame(claims)
        context.add_output_metadata(
            {
                "mode": mode,
                **frames.ints({"claimed": len(frame)}),
                **frames.ints({f"claimed_{r}": n for r, n in sorted(Counter(frame["reason"]).items())}),
                **frames.staleness_metadata(before),
                "preview": frames.markdown(frame[["entity_id", "reason", "attempts"]]),
            }
        )
        context.log.info("%s: leased %d %s entities of %s", mode, len(frame), entity_type, context.partition_key)
        return frame

    return candidates


def _hydrated(policy: Policy, entity_type: str, common: dict[str, Any]) -> dg.AssetsDefinition:
    touched = policy.sources_touched(entity_type)

    @dg.asset(
        key=step_key(entity_type, "hydrated"),
        ins={"candidates": dg.AssetIn(key=step_key(entity_type, "candidates"))},
        deps=[source_key(s) for s in touched],
        kinds={"http", "pandas"},
        **common,
        description=descriptions.hydrated(policy, entity_type),
    )
    def hydrated(
        context: dg.AssetExecutionContext,
        config: HydrateConfig,
        candidates: pd.DataFrame,
        fact_store: FactStoreResource,
        sources: SourcesResource,
    ) -> pd.DataFrame:
        store = fact_store.store

        async def walk() -> tuple[list[Any], dict[str, dict[str, Any]]]:
            async with sources.pool(policy, store) as pool:
                walks = await walk_claims(
                    store,
                    policy,
                    pool,
                    entity_type,
                    frames.claims_of(candidates),
                    owner=_owner(context),
                    batch_size=config.batch_size,
                    pending=sources.pending,
                    progress=lambda done, total: context.log.info("walked %d/%d", done, total),
                )
                return walks, pool.stats()

        walks, stats = asyncio.run(walk())
        report = WalkReport(entity_type)
        for each in walks:
            report.absorb(each.report)
        frame = frames.outcomes_frame(o for each in walks for o in each.outcomes)
        context.add_output_metadata(
            {
                **frames.ints(
                    {
                        "hydrated": report.fetched,
                        "cache_hits": report.cache_hits,
                        "prefetched": report.prefetched,
                        "propagated": report.propagated,
                    }
                ),
                **frames.ints(frames.outcome_counts(frame)),
                **frames.ints(
                    {
                        f"source_{label}/{name}": stats[name][kind]
                        for name in touched
                        for label, kind in (("calls", "requests"), ("errors", "errors"), ("throttled", "throttled"))
                    }
                ),
                "errors_by_source": dg.MetadataValue.json(dict(report.errors_by_source)),
                "preview": frames.markdown(frame[["entity_id", "outcome", "error"]]),
            }
        )
        return frame

    return hydrated


def _edges(policy: Policy, entity_type: str, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(
        key=step_key(entity_type, "edges"),
        ins={"hydrated": dg.AssetIn(key=step_key(entity_type, "hydrated"))},
        kinds={"postgres", "pandas"},
        **common,
        description=descriptions.edges(policy, entity_type),
    )
    def edges(
        context: dg.AssetExecutionContext,
        hydrated: pd.DataFrame,
        fact_store: FactStoreResource,
        sources: SourcesResource,
    ) -> pd.DataFrame:
        outcomes = frames.outcomes_of(hydrated)
        report = asyncio.run(
            settle_outcomes(
                fact_store.store, policy, entity_type, outcomes, owner=_owner(context), pending=sources.pending
            )
        )
        result = report.result
        frame = frames.edge_changes_frame(result.edge_changes)
        context.add_output_metadata(
            {
                **frames.ints(
                    {
                        "edges_asserted": result.edges_asserted,
                        "edges_retracted": result.edges_retracted,
                        "edges_confirmed": result.edges_confirmed,
                        "enriched": result.enriched,
                        "partial": result.partial,
                        "failed": result.failed,
                        "quarantined": result.quarantined,
                        "deferred": result.deferred,
                        "deleted": result.deleted,
                        "superseded_by_newer_events": result.superseded,
                        "leases_lost": len(result.lost),
                        "propagated": report.propagated,
                    }
                ),
                "preview": frames.markdown(frame),
            }
        )
        return frame

    return edges


def _index_updates(policy: Policy, entity_type: str, common: dict[str, Any]) -> dg.AssetsDefinition:
    @dg.asset(
        key=step_key(entity_type, "index_updates"),
        ins={
            "edges": dg.AssetIn(key=step_key(entity_type, "edges")),
            "hydrated": dg.AssetIn(key=step_key(entity_type, "hydrated")),
        },
        kinds={"elasticsearch", "pandas"},
        **common,
        freshness_policy=_freshness(policy.effective(entity_type).staleness_budget),
        description=descriptions.index_updates(policy, entity_type),
    )
    def index_updates(
        context: dg.AssetExecutionContext,
        edges: pd.DataFrame,
        hydrated: pd.DataFrame,
        fact_store: FactStoreResource,
        search: SearchResource,
    ) -> pd.DataFrame:
        store, index = fact_store.store, search.index
        ends = sorted(
            {(r.src_type, r.src_id) for r in edges.itertuples(index=False)}
            | {(r.dst_type, r.dst_id) for r in edges.itertuples(index=False)}
        )
        roots = {(r.entity_type, r.entity_id) for r in hydrated.itertuples(index=False)}
        metadata: dict[str, Any] = {}
        written: set[tuple[str, str]] = set()
        if index is None:
            metadata["search"] = "off: set ELASTICSEARCH_URL to index"
            context.log.warning("search is off (ELASTICSEARCH_URL is not set); documents stay in the outbox")
        else:
            step = index_changes(store, policy, index, roots | set(ends))
            written = step.total.changed
            metadata.update(
                frames.ints(
                    {
                        "documents_indexed": step.total.indexed,
                        "documents_deleted": step.total.deleted,
                        "own_documents_indexed": step.own.indexed + step.own.deleted,
                        "superseded": step.total.superseded,
                        "failures": len(step.total.failures),
                    }
                )
            )
            metadata["outbox_drained_here"] = dg.MetadataValue.bool(step.drained_here)
            if step.total.failures:
                context.log.warning(
                    "%d documents stay in the outbox for the next sync: %s",
                    len(step.total.failures),
                    list(step.total.failures.items())[:3],
                )
        metadata.update(frames.ints({"edge_ends": len(ends), "edge_ends_behind": len(store.index_behind(ends))}))
        metadata.update(frames.staleness_metadata(store.staleness(entity_type, _window(context))))
        context.add_output_metadata(metadata)
        return pd.DataFrame(sorted(written), columns=frames.INDEX_COLUMNS)

    return index_updates


def _freshness(budget: timedelta) -> dg.FreshnessPolicy | None:
    """Fail after the staleness budget, warn at half of it; Dagster needs both windows >= 1 minute."""
    fail = max(budget, timedelta(minutes=1))
    warn = fail / 2
    return dg.FreshnessPolicy.time_window(fail_window=fail, warn_window=warn if warn >= timedelta(minutes=1) else None)
