"""Ingest throughput and latency: batched NDJSON over HTTP against the raw fact-store upsert.

Measured, in one run on one fresh PostgreSQL database (see ``_common`` for where the server comes from):

1. Baselines, no HTTP, ``--baseline-batches`` batches each: ``FactStore.ingest_events`` on pre-built
   ``Event`` objects (fresh ids, so inserts; then the same ids with a later ``occurred_at``, so
   updates); and a bare SQLAlchemy ``INSERT ... ON CONFLICT DO UPDATE SET col = excluded.col`` of the
   same rows into a scratch table with the same columns, key and indexes as ``entities``, executed two
   ways: as an executemany (the path FactStore's statement takes) and as multi-row ``VALUES`` pages
   (SQLAlchemy's "insertmanyvalues", which it uses for an upsert only when it has ``RETURNING``).
2. Batched HTTP: ``enrichment serve`` runs as a separate process (uvicorn, settings from the
   environment, on 127.0.0.1); NDJSON bodies, serialized before the clock starts, are POSTed to
   ``/v1/events`` with httpx over one keep-alive connection, then over ``--clients`` connections.
3. Single-event latency: ``--singles`` sequential one-event POSTs over one keep-alive connection.

Targets: batched HTTP >= 20,000 events/s and >= 50% of the raw ``FactStore.ingest_events`` insert rate;
single-event p99 <= 10 ms. Timings are printed, never asserted.

Run: ``.venv/bin/python bench/ingest.py [--batches 30] [--batch-size 10000] [--singles 2000]``
(``BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres`` to use an existing server).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import sqlalchemy as sa
from _common import bench_database, console, describe_server, median, percentile, print_table, stop_process, verdict
from sqlalchemy.dialects import postgresql

from enrichment_assets.api.server import free_port
from enrichment_assets.events import Event, EventType
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import entities
from enrichment_assets.settings import Settings

BARE_TABLE = "bench_bare_upsert"
# The columns FactStore.ingest_events writes; the bare upsert overwrites all but the key and first_seen_at.
UPSERT_COLUMNS = ("state", "version", "updated_at", "last_event_at", "attempts", "next_attempt_at")
NDJSON = {"content-type": "application/x-ndjson"}
WARMUP_BATCHES = 2
WARMUP_SINGLES = 100
TARGET_RATE = 20_000
TARGET_SHARE = 0.5
TARGET_P99_MS = 10.0

T = TypeVar("T")


@dataclass(frozen=True)
class Batches:
    """``count`` batches of ``size`` events with ids ``<prefix>-<n>``, alternating over ``types``."""

    types: tuple[str, ...]
    count: int
    size: int

    def _ids(self, index: int) -> Iterator[tuple[str, int]]:
        for n in range(index * self.size, (index + 1) * self.size):
            yield self.types[n % len(self.types)], n

    def events(self, prefix: str, index: int, event_type: EventType, occurred_at: datetime) -> list[Event]:
        return [
            Event(entity_type=t, entity_id=f"{prefix}-{n:09d}", event_type=event_type, occurred_at=occurred_at)
            for t, n in self._ids(index)
        ]

    def ndjson(self, prefix: str, index: int, occurred_at: datetime) -> bytes:
        stamp = occurred_at.isoformat()
        lines = (
            json.dumps(
                {"entity_type": t, "entity_id": f"{prefix}-{n:09d}", "event_type": "created", "occurred_at": stamp},
                separators=(",", ":"),
            )
            for t, n in self._ids(index)
        )
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Run:
    """Per-batch latencies of one ingest path, and the wall time it took for all of them."""

    label: str
    batch_size: int
    batch_seconds: list[float]
    wall_seconds: float

    @property
    def median_rate(self) -> float:
        return self.batch_size / median(self.batch_seconds)

    @property
    def overall_rate(self) -> float:
        return self.batch_size * len(self.batch_seconds) / self.wall_seconds


# -- baselines: no HTTP ---------------------------------------------------------------------------


def time_batches(label: str, batches: Batches, prepare: Callable[[int], T], write: Callable[[T], object]) -> Run:
    """Time ``write(prepare(i))`` for each batch; ``prepare`` (building the input) is not timed."""
    seconds: list[float] = []
    for index in range(batches.count):
        prepared = prepare(index)
        started = time.perf_counter()
        write(prepared)
        seconds.append(time.perf_counter() - started)
    return Run(label, batches.size, seconds, sum(seconds))


def bare_table() -> sa.Table:
    """A scratch copy of ``entities``: same columns, key and indexes, under names of its own."""
    table = entities.to_metadata(sa.MetaData(), name=BARE_TABLE)
    table.primary_key.name = f"{BARE_TABLE}_pkey"
    for index in table.indexes:
        index.name = index.name.replace("entities", BARE_TABLE)
    return table


def bare_upsert(table: sa.Table) -> sa.Insert:
    insert = postgresql.insert(table)
    return insert.on_conflict_do_update(
        index_elements=[table.c.entity_type, table.c.entity_id],
        set_={name: insert.excluded[name] for name in UPSERT_COLUMNS},
    )


def upsert_rows(events: Sequence[Event]) -> list[dict[str, Any]]:
    """The rows ``FactStore.ingest_events`` writes for these (distinct, created or updated) events."""
    now = datetime.now(UTC)
    return [
        {
            "entity_type": e.entity_type,
            "entity_id": e.entity_id,
            "state": "uncached",
            "version": 1,
            "first_seen_at": now,
            "updated_at": now,
            "last_event_at": e.occurred_at,
            "attempts": 0,
            "next_attempt_at": now,
        }
        for e in events
    ]


def run_baselines(store: FactStore, batches: Batches, t0: datetime) -> list[Run]:
    table = bare_table()
    table.create(store.engine)
    later = t0 + timedelta(seconds=1)

    def factstore(label: str, event_type: EventType, at: datetime) -> Run:
        return time_batches(label, batches, lambda i: batches.events("raw", i, event_type, at), store.ingest_events)

    def bare(label: str, stmt: sa.Insert, prefix: str, at: datetime) -> Run:
        def write(rows: list[dict[str, Any]]) -> None:
            with store.engine.begin() as conn:
                conn.execute(stmt, rows)

        return time_batches(
            label, batches, lambda i: upsert_rows(batches.events(prefix, i, EventType.CREATED, at)), write
        )

    executemany = bare_upsert(table)
    multirow = bare_upsert(table).returning(table.c.entity_id)
    return [
        factstore("FactStore.ingest_events, inserts (baseline)", EventType.CREATED, t0),
        factstore("FactStore.ingest_events, updates", EventType.UPDATED, later),
        bare("bare upsert, executemany: inserts", executemany, "many", t0),
        bare("bare upsert, executemany: updates", executemany, "many", later),
        bare("bare upsert, multi-row VALUES: inserts", multirow, "values", t0),
        bare("bare upsert, multi-row VALUES: updates", multirow, "values", later),
    ]


# -- HTTP -----------------------------------------------------------------------------------------


def server_environment(database_url: str, max_events: int, max_body_bytes: int) -> dict[str, str]:
    """The environment ``enrichment serve`` runs with: the bench database, no token, limits that fit."""
    env = {
        **os.environ,
        "ENRICHMENT_DATABASE_URL": database_url,
        "ENRICHMENT_MAX_EVENTS": str(max(max_events, Settings.max_events)),
        "ENRICHMENT_MAX_BODY_BYTES": str(max(max_body_bytes, Settings.max_body_bytes)),
    }
    env.pop("ENRICHMENT_API_TOKEN", None)
    return env


def accepted_types(env: dict[str, str]) -> tuple[str, ...]:
    """Two entity types the server will accept: the first two its policy file declares."""
    declared = sorted(Settings.from_env(env).entity_types)
    if not declared:
        raise SystemExit("the API settings declare no entity types")
    return tuple(declared[:2])


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run ``enrichment serve`` on a free 127.0.0.1 port until the block ends; yields its base URL."""
    executable = Path(sys.executable).with_name("enrichment")
    if not executable.exists():
        raise SystemExit(f"{executable} not found: install the project into this venv (make install)")
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log_path)
        yield url
    finally:
        stop_process(process)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"enrichment serve exited with {process.returncode}:\n{_tail(log_path)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"enrichment serve did not become healthy in {timeout:.0f}s:\n{_tail(log_path)}")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def post(client: httpx.Client, body: bytes, expected_entities: int) -> float:
    """POST one batch; returns the seconds until the response arrived. A rejected batch is an error."""
    started = time.perf_counter()
    response = client.post("/v1/events", content=body, headers=NDJSON)
    elapsed = time.perf_counter() - started
    if response.status_code != 202 or response.json().get("entities") != expected_entities:
        raise RuntimeError(f"batch not accepted: HTTP {response.status_code} {response.text[:500]}")
    return elapsed


def time_http(url: str, label: str, bodies: Sequence[bytes], batch_size: int, clients: int) -> Run:
    """POST ``bodies`` spread over ``clients`` keep-alive connections, each sending its share in order."""
    connections = [httpx.Client(base_url=url, timeout=120) for _ in range(clients)]
    try:
        for client in connections:
            client.get("/healthz")  # open the connection before the clock starts

        def send(index: int) -> list[float]:
            return [post(connections[index], body, batch_size) for body in bodies[index::clients]]

        with ThreadPoolExecutor(clients) as pool:
            started = time.perf_counter()
            shares = list(pool.map(send, range(clients)))
            wall = time.perf_counter() - started
    finally:
        for client in connections:
            client.close()
    return Run(label, batch_size, [s for share in shares for s in share], wall)


def time_singles(url: str, types: tuple[str, ...], count: int, occurred_at: datetime) -> list[float]:
    """Milliseconds per single-event POST, sequential over one keep-alive connection."""
    single = Batches(types, WARMUP_SINGLES + count, 1)
    bodies = [single.ndjson("single", i, occurred_at) for i in range(single.count)]
    with httpx.Client(base_url=url, timeout=30) as client:
        for body in bodies[:WARMUP_SINGLES]:
            post(client, body, 1)
        return [post(client, body, 1) * 1000 for body in bodies[WARMUP_SINGLES:]]


def run_http(
    env: dict[str, str], batches: Batches, clients: int, singles: int, t0: datetime
) -> tuple[list[Run], list[float]]:
    with console.status("serializing NDJSON bodies"):
        warmup = [batches.ndjson("warm", i, t0) for i in range(WARMUP_BATCHES)]
        sequential = [batches.ndjson("http1", i, t0) for i in range(batches.count)]
        concurrent = [batches.ndjson("http2", i, t0) for i in range(batches.count)] if clients > 1 else []

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        with api_server(env, Path(tmp) / "serve.log") as api:
            with console.status("HTTP: warm-up and batched ingest over one connection"):
                time_http(api, "warm-up", warmup, batches.size, 1)
                runs = [time_http(api, "HTTP POST NDJSON, 1 connection", sequential, batches.size, 1)]
            if concurrent:
                label = f"HTTP POST NDJSON, {clients} connections"
                with console.status(f"HTTP: batched ingest over {clients} connections"):
                    runs.append(time_http(api, label, concurrent, batches.size, clients))
            with console.status(f"HTTP: {singles:,} single-event POSTs"):
                singles_ms = time_singles(api, batches.types, singles, t0) if singles > 0 else []
    return runs, singles_ms


# -- report ---------------------------------------------------------------------------------------


def report(baselines: list[Run], http_runs: list[Run], singles_ms: list[float], server: str) -> None:
    reference = baselines[0].overall_rate
    print_table(
        "Ingest throughput (rows or events per second)",
        ["path", "batches", "median batch rate", "overall rate", "vs FactStore inserts"],
        [
            [
                run.label,
                f"{len(run.batch_seconds)} x {run.batch_size:,}",
                f"{run.median_rate:,.0f}",
                f"{run.overall_rate:,.0f}",
                f"{run.overall_rate / reference:.0%}",
            ]
            for run in [*baselines, *http_runs]
        ],
        caption=server,
    )
    if singles_ms:
        print_table(
            "Single-event POST /v1/events, sequential, one keep-alive connection (ms)",
            ["requests", "p50", "p90", "p99", "max"],
            [
                [
                    f"{len(singles_ms):,}",
                    *(f"{percentile(singles_ms, q):.2f}" for q in (50, 90, 99)),
                    f"{max(singles_ms):.2f}",
                ]
            ],
        )
    http = http_runs[0]
    share = http.overall_rate / reference
    console.print(
        f"Batched HTTP ingest: [bold]{http.overall_rate:,.0f} events/s[/bold] overall "
        f"(median batch {http.median_rate:,.0f}/s), {verdict(http.overall_rate >= TARGET_RATE)} "
        f"target >= {TARGET_RATE:,}/s"
    )
    console.print(
        f"Ratio to raw FactStore.ingest_events inserts ({reference:,.0f} rows/s): [bold]{share:.0%}[/bold], "
        f"{verdict(share >= TARGET_SHARE)} target >= {TARGET_SHARE:.0%}"
    )
    if singles_ms:
        p99 = percentile(singles_ms, 99)
        console.print(
            f"Single-event latency: p50 {percentile(singles_ms, 50):.2f} ms, [bold]p99 {p99:.2f} ms[/bold], "
            f"{verdict(p99 <= TARGET_P99_MS)} target p99 <= {TARGET_P99_MS:.0f} ms"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=30, help="timed HTTP batches per row (default 30)")
    parser.add_argument("--baseline-batches", type=int, default=10, help="batches per baseline row (default 10)")
    parser.add_argument("--batch-size", type=int, default=10_000, help="events per batch (default 10000)")
    parser.add_argument("--singles", type=int, default=2_000, help="single-event POSTs (default 2000; 0 skips)")
    parser.add_argument(
        "--clients", type=int, default=2, help="connections for the concurrent row (default 2; 1 skips)"
    )
    args = parser.parse_args(argv)
    if min(args.batches, args.baseline_batches, args.batch_size) < 1:
        parser.error("--batches, --baseline-batches and --batch-size must be positive")

    t0 = datetime.now(UTC).replace(microsecond=0)
    with bench_database() as url:
        # Every NDJSON line here is well under 512 bytes, so no batch is refused for its size.
        env = server_environment(url, args.batch_size, args.batch_size * 512)
        types = accepted_types(env)
        store = FactStore.from_url(url)
        store.migrate()
        server = f"{describe_server(store.engine)}; entity types {', '.join(types)}"
        with console.status("baselines: FactStore.ingest_events and the bare upsert"):
            baselines = run_baselines(store, Batches(types, args.baseline_batches, args.batch_size), t0)
        store.dispose()
        http_batches = Batches(types, args.batches, args.batch_size)
        http_runs, singles_ms = run_http(env, http_batches, args.clients, args.singles, t0)
    report(baselines, http_runs, singles_ms, server)


if __name__ == "__main__":
    main()
