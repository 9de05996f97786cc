"""Terminal rendering shared by the CLI commands and the demo."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console
from rich.table import Table

from enrichment_assets.factstore import EntityState, TypeStatus

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
