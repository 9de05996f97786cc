"""The main job, ``make demo``: thin events in over HTTP, Dagster enriching them, the graph, search and
staleness out, and the Dagster UI left up to browse.

It starts a fact store (an embedded PostgreSQL unless ENRICHMENT_DATABASE_URL is set), the source
simulator, an Elasticsearch-compatible server (unless ELASTICSEARCH_URL is set), the ingest/read API and
Dagster (webserver + daemon, DAGSTER_HOME=.enrichment/dagster on SQLite), all on local ports. It sends the
simulator's thin events through the API (first a batch with one bad line, which is rejected whole), then
only watches: the sensor turns the new entities into runs of the types' branches. Once every entity is
enriched (or partial for a stated reason) it prints the state, the derived edges, one entity's multi-hop
answers, a search hit with its staleness and how long entities took from ingest to searchable, and
leaves the UI up until Ctrl-C (``DEMO_EXIT=1`` exits instead). Every process it started stops with it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.console import console, humanize_seconds, status_table
from enrichment_assets.defs.sensors import IN_FLIGHT
from enrichment_assets.dev.devservers import LocalElasticsearch, LocalPostgres, free_port
from enrichment_assets.dev.local_dagster import LOCATION, LocalDagster
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.server import simulator_server
from enrichment_assets.factstore import FactStore
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.search import SearchIndex
from enrichment_assets.settings import SHIPPED_POLICY, Settings

SCALE = 0.1
STATE_DIR = Path(".enrichment")
UI_PORT = 3000
SENSOR_INTERVAL_SECONDS = 5
WAIT_LIMIT_SECONDS = 900
# A partially resolved entity is always waiting on a reference its source named that does not exist yet.
SETTLED = ("fully_enriched", "partially_resolved", "deleted", "quarantined")


def run_demo(settings: Settings) -> None:
    """Run the demo with ``settings``' database and token, on the shipped policy the simulator plays."""
    policy = load_policy(SHIPPED_POLICY)
    settings = replace(settings, policy=policy, policy_path=SHIPPED_POLICY, entity_types=policy.entity_type_names)
    out = console()
    out.rule("enrichment_assets demo")
    _stop_on_signals()
    with ExitStack() as stack:
        database_url = stack.enter_context(_fact_store_database())
        search_url = stack.enter_context(_search_server(settings))
        simulator = stack.enter_context(simulator_server(seed=7, scale=SCALE))
        settings = replace(settings, database_url=database_url, elasticsearch_url=search_url)
        store = FactStore.from_url(database_url)
        store.migrate()
        stack.callback(store.dispose)
        index = SearchIndex.from_url(search_url, alias=settings.index_alias)
        index.ensure()
        stack.callback(index.close)
        api = stack.enter_context(BackgroundServer(create_app(store, settings, index)))
        graph = simulator.simulator.graph.snapshot()
        out.print(
            f"fact store: [bold]{store.dialect}[/bold]; sources: simulator on {simulator.url} "
            f"({sum(graph.counts().values()):,} entities, {len(policy.sources)} systems); search on {search_url}; "
            f"API on {api.url}"
        )
        dagster = stack.enter_context(_dagster(settings, simulator.environ()))
        events = list(thin_events(graph))
        ingested_at = _ingest(api.url, settings, events)
        searchable = _wait(store, index, dagster, total=len(events), ingested_at=ingested_at)
        stats = httpx.get(simulator.url + "/admin/stats", timeout=10).json()["sources"]
        _summary(store, policy, stats, dagster, ingested_at)
        _reads(api.url, settings, policy)
        _latency(searchable)
        _linger(dagster, _showcase_type(policy))


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM unwind the demo, so every process it started is stopped.

    Set explicitly: a process started in the background by a non-interactive shell (a CI script, a
    terminal multiplexer's job) inherits SIGINT as ignored, and SIGTERM's default would kill the demo
    without stopping its servers.
    """

    def interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


@contextmanager
def _fact_store_database() -> Iterator[str]:
    """ENRICHMENT_DATABASE_URL when set; otherwise an embedded PostgreSQL for the length of the demo.

    PostgreSQL rather than the SQLite quick-start file because several Dagster run workers write at
    once, and row locks with SKIP LOCKED keep them out of each other's way where SQLite would take
    turns on one file lock.
    """
    given = os.environ.get("ENRICHMENT_DATABASE_URL")
    if given:
        yield given
        return
    with _step("starting an embedded PostgreSQL for the fact store"):
        server = LocalPostgres(STATE_DIR / "postgres", durable=True).start()
    try:
        yield server.url("postgres")
    finally:
        server.stop()


@contextmanager
def _search_server(settings: Settings) -> Iterator[str]:
    """ELASTICSEARCH_URL when set; otherwise the Elasticsearch-compatible server from noida-db."""
    if settings.elasticsearch_url:
        yield settings.elasticsearch_url
        return
    # The embedded fact store starts empty every time, so its versions start again at 1; an index
    # kept from the last demo would hold newer versions and refuse every write as superseded.
    data_dir = STATE_DIR / "elasticsearch"
    shutil.rmtree(data_dir, ignore_errors=True)
    with _step("starting the Elasticsearch-compatible server"):
        server = LocalElasticsearch(data_dir).start()
    try:
        yield server.url
    finally:
        server.stop()


@contextmanager
def _dagster(settings: Settings, sources_env: dict[str, str]) -> Iterator[LocalDagster]:
    home = Path(os.environ.get("DAGSTER_HOME") or STATE_DIR / "dagster")
    port = UI_PORT if _port_free(UI_PORT) else free_port()
    env = {
        **sources_env,
        "ENRICHMENT_DATABASE_URL": settings.database_url,
        "ELASTICSEARCH_URL": settings.elasticsearch_url or "",
        "ENRICHMENT_INDEX_ALIAS": settings.index_alias,
        "ENRICHMENT_POLICY": str(SHIPPED_POLICY),
        "ENRICHMENT_SENSOR_INTERVAL_SECONDS": str(SENSOR_INTERVAL_SECONDS),
    }
    dagster = LocalDagster(home, env, port=port)
    with _step(f"starting Dagster (webserver + daemon, DAGSTER_HOME={home})"):
        dagster.start()
    console().print(
        f"Dagster UI: [bold]{dagster.url}[/bold]" + ("" if port == UI_PORT else f" (port {UI_PORT} was taken)")
    )
    try:
        yield dagster
    finally:
        with _step("stopping Dagster"):
            dagster.stop()


@contextmanager
def _step(description: str) -> Iterator[None]:
    with Progress(
        SpinnerColumn(), TextColumn(description), TimeElapsedColumn(), console=console(), transient=True
    ) as progress:
        progress.add_task(description, total=None)
        yield
    console().print(f"[dim]{description}: done[/dim]")


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _ingest(api_url: str, settings: Settings, events: list[dict[str, str]]) -> float:
    """Post the events through the API; returns when they were accepted (epoch seconds)."""
    out = console()
    headers = {"content-type": "application/x-ndjson"}
    if settings.api_token:
        headers["authorization"] = f"Bearer {settings.api_token}"
    body = "\n".join(json.dumps(e) for e in events)
    with httpx.Client(base_url=api_url, headers=headers, timeout=60) as client:
        bad = body + '\n{"entity_type": "nope", "entity_id": "x", "event_type": "created"}'
        rejected = client.post("/v1/events", content=bad)
        problem = rejected.json()["problems"][0]
        out.print(
            f"POST /v1/events, {len(events) + 1:,} events with one bad line -> [red]{rejected.status_code}[/red] "
            f"(line {problem['line']}: {problem['message'][:60]}...); nothing written"
        )
        started = time.time()
        accepted = client.post("/v1/events", content=body)
        accepted.raise_for_status()
        out.print(
            f"POST /v1/events, {len(events):,} thin events -> [green]{accepted.status_code}[/green] in "
            f"{(time.time() - started) * 1000:.0f} ms; no source was called. The sensor takes it from here."
        )
    return started


def _wait(
    store: FactStore, index: SearchIndex, dagster: LocalDagster, *, total: int, ingested_at: float
) -> list[float]:
    """Watch the sensor's runs settle every entity; returns each entity's seconds from ingest to a
    searchable enriched document (polled once a second, so to within about a second)."""
    searchable: dict[str, float] = {}
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("searchable"),
        TimeElapsedColumn(),
        console=console(),
    ) as progress:
        task = progress.add_task("Dagster runs enriching", total=total)
        while True:
            now = time.time()
            index.refresh()
            for doc_id in _enriched_documents(index, ingested_at):
                searchable.setdefault(doc_id, now - ingested_at)
            runs = _runs(dagster, ingested_at)
            in_flight = sum(1 for r in runs if r["status"] in {s.value for s in IN_FLIGHT})
            progress.update(
                task,
                completed=min(len(searchable), total),
                description=f"Dagster runs enriching ({len(runs)} runs, {in_flight} in flight)",
            )
            if _settled(store) >= total and not in_flight and not store.index_backlog(limit=1):
                break
            if time.monotonic() > deadline:
                console().print(
                    f"[yellow]still not settled after {WAIT_LIMIT_SECONDS}s; showing what there is. "
                    f"Look at the runs in the Dagster UI ({dagster.url}/runs).[/yellow]"
                )
                break
            time.sleep(1)
    return sorted(searchable.values())


def _enriched_documents(index: SearchIndex, since: float) -> list[str]:
    """Documents enriched since ``since`` (epoch seconds): a second demo finds the first one's documents
    in the index, and they must not count as this ingest's."""
    query = {
        "bool": {
            "filter": [
                {"term": {"state": "fully_enriched"}},
                {"range": {"last_enriched_at": {"gte": datetime.fromtimestamp(since, UTC).isoformat()}}},
            ]
        }
    }
    answer = index.client.search(index=index.alias, query=query, size=10_000, source=False)
    return [hit["_id"] for hit in answer["hits"]["hits"]]


def _settled(store: FactStore) -> int:
    """Entities that need nothing more: enriched, deleted, quarantined, or partial and waiting on a
    reference that does not exist yet (which is why they are partial)."""
    return sum(c for s in store.status() for state, c in s.counts.items() if state in SETTLED)


def _runs(dagster: LocalDagster, since: float) -> list[dict[str, str]]:
    """This demo's runs: the instance keeps the history of earlier demos too."""
    query = (
        "query Runs($since: Float!) { runsOrError(filter: {createdAfter: $since}, limit: 500) "
        "{ ... on Runs { results { runId status jobName } } } }"
    )
    return dagster.graphql(query, {"since": since})["runsOrError"]["results"]


def _summary(store: FactStore, policy: Policy, stats: dict, dagster: LocalDagster, since: float) -> None:
    out = console()
    runs = _runs(dagster, since)
    by_status: dict[str, int] = {}
    for run in runs:
        by_status[run["status"]] = by_status.get(run["status"], 0) + 1
    out.print(
        f"Dagster ran {len(runs)} runs: "
        + ", ".join(f"{n} {status.lower()}" for status, n in sorted(by_status.items()))
    )
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

    root_type = _showcase_type(policy)
    candidates = [set(store.edge_sources(root_type, r.relation, limit=500)) for r in policy.effective(root_type).edges]
    complete = set.intersection(*candidates) if candidates else set()
    for sample in sorted(complete)[:1]:
        record = store.get_entity(root_type, sample)
        staleness = humanize_seconds(record.staleness_seconds(now) or 0) if record else "?"
        out.print(f"\n[bold]{root_type} {sample}[/bold] (last enriched {staleness} ago)")
        for edge in store.edges_of(root_type, sample):
            hops = " -> ".join(f"{t} {i}" for t, i in edge["path"][1:-1])
            out.print(
                f"  --{edge['relation']}--> {edge['dst_type']} {edge['dst_id']}   "
                f"[dim]{'via ' + hops if hops else 'directly'}[/dim]"
            )


def _reads(api_url: str, settings: Settings, policy: Policy) -> None:
    """What a user does next: search, then walk the edges of a hit, each answer with its staleness."""
    out = console()
    root_type = _showcase_type(policy)
    headers = {"authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as client:
        [hit] = client.get("/v1/search", params={"q": "", "type": root_type, "size": 1}).json()["hits"]
        out.print(
            f'\nGET /v1/search?type={root_type} -> {hit["entity_id"]} "{hit["name"]}" '
            f"state={hit['state']} staleness={hit['staleness_seconds']:.1f}s"
        )
        started = time.perf_counter()
        answer = client.get(f"/v1/entities/{root_type}/{hit['entity_id']}/edges").json()
        elapsed = (time.perf_counter() - started) * 1000
        relations = sorted({e["relation"] for e in answer["edges"]})
        out.print(
            f"GET /v1/entities/{root_type}/{hit['entity_id']}/edges -> {len(answer['edges'])} edges "
            f"({', '.join(relations)}) in {elapsed:.1f} ms, staleness={answer['staleness_seconds']:.1f}s, "
            f"partial={answer['partial']}"
        )


def _latency(searchable: list[float]) -> None:
    if not searchable:
        return
    p50 = searchable[len(searchable) // 2]
    p95 = searchable[max(int(len(searchable) * 0.95) - 1, 0)]
    console().print(
        f"ingest -> searchable and enriched: p50 {p50:.0f} s, p95 {p95:.0f} s, max {searchable[-1]:.0f} s "
        f"over {len(searchable):,} entities (sensor every {SENSOR_INTERVAL_SECONDS} s; "
        "each run pays Dagster's few seconds of launch)"
    )


def _showcase_type(policy: Policy) -> str:
    """The type with the most derived relations: its entities make the best example of multi-hop answers."""
    return max(policy.policies, key=lambda t: len(policy.effective(t).edges))


def _linger(dagster: LocalDagster, group: str) -> None:
    out = console()
    lineage = f"{dagster.url}/locations/{LOCATION}/asset-groups/{group}"
    out.print(
        f"\nDagster UI: [bold]{dagster.url}[/bold]  lineage of one branch: {lineage}\n"
        "Next: `.venv/bin/enrichment status`, `.venv/bin/enrichment search <words>`, a backfill from the UI "
        "(it recomputes the partitions you pick)."
    )
    if os.environ.get("DEMO_EXIT"):
        return
    out.print("[bold]The UI stays up until Ctrl-C[/bold] (DEMO_EXIT=1 make demo exits here instead).")
    try:
        signal.pause()
    except KeyboardInterrupt:
        out.print("stopping everything the demo started...")
