"""The quick-start demo: thin events in over HTTP, enrichment against the simulated sources, the
graph, search and staleness out.

It starts the source simulator, an Elasticsearch-compatible server (unless ELASTICSEARCH_URL is set)
and the API on free local ports, sends the simulator's thin events through the API (first a batch with
one bad line, which is rejected whole), indexes them as pending, runs enrichment cycles (re-indexing
as it goes) until nothing is due, and prints the store's state, the derived edges, one entity's
multi-hop answers with their provenance, ingest-to-enriched times, and a search hit and its edges read
back through the API, each with its staleness.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.console import console, humanize_seconds, status_table
from enrichment_assets.devservers import LocalElasticsearch
from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.cycle import enrich_once
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.search import SearchIndex, sync_index
from enrichment_assets.settings import SHIPPED_POLICY, Settings
from enrichment_assets.simulator.events import thin_events
from enrichment_assets.simulator.server import simulator_server

SCALE = 0.1
DEMO_SEARCH_DIR = Path(".enrichment") / "elasticsearch"
MAX_CYCLES = 8


@contextmanager
def _sources_at(environ: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in environ}
    os.environ.update(environ)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_demo(settings: Settings) -> None:
    """Run the demo with ``settings``' database and token, on the shipped policy the simulator plays."""
    policy = load_policy(SHIPPED_POLICY)
    settings = replace(settings, policy=policy, policy_path=SHIPPED_POLICY, entity_types=policy.entity_type_names)
    out = console()
    store = FactStore.from_url(settings.database_url)
    store.migrate()
    out.rule("enrichment_assets demo")
    out.print(f"fact store: [bold]{store.dialect}[/bold] (ENRICHMENT_DATABASE_URL to change)")
    with _search_server(settings) as search_url, simulator_server(seed=7, scale=SCALE) as simulator, \
            _sources_at(simulator.environ()):
        index = SearchIndex.from_url(search_url, alias=settings.index_alias)
        index.ensure()
        graph = simulator.simulator.graph.snapshot()
        out.print(f"source simulator on {simulator.url}: {sum(graph.counts().values()):,} entities in "
                  f"{len(policy.sources)} source systems; search on {search_url}")
        events = list(thin_events(graph))
        _ingest(store, settings, events)
        pending = sync_index(store, policy, index)
        out.print(f"search: {pending.indexed:,} documents indexed as [bold]pending[/bold] before any enrichment")
        _enrich(store, policy, index, total=len(events))
        stats = httpx.get(simulator.url + "/admin/stats", timeout=10).json()["sources"]
        _summary(store, policy, stats)
        _reads(store, settings, policy, index)
        index.close()


@contextmanager
def _search_server(settings: Settings) -> Iterator[str]:
    """ELASTICSEARCH_URL when set; otherwise the Elasticsearch-compatible server from noida-db."""
    if settings.elasticsearch_url:
        yield settings.elasticsearch_url
        return
    with LocalElasticsearch(DEMO_SEARCH_DIR) as server:
        yield server.url


def _ingest(store: FactStore, settings: Settings, events: list[dict[str, str]]) -> None:
    out = console()
    headers = {"content-type": "application/x-ndjson"}
    if settings.api_token:
        headers["authorization"] = f"Bearer {settings.api_token}"
    body = "\n".join(json.dumps(e) for e in events)
    with BackgroundServer(create_app(store, settings)) as server, httpx.Client(
        base_url=server.url, headers=headers, timeout=60
    ) as client:
        bad = body + '\n{"entity_type": "nope", "entity_id": "x", "event_type": "created"}'
        rejected = client.post("/v1/events", content=bad)
        problem = rejected.json()["problems"][0]
        out.print(f"POST /v1/events, {len(events) + 1:,} events with one bad line -> [red]{rejected.status_code}[/red] "
                  f"(line {problem['line']}: {problem['message'][:60]}...); nothing written")
        started = time.time()
        accepted = client.post("/v1/events", content=body)
        accepted.raise_for_status()
        out.print(f"POST /v1/events, {len(events):,} thin events -> [green]{accepted.status_code}[/green] in "
                  f"{(time.time() - started) * 1000:.0f} ms; no source was called")


def _enrich(store: FactStore, policy: Policy, index: SearchIndex, *, total: int) -> None:
    with Progress(TextColumn("enriching"), BarColumn(), MofNCompleteColumn(), TextColumn("settled"),
                  TimeElapsedColumn(), console=console()) as progress:
        task = progress.add_task("enrich", total=total)
        for _ in range(MAX_CYCLES):
            enrich_once(store, policy)
            sync_index(store, policy, index)
            settled = sum(c for s in store.status() for state, c in s.counts.items()
                          if state in ("fully_enriched", "deleted", "quarantined"))
            progress.update(task, completed=min(settled, total))
            if not store.due_work():
                break


def _summary(store: FactStore, policy: Policy, stats: dict) -> None:
    out = console()
    now = store.now()
    out.print(status_table(store.status(), now))

    edges = Table(title="Derived edges (live)", title_justify="left")
    for column in ("from", "relation", "to", "edges"):
        edges.add_column(column, justify="right" if column == "edges" else "left")
    for (src, relation, dst), count in sorted(store.edge_counts().items()):
        edges.add_row(src, relation, dst, f"{count:,}")
    out.print(edges)

    calls = Table(title="Calls each source system received", title_justify="left")
    for column in ("source", "requests", "peak req/s"):
        calls.add_column(column, justify="left" if column == "source" else "right")
    for name, source in sorted(stats.items()):
        calls.add_row(name, f"{source['requests']:,}", str(source["peak_rps"]))
    out.print(calls)

    # The type with the most derived relations, and one of its entities that has all of them, makes
    # the best example of multi-hop answers.
    root_type = max(policy.policies, key=lambda t: len(policy.effective(t).edges))
    candidates = [set(store.edge_sources(root_type, r.relation, limit=500)) for r in policy.effective(root_type).edges]
    complete = set.intersection(*candidates) if candidates else set()
    for sample in sorted(complete)[:1]:
        record = store.get_entity(root_type, sample)
        staleness = humanize_seconds(record.staleness_seconds(now) or 0) if record else "?"
        out.print(f"\n[bold]{root_type} {sample}[/bold] (last enriched {staleness} ago)")
        for edge in store.edges_of(root_type, sample):
            hops = " -> ".join(f"{t} {i}" for t, i in edge["path"][1:-1])
            out.print(f"  --{edge['relation']}--> {edge['dst_type']} {edge['dst_id']}   "
                      f"[dim]{'via ' + hops if hops else 'directly'}[/dim]")

    lags = store.enrichment_lags()
    if lags:
        p50, p95 = lags[len(lags) // 2], lags[max(int(len(lags) * 0.95) - 1, 0)]
        out.print(f"ingest -> fully enriched: p50 {p50:.1f} s, p95 {p95:.1f} s over {len(lags):,} entities")


def _reads(store: FactStore, settings: Settings, policy: Policy, index: SearchIndex) -> None:
    """What a user does next: search, then walk the edges of a hit, each answer with its staleness."""
    out = console()
    index.refresh()
    root_type = max(policy.policies, key=lambda t: len(policy.effective(t).edges))
    with BackgroundServer(create_app(store, settings, index)) as server, httpx.Client(
        base_url=server.url, timeout=30
    ) as client:
        [hit] = client.get("/v1/search", params={"q": "", "type": root_type, "size": 1}).json()["hits"]
        out.print(f"\nGET /v1/search?type={root_type} -> {hit['entity_id']} \"{hit['name']}\" "
                  f"state={hit['state']} staleness={hit['staleness_seconds']:.1f}s")
        started = time.perf_counter()
        answer = client.get(f"/v1/entities/{root_type}/{hit['entity_id']}/edges").json()
        elapsed = (time.perf_counter() - started) * 1000
        relations = sorted({e["relation"] for e in answer["edges"]})
        out.print(f"GET /v1/entities/{root_type}/{hit['entity_id']}/edges -> {len(answer['edges'])} edges "
                  f"({', '.join(relations)}) in {elapsed:.1f} ms, staleness={answer['staleness_seconds']:.1f}s, "
                  f"partial={answer['partial']}")
    out.print("Next: `.venv/bin/enrichment status`, `.venv/bin/enrichment serve` for the API, "
              "`.venv/bin/enrichment simulate` to play the sources yourself.")
