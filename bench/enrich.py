"""Enrichment throughput and source traffic: the batched multi-hop walker against a naive per-entity walk.

Both run in this process against the same source simulator (``python -m enrichment_assets.dev.simulator``
in a separate process on 127.0.0.1: the seeded graph at ``--scale``, ``--latency-ms`` added to every
answer, no injected faults) with the shipped ``policies/mds.yaml``, whose per-source
``requests_per_second`` and ``max_concurrency`` the same source clients enforce on both paths:

1. The batched walker (the product): every entity's thin ``created`` event is ingested into a fresh
   PostgreSQL database (see ``_common``; not timed with the walk), then ``enrich_cycle`` runs until
   ``FactStore.due_work()`` is empty (at most ``--max-cycles`` cycles). Measured: wall time, entities
   fully enriched per second, source requests as the simulator counted them (``/admin/stats``),
   requests per enriched entity and the derived edges in the store (checked against the edges the
   simulator's graph implies).
2. The baseline, in the same run: what a hand-rolled script does. For each root entity, GET it, then
   walk each of its type's policy paths hop by hop with one GET per entity reached (the single-entity
   endpoint, through the same ``SourcePool`` clients, so the same limits, retries and simulator). No
   batching and nothing shared between roots; to be generous it remembers what it fetched within one
   root's walk, writes nothing to the database, and walks all roots concurrently. It runs on
   ``--naive-sample`` roots drawn from the whole workload, stratified by type in proportion to the
   workload (so model instances dominate, as they do in the real mix); its per-type cost per root is
   extrapolated to the whole workload, and the output says which figures are extrapolated. Its derived
   edges are compared with the ones the batched walker stored for the same roots.

Also printed: per-source requests and peak requests per second against the policy's limits, the
"source floor" (the least time the requests could take under the policy's rate and concurrency limits
at the simulated latency), and where the batched walker's wall time went (a source request in flight,
SQL executing, neither). Timings are printed, never asserted.

Run: ``.venv/bin/python bench/enrich.py [--scale 0.5] [--latency-ms 20] [--naive-sample 300]``
(``BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres`` to use an existing server).
At the defaults it takes under a minute (about 35 s on a 2-core machine).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from _common import (
    SEED,
    bench_database,
    console,
    describe_server,
    print_table,
    reset_stats,
    simulator_process,
    source_environ,
    source_stats,
)

from enrichment_assets.dev.simulator.catalog import DERIVED_EDGES
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.events import Event
from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.factstore.schema import references
from enrichment_assets.hydration.client import Fetched
from enrichment_assets.hydration.paths import MalformedField, extract_ids
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.walker import WalkReport
from enrichment_assets.policy import EdgeRule, Policy, load_policy
from enrichment_assets.settings import SHIPPED_POLICY
from enrichment_assets.steps.cycle import enrich_cycle

OWNER = "bench-enrich"
INGEST_CHUNK = 5_000
Edge = tuple[str, str, str]  # (relation, target type, target id)
Span = tuple[float, float]  # perf_counter seconds, start and end
T = TypeVar("T")


# -- the source floor -------------------------------------------------------------------------------


def source_floor(requests: Mapping[str, int], policy: Policy, latency_ms: float) -> float:
    """Least seconds ``requests`` could take under the policy's per-source rate and concurrency limits,
    each request taking ``latency_ms``; sources run in parallel, so the slowest one sets it."""
    floors = [0.0]
    for name, count in requests.items():
        source = policy.sources[name]
        by_rate = count / source.requests_per_second
        by_concurrency = count * latency_ms / 1000 / source.max_concurrency
        floors.append(max(by_rate, by_concurrency))
    return max(floors)


# -- 1. the batched walker ------------------------------------------------------------------------


class ClockedPool(SourcePool):
    """The product's ``SourcePool``, also clocking the wall time during which some fetch is in flight."""

    def __init__(self, policy: Policy, *, environ: Mapping[str, str]) -> None:
        super().__init__(policy, environ=environ)
        self.in_flight_seconds = 0.0
        self.spans: list[Span] = []
        self._in_flight = 0
        self._since = 0.0

    async def fetch(self, entity_type: str, ids: Sequence[str]) -> dict[str, Fetched]:
        if not ids:
            return {}
        if self._in_flight == 0:
            self._since = time.perf_counter()
        self._in_flight += 1
        try:
            return await super().fetch(entity_type, ids)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self.spans.append((self._since, time.perf_counter()))
                self.in_flight_seconds += self.spans[-1][1] - self._since


def covered_seconds(*spans: Sequence[Span]) -> float:
    """Seconds covered by at least one of the spans (their union, overlaps counted once)."""
    total, reached = 0.0, -math.inf
    for start, end in sorted(s for group in spans for s in group):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


_STATEMENT_KIND = re.compile(r'^\s*(INSERT INTO|UPDATE|DELETE FROM|SELECT\b.*?\bFROM)\s+"?(\w+)', re.DOTALL)


@dataclass
class SqlClock:
    """Seconds spent in the driver's execute, summed, with statements and parameter rows, per kind of
    statement (``INSERT edges``, ``SELECT references``, ...)."""

    seconds: Counter[str] = field(default_factory=Counter)
    statements: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    spans: list[Span] = field(default_factory=list)

    def total(self) -> tuple[float, int]:
        return sum(self.seconds.values()), sum(self.statements.values())


def _row_count(params: Any, many: bool) -> int:
    """Rows a statement carried: an executemany's parameter sets, or the length of the arrays an
    ``unnest`` statement passes one per column (the graph upserts on PostgreSQL), else one."""
    if many and isinstance(params, Sequence):
        return len(params)
    if isinstance(params, dict):
        arrays = [v for v in params.values() if isinstance(v, list)]
        if arrays:
            return len(arrays[0])
    return 1


@contextmanager
def clocked_sql(engine: sa.Engine) -> Iterator[SqlClock]:
    clock = SqlClock()

    def before(conn: Any, _cursor: Any, _statement: str, _params: Any, _context: Any, _many: bool) -> None:
        conn.info.setdefault("bench_started", []).append(time.perf_counter())

    def after(conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, many: bool) -> None:
        started, ended = conn.info["bench_started"].pop(), time.perf_counter()
        elapsed = ended - started
        clock.spans.append((started, ended))
        match = _STATEMENT_KIND.match(statement)
        kind = f"{match[1].split()[0]} {match[2]}" if match else statement.split(None, 1)[0]
        clock.seconds[kind] += elapsed
        clock.statements[kind] += 1
        clock.rows[kind] += _row_count(params, many)

    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "after_cursor_execute", after)
    try:
        yield clock
    finally:
        sa.event.remove(engine, "before_cursor_execute", before)
        sa.event.remove(engine, "after_cursor_execute", after)


@dataclass
class Batched:
    entities: int
    ingest_seconds: float
    cycle_seconds: list[float]
    idle: bool
    wall: float
    by_type: dict[str, WalkReport]
    states: Counter[str]
    requests: dict[str, int]
    client_requests: int
    ids_requested: int
    retries: int
    peak_rps: dict[str, int]
    ids_per_request: dict[str, float]
    edges: int
    expected_edges: int
    references: int
    in_flight_seconds: float
    in_flight_spans: list[Span]
    sql: SqlClock

    @property
    def enriched(self) -> int:
        return self.states["fully_enriched"]

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())


def ingest(store: FactStore, graph: MdsGraph) -> tuple[int, float]:
    """Ingest one thin ``created`` event per entity; returns the count and the seconds it took."""
    events = [Event.model_validate(e) for e in thin_events(graph)]
    started = time.perf_counter()
    for start in range(0, len(events), INGEST_CHUNK):
        store.ingest_events(events[start : start + INGEST_CHUNK])
    return len(events), time.perf_counter() - started


def count_references(store: FactStore) -> int:
    """Distinct 1-hop references the store holds (live or retracted)."""
    with store.engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(references)).scalar_one()


def expected_edge_count(graph: MdsGraph) -> int:
    """Derived edges the policies should give the whole graph, by the simulator's own walk."""
    return sum(
        len(targets)
        for entity_type in DERIVED_EDGES
        for entity_id in graph.ids(entity_type)
        for targets in graph.expected_edges(entity_type, entity_id).values()
    )


async def enrich_until_idle(
    store: FactStore, policy: Policy, pool: SourcePool, *, batch_size: int, max_cycles: int
) -> tuple[list[float], dict[str, WalkReport], bool]:
    """Run cycles until nothing is due (or ``max_cycles``); returns each cycle's seconds, the reports
    summed per type over all cycles, and whether nothing was due at the end."""
    by_type: dict[str, WalkReport] = {}
    seconds: list[float] = []
    for _ in range(max_cycles):
        started = time.perf_counter()
        reports = await enrich_cycle(store, policy, pool, owner=OWNER, batch_size=batch_size)
        seconds.append(time.perf_counter() - started)
        for report in reports:
            by_type.setdefault(report.entity_type, WalkReport(report.entity_type)).absorb(report)
        if not await asyncio.to_thread(store.due_work):
            return seconds, by_type, True
    return seconds, by_type, False


def run_batched(
    store: FactStore, policy: Policy, graph: MdsGraph, sim_url: str, *, batch_size: int, max_cycles: int
) -> Batched:
    entities, ingest_seconds = ingest(store, graph)
    reset_stats(sim_url)

    async def run() -> tuple[list[float], dict[str, WalkReport], bool, float, dict[str, Any], ClockedPool]:
        async with ClockedPool(policy, environ=source_environ(sim_url)) as pool:
            started = time.perf_counter()
            seconds, by_type, idle = await enrich_until_idle(
                store, policy, pool, batch_size=batch_size, max_cycles=max_cycles
            )
            wall = time.perf_counter() - started
            return seconds, by_type, idle, wall, pool.stats(), pool

    with clocked_sql(store.engine) as sql:
        cycle_seconds, by_type, idle, wall, client_stats, pool = asyncio.run(run())
    stats = source_stats(sim_url)
    states: Counter[str] = Counter()
    for status in store.status():
        states.update(status.counts)
    return Batched(
        entities=entities,
        ingest_seconds=ingest_seconds,
        cycle_seconds=cycle_seconds,
        idle=idle,
        wall=wall,
        by_type=by_type,
        states=states,
        requests={name: s["requests"] for name, s in stats.items()},
        client_requests=sum(s["requests"] for s in client_stats.values()),
        ids_requested=sum(s["entities_requested"] for s in client_stats.values()),
        retries=sum(s["retries"] for s in client_stats.values()),
        peak_rps={name: s["peak_rps"] for name, s in stats.items()},
        ids_per_request={name: s["batches"]["mean"] for name, s in stats.items()},
        edges=sum(store.edge_counts().values()),
        expected_edges=expected_edge_count(graph),
        references=count_references(store),
        in_flight_seconds=pool.in_flight_seconds,
        in_flight_spans=pool.spans,
        sql=sql,
    )


# -- 2. the naive walk ------------------------------------------------------------------------------


@dataclass
class NaiveRoot:
    """One root's naive walk: GETs sent, GETs a script without a per-root memo would send, edges."""

    key: EntityKey
    by_source: Counter[str] = field(default_factory=Counter)
    visits: int = 0
    failures: int = 0
    edges: set[Edge] = field(default_factory=set)

    @property
    def requests(self) -> int:
        return sum(self.by_source.values())


async def _each(awaitables: Sequence[Awaitable[T]], *, sequential: bool) -> list[T]:
    """Await them all at once, or one after another as a plain loop would."""
    if sequential:
        return [await a for a in awaitables]
    return list(await asyncio.gather(*awaitables))


async def naive_walk(pool: SourcePool, policy: Policy, key: EntityKey, *, sequential: bool = False) -> NaiveRoot:
    """GET the root, then walk each policy path hop by hop, one GET per entity reached; ``sequential``
    sends one GET at a time, otherwise each hop's GETs and the paths go out concurrently."""
    result = NaiveRoot(key)
    sent: dict[EntityKey, asyncio.Future[dict[str, Fetched]]] = {}

    async def get(target: EntityKey) -> Fetched:
        result.visits += 1
        if target not in sent:
            result.by_source[policy.entity_types[target[0]].source] += 1
            # One id: the client uses the single-entity endpoint, one GET.
            sent[target] = asyncio.ensure_future(pool.fetch(target[0], [target[1]]))
        fetched = (await sent[target])[target[1]]
        if fetched.status in ("error", "unavailable"):
            result.failures += 1
        return fetched

    async def walk(rule: EdgeRule, root: Fetched) -> None:
        frontier: list[tuple[EntityKey, Fetched]] = [(key, root)]
        for hop in rule.path:
            targets: list[EntityKey] = []
            for (entity_type, _), fetched in frontier:
                reference = policy.entity_types[entity_type].references[hop]
                try:
                    ids = extract_ids(fetched.body or {}, reference.field)
                except MalformedField:
                    result.failures += 1
                    continue
                targets += [(reference.type, i) for i in ids]
            answers = await _each([get(t) for t in targets], sequential=sequential)
            frontier = [(t, a) for t, a in zip(targets, answers, strict=True) if a.status == "found"]
        result.edges.update((rule.relation, t, i) for (t, i), _ in frontier)

    root = await get(key)
    if root.status == "found":
        await _each([walk(rule, root) for rule in policy.effective(key[0]).edges], sequential=sequential)
    return result


def stratified_sample(graph: MdsGraph, size: int) -> list[EntityKey]:
    """``size`` roots (about), each type in proportion to its share of the graph, at least one of each."""
    rng = random.Random(f"{SEED}:naive-sample")
    counts = graph.counts()
    total = sum(counts.values())
    picked: list[EntityKey] = []
    for entity_type in sorted(counts):
        share = min(counts[entity_type], max(1, round(size * counts[entity_type] / total)))
        picked += [(entity_type, i) for i in rng.sample(graph.ids(entity_type), share)]
    rng.shuffle(picked)
    return picked


@dataclass
class Naive:
    roots: list[NaiveRoot]
    wall: float
    requests: dict[str, int]
    retries: int
    peak_rps: dict[str, int]
    workload: dict[str, int]  # entities per type in the whole workload

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    def by_type(self) -> dict[str, list[NaiveRoot]]:
        grouped: dict[str, list[NaiveRoot]] = defaultdict(list)
        for root in self.roots:
            grouped[root.key[0]].append(root)
        return dict(grouped)

    def extrapolated_source_requests(self) -> dict[str, float]:
        """GETs per source the naive walk would send for the whole workload (each type's mean per root)."""
        totals: Counter[str] = Counter()
        for entity_type, roots in self.by_type().items():
            for root in roots:
                for source, count in root.by_source.items():
                    totals[source] += self.workload[entity_type] * count / len(roots)
        return dict(totals)

    def extrapolated_requests(self) -> float:
        return sum(self.extrapolated_source_requests().values())

    def per_entity_margin(self) -> float:
        """Half-width of a 95% interval on the extrapolated GETs per entity (stratified sample)."""
        total = sum(self.workload.values())
        variance = 0.0
        for entity_type, roots in self.by_type().items():
            if len(roots) < 2:
                continue
            counts = [r.requests for r in roots]
            mean = sum(counts) / len(counts)
            spread = sum((c - mean) ** 2 for c in counts) / (len(counts) - 1)
            variance += (self.workload[entity_type] / total) ** 2 * spread / len(counts)
        return 1.96 * math.sqrt(variance)


def run_naive(policy: Policy, graph: MdsGraph, sim_url: str, sample: int, *, sequential: bool = False) -> Naive:
    """The naive walk over ``sample`` stratified roots: all at once, or (``sequential``) root after root
    with one GET in flight at a time."""
    keys = stratified_sample(graph, sample)
    reset_stats(sim_url)

    async def run() -> tuple[list[NaiveRoot], float, dict[str, dict[str, Any]]]:
        # A fresh pool: its rate limiters start empty, as the batched walker's did.
        async with SourcePool(policy, environ=source_environ(sim_url)) as pool:
            started = time.perf_counter()
            roots = await _each(
                [naive_walk(pool, policy, key, sequential=sequential) for key in keys], sequential=sequential
            )
            return roots, time.perf_counter() - started, pool.stats()

    roots, wall, client_stats = asyncio.run(run())
    stats = source_stats(sim_url)
    return Naive(
        roots=roots,
        wall=wall,
        requests={name: s["requests"] for name, s in stats.items()},
        retries=sum(s["retries"] for s in client_stats.values()),
        peak_rps={name: s["peak_rps"] for name, s in stats.items()},
        workload=graph.counts(),
    )


def agreement(store: FactStore, naive: Naive) -> tuple[int, list[EntityKey]]:
    """How many sampled roots have the same live edges in the store as the naive walk found, and
    which do not."""
    differing = []
    for root in naive.roots:
        stored = {(e["relation"], e["dst_type"], e["dst_id"]) for e in store.edges_of(*root.key)}
        if stored != root.edges:
            differing.append(root.key)
    return len(naive.roots) - len(differing), differing


# -- report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    scale: float
    latency_ms: float
    server: str
    policy: Policy


def print_comparison(batched: Batched, naive: Naive, setup: Setup) -> None:
    total, sampled = batched.entities, len(naive.roots)
    batched_per_entity = batched.total_requests / max(1, batched.enriched)
    batched_rate = batched.enriched / batched.wall
    naive_rate = sampled / naive.wall
    naive_per_entity = naive.extrapolated_requests() / total
    naive_all = {name: round(count) for name, count in naive.extrapolated_source_requests().items()}

    def floor(requests: Mapping[str, int]) -> float:
        return source_floor(requests, setup.policy, setup.latency_ms)

    cycles = ", ".join(f"{seconds:.1f}" for seconds in batched.cycle_seconds)
    stopped = "" if batched.idle else " [red](stopped at --max-cycles with work still due)[/red]"
    print_table(
        f"Enriching {total:,} entities (simulator scale {setup.scale:g}, {setup.latency_ms:g} ms per source request)",
        ["path", "entities", "wall s", "entities/s", "source requests", "requests/entity", "source floor s"],
        [
            [
                "batched walker (enrich_cycle)",
                f"{batched.enriched:,}",
                f"{batched.wall:.1f}",
                f"{batched_rate:,.0f}",
                f"{batched.total_requests:,}",
                f"{batched_per_entity:.3f}",
                f"{floor(batched.requests):.1f}",
            ],
            [
                "naive walk, sample (measured)",
                f"{sampled:,}",
                f"{naive.wall:.1f}",
                f"{naive_rate:,.1f}",
                f"{naive.total_requests:,}",
                f"{naive.total_requests / sampled:.2f}",
                f"{floor(naive.requests):.1f}",
            ],
            [
                "naive walk, all (extrapolated)",
                f"{total:,}",
                f"~{total / naive_rate:,.0f}",
                f"{naive_rate:,.1f}",
                f"~{sum(naive_all.values()):,}",
                f"{naive_per_entity:.2f} ±{naive.per_entity_margin():.2f}",
                f"~{floor(naive_all):,.0f}",
            ],
        ],
        caption=(
            f"{setup.server}\n"
            f"batched: {len(batched.cycle_seconds)} cycle(s) of {cycles} s{stopped}, after ingesting "
            f"{total:,} thin events in {batched.ingest_seconds:.1f} s (not counted); entities = fully "
            "enriched at the end.\n"
            f"naive: {sampled} roots stratified by type; 'all' scales each type's mean GETs per root to the "
            "workload (± a 95% interval from the sample) and the sample's entities/s to its size.\n"
            "source floor: least time those requests take under mds.yaml's requests_per_second and "
            f"max_concurrency at {setup.latency_ms:g} ms each (the slowest source sets it)."
        ),
    )
    console.print(
        "Requests saved: naive/batched per entity = "
        f"[bold]{naive_per_entity / batched_per_entity:,.0f}x[/bold] "
        f"({naive_per_entity:.2f} vs {batched_per_entity:.3f}); speedup in entities/s = "
        f"[bold]{batched_rate / naive_rate:,.1f}x[/bold] ({batched_rate:,.0f} vs {naive_rate:,.1f})"
    )


def print_sources(batched: Batched, naive: Naive, setup: Setup) -> None:
    naive_all = naive.extrapolated_source_requests()
    rows = []
    for name, source in setup.policy.sources.items():
        naive_requests = naive.requests.get(name, 0)
        rows.append(
            [
                name,
                f"{source.requests_per_second:g}",
                f"{source.max_concurrency}",
                f"{batched.requests.get(name, 0):,}",
                f"{batched.ids_per_request.get(name, 0):.1f}",
                f"{batched.peak_rps.get(name, 0)}",
                f"{naive_requests:,}",
                f"{naive.peak_rps.get(name, 0)}",
                f"{source_floor({name: naive_requests}, setup.policy, setup.latency_ms):.1f}",
                f"~{naive_all.get(name, 0):,.0f}",
            ]
        )
    print_table(
        "Per source, as the simulator counted them, against the limits in mds.yaml",
        [
            "source",
            "limit rps",
            "max conc",
            "batched req",
            "ids/req",
            "peak rps",
            "naive req",
            "peak rps",
            "floor s",
            "naive req, all",
        ],
        rows,
        caption="peak rps: most requests arriving in any sliding 1 s. naive req, peak and floor: the "
        "measured sample; 'naive req, all': extrapolated to the workload.\n"
        f"client retries: batched {batched.retries}, naive {naive.retries}. The batched clients "
        f"asked for {batched.ids_requested:,} ids for {batched.entities:,} entities in "
        f"{batched.client_requests:,} requests.",
    )


def print_types(batched: Batched, naive: Naive) -> None:
    rows = []
    for entity_type, roots in sorted(naive.by_type().items(), key=lambda item: -naive.workload[item[0]]):
        walked = batched.by_type.get(entity_type, WalkReport(entity_type))
        result = walked.result
        rows.append(
            [
                entity_type,
                f"{len(roots)}",
                f"{sum(r.requests for r in roots) / len(roots):.2f}",
                f"{sum(r.visits for r in roots) / len(roots):.2f}",
                f"{sum(len(r.edges) for r in roots) / len(roots):.2f}",
                f"{walked.claimed:,}",
                f"{walked.fetched:,}",
                f"{walked.cache_hits:,}",
                f"{result.enriched:,}",
                f"{result.partial + result.failed + result.deferred:,}",
            ]
        )
    print_table(
        "Per entity type: naive GETs per root (sample) and what the batched walker did (summed over cycles)",
        [
            "type",
            "naive roots",
            "GETs/root",
            "no memo",
            "edges/root",
            "claimed",
            "ids fetched",
            "reused",
            "enriched",
            "not enriched",
        ],
        rows,
        caption="naive 'no memo': GETs per root if the script did not even remember within one root's walk "
        "(the shared pipeline run is then fetched once per path through it).\n"
        "batched, by the type being walked: 'ids fetched' from sources (roots and hops, in batch "
        "requests), 'reused': fresh hydrations read from the fact store instead, 'not enriched': "
        "partial, failed or deferred.",
    )


def print_time_and_checks(batched: Batched, naive: Naive, agreed: tuple[int, list[EntityKey]]) -> None:
    sql_seconds, sql_statements = batched.sql.total()
    sql_only = covered_seconds(batched.sql.spans)
    either = covered_seconds(batched.sql.spans, batched.in_flight_spans)
    console.print(
        f"Batched walker wall {batched.wall:.1f} s: a source request in flight "
        f"{batched.in_flight_seconds:.1f} s; SQL execute {sql_only:.1f} s of wall time ({sql_seconds:.1f} s "
        f"summed over {sql_statements:,} statements); the two overlap by "
        f"{batched.in_flight_seconds + sql_only - either:.1f} s (a hop reads fresh hydrations of one type "
        f"while another type's fetch is in flight); neither {batched.wall - either:.1f} s (Python in the "
        "walker and the store, commits, thread hand-offs). SQL by statement:"
    )
    for kind, seconds in batched.sql.seconds.most_common(6):
        console.print(
            f"  {kind:<22} {seconds:5.1f} s  {batched.sql.statements[kind]:>4} statements  "
            f"{batched.sql.rows[kind]:>7,} rows",
            highlight=False,
        )
    written = batched.sql.rows["INSERT references"]
    console.print(
        f"References: {written:,} rows upserted for {batched.references:,} distinct references "
        f"({written / max(1, batched.references):.2f} writes each)"
    )
    states = ", ".join(f"{state} {count:,}" for state, count in sorted(batched.states.items()))
    console.print(f"Entity states after the cycles: {states}")
    matches = batched.edges == batched.expected_edges
    edge_note = "[green]matches[/green]" if matches else "[red]differs from[/red]"
    console.print(
        f"Edges materialized: {batched.edges:,}, {edge_note} the {batched.expected_edges:,} the "
        "simulator's graph implies"
    )
    same, differing = agreed
    verdict = "[green]all[/green]" if not differing else f"[red]{same} of {len(naive.roots)}[/red]"
    console.print(
        f"Naive and batched agree on the edges of {verdict} sampled roots"
        + (f"; first differing: {differing[:5]}" if differing else "")
    )
    failures = sum(r.failures for r in naive.roots)
    if failures:
        console.print(f"[red]naive walk: {failures} failed GETs or malformed fields[/red]")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=0.5, help="simulator graph scale (default 0.5, about 7,200 entities)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="latency the simulator adds to every source request (default 20)"
    )
    parser.add_argument("--naive-sample", type=int, default=300, help="roots the naive walk runs on (default 300)")
    parser.add_argument("--batch-size", type=int, default=500, help="claims per walker batch (default 500)")
    parser.add_argument("--max-cycles", type=int, default=5, help="enrichment cycles at most (default 5)")
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.latency_ms < 0 or min(args.naive_sample, args.batch_size, args.max_cycles) < 1:
        parser.error(
            "--scale, --naive-sample, --batch-size and --max-cycles must be positive, --latency-ms not negative"
        )

    policy = load_policy(SHIPPED_POLICY)
    graph = generate_graph(SEED, args.scale)
    with (
        tempfile.TemporaryDirectory(prefix="bench-enrich-") as tmp,
        simulator_process(args.scale, args.latency_ms, Path(tmp) / "simulator.log") as sim_url,
        bench_database() as url,
    ):
        store = FactStore.from_url(url)
        store.migrate()
        server = describe_server(store.engine)
        total = sum(graph.counts().values())
        with console.status(f"batched walker: ingesting and enriching {total:,} entities"):
            batched = run_batched(store, policy, graph, sim_url, batch_size=args.batch_size, max_cycles=args.max_cycles)
        with console.status(f"naive walk over {args.naive_sample} sampled roots"):
            naive = run_naive(policy, graph, sim_url, args.naive_sample)
        agreed = agreement(store, naive)
        store.dispose()
    setup = Setup(args.scale, args.latency_ms, server, policy)
    print_comparison(batched, naive, setup)
    print_sources(batched, naive, setup)
    print_types(batched, naive)
    print_time_and_checks(batched, naive, agreed)


if __name__ == "__main__":
    main()
