"""The quick-start demo: thin events in over HTTP, the fact store's state out.

It builds a batch for every entity type the policy declares, sends it to the real API on a real port,
shows the write being rejected whole when one line is bad, reads one entity back, and prints the
store's state. Enrichment (hydration, edges, search) joins this flow as those layers land.
"""

from __future__ import annotations

import json
import time

import httpx

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.console import console, status_table
from enrichment_assets.factstore import FactStore
from enrichment_assets.settings import Settings

PER_TYPE = 250


def demo_events(entity_types: frozenset[str], per_type: int = PER_TYPE) -> list[dict[str, str]]:
    """Creations for ``per_type`` ids of every type, a burst of duplicate updates, and a few deletions."""
    events = []
    for etype in sorted(entity_types):
        ids = [f"{etype}-{n:05d}" for n in range(per_type)]
        events += [{"entity_type": etype, "entity_id": i, "event_type": "created"} for i in ids]
        events += [{"entity_type": etype, "entity_id": i, "event_type": "updated"} for i in ids[:: 10]]
        events += [{"entity_type": etype, "entity_id": i, "event_type": "deleted"} for i in ids[-3:]]
    return events


def run_demo(settings: Settings) -> None:
    out = console()
    store = FactStore.from_url(settings.database_url)
    store.migrate()
    out.rule("enrichment_assets demo")
    out.print(f"fact store: [bold]{store.dialect}[/bold] (ENRICHMENT_DATABASE_URL to change)")
    events = demo_events(settings.entity_types)
    body = "\n".join(json.dumps(e) for e in events)
    headers = {"content-type": "application/x-ndjson"}
    if settings.api_token:
        headers["authorization"] = f"Bearer {settings.api_token}"

    with BackgroundServer(create_app(store, settings)) as server, httpx.Client(
        base_url=server.url, headers=headers, timeout=30
    ) as client:
        out.print(f"ingest API listening on {server.url}")

        bad = body + '\n{"entity_type": "nope", "entity_id": "x", "event_type": "created"}'
        rejected = client.post("/v1/events", content=bad)
        problem = rejected.json()["problems"][0]
        out.print(
            f"POST /v1/events with one bad line among {len(events) + 1:,} -> [red]{rejected.status_code}[/red] "
            f"(line {problem['line']}: {problem['message']}); nothing written"
        )

        started = time.perf_counter()
        accepted = client.post("/v1/events", content=body)
        accepted.raise_for_status()
        elapsed = time.perf_counter() - started
        counts = accepted.json()
        out.print(
            f"POST /v1/events with {counts['received']:,} events -> [green]{accepted.status_code}[/green] "
            f"in {elapsed * 1000:.0f} ms ({counts['entities']:,} entities, {counts['by_event_type']})"
        )

        sample = events[0]
        entity = client.get(f"/v1/entities/{sample['entity_type']}/{sample['entity_id']}").json()
        out.print(
            f"GET /v1/entities/{sample['entity_type']}/{sample['entity_id']} -> state={entity['state']} "
            f"version={entity['version']} last_enriched_at={entity['last_enriched_at']} "
            f"staleness_seconds={entity['staleness_seconds']}"
        )

    out.print(status_table(store.status(), store.now()))
    out.print(
        "Every entity waits as [bold]uncached[/bold] until enrichment runs; ingestion never calls a source.\n"
        "Next: `.venv/bin/enrichment status` any time, `.venv/bin/enrichment serve` for the API."
    )
