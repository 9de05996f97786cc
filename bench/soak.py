"""Soak: the whole pattern for half an hour under a steady stream, source errors and one source's outage.

The servers are ``bench/staleness.py``'s, each in its own process and for real: a durable PostgreSQL
with the fact store and Dagster's storage, the search server, the source simulator (20 ms per request,
``--error-rate`` of its answers a 500 or 503 on every source), ``enrichment serve``, and LocalDagster
with ``uncached_entities_sensor`` enriching every 5 s. Thin events are POSTed one per request at
``--rate`` per second for ``--minutes``, open loop as staleness.py does, at most 8 at a time in
httpx (see ``send``). The stream keeps making
new work: the simulator graph's ``created`` events in staleness.py's order (every entity after what it
references), and, as a fifth of the events from the first on, an ``updated`` event of a random entity
already sent, whose source record is changed just before (``soak_revision`` set to its update count
through the simulator's ``/admin/mutate``), so the new attributes must flow through to the store. In
the middle, ``--outage-source`` answers 503 to everything for ``--outage-minutes``.

Every ``--sample-seconds`` a thread records, from ``/proc``, the resident memory (``VmRSS``) and CPU of
each role (the API; Dagster's daemon, webserver and code server; the run workers, forked from the code
server's forkserver, each on its own), PostgreSQL's connections per database (``pg_stat_activity``),
the leases in the fact store, the backlog and the source's answers by status.

Targets, each comparing the first steady window after warm-up (``--warmup-minutes``, then
``--window-minutes``) with the last window of the stream:

- memory: the median RSS of the API, the daemon and the code server (each summed over its processes),
  and the median of the run workers' peak RSS (each worker's largest sample in the window), grows at
  most 10%;
- PostgreSQL connections per database stay flat: the last window's median at most the first's plus
  10% (and at least 2 connections of slack, since run workers come and go);
- no lease is held past its expiry: no row is still leased more than 60 s after its lease expired
  (an expired lease nobody has claimed again yet is not held, so 60 s of grace), in any sample; also
  counted, since the leases run 30 minutes and could only expire near the end of a 30-minute soak: rows
  still leased more than 60 s after the run that owns them ended ("orphaned");
- staleness (a model instance's POST until its search document carries every derived edge, measured
  by staleness.py's watcher) p95 in the last window at most 1.2x the first's;
- no event lost: after the stream, once nothing is left to enrich or index (at most
  ``--settle-minutes``), every entity sent is in the store with the ``occurred_at`` of its latest event,
  fully enriched since that event was sent, and, when updated, with the latest ``soak_revision``.

Run: ``.venv/bin/python bench/soak.py`` (30 minutes, then up to 15 to settle), ``--quick`` for a
4-minute run that exercises the same (shorter windows and outage, samples every 5 s). The summary goes
to ``bench/RESULTS-soak.md`` (``--results``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _common import SEED, console, describe_search, describe_server, median, percentile, print_table, verdict
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from staleness import (
    DAGSTER,
    IN_FLIGHT,
    NDJSON,
    ROOT_TYPE,
    Ingest,
    Servers,
    Watcher,
    _failure,
    _proc_table,
    body,
    derived_edges,
    drain,
    process_roles,
    referenced_first,
    scale_for,
    stale_at,
    start_dagster,
    start_servers,
    stop_on_signals,
)

from enrichment_assets.dev.local_dagster import LocalDagster
from enrichment_assets.dev.simulator.catalog import ENTITY_TYPES
from enrichment_assets.dev.simulator.graph import generate_graph
from enrichment_assets.factstore.schema import PENDING_STATES, EntityState, entities

UPDATE_SHARE = 0.2
REVISION = "soak_revision"  # the source field an update changes
UNSETTLED = "still to enrich at the settle deadline"
LATENCY_MS = 20.0
SENSOR_INTERVAL = 5
MAX_CONCURRENT_RUNS = 4
LEASE_GRACE_SECONDS = 60.0
MEMORY_GROWTH = 0.10
CONNECTION_GROWTH, CONNECTION_SLACK = 0.10, 2
STALENESS_RATIO = 1.2
RESULTS = Path(__file__).with_name("RESULTS-soak.md")

API = "API server (enrichment serve)"  # staleness.py's name for the role
DAEMON, WEBSERVER, CODE_SERVER, WORKERS = "Dagster daemon", "Dagster webserver", "Dagster code server", "run workers"
MEMORY_ROLES = (API, DAEMON, CODE_SERVER)  # summed over their processes; run workers are per worker
FORKSERVER = "multiprocessing.forkserver"
RUNS_IN_FLIGHT = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED"]
ENDED = {"SUCCESS", "FAILURE", "CANCELED"}

RUNS_QUERY = """
query Runs($filter: RunsFilter) { runsOrError(filter: $filter, limit: 100000) { ... on Runs { results {
  runId status creationTime startTime endTime
} } } }"""
FAILURES_QUERY = """
query Failures($ids: [String!]) { runsOrError(filter: {runIds: $ids}) { ... on Runs { results {
  runId eventConnection(limit: 1000) { events {
    ... on ExecutionStepFailureEvent { stepKey error { message errorChain { error { message } } } }
    ... on RunFailureEvent { message }
  } }
} } } }"""
OUTCOMES_QUERY = """
query Outcomes($key: AssetKeyInput!, $after: String, $before: String) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations(afterTimestampMillis: $after, beforeTimestampMillis: $before, limit: 10000) {
    timestamp metadataEntries { label ... on IntMetadataEntry { intValue } }
  }
} } }"""


# -- the stream -------------------------------------------------------------------------------------


@dataclass
class Stream:
    """The events in send order; per event the source revision an update sets (0 for a create)."""

    events: list[dict[str, Any]]
    revisions: list[int]

    @classmethod
    def build(cls, creates: Sequence[dict[str, Any]], total: int, rate: float) -> Stream:
        rng = random.Random(f"{SEED}:soak")
        start = datetime.now(UTC)
        events: list[dict[str, Any]] = []
        revisions: list[int] = []
        sent: list[tuple[str, str]] = []
        updates: Counter[tuple[str, str]] = Counter()
        for index in range(total):
            if len(sent) < len(creates) and (not sent or rng.random() >= UPDATE_SHARE):
                event = creates[len(sent)]
                sent.append((event["entity_type"], event["entity_id"]))
                events.append(event)
                revisions.append(0)
                continue
            key = rng.choice(sent)
            updates[key] += 1
            # Later than the create's source time (the simulator's are in early 2026) and than any
            # earlier update of the entity, so the store applies each in turn.
            at = start + timedelta(seconds=index / rate)
            events.append(
                {
                    "entity_type": key[0],
                    "entity_id": key[1],
                    "event_type": "updated",
                    "occurred_at": at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                }
            )
            revisions.append(updates[key])
        return cls(events, revisions)


@dataclass
class Sent:
    """What the sender saw: per event the API's status (0 until answered, -1 when its connection failed
    three times), the source revision set per entity, and how many events it has started."""

    ingest: Ingest
    statuses: list[int]
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    mutation_failures: list[str] = field(default_factory=list)
    started: int = 0


async def send(api_url: str, sim_url: str, stream: Stream, sent: Sent, expect: Callable[[str], None]) -> None:
    """staleness.py's open-loop schedule (each event in its own task at its due time, latency from that
    time), with two differences a long run needs. At most ``IN_FLIGHT`` requests are handed to httpx at
    once, the rest wait on a semaphore: httpx's pool scans every queued request each time one is added or
    finishes (httpcore 1.0.9, ``AsyncConnectionPool._assign_requests_to_connections``), so a backlog of
    thousands, which one slow minute on a shared machine builds, made the sender itself CPU-bound, and it
    never caught up. And an update first sets the entity's revision at the source, awaited in its task,
    so the event loop never blocks on it."""
    ingest, total = sent.ingest, len(stream.events)
    ingest.sent_at, ingest.latency, ingest.late = [0.0] * total, [0.0] * total, [0.0] * total
    slots = asyncio.Semaphore(IN_FLIGHT)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with (
        httpx.AsyncClient(base_url=api_url, timeout=60, limits=limits) as api,
        httpx.AsyncClient(base_url=sim_url, timeout=10, limits=limits) as sim,
    ):

        async def one(index: int, due: float) -> None:
            event, revision = stream.events[index], stream.revisions[index]
            key = (event["entity_type"], event["entity_id"])
            ingest.sent_at[index], ingest.late[index] = time.time(), time.perf_counter() - due
            async with slots:
                mutating = time.perf_counter()
                if revision:
                    # The source changes first, then says so: the event's enrichment must see the change.
                    change = {"entity_type": key[0], "id": key[1], "set": {REVISION: revision}}
                    try:
                        (await sim.post("/admin/mutate", json=change)).raise_for_status()
                        sent.applied[key] = revision
                    except httpx.HTTPError as error:
                        sent.mutation_failures.append(f"{key}: {error!r}"[:200])
                elif key[0] == ROOT_TYPE:
                    expect(key[1])
                mutating = time.perf_counter() - mutating
                for attempt in range(3):
                    try:
                        response = await api.post("/v1/events", content=body(event), headers=NDJSON)
                        sent.statuses[index] = response.status_code
                        break
                    except httpx.TransportError:  # a reset or keep-alive race: events are idempotent
                        sent.statuses[index] = -1
                        if attempt < 2:
                            ingest.retries += 1
            ingest.latency[index] = time.perf_counter() - due - mutating
            ingest.errors += sent.statuses[index] != 202

        tasks: set[asyncio.Task[None]] = set()
        ingest.started_at = time.time()
        start = time.perf_counter() + 0.2
        for index in range(total):
            due = start + index / ingest.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(index, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent.started = index + 1
        await asyncio.gather(*tasks)
        ingest.wall = time.perf_counter() - start


# -- samples ----------------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the stream started
    sent: int  # events whose task has started
    answered: int  # events the API has answered
    rss: dict[str, float]  # MB per role, summed over its processes
    workers: dict[int, float]  # MB per run worker alive
    cpu: dict[str, float]  # CPU seconds so far per role, and the machine's
    connections: dict[str, int]  # per database: "facts", "dagster"
    leased: int
    expired: int  # still leased past its expiry
    held: int  # ... by more than LEASE_GRACE_SECONDS
    orphaned: int  # still leased more than LEASE_GRACE_SECONDS after the owning run ended
    pending: int
    outbox: int
    quarantined: int
    deferred: int  # pending, with an error naming the outage source
    runs_in_flight: int
    source_status: dict[str, dict[str, int]]  # source -> status -> answers so far


def _role(role: str, chain: Sequence[str]) -> str:
    """staleness.py's role, with Dagster split: daemon, webserver, code server and its run workers."""
    if role != DAGSTER:
        return role
    if "dagster-daemon" in chain[-1]:
        return DAEMON
    if "dagster-webserver" in chain[-1]:
        return WEBSERVER
    # A run worker is a fork of the code server's forkserver (and keeps its command line).
    return WORKERS if any(FORKSERVER in c for c in chain[1:-1]) else CODE_SERVER


def _proc_fields(pid: int) -> tuple[float, float]:
    """(resident MB, CPU seconds of reaped children) of one process; zeros if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next((int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:")), 0.0)
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return rss, (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def _worker(pid: int, table: Mapping[int, tuple[int, str, float]]) -> int:
    """The run worker a process is or runs under: the child of the forkserver, the one process with that
    command line whose parent (the code server) has another."""
    while not (FORKSERVER in table[table[pid][0]][1] and FORKSERVER not in table[table[table[pid][0]][0]][1]):
        pid = table[pid][0]
    return pid


def processes(postgres_port: int | None) -> tuple[dict[str, float], dict[int, float], dict[str, float]]:
    """RSS per role, RSS per run worker (its subprocesses included), CPU seconds per role (the machine's
    as ``machine``)."""
    table = _proc_table()
    rss: dict[str, float] = defaultdict(float)
    cpu: dict[str, float] = defaultdict(float)
    workers: dict[int, float] = {}
    for pid, (role, chain) in process_roles(table, postgres_port).items():
        role = _role(role, chain)
        mb, reaped = _proc_fields(pid)
        rss[role] += mb
        cpu[role] += table[pid][2]
        if role == WORKERS:
            worker = _worker(pid, table)
            workers[worker] = workers.get(worker, 0.0) + mb
        elif chain and FORKSERVER in chain[0]:
            # The forkserver reaps the run workers: their CPU is in its children's time.
            cpu[CODE_SERVER] -= reaped
            cpu[WORKERS] += reaped
    with open("/proc/stat") as stat:
        jiffies = [int(v) for v in stat.readline().split()[1:]]
    cpu["machine"] = (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK")
    return dict(rss), workers, dict(cpu)


class Sampler(threading.Thread):
    """Takes a ``Sample`` every ``interval`` seconds until ``stop``; starts and ends the outage."""

    def __init__(self, servers: Servers, dagster: LocalDagster, *, interval: float, outage_source: str) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.servers, self.dagster, self.interval, self.outage_source = servers, dagster, interval, outage_source
        self.engine = sa.create_engine(make_url(servers.facts_url).set(drivername="postgresql+psycopg2"))
        self.databases = {
            "facts": make_url(servers.facts_url).database,
            "dagster": make_url(servers.dagster_url or "").database,
        }
        self.samples: list[Sample] = []
        self.errors: list[str] = []
        self.progress_of: Sent | None = None
        self.started_at = time.time()
        self.outage: dict[str, Any] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            began = time.monotonic()
            try:
                sample = self.sample()
            except Exception as error:  # a bad sample is reported, not the end of the soak
                self.errors.append(f"{time.time() - self.started_at:.0f} s: {error!r}"[:300])
            else:
                if not self.samples or int(sample.t // 60) > int(self.samples[-1].t // 60):
                    self.progress(sample)
                self.samples.append(sample)
            self._done.wait(max(self.interval - (time.monotonic() - began), 0.0))

    def progress(self, s: Sample) -> None:
        """A line a minute, for whoever follows the log."""
        console.print(
            f"{s.t / 60:5.1f} min: {s.sent:,} sent, {s.answered:,} answered, {s.pending:,} to enrich, "
            f"{s.outbox:,} to index, "
            f"{s.deferred:,} deferred, {s.runs_in_flight} runs in flight, {s.leased:,} leased "
            f"({s.held} held past expiry, {s.orphaned} orphaned), PostgreSQL connections {s.connections}, "
            f"RSS MB " + ", ".join(f"{role} {s.rss.get(role, 0):.0f}" for role in (*MEMORY_ROLES, WORKERS))
        )

    def stop(self) -> None:
        self._done.set()
        self.join(timeout=60)
        self.engine.dispose()

    def sample(self) -> Sample:
        t = time.time() - self.started_at
        rss, workers, cpu = processes(self.servers.postgres_port)
        now = datetime.now(UTC)
        leased = entities.c.claim_owner.is_not(None)
        pending = entities.c.state.in_(PENDING_STATES)

        def count(*where: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
            return sa.func.count().filter(sa.and_(*where))

        activity = sa.table("pg_stat_activity", sa.column("datname"))
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(
                    count(leased),
                    count(leased, entities.c.claim_expires_at < now),
                    count(leased, entities.c.claim_expires_at < now - timedelta(seconds=LEASE_GRACE_SECONDS)),
                    count(pending),
                    count(entities.c.indexed_version < entities.c.doc_version),
                    count(entities.c.state == EntityState.QUARANTINED.value),
                    count(pending, entities.c.last_error.contains(self.outage_source)),
                )
            ).one()
            owners = dict(
                conn.execute(
                    sa.select(entities.c.claim_owner, sa.func.count()).where(leased).group_by(entities.c.claim_owner)
                ).all()
            )
            connections = dict(
                conn.execute(
                    sa.select(activity.c.datname, sa.func.count())
                    .where(activity.c.datname.in_(list(self.databases.values())))
                    .group_by(activity.c.datname)
                ).all()
            )
        in_flight = self.runs({"statuses": RUNS_IN_FLIGHT})
        statuses = httpx.get(f"{self.servers.sim_url}/admin/stats", timeout=10).json()["sources"]
        return Sample(
            t,
            self.progress_of.started if self.progress_of else 0,
            len(self.progress_of.statuses) - self.progress_of.statuses.count(0) if self.progress_of else 0,
            rss,
            workers,
            cpu,
            {name: connections.get(db, 0) for name, db in self.databases.items()},
            row[0],
            row[1],
            row[2],
            self.orphaned(owners, now),
            row[3],
            row[4],
            row[5],
            row[6],
            len(in_flight),
            {source: dict(s["by_status"]) for source, s in statuses.items()},
        )

    def runs(self, run_filter: Mapping[str, Any]) -> list[dict[str, Any]]:
        return self.dagster.graphql(RUNS_QUERY, {"filter": dict(run_filter)})["runsOrError"]["results"]

    def orphaned(self, owners: Mapping[str, int], now: datetime) -> int:
        """Rows leased to runs that ended more than ``LEASE_GRACE_SECONDS`` ago."""
        run_ids = {owner.removeprefix("dagster:"): n for owner, n in owners.items() if owner.startswith("dagster:")}
        if not run_ids:
            return 0
        cutoff = now.timestamp() - LEASE_GRACE_SECONDS
        return sum(
            run_ids[r["runId"]]
            for r in self.runs({"runIds": list(run_ids)})
            if r["status"] in ENDED and r["endTime"] and r["endTime"] < cutoff
        )

    def start_outage(self, seconds: float) -> None:
        httpx.post(
            f"{self.servers.sim_url}/admin/outage",
            json={"source": self.outage_source, "outage_seconds": seconds},
            timeout=10,
        ).raise_for_status()
        self.outage.update(start=time.time() - self.started_at, seconds=seconds, before=self._source_status())

    def end_outage(self) -> None:
        self.outage.update(end=time.time() - self.started_at, after=self._source_status())

    def _source_status(self) -> dict[str, int]:
        answer = httpx.get(f"{self.servers.sim_url}/admin/stats", timeout=10).json()["sources"][self.outage_source]
        return {"requests": answer["requests"], **answer["by_status"]}


@contextmanager
def scheduled(delay: float, action: Any, *args: Any) -> Iterator[None]:
    timer = threading.Timer(delay, action, args)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -- after the stream -------------------------------------------------------------------------------


@dataclass
class Window:
    name: str
    start: float  # seconds since the stream started
    end: float

    def __contains__(self, t: float) -> bool:
        return self.start <= t < self.end

    def label(self) -> str:
        return f"{self.name} ({self.start / 60:g}-{self.end / 60:g} min)"


def check_events(engine: sa.Engine, stream: Stream, sent: Sent) -> dict[str, Any]:
    """Every entity with an event answered 202, against the store: its latest such event applied,
    enriched since it was sent, and the source's latest revision stored."""
    ingest, applied = sent.ingest, sent.applied
    latest: dict[tuple[str, str], int] = {}
    for index, event in enumerate(stream.events):
        if sent.statuses[index] == 202:
            latest[(event["entity_type"], event["entity_id"])] = index
    problems: dict[str, list[str]] = defaultdict(list)
    states: Counter[str] = Counter()
    by_type: dict[str, list[str]] = defaultdict(list)
    for entity_type, entity_id in latest:
        by_type[entity_type].append(entity_id)
    columns = (
        entities.c.entity_id,
        entities.c.state,
        entities.c.last_event_at,
        entities.c.last_enriched_at,
        entities.c.attributes[REVISION].as_integer(),
        entities.c.last_error,
        entities.c.hydrated_at,
    )
    with engine.connect() as conn:
        for entity_type, ids in by_type.items():
            for start in range(0, len(ids), 5000):
                page = ids[start : start + 5000]
                found = {
                    row[0]: row
                    for row in conn.execute(
                        sa.select(*columns).where(
                            entities.c.entity_type == entity_type,
                            entities.c.entity_id
                            == sa.any_(sa.cast(sa.bindparam("ids", value=page), postgresql.ARRAY(sa.Text()))),
                        )
                    )
                }
                for entity_id in page:
                    key = (entity_type, entity_id)
                    index = latest[key]
                    name = f"{entity_type}/{entity_id}"
                    row = found.get(entity_id)
                    if row is None:
                        problems["missing from the store"].append(name)
                        continue
                    _, state, last_event_at, enriched_at, revision, error, hydrated_at = row
                    states[state] += 1
                    occurred = datetime.fromisoformat(stream.events[index]["occurred_at"])
                    if last_event_at != occurred:
                        problems["latest event not applied"].append(f"{name}: {last_event_at} != {occurred}")
                    elif state in PENDING_STATES:
                        # Left to enrich when the settle deadline passed: a backlog, not (yet) a loss.
                        problems[UNSETTLED].append(f"{name}: {state}")
                    elif (
                        state != EntityState.FULLY_ENRICHED.value
                        or enriched_at is None
                        or enriched_at.timestamp() < ingest.sent_at[index]
                    ):
                        problems["not enriched since its latest event"].append(f"{name}: {state} {error or ''}"[:200])
                    elif applied.get(key, 0) != (revision or 0):
                        posted = ingest.sent_at[index]
                        problems["source's latest revision not stored"].append(
                            f"{name}: revision {revision} stored, {applied.get(key, 0)} sent; relative to the "
                            f"event's POST, hydrated_at {hydrated_at.timestamp() - posted:+.1f} s, last_enriched_at "
                            f"{enriched_at.timestamp() - posted:+.1f} s"
                        )
    return {
        "entities": len(latest),
        "states": dict(states),
        "lost": sum(len(v) for k, v in problems.items() if k != UNSETTLED),
        "unsettled": len(problems.get(UNSETTLED, [])),
        "problems": {k: {"count": len(v), "examples": v[:5]} for k, v in problems.items()},
    }


def outcomes(dagster: LocalDagster, after: float, *, slice_seconds: float = 300) -> list[tuple[float, dict[str, int]]]:
    """(epoch seconds, outcome counts) of every ``<type>/edges`` materialization since ``after``, asked
    for ``slice_seconds`` at a time (Dagster answers at most 10,000 events per request)."""
    found = []
    for start in range(int(after * 1000), int(time.time() * 1000) + 1, int(slice_seconds * 1000)):
        for entity_type in ENTITY_TYPES:
            bounds = {"after": str(start), "before": str(start + int(slice_seconds * 1000))}
            answer = dagster.graphql(OUTCOMES_QUERY, {"key": {"path": [entity_type, "edges"]}, **bounds})
            for event in answer["assetOrError"].get("assetMaterializations") or []:
                counts = {m["label"]: m["intValue"] for m in event["metadataEntries"] if m.get("intValue") is not None}
                found.append((int(event["timestamp"]) / 1000, counts))
    return found


def runs_summary(sampler: Sampler, after: float) -> dict[str, Any]:
    runs = sampler.runs({"createdAfter": after})
    failed = [r["runId"] for r in runs if r["status"] in ("FAILURE", "CANCELED")]
    failures: list[str] = []
    if failed:
        answer = sampler.dagster.graphql(FAILURES_QUERY, {"ids": failed[:10]})["runsOrError"]["results"]
        failures = [
            f"{r['runId'][:8]} {_failure(e)}"
            for r in answer
            for e in r["eventConnection"]["events"]
            if "error" in e or "message" in e
        ]
    return {
        "created": len(runs),
        "launched": sum(1 for r in runs if r["startTime"]),
        "by_status": dict(Counter(r["status"] for r in runs)),
        "failures": failures[:10],
    }


def in_window(samples: Sequence[Sample], window: Window) -> list[Sample]:
    return [s for s in samples if s.t in window]


def worker_peaks(samples: Sequence[Sample]) -> list[float]:
    """The largest RSS seen of each run worker alive in ``samples``."""
    peaks: dict[int, float] = defaultdict(float)
    for sample in samples:
        for pid, mb in sample.workers.items():
            peaks[pid] = max(peaks[pid], mb)
    return list(peaks.values())


def growth(first: float, last: float) -> float:
    return last / first - 1 if first else math.inf


def evaluate(
    samples: Sequence[Sample],
    first: Window,
    last: Window,
    staleness: Mapping[str, list[float]],
    lost: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """One row per target: what it compares, the figures, met or not."""
    a, b = in_window(samples, first), in_window(samples, last)
    rows = []
    for role in MEMORY_ROLES:
        x, y = median([s.rss.get(role, 0.0) for s in a]), median([s.rss.get(role, 0.0) for s in b])
        rows.append(
            {
                "target": f"RSS {role}, median MB",
                "first": x,
                "last": y,
                "measured": f"{growth(x, y):+.1%}",
                "met": growth(x, y) <= MEMORY_GROWTH,
                "limit": f"<= +{MEMORY_GROWTH:.0%}",
            }
        )
    pa, pb = worker_peaks(a), worker_peaks(b)
    x, y = (median(pa) if pa else 0.0), (median(pb) if pb else 0.0)
    rows.append(
        {
            "target": f"RSS {WORKERS}, median of each worker's peak MB ({len(pa)} vs {len(pb)} workers; "
            f"max {max(pa, default=0):.0f} vs {max(pb, default=0):.0f})",
            "first": x,
            "last": y,
            "measured": f"{growth(x, y):+.1%}",
            "met": bool(pa and pb) and growth(x, y) <= MEMORY_GROWTH,
            "limit": f"<= +{MEMORY_GROWTH:.0%}",
        }
    )
    for db in ("facts", "dagster"):
        x, y = median([s.connections[db] for s in a]), median([s.connections[db] for s in b])
        allowed = x + max(CONNECTION_SLACK, x * CONNECTION_GROWTH)
        rows.append(
            {
                "target": f"PostgreSQL connections, {db} database, median (max {max(s.connections[db] for s in a)} "
                f"vs {max(s.connections[db] for s in b)})",
                "first": x,
                "last": y,
                "measured": f"{y - x:+.0f}",
                "met": y <= allowed,
                "limit": f"<= {allowed:.0f}",
            }
        )
    held = max(s.held for s in samples)
    orphaned = max(s.orphaned for s in samples)
    rows.append(
        {
            "target": f"leases held > {LEASE_GRACE_SECONDS:.0f} s past expiry, max of {len(samples)} samples",
            "first": max(s.held for s in a),
            "last": max(s.held for s in b),
            "measured": f"{held}",
            "met": held == 0,
            "limit": "0",
        }
    )
    rows.append(
        {
            "target": f"leases of runs ended > {LEASE_GRACE_SECONDS:.0f} s before, max of all samples",
            "first": max(s.orphaned for s in a),
            "last": max(s.orphaned for s in b),
            "measured": f"{orphaned}",
            "met": orphaned == 0,
            "limit": "0",
        }
    )
    x, y = (stale_at(staleness[w.name], 95) if staleness[w.name] else math.inf for w in (first, last))
    ratio = y / x if x and not math.isinf(y) else math.inf
    rows.append(
        {
            "target": f"staleness p95 s ({len(staleness[first.name]):,} vs {len(staleness[last.name]):,} "
            "model instances)",
            "first": x,
            "last": y,
            "measured": f"{ratio:.2f}x",
            "met": ratio <= STALENESS_RATIO,
            "limit": f"<= {STALENESS_RATIO}x",
        }
    )
    rows.append(
        {
            "target": f"events lost, of {lost['entities']:,} entities sent",
            "first": None,
            "last": None,
            "measured": f"{lost['lost']:,}" + (f" ({lost['unsettled']:,} {UNSETTLED})" if lost["unsettled"] else ""),
            "met": lost["lost"] == 0 and not lost["unsettled"],
            "limit": "0",
        }
    )
    return rows


# -- report -----------------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "never" if math.isinf(value) else f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def minute_series(samples: Sequence[Sample], outage_source: str) -> Table:
    """The last sample of every minute (run workers: the largest seen that minute)."""
    by_minute: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_minute[int(sample.t // 60)].append(sample)
    rows = []
    for minute, group in sorted(by_minute.items()):
        s = group[-1]
        rows.append(
            [
                f"{minute + 1}",
                f"{s.sent:,}",
                f"{s.pending:,}",
                f"{s.outbox:,}",
                f"{s.deferred:,}",
                f"{s.leased:,}",
                f"{s.held}",
                f"{s.orphaned}",
                f"{s.runs_in_flight}",
                f"{s.connections['facts']}",
                f"{s.connections['dagster']}",
                *(f"{s.rss.get(role, 0):.0f}" for role in (*MEMORY_ROLES, WEBSERVER)),
                f"{max(worker_peaks(group), default=0):.0f}",
                f"{s.source_status.get(outage_source, {}).get('503', 0):,}",
            ]
        )
    return (
        "Every minute (the minute's last sample; RSS in MB)",
        [
            "min",
            "sent",
            "pending",
            "outbox",
            f"deferred ({outage_source})",
            "leased",
            "held past expiry",
            "orphaned",
            "runs in flight",
            "PG facts",
            "PG dagster",
            "RSS API",
            "daemon",
            "code server",
            "webserver",
            "largest worker",
            f"{outage_source} 503s",
        ],
        rows,
    )


def cpu_table(samples: Sequence[Sample], wall: float) -> Table:
    first, last = samples[0].cpu, samples[-1].cpu
    cores = os.cpu_count() or 1
    used = {role: last.get(role, 0.0) - first.get(role, 0.0) for role in last}
    roles = sorted((r for r in used if r != "machine"), key=lambda r: -used[r])
    rows = [[role, f"{used[role]:,.0f}", f"{used[role] / (wall * cores):.0%}"] for role in roles]
    other = used["machine"] - sum(used[r] for r in roles)
    rows += [
        ["everything else on this machine", f"{other:,.0f}", f"{other / (wall * cores):.0%}"],
        ["machine, all processes", f"{used['machine']:,.0f}", f"{used['machine'] / (wall * cores):.0%}"],
    ]
    return (f"CPU during the stream ({wall / 60:.1f} min; share of {cores} cores)", ["role", "CPU s", "share"], rows)


def markdown(table: Table) -> str:
    title, columns, rows = table
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report(summary: dict[str, Any], tables: Sequence[Table], notes: Sequence[str], path: Path) -> None:
    for title, columns, rows in tables:
        print_table(title, columns, rows)
    for note in notes:
        console.print(note)
    text = [
        f"# Soak — {summary['finished']}",
        "",
        f"`{summary['command']}`",
        "",
        *(f"- {line}" for line in summary["environment"]),
        "",
        *(markdown(t) for t in tables),
        *(f"- {n}" for n in notes),
        "",
        "## Summary (JSON)",
        "",
        "```json",
        json.dumps(summary, indent=1, default=str),
        "```",
        "",
    ]
    path.write_text(
        "\n".join(text).replace("[red]", "").replace("[/red]", "").replace("[green]", "").replace("[/green]", "")
    )
    console.print(f"Written to {path}")


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the stream (default 30)")
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")
    parser.add_argument(
        "--outage-source",
        default="datasets",
        choices=sorted({t.source for t in ENTITY_TYPES.values()}),
        help="the source that goes down in the middle (default datasets)",
    )
    parser.add_argument("--outage-minutes", type=float, default=2.0, help="how long it is down (default 2)")
    parser.add_argument(
        "--error-rate",
        type=float,
        default=0.01,
        help="share of every source's answers that are a 500 or 503 (default 0.01)",
    )
    parser.add_argument("--warmup-minutes", type=float, default=5.0, help="left out of the comparison (default 5)")
    parser.add_argument(
        "--window-minutes", type=float, default=5.0, help="the first steady and the last window compared (default 5)"
    )
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="between samples (default 10)")
    parser.add_argument(
        "--settle-minutes",
        type=float,
        default=15.0,
        help="after the stream, longest wait for nothing left to enrich or index (default 15)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"the summary (default {RESULTS.name})")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 4 minutes, 45 s windows, a 30 s outage, samples every 5 s"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes, args.warmup_minutes, args.window_minutes = 4.0, 0.75, 0.75
        args.outage_minutes, args.sample_seconds, args.settle_minutes = 0.5, 5.0, 5.0
    if args.warmup_minutes + 2 * args.window_minutes + args.outage_minutes > args.minutes:
        parser.error("--minutes must hold the warm-up, both windows and the outage")
    if args.rate <= 0 or not 0 <= args.error_rate <= 1:
        parser.error("--rate must be positive and --error-rate between 0 and 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    stop_on_signals()
    duration, outage = args.minutes * 60, args.outage_minutes * 60
    first = Window("first steady", args.warmup_minutes * 60, (args.warmup_minutes + args.window_minutes) * 60)
    last = Window("last", duration - args.window_minutes * 60, math.inf)
    outage_at = max(duration / 2 - outage / 2, first.end)
    total = round(args.rate * duration)
    scale = scale_for(math.ceil(total * (1 - UPDATE_SHARE) * 1.05))
    with console.status(f"building the simulator graph (scale {scale:g}) and the event stream"):
        graph = generate_graph(SEED, scale)
        stream = Stream.build(referenced_first(graph), total, args.rate)
    expected = {
        e["entity_id"]: derived_edges(graph, e["entity_id"])
        for e, rev in zip(stream.events, stream.revisions, strict=True)
        if e["entity_type"] == ROOT_TYPE and not rev
    }

    with ExitStack() as stack:
        servers = start_servers(stack, name="soak", scale=scale, latency_ms=LATENCY_MS)
        httpx.post(
            f"{servers.sim_url}/admin/knobs", json={"error_rate": args.error_rate}, timeout=10
        ).raise_for_status()
        environment = [
            describe_server(servers.store.engine),
            f"{describe_search(servers.index.client)}; simulator scale {scale:g}, {LATENCY_MS:g} ms per request, "
            f"error rate {args.error_rate:g} on every source",
            f"Dagster {version('dagster')}: sensor every {SENSOR_INTERVAL} s, max_concurrent_runs "
            f"{MAX_CONCURRENT_RUNS}, postgres storage; {os.cpu_count()} CPUs; load average before "
            f"{os.getloadavg()[0]:.1f}",
            f"stream: {total:,} events at {args.rate:g}/s, {stream.revisions.count(0):,} creates and "
            f"{total - stream.revisions.count(0):,} updates; windows: warm-up {args.warmup_minutes:g} min, "
            f"{first.label()}, {last.name} ({last.start / 60:g}-{duration / 60:g} min)",
        ]
        with console.status("starting Dagster"):
            dagster = start_dagster(
                stack, servers, home=None, sensor_interval=SENSOR_INTERVAL, max_concurrent_runs=MAX_CONCURRENT_RUNS
            )
        dagster_started = time.time()
        watcher = stack.enter_context(Watcher(servers.es_url, servers.alias, servers.facts_url))
        sampler = Sampler(servers, dagster, interval=args.sample_seconds, outage_source=args.outage_source)
        sent = Sent(Ingest("soak", args.rate), [0] * len(stream.events))
        sampler.progress_of = sent

        def expect(entity_id: str) -> None:
            if expected.get(entity_id):
                watcher.expect(entity_id, expected[entity_id])

        sampler.started_at = time.time()
        sampler.start()
        with scheduled(outage_at, sampler.start_outage, outage), scheduled(outage_at + outage, sampler.end_outage):
            asyncio.run(send(servers.api_url, servers.sim_url, stream, sent, expect))
        stream_seconds = time.time() - sampler.started_at
        console.print(f"stream done in {stream_seconds / 60:.1f} min; settling")
        settled = drain(servers.store, args.settle_minutes * 60)
        time.sleep(3)  # the watcher polls every 0.5 s
        visible = dict(watcher.collect())
        sampler.stop()
        with console.status("checking every entity sent, reading Dagster's record"):
            lost = check_events(servers.store.engine, stream, sent)
            runs = runs_summary(sampler, dagster_started - 5)
            done = outcomes(dagster, sampler.started_at)

    samples = sampler.samples
    ingest, applied, mutation_failures = sent.ingest, sent.applied, sent.mutation_failures
    stream_samples = [s for s in samples if s.t <= stream_seconds + args.sample_seconds]
    staleness: dict[str, list[float]] = defaultdict(list)
    outage_window = Window(
        "outage", sampler.outage.get("start", outage_at), sampler.outage.get("end", outage_at + outage)
    )
    for index, event in enumerate(stream.events):
        entity_id = event["entity_id"]
        if event["entity_type"] != ROOT_TYPE or stream.revisions[index] or not expected.get(entity_id):
            continue
        posted = ingest.sent_at[index]
        seconds = visible[entity_id] - posted if entity_id in visible else math.inf
        for window in (first, last, outage_window, Window("all", 0, math.inf)):
            if posted - sampler.started_at in window:
                staleness[window.name].append(seconds)
    targets = evaluate(stream_samples, first, last, staleness, lost)
    tables: list[Table] = [
        (
            f"Targets: {first.label()} vs {last.name} ({last.start / 60:g}-{duration / 60:g} min)",
            ["target", first.name, last.name, "measured", "target", ""],
            [
                [t["target"], _num(t["first"]), _num(t["last"]), t["measured"], t["limit"], verdict(t["met"])]
                for t in targets
            ],
        )
    ]
    tables.append(
        (
            "Staleness, POST to a searchable derived edge, per model instance created (s)",
            ["sent during", "instances", "p50", "p95", "max", "never searchable"],
            [
                [
                    name,
                    f"{len(v):,}",
                    *(_num(stale_at(v, q)) for q in (50, 95)),
                    _num(max(v)),
                    f"{sum(1 for s in v if math.isinf(s)):,}",
                ]
                for name, v in staleness.items()
                if v
            ],
        )
    )
    before = sampler.outage.get("before", {})
    after = sampler.outage.get("after", {})
    # Deferred outcomes are written when a run settles, after the outage if the run outlived it.
    deferred = [s for s in samples if s.t >= outage_window.start]
    last_deferred = max((n for n, s in enumerate(deferred) if s.deferred), default=None)
    recovered = None if last_deferred is None or last_deferred + 1 >= len(deferred) else deferred[last_deferred + 1].t

    def deferred_in(window: Window) -> int:
        return sum(c.get("deferred", 0) for at, c in done if at - sampler.started_at in window)

    tables.append(
        (
            f"Outage of {args.outage_source}",
            ["measure", "figure"],
            [
                ["window (min after the stream began)", f"{outage_window.start / 60:.2f}-{outage_window.end / 60:.2f}"],
                [
                    f"requests {args.outage_source} received during it",
                    f"{after.get('requests', 0) - before.get('requests', 0):,}",
                ],
                ["of which it answered 503", f"{after.get('503', 0) - before.get('503', 0):,}"],
                [
                    "entities deferred on it (pending, its error stored): peak from the outage's start",
                    f"{max((s.deferred for s in deferred), default=0):,}",
                ],
                [
                    "deferred back to 0 at (min)",
                    f"{recovered / 60:.2f}"
                    if recovered is not None
                    else "none deferred"
                    if last_deferred is None
                    else "never",
                ],
                [
                    "deferred outcomes in runs: before / during / after",
                    f"{deferred_in(Window('', 0, outage_window.start)):,} / {deferred_in(outage_window):,} / "
                    f"{deferred_in(Window('', outage_window.end, math.inf)):,}",
                ],
            ],
        )
    )
    errors = Counter()
    for source, statuses in (samples[-1].source_status if samples else {}).items():
        errors[f"{source} 500"] += statuses.get("500", 0)
        errors[f"{source} 503"] += statuses.get("503", 0)
    enriched = sum(c.get("enriched", 0) for _, c in done)
    tables.append(
        (
            "Events and runs",
            ["measure", "figure"],
            [
                [
                    "events sent / answered 202 / otherwise",
                    f"{len(ingest.latency):,} / {len(ingest.latency) - ingest.errors:,} / {ingest.errors:,}",
                ],
                ["POSTs sent again after a connection failed", f"{ingest.retries:,}"],
                [
                    "ingest latency p50 / p99 / max (ms)",
                    f"{ingest.ms(50):.1f} / {ingest.ms(99):.1f} / {max(ingest.latency) * 1000:.0f}",
                ],
                ["send lag behind schedule, p99 (ms)", f"{percentile(ingest.late, 99) * 1000:.1f}"],
                ["source revisions set / failed", f"{len(applied):,} / {len(mutation_failures):,}"],
                ["runs created / launched", f"{runs['created']:,} / {runs['launched']:,}"],
                ["runs by status", ", ".join(f"{k} {v:,}" for k, v in sorted(runs["by_status"].items()))],
                [
                    "outcomes in runs: enriched / failed / quarantined / superseded",
                    f"{enriched:,} / {sum(c.get('failed', 0) for _, c in done):,} / "
                    f"{sum(c.get('quarantined', 0) for _, c in done):,} / "
                    f"{sum(c.get('superseded_by_newer_events', 0) for _, c in done):,}",
                ],
                [
                    "errors the sources injected (500 / 503, the outage's 503s included)",
                    ", ".join(f"{k} {v:,}" for k, v in sorted(errors.items()) if v) or "none",
                ],
                [
                    "entities in the store at the end, by state",
                    ", ".join(f"{k} {v:,}" for k, v in lost["states"].items()),
                ],
                [
                    "settled after the stream (nothing left to enrich or index)",
                    f"in {settled:.0f} s"
                    if settled is not None
                    else f"[red]not within {args.settle_minutes:g} min[/red]",
                ],
            ],
        )
    )
    if stream_samples:
        tables.append(cpu_table(stream_samples, stream_seconds))
    tables.append(minute_series(samples, args.outage_source))
    notes = [
        *(f"[red]failed run[/red] {line}" for line in runs["failures"]),
        *(f"[red]{kind}: {p['count']:,}[/red], e.g. {p['examples']}" for kind, p in lost["problems"].items()),
        *(f"[red]sampler: {e}[/red]" for e in sampler.errors[:5]),
        *(f"[red]source revision not set: {m}[/red]" for m in mutation_failures[:3]),
    ]
    if failed := sent.statuses.count(-1):
        notes.append(f"[red]{failed:,} POSTs failed three times at the connection[/red]")
    summary = {
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/soak.py", *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment,
        "targets": targets,
        "staleness_p95": {k: stale_at(v, 95) for k, v in staleness.items() if v},
        "outage": {"source": args.outage_source, **sampler.outage, "recovered_at": recovered},
        "runs": runs,
        "lost": lost,
        "events": {
            "sent": len(ingest.latency),
            "errors": ingest.errors,
            "retries": ingest.retries,
            "updates_applied": len(applied),
        },
        "samples": len(samples),
        "sampler_errors": sampler.errors[:20],
    }
    report(summary, tables, notes, args.results)


if __name__ == "__main__":
    main()
