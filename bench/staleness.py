"""Staleness under load: ingest to a searchable derived edge with Dagster enriching, and what it costs ingest.

Everything runs for real on this machine, each server in its own process: a durable PostgreSQL (see
``_common``) holding the fact store and, in a second database, Dagster's storage (``--dagster-storage
sqlite`` puts that in ``$DAGSTER_HOME`` instead); the Elasticsearch-compatible server; the source
simulator as ``bench/enrich.py`` runs it (``--latency-ms`` added to every answer, no faults); ``enrichment
serve``; and, from phase 2
on, ``LocalDagster``: ``dagster-webserver`` plus ``dagster-daemon`` running ``uncached_entities_sensor``
every ``--sensor-interval`` seconds, at most ``--max-concurrent-runs`` runs at once, the sources' limits
shared by every run through the fact store (``local_dagster.instance_config``).

The events are the simulator graph's thin ``created`` events in its seeded shuffled order, except that
every entity follows the entities it references (a model instance after its model, pipeline run and
features, a run after its A/B tests and datasets, and so on), so each model instance's derived edges
can resolve the moment it is enriched. They are POSTed one event per request to ``/v1/events`` at
``--rate`` per second on a fixed schedule (open loop, up to 8 requests in flight, so a slow answer does
not delay the next send); an event's ingest latency runs from its send to the 202.

1. Idle baseline: after 5 s of untimed POSTs (a fresh server's first requests are slow), the next
   ``--minutes`` of the stream, with no Dagster process running.
2. Dagster starts and enriches that backlog (untimed warm-up; how long it took is printed).
3. Enrichment running: the next ``--minutes`` of the stream. For each model instance in it, staleness
   runs from its POST to the moment its search document (behind the index alias) carries every derived
   edge the simulator's graph implies for it. A separate process, every 0.5 s, asks the fact store
   which waiting instances are enriched with their document written (the outbox's acknowledgement),
   and fetches those documents (``mget`` in pages of 1,000), so a figure is an upper bound within one
   poll plus the fetch; fetching every waiting document every poll had made the watcher most of the
   search server's load. ``mget`` reads a document as soon as it is written; a ``_search`` sees it after the
   index's next refresh (``refresh_interval`` 1 s), which is not included. The emulator answers any
   ``_search`` in over a second at this size, so polling with one would load the server measured.
   Instances not searchable ``--give-up-seconds`` after the last POST are counted as such.

Then the time is split per model instance along the run that claimed it (Dagster's run, step and
event records over GraphQL, ``last_enriched_at`` from the fact store): until the sensor requested the
run, in the run queue, launching the run worker, worker start to claim, claim to edges settled,
settled to searchable. CPU seconds per process role (Linux ``/proc``) are printed for both phases,
with what the rest of the machine used, since a shared machine moves these figures most.

Targets: staleness p95 <= 30 s at 50 events/s; ingest p99 with enrichment running <= 1.2x the idle
p99. Timings are printed, never asserted.

Run: ``.venv/bin/python bench/staleness.py [--rate 50] [--minutes 2]`` (about 8 minutes at the
defaults on a 2-core machine); ``--quick`` for a smoke run of 15 s per phase. ``BENCH_DATABASE_URL``
and ``BENCH_ELASTICSEARCH_URL`` to use existing servers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import queue
import secrets
import signal
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _common import (
    SEED,
    api_server,
    console,
    describe_search,
    describe_server,
    elasticsearch_server,
    fresh_database,
    median,
    percentile,
    postgres_server,
    print_table,
    simulator_process,
    source_environ,
    verdict,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from enrichment_assets.dev.local_dagster import LOCATION, LocalDagster
from enrichment_assets.dev.simulator.catalog import REFERENCES
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import BASE_COUNTS, MdsGraph, count_for, generate_graph
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import PENDING_STATES, entities
from enrichment_assets.search.documents import document_id
from enrichment_assets.search.index import SearchIndex

ROOT_TYPE = "model_instance"
NDJSON = {"content-type": "application/x-ndjson"}
IN_FLIGHT = 8
WARMUP_SECONDS = 5  # of untimed POSTs before the idle phase: a fresh server's first requests are slow
POLL_SECONDS = 0.5
POLL_CHUNK = 1_000
WATCHED_FIELDS = (
    "entity_id",
    "relationships.relation",
    "relationships.other_id",
    "relationships.derived",
    "relationships.direction",
)
SENSOR_MAX_PAIRS = 8  # ENRICHMENT_SENSOR_MAX_PAIRS, set explicitly so the figure names it
TARGET_P95_SECONDS = 30.0
TARGET_RATIO = 1.2
OTHER_CPU_WARNING = 0.15  # share of the machine used by processes outside this benchmark
Edge = tuple[str, str]  # (relation, target id)

# -- the event stream ------------------------------------------------------------------------------


def referenced_first(graph: MdsGraph) -> list[dict[str, Any]]:
    """The graph's thin events in their shuffled order, each entity moved after everything it references."""
    by_key = {(e["entity_type"], e["entity_id"]): e for e in thin_events(graph)}
    ordered: list[dict[str, Any]] = []
    placed: set[tuple[str, str]] = set()

    def place(key: tuple[str, str]) -> None:
        if key in placed or key not in by_key:
            return
        placed.add(key)  # the reference graph is acyclic; marking first only guards against a bad graph
        for field_path, target_type in REFERENCES.get(key[0], {}).values():
            for target in graph.follow(key[0], key[1], field_path):
                place((target_type, target))
        ordered.append(by_key[key])

    for key in by_key:
        place(key)
    return ordered


def scale_for(events: int) -> float:
    """The smallest graph scale (to 0.01) with at least ``events`` entities."""
    scale = max(0.01, math.ceil(events / sum(BASE_COUNTS.values()) * 100) / 100)
    while sum(count_for(t, scale) for t in BASE_COUNTS) < events:
        scale += 0.01
    return round(scale, 2)


def body(event: Mapping[str, Any]) -> bytes:
    return (json.dumps(event, separators=(",", ":")) + "\n").encode()


# -- ingest at a fixed rate ------------------------------------------------------------------------


@dataclass
class Ingest:
    """One phase of paced single-event POSTs: per event its send time (epoch) and latency (s)."""

    label: str
    rate: float
    sent_at: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    late: list[float] = field(default_factory=list)  # send time behind schedule
    wall: float = 0.0
    errors: int = 0
    retries: int = 0  # POSTs sent again after the connection failed (events are idempotent)
    started_at: float = 0.0
    load: float = 0.0  # 1-minute load average when the phase ended (the machine may run other work)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by role during the phase

    def ms(self, q: float) -> float:
        return percentile(self.latency, q) * 1000

    @property
    def achieved(self) -> float:
        return len(self.latency) / self.wall if self.wall else 0.0


async def _paced(
    url: str,
    events: Sequence[Mapping[str, Any]],
    result: Ingest,
    on_sent: Callable[[int, float], None],
    progress: Callable[[int], None],
) -> None:
    bodies = [body(e) for e in events]
    result.sent_at = [0.0] * len(bodies)
    result.latency = [0.0] * len(bodies)
    result.late = [0.0] * len(bodies)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(IN_FLIGHT)))  # open the connections

        async def post(index: int, due: float) -> None:
            started = time.perf_counter()
            result.sent_at[index] = time.time()
            result.late[index] = started - due
            on_sent(index, result.sent_at[index])
            for attempt in range(3):
                try:
                    response = await client.post("/v1/events", content=bodies[index], headers=NDJSON)
                    break
                except httpx.TransportError:
                    # A pooled connection can fail under a request (a reset, a keep-alive race). The
                    # event is idempotent, so send it again as a producer would; the retry is timed.
                    if attempt == 2:
                        raise
                    result.retries += 1
            result.latency[index] = time.perf_counter() - started
            if response.status_code != 202:
                result.errors += 1

        tasks = []
        result.started_at = time.time()
        start = time.perf_counter() + 0.2
        for index in range(len(bodies)):
            due = start + index / result.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(index, due)))
            if index % max(int(result.rate), 1) == 0:
                progress(index)
        await asyncio.gather(*tasks)
        result.wall = time.perf_counter() - start


def ingest_at_rate(
    url: str,
    label: str,
    events: Sequence[Mapping[str, Any]],
    rate: float,
    *,
    cpu: Callable[[], dict[str, float]],
    on_sent: Callable[[int, float], None] = lambda i, t: None,
) -> Ingest:
    result = Ingest(label, rate)
    before = cpu()
    with console.status(f"{label}: POSTing {len(events):,} events at {rate:g}/s") as status:

        def progress(index: int) -> None:
            status.update(f"{label}: {index:,}/{len(events):,} events sent at {rate:g}/s")

        asyncio.run(_paced(url, events, result, on_sent, progress))
    result.load = os.getloadavg()[0]
    result.cpu = {role: seconds - before.get(role, 0.0) for role, seconds in cpu().items()}
    if result.errors:
        raise RuntimeError(f"{label}: {result.errors} events were not accepted")
    if result.retries:
        console.print(
            f"[yellow]{label}: {result.retries} POSTs were sent again after their connection "
            "failed (counted in their latency)[/yellow]"
        )
    return result


# -- CPU by process (Linux /proc; the machine may run other work) -------------------------------------

DAGSTER = "Dagster (daemon, webserver, code servers, run workers)"
# Matched on a process's command line or an ancestor's, up to (not including) this benchmark. All of
# Dagster is one role: a code server that exits is reaped by the daemon or the webserver, so its CPU
# (run workers' included) moves to them, and a finer split could show negative deltas.
CPU_ROLES = (
    ("dagster-daemon", DAGSTER),
    ("dagster-webserver", DAGSTER),
    ("-m dagster api", DAGSTER),
    ("bin/dagster api", DAGSTER),
    ("enrichment_assets.dev.codeserver", DAGSTER),
    ("noida-db", "search server (noida-db)"),
    (" serve --host", "API server (enrichment serve)"),
    ("enrichment_assets.dev.simulator", "source simulator"),
)


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent pid, command line, CPU seconds including reaped children)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        table[int(entry.name)] = (int(fields[1]), command, sum(int(f) for f in fields[11:15]) / tick)
    return table


def process_roles(
    table: Mapping[int, tuple[int, str, float]], postgres_port: int | None
) -> dict[int, tuple[str, list[str]]]:
    """pid -> (role, command lines from the process up to this benchmark) for this benchmark's process
    tree and its PostgreSQL server (by port); other processes are left out."""
    me = os.getpid()
    roles: dict[int, tuple[str, list[str]]] = {}
    for pid in table:
        current, chain = pid, []
        while current in table and current > 1:
            if current == me:
                roles[pid] = (next((name for text, name in CPU_ROLES for c in chain if text in c), "benchmark"), chain)
                break
            command = table[current][1]
            chain.append(command)
            if postgres_port and f"-p {postgres_port} " in command and "postgres" in command:
                roles[pid] = ("PostgreSQL", chain)
                break
            current = table[current][0]
    return roles


def cpu_snapshot(postgres_port: int | None) -> dict[str, float]:
    """CPU seconds so far by role: this benchmark's process tree, its PostgreSQL server (by port), and
    the whole machine (``/proc/stat``), so the rest is everything else running here."""
    table = _proc_table()
    used: dict[str, float] = defaultdict(float)
    for pid, (role, _) in process_roles(table, postgres_port).items():
        used[role] += table[pid][2]
    with open("/proc/stat") as stat:
        jiffies = [int(v) for v in stat.readline().split()[1:]]
    busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
    used["machine"] = busy / os.sysconf("SC_CLK_TCK")
    return used


# -- the search watcher, in its own process ---------------------------------------------------------


def _watch(es_url: str, alias: str, facts_url: str, inbox: mp.Queue, outbox: mp.Queue, stop: Any) -> None:
    """Every ``POLL_SECONDS``, fetch the documents of the waiting model instances that the fact store
    says are indexed as enriched; report (id, epoch seconds) once one carries every expected derived
    edge. Runs in a child process so that its polling shares no GIL with the sender.

    Asking the store first keeps the watcher's load on the search server to the documents that may
    have become complete since the last poll, instead of every waiting one every poll (with a backlog of
    a few thousand, that was most of the search server's work, and it grew with the staleness it
    measured). A document cannot carry its derived edges before its entity is enriched and the outbox
    has written it; the acknowledgement follows the bulk write within milliseconds, and a document whose
    entity changed again since waits for its next write, so the figures can only err late.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops this process
    index = SearchIndex.from_url(es_url, alias=alias)
    store = sa.create_engine(make_url(facts_url).set(drivername="postgresql+psycopg2"))
    waiting: dict[str, set[Edge]] = {}
    polls, poll_seconds = 0, 0.0
    incomplete: dict[str, list[Edge]] = {}
    while not stop.is_set():
        tick = time.monotonic()
        while True:
            try:
                entity_id, expected = inbox.get_nowait()
            except queue.Empty:
                break
            waiting[entity_id] = {tuple(e) for e in expected}  # type: ignore[misc]
        ids = _indexed_as_enriched(store, list(waiting)) if waiting else []
        for start in range(0, len(ids), POLL_CHUNK):
            began = time.perf_counter()
            # mget, not _search: the emulator answers any _search in over a second at this index size
            # (measured: 1.2 s for match_all, 2.4 s with the nested filter) and would spend a core on
            # this loop; mget of 500 documents takes ~40 ms.
            page = [document_id(ROOT_TYPE, i) for i in ids[start : start + POLL_CHUNK]]
            answer = index.client.mget(index=alias, ids=page, source_includes=list(WATCHED_FIELDS))
            seen_at = time.time()
            polls += 1
            poll_seconds += time.perf_counter() - began
            for doc in answer["docs"]:
                if not doc.get("found"):
                    continue
                source = doc["_source"]
                found = {
                    (r["relation"], r["other_id"])
                    for r in source.get("relationships", [])
                    if r.get("derived") and r.get("direction") == "out"
                }
                entity_id = source["entity_id"]
                if waiting[entity_id] <= found:
                    outbox.put((entity_id, seen_at))
                    del waiting[entity_id]
                    incomplete.pop(entity_id, None)
                elif found:
                    incomplete[entity_id] = sorted(waiting[entity_id] - found)
        stop.wait(max(POLL_SECONDS - (time.monotonic() - tick), 0.0))
    outbox.put(("stats", {"polls": polls, "poll_seconds": poll_seconds, "incomplete": incomplete}))
    index.close()
    store.dispose()


def _indexed_as_enriched(store: sa.Engine, ids: list[str]) -> list[str]:
    """The model instances among ``ids`` that are enriched and whose document the outbox has written."""
    stmt = sa.select(entities.c.entity_id).where(
        entities.c.entity_type == ROOT_TYPE,
        entities.c.entity_id == sa.any_(sa.cast(sa.bindparam("ids", value=ids), postgresql.ARRAY(sa.Text()))),
        entities.c.last_enriched_at.is_not(None),
        entities.c.indexed_version >= entities.c.doc_version,
    )
    with store.connect() as conn:
        return list(conn.scalars(stmt))


class Watcher:
    """``with Watcher(es_url, alias, facts_url) as w: w.expect(id, edges); w.collect()`` -> searchable times."""

    def __init__(self, es_url: str, alias: str, facts_url: str) -> None:
        context = mp.get_context("spawn")
        self._inbox: mp.Queue = context.Queue()
        self._outbox: mp.Queue = context.Queue()
        self._stop = context.Event()
        self._process = context.Process(
            target=_watch,
            name="staleness-watcher",
            daemon=True,
            args=(es_url, alias, facts_url, self._inbox, self._outbox, self._stop),
        )
        self.visible: dict[str, float] = {}
        self.stats: dict[str, Any] = {}

    def __enter__(self) -> Watcher:
        self._process.start()
        return self

    def expect(self, entity_id: str, edges: set[Edge]) -> None:
        self._inbox.put((entity_id, sorted(edges)))

    def collect(self) -> dict[str, float]:
        """Searchable times reported so far (epoch seconds by id)."""
        while True:
            try:
                item = self._outbox.get_nowait()
            except queue.Empty:
                return self.visible
            self._take(item)

    def _take(self, item: Any) -> None:
        if item[0] == "stats":
            self.stats = item[1]
        else:
            self.visible[item[0]] = item[1]

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        deadline = time.monotonic() + 30
        while not self.stats and self._process.is_alive() and time.monotonic() < deadline:
            try:
                self._take(self._outbox.get(timeout=0.5))
            except queue.Empty:
                pass
        self.collect()
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# -- Dagster's record of the runs -------------------------------------------------------------------

RUNS_QUERY = """
query Runs($after: Float!) {
  runsOrError(filter: {createdAfter: $after}, limit: 5000) { ... on Runs { results {
    runId jobName status creationTime startTime endTime
    stepStats { stepKey status startTime endTime }
    eventConnection(limit: 1000) { events {
      ... on MessageEvent { eventType timestamp }
      ... on MaterializationEvent {
        assetKey { path }
        metadataEntries { label ... on IntMetadataEntry { intValue } }
      }
      ... on ExecutionStepFailureEvent { stepKey error { message errorChain { error { message } } } }
      ... on RunFailureEvent { message }
    } }
  } } }
}"""
LIFECYCLE = ("RUN_ENQUEUED", "RUN_STARTING", "RUN_START")
TICKS_QUERY = """
query Ticks($selector: SensorSelector!, $after: Float!) {
  sensorOrError(sensorSelector: $selector) { ... on Sensor { sensorState {
    ticks(afterTimestamp: $after, limit: 5000) { timestamp endTimestamp status runIds skipReason }
  } } }
}"""
SENSOR = {
    "repositoryLocationName": LOCATION,
    "repositoryName": "__repository__",
    "sensorName": "uncached_entities_sensor",
}


@dataclass(frozen=True)
class Run:
    run_id: str
    job: str
    status: str
    created: float
    started: float | None
    ended: float | None
    steps: Mapping[str, tuple[float | None, float | None]]  # "<type>/<step>" -> (start, end)
    lifecycle: Mapping[str, float]  # RUN_STARTING etc. -> epoch seconds
    counts: Mapping[str, int]  # "<type>/<step>.<metadata label>" -> value, e.g. "team/candidates.claimed"
    failures: Sequence[str] = ()  # a failed step's key and the first line of its error; a run failure's message

    @property
    def dequeued(self) -> float | None:
        """When the run coordinator took it off the queue (``RUN_STARTING``) and began to launch it."""
        return self.lifecycle.get("RUN_STARTING")

    def step(self, name: str, entity_type: str = ROOT_TYPE) -> tuple[float | None, float | None]:
        return self.steps.get(f"{entity_type}/{name}", (None, None))

    def count(self, key: str, entity_type: str = ROOT_TYPE) -> int | None:
        return self.counts.get(f"{entity_type}/{key}")

    def total(self, key: str) -> int:
        """``key`` summed over the run's branches (a run of the enrichment job selects several)."""
        return sum(n for k, n in self.counts.items() if k.split("/", 1)[-1] == key)

    @property
    def types(self) -> list[str]:
        return sorted({key.split("/")[0] for key in self.steps})


def _failure(event: Mapping[str, Any]) -> str:
    """One line for a step failure (its step and the first line of the innermost error, which is the
    cause: Dagster wraps it in "Error occurred while executing op") or a run failure."""
    if "error" in event:
        error = event["error"] or {}
        innermost = ([link["error"] for link in error.get("errorChain") or []] or [error])[-1]
        lines = (innermost.get("message") or "").strip().splitlines() or ["(no message)"]
        return f"{event.get('stepKey')}: {lines[0][:200]}"
    return str(event["message"])[:200]


def dagster_runs(dagster: LocalDagster, after: float) -> list[Run]:
    results = dagster.graphql(RUNS_QUERY, {"after": after})["runsOrError"]["results"]
    return sorted(
        (
            Run(
                r["runId"],
                r["jobName"],
                r["status"],
                r["creationTime"],
                r["startTime"],
                r["endTime"],
                {s["stepKey"].replace("__", "/"): (s["startTime"], s["endTime"]) for s in r["stepStats"]},
                {
                    e["eventType"]: int(e["timestamp"]) / 1000
                    for e in r["eventConnection"]["events"]
                    if e.get("eventType") in LIFECYCLE
                },
                {
                    f"{'/'.join(e['assetKey']['path'])}.{m['label']}": m["intValue"]
                    for e in r["eventConnection"]["events"]
                    if e.get("assetKey")
                    for m in e["metadataEntries"]
                    if m.get("intValue") is not None
                },
                [_failure(e) for e in r["eventConnection"]["events"] if "error" in e or "message" in e],
            )
            for r in results
        ),
        key=lambda r: r.created,
    )


def finished_runs(dagster: LocalDagster, after: float, timeout: float = 120) -> list[Run]:
    """Runs created after ``after``, once those that were in flight have ended (or ``timeout`` passed)."""
    deadline = time.monotonic() + timeout
    runs = dagster_runs(dagster, after)
    waiting = {r.run_id for r in runs if r.ended is None}
    while waiting and time.monotonic() < deadline:
        time.sleep(2)
        runs = dagster_runs(dagster, after)
        waiting &= {r.run_id for r in runs if r.ended is None}
    return runs


def sensor_ticks(dagster: LocalDagster, after: float) -> list[dict[str, Any]]:
    answer = dagster.graphql(TICKS_QUERY, {"selector": SENSOR, "after": after})["sensorOrError"]
    return sorted(answer["sensorState"]["ticks"], key=lambda t: t["timestamp"])


# -- the phases -------------------------------------------------------------------------------------


@dataclass
class Staleness:
    """Model instances of the measured phase: POST time, searchable time (if seen) and the breakdown."""

    sent_at: dict[str, float]
    committed_at: dict[str, float]
    visible_at: dict[str, float]
    give_up: float
    watcher_stats: dict[str, Any]

    def seconds(self) -> list[float]:
        """Staleness per instance; one never seen counts as infinitely stale."""
        return [self.visible_at[i] - t if i in self.visible_at else math.inf for i, t in self.sent_at.items()]


def pending_counts(store: FactStore) -> tuple[int, int]:
    """(entities still to enrich, documents behind the index)."""
    with store.engine.connect() as conn:
        pending = conn.execute(sa.select(sa.func.count()).where(entities.c.state.in_(PENDING_STATES))).scalar_one()
        behind = conn.execute(
            sa.select(sa.func.count()).where(entities.c.indexed_version < entities.c.doc_version)
        ).scalar_one()
    return pending, behind


def drain(store: FactStore, timeout: float) -> float | None:
    """Seconds until nothing is left to enrich or index, or None if ``timeout`` passed first."""
    started = time.monotonic()
    with console.status("warm-up: Dagster enriching the idle phase's backlog") as status:
        while time.monotonic() - started < timeout:
            pending, behind = pending_counts(store)
            if pending == 0 and behind == 0:
                return time.monotonic() - started
            status.update(
                f"warm-up: Dagster enriching the idle backlog: {pending:,} entities to enrich, "
                f"{behind:,} documents to index ({time.monotonic() - started:.0f} s)"
            )
            time.sleep(1)
    return None


def derived_edges(graph: MdsGraph, entity_id: str) -> set[Edge]:
    """(relation, target id) of every derived edge the simulator's graph implies for a model instance."""
    return {
        (relation, target)
        for relation, targets in graph.expected_edges(ROOT_TYPE, entity_id).items()
        for target in targets
    }


def measure(
    url: str,
    events: Sequence[Mapping[str, Any]],
    rate: float,
    graph: MdsGraph,
    es_url: str,
    alias: str,
    facts_url: str,
    give_up: float,
    cpu: Callable[[], dict[str, float]],
) -> tuple[Ingest, Staleness]:
    expected = {e["entity_id"]: derived_edges(graph, e["entity_id"]) for e in events if e["entity_type"] == ROOT_TYPE}
    with Watcher(es_url, alias, facts_url) as watcher:

        def on_sent(index: int, at: float) -> None:
            event = events[index]
            if event["entity_type"] == ROOT_TYPE and expected[event["entity_id"]]:
                watcher.expect(event["entity_id"], expected[event["entity_id"]])

        ingest = ingest_at_rate(url, "enrichment running", events, rate, cpu=cpu, on_sent=on_sent)
        measured = {
            e["entity_id"]: i
            for i, e in enumerate(events)
            if e["entity_type"] == ROOT_TYPE and expected[e["entity_id"]]
        }
        deadline = time.monotonic() + give_up
        with console.status("waiting for the last derived edges to become searchable") as status:
            while time.monotonic() < deadline:
                seen = len(watcher.collect())
                if seen >= len(measured):
                    break
                status.update(
                    f"searchable: {seen:,}/{len(measured):,} model instances "
                    f"(giving up in {deadline - time.monotonic():.0f} s)"
                )
                time.sleep(0.5)
    staleness = Staleness(
        sent_at={i: ingest.sent_at[n] for i, n in measured.items()},
        committed_at={i: ingest.sent_at[n] + ingest.latency[n] for i, n in measured.items()},
        visible_at=dict(watcher.visible),
        give_up=give_up,
        watcher_stats=watcher.stats,
    )
    return ingest, staleness


# -- where the time went ----------------------------------------------------------------------------

SEGMENTS = (
    "until the sensor requested its run",
    "in the run queue",
    "launching the run worker",
    "run worker start to claim",
    "claim to edges settled (hydrate, edges)",
    "settled to searchable (index, refresh, poll)",
)


def last_enriched(store: FactStore, ids: Sequence[str]) -> dict[str, float]:
    found: dict[str, float] = {}
    with store.engine.connect() as conn:
        for start in range(0, len(ids), 1000):
            rows = conn.execute(
                sa.select(entities.c.entity_id, entities.c.last_enriched_at).where(
                    entities.c.entity_type == ROOT_TYPE, entities.c.entity_id.in_(ids[start : start + 1000])
                )
            )
            found.update({i: at.timestamp() for i, at in rows if at is not None})
    return found


def breakdown(staleness: Staleness, runs: Sequence[Run], enriched: Mapping[str, float]) -> dict[str, list[float]]:
    """Seconds per segment for every searchable instance, along the first run that claimed after it was
    committed."""
    claims = sorted(
        ((r.step("candidates")[0], r) for r in runs if r.step("candidates")[0] is not None), key=lambda pair: pair[0]
    )  # type: ignore[arg-type,return-value]
    segments: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    for entity_id, visible in staleness.visible_at.items():
        committed = staleness.committed_at[entity_id]
        run = next((r for claimed, r in claims if claimed >= committed), None)  # type: ignore[operator]
        if run is None or run.started is None or entity_id not in enriched:
            continue
        marks = [
            staleness.sent_at[entity_id],
            run.created,
            run.dequeued or run.created,
            run.started,
            run.step("candidates")[0],
            enriched[entity_id],
            visible,
        ]
        for n in range(1, len(marks)):  # a run created before the POST (or a re-enrichment) counts as 0
            marks[n] = min(max(marks[n], marks[n - 1]), visible)  # type: ignore[type-var]
        for name, start, end in zip(SEGMENTS, marks, marks[1:], strict=False):
            segments[name].append(end - start)  # type: ignore[operator]
    return segments


# -- report -----------------------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    return "never" if math.isinf(seconds) else f"{seconds:.1f}"


def stale_at(seconds: Sequence[float], q: float) -> float:
    """``percentile`` that lets never-searchable instances (inf) sort last instead of turning it into nan."""
    ordered = sorted(seconds)
    rank = (len(ordered) - 1) * q / 100
    low, high = ordered[math.floor(rank)], ordered[math.ceil(rank)]
    return math.inf if math.isinf(high) else low + (high - low) * (rank - math.floor(rank))


def report(
    idle: Ingest,
    busy: Ingest,
    staleness: Staleness,
    segments: dict[str, list[float]],
    runs: Sequence[Run],
    ticks: Sequence[dict[str, Any]],
    environment: Sequence[str],
    warmup: str,
) -> None:
    ratio = busy.ms(99) / idle.ms(99)
    print_table(
        f"Ingest, single-event POST /v1/events at {idle.rate:g} events/s (ms)",
        ["phase", "events", "achieved rate", "p50", "p90", "p99", "max", "send lag p99", "load avg", "p99 vs idle"],
        [
            [
                run.label + (" (baseline)" if run is idle else ""),
                f"{len(run.latency):,}",
                f"{run.achieved:.1f}/s",
                *(f"{run.ms(q):.2f}" for q in (50, 90, 99)),
                f"{max(run.latency) * 1000:.1f}",
                f"{percentile(run.late, 99) * 1000:.1f}",
                f"{run.load:.1f}",
                f"{run.ms(99) / idle.ms(99):.2f}x",
            ]
            for run in (idle, busy)
        ],
    )
    seconds = staleness.seconds()
    never = sum(1 for s in seconds if math.isinf(s))
    print_table(
        "Ingest POST to a searchable derived edge, per model instance (s)",
        [
            "model instances",
            "searchable",
            "p50",
            "p90",
            "p95",
            "max",
            f"not searchable after {staleness.give_up:.0f} s",
        ],
        [
            [
                f"{len(seconds):,}",
                f"{len(seconds) - never:,}",
                *(fmt(stale_at(seconds, q)) for q in (50, 90, 95)),
                fmt(max(seconds)),
                f"{never:,}",
            ]
        ],
        caption=warmup,
    )
    total = sum(sum(v) for v in segments.values()) or 1.0
    print_table(
        f"Where the time went: {len(segments[SEGMENTS[0]]):,} searchable model instances, along the run "
        "that claimed each (s)",
        ["segment", "p50", "p95", "max", "share of the mean"],
        [
            [name, f"{median(v):.1f}", f"{percentile(v, 95):.1f}", f"{max(v):.1f}", f"{sum(v) / total:.0%}"]
            for name, v in segments.items()
            if v
        ],
    )
    report_cpu(idle, busy)
    report_runs([r for r in runs if r.created >= busy.started_at], ticks)
    console.print("\n".join(environment))
    p95 = stale_at(seconds, 95)
    console.print(
        f"Staleness p95: [bold]{fmt(p95)} s[/bold] (p50 {fmt(stale_at(seconds, 50))} s, max "
        f"{fmt(max(seconds))} s), {verdict(p95 <= TARGET_P95_SECONDS)} target <= "
        f"{TARGET_P95_SECONDS:.0f} s at 50 events/s (measured at {busy.rate:g}/s)"
    )
    console.print(
        f"Ingest p99: [bold]{busy.ms(99):.2f} ms[/bold] with enrichment running vs {idle.ms(99):.2f} ms "
        f"idle, ratio [bold]{ratio:.2f}x[/bold], {verdict(ratio <= TARGET_RATIO)} target <= {TARGET_RATIO}x"
    )
    stats = staleness.watcher_stats
    if stats.get("polls"):
        each = stats["poll_seconds"] / stats["polls"] * 1000
        console.print(f"Watcher: {stats['polls']:,} mget pages, {each:.0f} ms each on average")
    incomplete = stats.get("incomplete") or {}
    if incomplete:
        console.print(
            f"[red]{len(incomplete)} model instances had derived edges in search other than the "
            f"graph's; missing, e.g.: {list(incomplete.items())[:3]}[/red]"
        )


def report_cpu(idle: Ingest, busy: Ingest) -> None:
    cores = os.cpu_count() or 1
    roles = sorted(
        {r for phase in (idle, busy) for r in phase.cpu if r != "machine"}, key=lambda r: -busy.cpu.get(r, 0.0)
    )

    def others(phase: Ingest) -> float:
        return phase.cpu.get("machine", 0.0) - sum(phase.cpu.get(r, 0.0) for r in roles)

    def share(phase: Ingest, seconds: float) -> str:
        return f"{seconds:,.0f} s ({seconds / (phase.wall * cores):.0%})"

    rows = [[role, *(share(p, p.cpu.get(role, 0.0)) for p in (idle, busy))] for role in roles]
    rows.append(["everything else on this machine", *(share(p, others(p)) for p in (idle, busy))])
    rows.append(["machine, all processes", *(share(p, p.cpu.get("machine", 0.0)) for p in (idle, busy))])
    print_table(
        f"CPU while each phase was ingesting (seconds, and share of {cores} cores x its wall time)",
        ["role", idle.label, busy.label],
        rows,
    )
    for phase in (idle, busy):
        used = others(phase) / (phase.wall * cores)
        if used > OTHER_CPU_WARNING:
            console.print(
                f"[red]Other processes used {used:.0%} of this machine during the {phase.label} "
                "phase: its latencies (and the ratio) measure them too; run again on a quiet "
                "machine.[/red]"
            )


def _run_counts(runs: Sequence[Run]) -> str:
    """What the runs did, per run: entities claimed, source fetches, documents indexed (and how fast)."""

    def p50(values: Sequence[int | None]) -> float:
        known = [v for v in values if v is not None]
        return median(known) if known else 0.0

    rates = [
        r.count("index_updates.documents_indexed") / (end - start)
        for r in runs  # type: ignore[operator]
        if r.count("index_updates.documents_indexed") is not None
        for start, end in [r.step("index_updates")]
        if start and end and end > start
    ]
    return (
        f"Per run, p50: {p50([r.count('candidates.claimed') for r in runs]):,.0f} {ROOT_TYPE}s claimed, "
        f"{p50([r.total('hydrated.hydrated') for r in runs]):,.0f} entities fetched from sources (every "
        f"branch of the run), {p50([r.count('index_updates.documents_indexed') for r in runs]):,.0f} "
        f"documents indexed by its {ROOT_TYPE} branch (its own first, then what the search outbox held) at "
        f"{median(rates) if rates else 0:,.0f} documents/s; "
        f"{p50([len(r.types) for r in runs]):.0f} branches per run"
    )


def _p50_max(values: Sequence[float]) -> list[str]:
    return [f"{median(values):.1f}", f"{max(values):.1f}"] if values else ["-", "-"]


def report_runs(runs: Sequence[Run], ticks: Sequence[dict[str, Any]]) -> None:
    by_job: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        by_job[run.job].append(run)
    rows = []
    for job, group in sorted(by_job.items(), key=lambda item: -len(item[1])):
        queued = [r.dequeued - r.created for r in group if r.dequeued]
        launched = [r.started - r.dequeued for r in group if r.started and r.dequeued]
        took = [r.ended - r.started for r in group if r.started and r.ended]
        failed = sum(1 for r in group if r.status in ("FAILURE", "CANCELED"))
        indexed = sum(r.total("index_updates.documents_indexed") for r in group)
        superseded = sum(r.total("index_updates.superseded") for r in group)
        rows.append(
            [
                job,
                f"{len(group)}",
                *_p50_max(queued),
                *_p50_max(launched),
                *_p50_max(took),
                f"{indexed:,} ({superseded:,})",
                f"{failed}",
            ]
        )
    print_table(
        "Dagster runs created during the measured phase (s)",
        [
            "job",
            "runs",
            "in queue p50",
            "max",
            "dequeued to started p50",
            "max",
            "started to done p50",
            "max",
            "documents indexed (already newer)",
            "failed",
        ],
        rows,
    )

    failures = [f"{r.run_id[:8]} {line}" for r in runs if r.status in ("FAILURE", "CANCELED") for line in r.failures]
    for line in failures[:10]:
        console.print(f"[red]failed run[/red] {line}")

    root_runs = [r for r in runs if r.started and r.ended and r.step("candidates")[0] is not None]
    if root_runs:
        spans: dict[str, list[float]] = defaultdict(list)
        for run in root_runs:
            previous = run.started
            for name in ("candidates", "hydrated", "edges", "index_updates"):
                start, end = run.step(name)
                if start is None or end is None:
                    break
                spans[
                    "before candidates" if name == "candidates" else f"before {name} (other branches' steps too)"
                ].append(start - previous)  # type: ignore[operator]
                spans[name].append(end - start)
                previous = end
            spans["after the last step (asset checks)"].append(run.ended - previous)  # type: ignore[operator]
        run_time = sum(r.ended - r.started for r in root_runs)  # type: ignore[operator]
        print_table(
            f"Inside the {len(root_runs)} runs that enriched {ROOT_TYPE} (s): worker start, its steps, between them",
            ["span", "p50", "max", "share of run time"],
            [[name, f"{median(v):.2f}", f"{max(v):.2f}", f"{sum(v) / run_time:.0%}"] for name, v in spans.items() if v],
            caption=_run_counts(root_runs),
        )

    if len(ticks) > 1:
        gaps = [b["timestamp"] - a["timestamp"] for a, b in zip(ticks, ticks[1:], strict=False)]
        took = [t["endTimestamp"] - t["timestamp"] for t in ticks if t.get("endTimestamp")]
        requested = sum(1 for t in ticks if t["runIds"])
        busy = sum(1 for t in ticks if "already have a run" in (t.get("skipReason") or ""))
        console.print(
            f"Sensor: {len(ticks)} ticks, every {median(gaps):.1f} s (p50; max {max(gaps):.1f} s), "
            f"evaluation {median(took):.2f} s p50; {requested} ticks requested runs, {busy} "
            "skipped because every due (type, partition) already had a run in flight"
        )


# -- main -------------------------------------------------------------------------------------------


def dagster_postgres_url(url: str) -> str:
    """Dagster's storage URL: SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3, not installed."""
    return make_url(url).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)


@dataclass(frozen=True)
class Servers:
    """What ``start_servers`` started, each in its own process: URLs, the fact store, the search index."""

    tmp: Path  # logs and Dagster's home, deleted at the end
    sim_url: str
    es_url: str
    server_url: str  # the PostgreSQL server the databases below are on
    facts_url: str
    dagster_url: str | None  # Dagster's storage database; None keeps SQLite in Dagster's home
    store: FactStore
    index: SearchIndex
    alias: str
    api_url: str

    @property
    def postgres_port(self) -> int | None:
        return make_url(self.server_url).port


def start_servers(
    stack: ExitStack, *, name: str, scale: float, latency_ms: float, dagster_storage: str = "postgres"
) -> Servers:
    """The simulator at ``scale``, the search server, PostgreSQL with a fresh fact store (and, for
    ``dagster_storage="postgres"``, a second database for Dagster), a fresh index alias and ``enrichment
    serve``: everything but Dagster, stopped and deleted when ``stack`` closes."""
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{name}-")))
    sim_url = stack.enter_context(simulator_process(scale, latency_ms, tmp / "simulator.log"))
    es_url = stack.enter_context(elasticsearch_server())
    server_url = stack.enter_context(postgres_server())
    facts_url = stack.enter_context(fresh_database(server_url))
    dagster_url = (
        dagster_postgres_url(stack.enter_context(fresh_database(server_url))) if dagster_storage == "postgres" else None
    )
    store = FactStore.from_url(facts_url)
    stack.callback(store.dispose)
    store.migrate()
    alias = f"bench-{name}-{secrets.token_hex(4)}"
    index = SearchIndex.from_url(es_url, alias=alias)
    stack.callback(index.close)
    index.ensure()
    stack.callback(lambda: [index.client.indices.delete(index=each) for each in index.current_indices()])
    api_env = {**os.environ, "ENRICHMENT_DATABASE_URL": facts_url}
    api_env.pop("ENRICHMENT_API_TOKEN", None)
    api_url = stack.enter_context(api_server(api_env, tmp / "serve.log"))
    return Servers(tmp, sim_url, es_url, server_url, facts_url, dagster_url, store, index, alias, api_url)


def start_dagster(
    stack: ExitStack, servers: Servers, *, home: Path | None, sensor_interval: int, max_concurrent_runs: int
) -> LocalDagster:
    """``LocalDagster`` over ``servers`` with the sensor every ``sensor_interval`` seconds, stopped when
    ``stack`` closes; its home is ``home`` or a directory in ``servers.tmp``."""
    env = {
        **source_environ(servers.sim_url),
        "ENRICHMENT_DATABASE_URL": servers.facts_url,
        "ELASTICSEARCH_URL": servers.es_url,
        "ENRICHMENT_INDEX_ALIAS": servers.alias,
        "ENRICHMENT_SENSOR_INTERVAL_SECONDS": str(sensor_interval),
        "ENRICHMENT_SENSOR_MAX_PAIRS": str(SENSOR_MAX_PAIRS),
    }
    return stack.enter_context(
        LocalDagster(
            home or servers.tmp / "dagster",
            env,
            max_concurrent_runs=max_concurrent_runs,
            postgres_url=servers.dagster_url,
        )
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")
    parser.add_argument("--minutes", type=float, default=2.0, help="minutes per phase (default 2)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 15 s per phase")
    parser.add_argument(
        "--sensor-interval",
        type=int,
        default=5,
        help="ENRICHMENT_SENSOR_INTERVAL_SECONDS (default 5; the shipped default is 30)",
    )
    parser.add_argument(
        "--max-concurrent-runs", type=int, default=4, help="Dagster's run queue limit (default 4, LocalDagster's)"
    )
    parser.add_argument(
        "--dagster-storage",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="Dagster's run and event storage (default postgres, a second database)",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="latency the simulator adds to every source request (default 20)"
    )
    parser.add_argument(
        "--give-up-seconds",
        type=float,
        default=120.0,
        help="after the last POST, how long to wait for the last edges (default 120)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="longest warm-up for Dagster to enrich the idle backlog (default 600)",
    )
    parser.add_argument(
        "--dagster-home",
        type=Path,
        help="keep Dagster's home (dagster.yaml, daemon and webserver logs) here; by default "
        "a temporary directory, deleted at the end",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 0.25
    if args.rate <= 0 or args.minutes <= 0 or args.sensor_interval < 1 or args.max_concurrent_runs < 1:
        parser.error("--rate and --minutes must be positive; --sensor-interval and --max-concurrent-runs at least 1")
    return args


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM unwind ``main``'s ExitStack, so every server and process it started stops. A
    shell that starts this in the background may have left SIGINT ignored, so it is set explicitly."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    stop_on_signals()
    warm, per_phase = round(args.rate * WARMUP_SECONDS), round(args.rate * args.minutes * 60)
    scale = scale_for(warm + 2 * per_phase)
    with console.status(f"building the simulator graph (scale {scale:g}) and the event stream"):
        graph = generate_graph(SEED, scale)
        stream = referenced_first(graph)
    warm_events, idle_events = stream[:warm], stream[warm : warm + per_phase]
    busy_events = stream[warm + per_phase : warm + 2 * per_phase]

    with ExitStack() as stack:  # stops every server and process it started, Ctrl-C included
        servers = start_servers(
            stack, name="staleness", scale=scale, latency_ms=args.latency_ms, dagster_storage=args.dagster_storage
        )
        store = servers.store
        environment = [
            describe_server(store.engine),
            f"{describe_search(servers.index.client)}; simulator scale {scale:g}, {args.latency_ms:g} ms per request",
            f"Dagster {version('dagster')}: sensor every {args.sensor_interval} s, at most {SENSOR_MAX_PAIRS} "
            f"per-type runs per tick, max_concurrent_runs {args.max_concurrent_runs}, source limits shared "
            f"through the fact store, in-process executor, {args.dagster_storage} storage; {os.cpu_count()} CPUs",
        ]

        cpu = partial(cpu_snapshot, servers.postgres_port)
        ingest_at_rate(servers.api_url, "warm-up", warm_events, args.rate, cpu=cpu)
        idle = ingest_at_rate(servers.api_url, "idle, no Dagster", idle_events, args.rate, cpu=cpu)
        started = time.monotonic()
        with console.status("starting dagster-webserver and dagster-daemon"):
            dagster = start_dagster(
                stack,
                servers,
                home=args.dagster_home,
                sensor_interval=args.sensor_interval,
                max_concurrent_runs=args.max_concurrent_runs,
            )
        loaded = time.monotonic() - started
        drained = drain(store, args.drain_timeout)
        backlog = warm + per_phase
        if drained:
            warmup = (
                f"Warm-up: Dagster loaded in {loaded:.0f} s, then enriched and indexed the idle "
                f"phase's {backlog:,} entities in {drained:.0f} s ({backlog / drained:.0f} entities/s)"
            )
        else:
            warmup = (
                f"[red]Warm-up: the idle backlog was not drained in {args.drain_timeout:.0f} s; the "
                "measured phase started behind it[/red]"
            )
        measured_from = time.time()
        busy, staleness = measure(
            servers.api_url,
            busy_events,
            args.rate,
            graph,
            servers.es_url,
            servers.alias,
            servers.facts_url,
            args.give_up_seconds,
            cpu,
        )
        with console.status("waiting for the runs in flight to finish, then reading Dagster's record"):
            runs = finished_runs(dagster, measured_from - 60)
            ticks = sensor_ticks(dagster, measured_from)
            enriched = last_enriched(store, list(staleness.sent_at))
        segments = breakdown(staleness, runs, enriched)
    report(idle, busy, staleness, segments, runs, ticks, environment, warmup)


if __name__ == "__main__":
    main()
