"""Asset checks: how stale each type's entities are against their budget, what is quarantined, and
whether the search index agrees with the fact store."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import dagster as dg
from elasticsearch import ApiError, TransportError

from enrichment_assets.defs.names import SEARCH_INDEX_KEY, branch_types
from enrichment_assets.defs.resources import FactStoreResource, SearchResource
from enrichment_assets.policy import Policy
from enrichment_assets.search.reconcile import reconcile


def build_checks(policy: Policy) -> list[dg.AssetChecksDefinition]:
    checks = [check for t in branch_types(policy) for check in _type_checks(policy, t)]
    return [*checks, _search_index_in_sync(policy)]


def _type_checks(policy: Policy, entity_type: str) -> list[dg.AssetChecksDefinition]:
    budget = policy.effective(entity_type).staleness_budget
    asset = dg.AssetKey([entity_type, "index_updates"])

    @dg.asset_check(
        asset=asset,
        name="staleness_budget",
        description=f"p95 staleness of every live {entity_type} (time since last enriched, or since first "
        f"seen if never) within its budget of {budget}.",
    )
    def staleness_budget(fact_store: FactStoreResource) -> dg.AssetCheckResult:
        staleness = fact_store.store.staleness(entity_type, budget=budget)
        return dg.AssetCheckResult(
            passed=staleness.p95 <= budget.total_seconds(),
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"p95 {staleness.p95:.0f}s against a budget of {budget.total_seconds():.0f}s; "
            f"{staleness.over_budget} of {staleness.count} over budget",
            metadata={
                "entities": dg.MetadataValue.int(staleness.count),
                "staleness_p50_seconds": dg.MetadataValue.float(round(staleness.p50, 1)),
                "staleness_p95_seconds": dg.MetadataValue.float(round(staleness.p95, 1)),
                "staleness_max_seconds": dg.MetadataValue.float(round(staleness.max, 1)),
                "budget_seconds": dg.MetadataValue.float(budget.total_seconds()),
                "over_budget": dg.MetadataValue.int(staleness.over_budget),
            },
        )

    @dg.asset_check(
        asset=asset,
        name="quarantined",
        description=f"No {entity_type} is quarantined (failed its maximum attempts). Backfill its partition "
        "to try quarantined entities again once the cause is fixed.",
    )
    def quarantined(fact_store: FactStoreResource) -> dg.AssetCheckResult:
        count, sample = fact_store.store.quarantined(entity_type)
        table = "\n".join(f"| {entity_id} | {(error or '')[:120]} |" for entity_id, error in sample)
        return dg.AssetCheckResult(
            passed=count == 0,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"{count} quarantined"
            + ("" if not count else "; backfill their partitions after fixing the cause"),
            metadata={
                "quarantined": dg.MetadataValue.int(count),
                "sample": dg.MetadataValue.md("| id | last error |\n|---|---|\n" + table if sample else "_none_"),
            },
        )

    return [staleness_budget, quarantined]


def _search_index_in_sync(policy: Policy) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=SEARCH_INDEX_KEY,
        name="search_index_in_sync",
        description="Reconciliation: counts per type and a sample of document versions agree with the fact "
        "store, allowing for documents still waiting in the search outbox. Fails on real divergence; "
        "`enrichment reconcile --repair` fixes it.",
    )
    def search_index_in_sync(fact_store: FactStoreResource, search: SearchResource) -> dg.AssetCheckResult:
        index = search.index
        if index is None:
            return dg.AssetCheckResult(
                passed=False, severity=dg.AssetCheckSeverity.ERROR, description="search is off: set ELASTICSEARCH_URL"
            )
        store = fact_store.store
        try:
            report = reconcile(store, index, policy)
        except (ApiError, TransportError) as error:
            backlog = sum(store.index_backlog_counts().values())
            return dg.AssetCheckResult(
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description=f"search unavailable ({type(error).__name__}): {backlog:,} documents wait in the "
                "outbox; the next run drains them once it answers",
                metadata={"outbox_backlog": dg.MetadataValue.int(backlog)},
            )
        behind = store.index_behind([*report.missing, *report.stale])
        # A document ahead of the store is divergent whatever the outbox holds: writes to it are refused.
        divergent = [k for k in [*report.missing, *report.stale] if k not in behind] + report.ahead
        backlog = store.index_backlog_counts()
        count_gaps = {t: (s, i) for t, (s, i) in report.counts.items() if abs(s - i) > backlog.get(t, 0)}
        passed = not divergent and not report.extra and not count_gaps
        return dg.AssetCheckResult(
            passed=passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description="in sync"
            if passed
            else f"{len(divergent)} sampled documents disagree, {len(report.extra)} extra, "
            f"count gaps {count_gaps}: run `enrichment reconcile --repair`",
            metadata={
                "checked": dg.MetadataValue.int(report.checked),
                "divergent": dg.MetadataValue.int(len(divergent)),
                "extra": dg.MetadataValue.int(len(report.extra)),
                "outbox_backlog": dg.MetadataValue.int(sum(backlog.values())),
                "counts": dg.MetadataValue.json(
                    {t: {"fact_store": s, "index": i} for t, (s, i) in report.counts.items()}
                ),
            },
        )

    return search_index_in_sync
