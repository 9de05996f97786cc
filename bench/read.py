"""Edge reads: a materialized edge from the read API against a synchronous multi-hop walk on read.

Setup, untimed, on one fresh PostgreSQL database (see ``_common``): the source simulator runs on
127.0.0.1 (``--seed``, ``--scale``, ``--latency-ms`` added to every source request); the graph's thin
``created`` events are ingested and ``enrich_once`` runs until ``FactStore.due_work()`` is empty, so
the derived edges are materialized. ``enrichment serve`` then runs as a separate process (uvicorn,
settings from the environment, search off) on 127.0.0.1.

Measured, for ``--samples`` model instances drawn at random (seeded):

1. Materialized edge: ``GET /v1/entities/model_instance/{id}/edges?relation=evaluated_in``,
   ``--requests`` sequential requests over one keep-alive connection, cycling through the sampled
   ids, after ``--warmup`` untimed ones.
2. Baseline, synchronous walk on read, as a read-time service without the fact store would answer:
   GET the model instance from its source, GET its pipeline run, GET each A/B test the run names
   (only tests that exist count), one sequential GET at a time over one keep-alive connection;
   paths and fields come from the shipped policy (``policies/mds.yaml``). Once per sampled id, after
   a few untimed walks.
3. For reference: the same edge lookups through an ``httpx.Client`` (what a Python caller of the API
   would likely use: the difference is the client's own cost), ``GET /healthz`` (HTTP plus one
   database ping), and the handler's fact-store read in-process (``FactStore.entity_edges``, no HTTP).

Both read paths use the standard library's ``http.client`` with keep-alive, the leanest Python client,
so the figures measure the servers rather than the client.

Correctness: for every sampled id, the A/B test set of the walk and of the edge API are compared
(and each with the simulator's own graph); mismatches are counted.

Targets: edge lookup p99 <= 5 ms, and >= 100x faster than the synchronous walk (at p50 and p99).
Timings are printed, never asserted.

Run: ``.venv/bin/python bench/read.py [--scale 0.1] [--samples 200] [--requests 5000]`` (about a
minute at the defaults; ``BENCH_DATABASE_URL`` to use an existing PostgreSQL server).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from _common import api_server, bench_database, console, describe_server, percentile, print_table, verdict

from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph
from enrichment_assets.dev.simulator.server import simulator_server
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.client import encode_segment
from enrichment_assets.hydration.paths import extract_ids
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.settings import SHIPPED_POLICY
from enrichment_assets.steps.cycle import enrich_once

ROOT_TYPE = "model_instance"
RELATION = "evaluated_in"
INGEST_BATCH = 10_000
MAX_CYCLES = 10
WALK_WARMUP = 5
TARGET_P99_MS = 5.0
TARGET_SPEEDUP = 100.0


@dataclass(frozen=True)
class Timings:
    """Milliseconds per request (or per walk) of one read path."""

    label: str
    ms: list[float]
    requests_each: float = 1.0

    def at(self, q: float) -> float:
        return percentile(self.ms, q)


# -- setup: materialize the edges ------------------------------------------------------------------


def materialize(store: FactStore, policy: Policy, graph: MdsGraph) -> tuple[int, int, float]:
    """Ingest the graph's thin events and enrich until nothing is due: (events, cycles, seconds)."""
    events = [Event.model_validate(e) for e in thin_events(graph)]
    started = time.perf_counter()
    for start in range(0, len(events), INGEST_BATCH):
        store.ingest_events(events[start : start + INGEST_BATCH])
    for cycle in range(1, MAX_CYCLES + 1):
        enrich_once(store, policy)
        if not store.due_work():
            return len(events), cycle, time.perf_counter() - started
    raise RuntimeError(f"work still due after {MAX_CYCLES} enrichment cycles: {store.due_work()[:3]}")


# -- the two read paths ----------------------------------------------------------------------------


class KeepAlive:
    """One keep-alive HTTP/1.1 connection per host (the standard library's client): GET -> (status, body)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.connections: dict[str, http.client.HTTPConnection] = {}

    def get(self, url: str) -> tuple[int, bytes]:
        parts = urlsplit(url)
        conn = self.connections.get(parts.netloc)
        if conn is None:
            conn = self.connections[parts.netloc] = http.client.HTTPConnection(parts.netloc, timeout=self.timeout)
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()

    def close(self) -> None:
        for conn in self.connections.values():
            conn.close()


class SyncWalker:
    """The naive read-time answer: follow the policy's path with one blocking GET per entity."""

    def __init__(self, client: KeepAlive, policy: Policy, environ: dict[str, str]) -> None:
        self.client = client
        self.policy = policy
        self.environ = environ
        self.requests = 0

    def get(self, entity_type: str, entity_id: str) -> dict[str, Any] | None:
        declared = self.policy.entity_types[entity_type]
        base = self.policy.sources[declared.source].resolved_base_url(self.environ)
        self.requests += 1
        status, body = self.client.get(base + declared.path.replace("{id}", encode_segment(entity_id)))
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"{entity_type}/{entity_id}: HTTP {status} {body[:300]!r}")
        return json.loads(body)

    def walk(self, entity_type: str, entity_id: str, hops: Sequence[str]) -> set[str]:
        """Ids at the end of ``hops`` from the entity, through (and ending at) entities that exist."""
        root = self.get(entity_type, entity_id)
        frontier = [(entity_type, root)] if root is not None else []
        for hop in hops:
            reached = []
            for current_type, body in frontier:
                reference = self.policy.entity_types[current_type].references[hop]
                for target in extract_ids(body, reference.field):
                    found = self.get(reference.type, target)
                    if found is not None:
                        reached.append((reference.type, found))
            frontier = reached
        return {body["id"] for _, body in frontier}


def time_calls(
    call: Callable[[str], set[str]], ids: Sequence[str], count: int, warmup: int
) -> tuple[list[float], dict[str, set[str]]]:
    """``call`` on ``ids`` in turn: ``warmup`` untimed calls, then ``count`` timed ones (ms), and the answers."""
    answers: dict[str, set[str]] = {}
    for n in range(warmup):
        call(ids[n % len(ids)])
    ms: list[float] = []
    for n in range(count):
        entity_id = ids[n % len(ids)]
        started = time.perf_counter()
        answer = call(entity_id)
        ms.append((time.perf_counter() - started) * 1000)
        answers.setdefault(entity_id, answer)
    return ms, answers


def edges_path(entity_id: str) -> str:
    return f"/v1/entities/{ROOT_TYPE}/{quote(entity_id, safe='')}/edges?relation={RELATION}"


def edge_lookup(client: KeepAlive, api: str) -> Callable[[str], set[str]]:
    def lookup(entity_id: str) -> set[str]:
        status, body = client.get(api + edges_path(entity_id))
        if status != 200:
            raise RuntimeError(f"edges of {entity_id}: HTTP {status} {body[:300]!r}")
        return {e["dst_id"] for e in json.loads(body)["edges"]}

    return lookup


def edge_lookup_httpx(client: httpx.Client) -> Callable[[str], set[str]]:
    def lookup(entity_id: str) -> set[str]:
        response = client.get(edges_path(entity_id))
        response.raise_for_status()
        return {e["dst_id"] for e in response.json()["edges"]}

    return lookup


def healthz(client: KeepAlive, api: str) -> Callable[[str], set[str]]:
    def ping(_entity_id: str) -> set[str]:
        status, body = client.get(api + "/healthz")
        if status != 200:
            raise RuntimeError(f"/healthz: HTTP {status} {body[:300]!r}")
        return set()

    return ping


def in_process(store: FactStore) -> Callable[[str], set[str]]:
    def read(entity_id: str) -> set[str]:
        found = store.entity_edges(ROOT_TYPE, entity_id, relation=RELATION, limit=1000)
        return {e["dst_id"] for e in found.edges} if found else set()

    return read


# -- report ---------------------------------------------------------------------------------------


def mismatches(left: dict[str, set[str]], right: dict[str, set[str]]) -> list[str]:
    return sorted(i for i in left if left[i] != right.get(i))


def report(
    walk: Timings,
    edge: Timings,
    references: Sequence[Timings],
    walk_answers: dict[str, set[str]],
    edge_answers: dict[str, set[str]],
    truth: dict[str, set[str]],
    caption: str,
) -> None:
    def row(t: Timings) -> list[str]:
        return [
            t.label,
            f"{len(t.ms):,}",
            f"{t.requests_each:.2f}",
            *(f"{t.at(q):.2f}" for q in (50, 90, 99)),
            f"{max(t.ms):.2f}",
        ]

    speedup = {q: walk.at(q) / edge.at(q) for q in (50, 90, 99)}
    print_table(
        "Sync walk on read vs materialized edge (ms)",
        ["read path", "timed", "HTTP GETs each", "p50", "p90", "p99", "max"],
        [
            row(walk),
            row(edge),
            [
                "speedup (walk / edge)",
                "",
                "",
                *(f"{speedup[q]:,.0f}x" for q in (50, 90, 99)),
                f"{max(walk.ms) / max(edge.ms):,.0f}x",
            ],
            *(row(t) for t in references),
        ],
        caption=caption,
    )
    p99 = edge.at(99)
    console.print(
        f"Edge lookup: p50 {edge.at(50):.2f} ms, [bold]p99 {p99:.2f} ms[/bold], "
        f"{verdict(p99 <= TARGET_P99_MS)} target p99 <= {TARGET_P99_MS:.0f} ms"
    )
    console.print(
        f"Speedup over the synchronous walk: [bold]{speedup[50]:,.0f}x at p50, {speedup[99]:,.0f}x at p99[/bold], "
        f"{verdict(min(speedup[50], speedup[99]) >= TARGET_SPEEDUP)} target >= {TARGET_SPEEDUP:.0f}x"
    )
    differ = mismatches(walk_answers, edge_answers)
    walk_wrong, edge_wrong = mismatches(walk_answers, truth), mismatches(edge_answers, truth)
    with_tests = sum(1 for answer in truth.values() if answer)
    sample = (
        f" (e.g. {differ[0]}: walk {sorted(walk_answers[differ[0]])}, edge {sorted(edge_answers[differ[0]])})"
        if differ
        else ""
    )
    console.print(
        f"Same A/B test set: {len(walk_answers):,} ids compared ({with_tests:,} in at least one test), "
        f"[bold]{len(differ)} mismatches[/bold] between walk and edge{sample}; against the simulator's graph: "
        f"walk {len(walk_wrong)}, edge {len(edge_wrong)} mismatches"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=0.1, help="simulator graph scale (default 0.1)")
    parser.add_argument("--seed", type=int, default=7, help="graph and sample seed (default 7)")
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="simulated latency per source request (default 20)"
    )
    parser.add_argument("--samples", type=int, default=200, help="model instances sampled (default 200)")
    parser.add_argument("--requests", type=int, default=5_000, help="timed edge lookups (default 5000)")
    parser.add_argument("--warmup", type=int, default=500, help="untimed edge lookups first (default 500)")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.samples < 1 or args.requests < 1 or args.warmup < 0 or args.latency_ms < 0:
        parser.error("--scale, --samples and --requests must be positive; --warmup and --latency-ms not negative")

    policy = load_policy(SHIPPED_POLICY)
    hops = next(rule.path for rule in policy.effective(ROOT_TYPE).edges if rule.relation == RELATION)
    with (
        bench_database() as url,
        simulator_server(seed=args.seed, scale=args.scale, knobs={"latency_ms": args.latency_ms}) as sim,
    ):
        environ = sim.environ()
        # enrich_once reads the sources' base URLs from the environment; the API process inherits them.
        os.environ.update(environ)
        graph = sim.simulator.graph.snapshot()
        store = FactStore.from_url(url)
        store.migrate()
        caption = describe_server(store.engine)
        with console.status(f"materializing: {sum(graph.counts().values()):,} entities ingested and enriched"):
            events, cycles, seconds = materialize(store, policy, graph)
        console.print(
            f"materialized {sum(store.edge_counts().values()):,} live edges from {events:,} thin events in "
            f"{cycles} enrichment cycles, {seconds:.0f} s (sources at {args.latency_ms:.0f} ms per request)"
        )

        ids = random.Random(args.seed).sample(graph.ids(ROOT_TYPE), min(args.samples, len(graph.ids(ROOT_TYPE))))
        truth = {i: graph.walk(ROOT_TYPE, i, hops) for i in ids}
        env = {**os.environ, "ENRICHMENT_DATABASE_URL": url}
        for unused in ("ENRICHMENT_API_TOKEN", "ELASTICSEARCH_URL", "ENRICHMENT_POLICY"):
            env.pop(unused, None)

        with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp, api_server(env, Path(tmp) / "serve.log") as api:
            client = KeepAlive()
            with console.status(f"edge lookups: {args.warmup:,} warm-up, {args.requests:,} timed"):
                edge_ms, edge_answers = time_calls(edge_lookup(client, api), ids, args.requests, args.warmup)
                health_ms, _ = time_calls(healthz(client, api), ids, min(args.requests, 2_000), min(args.warmup, 100))
            client.close()
            with console.status("the same edge lookups through httpx"), httpx.Client(base_url=api, timeout=10) as hx:
                httpx_ms, _ = time_calls(edge_lookup_httpx(hx), ids, min(args.requests, 2_000), min(args.warmup, 100))
        with console.status("fact-store reads in-process"):
            local_ms, _ = time_calls(in_process(store), ids, min(args.requests, 2_000), min(args.warmup, 100))
        store.dispose()

        with console.status(f"synchronous walks on read: {len(ids):,} ids"):
            sources = KeepAlive()
            walker = SyncWalker(sources, policy, environ)
            walk_ms, walk_answers = time_calls(lambda i: walker.walk(ROOT_TYPE, i, hops), ids, len(ids), WALK_WARMUP)
            per_walk = walker.requests / (len(ids) + WALK_WARMUP)
            sources.close()

    walk = Timings(f"sync walk on read ({args.latency_ms:.0f} ms per source GET)", walk_ms, per_walk)
    edge = Timings(f"materialized: GET .../edges?relation={RELATION}", edge_ms)
    references = [
        Timings("  reference: the same lookups through httpx.Client", httpx_ms),
        Timings("  reference: GET /healthz (HTTP + DB ping)", health_ms),
        Timings("  reference: FactStore.entity_edges in-process", local_ms, 0.0),
    ]
    caption += (
        f"\nsimulator seed {args.seed}, scale {args.scale}: {sum(graph.counts().values()):,} entities; "
        f"{len(ids):,} sampled {ROOT_TYPE} ids; all requests sequential over one keep-alive connection"
    )
    report(walk, edge, references, walk_answers, edge_answers, truth, caption)


if __name__ == "__main__":
    main()
