"""Terminal rendering shared by the CLI commands and the demo."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.table import Table

from enrichment_assets.factstore import EntityState, TypeStatus
from enrichment_assets.policy import Policy

STATE_COLUMNS = [s.value for s in EntityState]
_HEADERS = {"partially_resolved": "partial", "fully_enriched": "enriched"}


def status_table(report: list[TypeStatus], now: datetime) -> Table:
    table = Table(title="Fact store: entities by type and state", title_justify="left")
    table.add_column("entity type", style="bold")
    for state in STATE_COLUMNS:
        table.add_column(_HEADERS.get(state, state), justify="right")
    table.add_column("total", justify="right", style="bold")
    table.add_column("oldest waiting", overflow="fold")
    table.add_column("for", justify="right")
    for row in report:
        waited = "-"
        if row.oldest_waiting_since is not None:
            waited = humanize_seconds((now - row.oldest_waiting_since).total_seconds())
        table.add_row(
            row.entity_type,
            *[_count(row.counts.get(state, 0)) for state in STATE_COLUMNS],
            str(sum(row.counts.values())),
            row.oldest_waiting_id or "-",
            waited,
        )
    if not report:
        table.caption = "empty: ingest events with `enrichment ingest FILE` or POST /v1/events"
    return table


def _count(value: int) -> str:
    return str(value) if value else "[dim]0[/dim]"


def humanize_seconds(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f}m"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def console(stderr: bool = False) -> Console:
    out = Console(stderr=stderr, highlight=False)
    if not out.is_terminal:
        # Logs and CI capture get full rows instead of rich's 80-column default.
        out.width = 120
    return out


def policy_tables(policy: Policy) -> list[Table]:
    sources = Table(title="Sources", title_justify="left")
    for column in ("source", "base URL", "req/s", "concurrency", "timeout", "batch"):
        sources.add_column(column)
    for name, source in sorted(policy.sources.items()):
        sources.add_row(
            name,
            source.resolved_base_url(),
            f"{source.requests_per_second:g}",
            str(source.max_concurrency),
            f"{source.timeout_seconds:g}s",
            str(source.max_batch_size or "-"),
        )
    types = Table(title="Entity types", title_justify="left")
    for column in ("type", "source", "path", "references"):
        types.add_column(column)
    for name, etype in sorted(policy.entity_types.items()):
        refs = ", ".join(f"{r} ({ref.field} -> {ref.type})" for r, ref in etype.references.items()) or "-"
        types.add_row(name, etype.source, etype.path, refs)
    edges = Table(title="Derived edges", title_justify="left")
    for column in ("from", "relation", "to", "path", "budget", "refresh"):
        edges.add_column(column)
    for name in sorted(policy.entity_types):
        effective = policy.effective(name)
        for rule in effective.edges:
            edges.add_row(
                name,
                rule.relation,
                policy.edge_target_type(name, rule),
                " -> ".join(rule.path),
                humanize_seconds(effective.staleness_budget.total_seconds()),
                humanize_seconds(effective.refresh_interval.total_seconds()),
            )
    branches = Table(title="Dagster branches (one per type with a policy)", title_justify="left")
    for column in ("type", "source", "calls sources", "budget", "refresh", "max attempts", "priority"):
        branches.add_column(column)
    for name in sorted(policy.entity_types):
        if name not in policy.policies:
            branches.add_row(
                name, "[yellow]no policy: hydrated only as a hop, never enriched itself[/yellow]", "", "", "", "", ""
            )
            continue
        effective = policy.effective(name)
        branches.add_row(
            name,
            policy.entity_types[name].source,
            ", ".join(policy.sources_touched(name)),
            humanize_seconds(effective.staleness_budget.total_seconds()),
            humanize_seconds(effective.refresh_interval.total_seconds()),
            str(effective.max_attempts),
            str(effective.priority),
        )
    return [sources, types, edges, branches]


def cycle_table(reports: list, sources: dict[str, dict]) -> list[Table]:
    """Per-type results of an enrichment cycle, and per-source call counts."""
    types = Table(title="Enrichment cycle", title_justify="left")
    for column in (
        "entity type",
        "claimed",
        "fetched",
        "cache hits",
        "prefetched",
        "enriched",
        "partial",
        "failed",
        "deferred",
        "quarantined",
        "edges +",
        "edges -",
    ):
        types.add_column(column, justify="left" if column == "entity type" else "right")
    for r in reports:
        res = r.result
        types.add_row(
            r.entity_type,
            str(r.claimed),
            str(r.fetched),
            str(r.cache_hits),
            str(r.prefetched),
            str(res.enriched),
            str(res.partial),
            str(res.failed),
            str(res.deferred),
            str(res.quarantined),
            str(res.edges_asserted),
            str(res.edges_retracted),
        )
    calls = Table(title="Source calls", title_justify="left")
    for column in ("source", "requests", "entities", "retries", "429s", "errors", "circuit"):
        calls.add_column(column, justify="left" if column == "source" else "right")
    for name, stats in sorted(sources.items()):
        calls.add_row(
            name,
            str(stats["requests"]),
            str(stats["entities_requested"]),
            str(stats["retries"]),
            str(stats["throttled"]),
            str(stats["errors"]),
            "open" if stats["circuit_open"] else "closed",
        )
    return [types, calls]


def edges_header(record, now: datetime) -> str:  # type: ignore[no-untyped-def]
    staleness = record.staleness_seconds(now)
    fresh = "never enriched" if staleness is None else f"enriched {humanize_seconds(staleness)} ago"
    partial = " (partial: still waiting on some references)" if record.state == "partially_resolved" else ""
    return f"[bold]{record.entity_type} {record.entity_id}[/bold]: {record.state}, {fresh}{partial}"


def edges_table(edges: list[dict], now: datetime, *, incoming: bool = False) -> Table:
    table = Table()
    for column in ("relation", "from" if incoming else "to", "via", "asserted"):
        table.add_column(column)
    for edge in edges:
        hops = " -> ".join(f"{t} {i}" for t, i in edge["path"][1:-1]) or "directly"
        other = f"{edge['src_type']} {edge['src_id']}" if incoming else f"{edge['dst_type']} {edge['dst_id']}"
        table.add_row(
            edge["relation"], other, hops, humanize_seconds((now - edge["asserted_at"]).total_seconds()) + " ago"
        )
    if not edges:
        table.caption = "no derived edges" + (" into it" if incoming else "")
    return table


def search_table(hits: list[dict], now: datetime) -> Table:
    from datetime import datetime as _dt

    table = Table(title="Search", title_justify="left")
    for column in ("type", "id", "name", "state", "staleness"):
        table.add_column(column)
    for hit in hits:
        enriched = hit.get("last_enriched_at")
        age = humanize_seconds((now - _dt.fromisoformat(enriched)).total_seconds()) if enriched else "never enriched"
        table.add_row(hit["entity_type"], hit["entity_id"], hit.get("name") or "-", hit["state"], age)
    if not hits:
        table.caption = "no hits"
    return table


def reconcile_table(report) -> Table:  # type: ignore[no-untyped-def]
    table = Table(
        title=f"Fact store vs search index: {'in sync' if report.in_sync else 'DIFFERENT'} "
        f"({report.checked:,} documents checked)",
        title_justify="left",
    )
    for column in ("entity type", "fact store", "index"):
        table.add_column(column, justify="left" if column == "entity type" else "right")
    for etype, (in_store, in_index) in report.counts.items():
        table.add_row(etype, f"{in_store:,}", f"{in_index:,}")
    table.caption = (
        f"missing {len(report.missing)}, stale {len(report.stale)}, ahead of the store "
        f"{len(report.ahead)}, extra {len(report.extra)}"
        + (f"; repaired: {report.repaired.indexed} re-indexed" if report.repaired else "")
    )
    return table
