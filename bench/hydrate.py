"""Hydration at the issue's source limits: source calls against the fewest possible, elapsed time against
the larger of the rate-limit bound and the fact store's time for the same writes, and throughput against
a sequential naive script.

All three runs are in this process against the source simulator (``python -m enrichment_assets.dev.simulator``
in its own process on 127.0.0.1: the seeded graph at ``--scale``, ``--latency-ms`` added to every
answer, every source answering 429 above ``--requests-per-second``, no injected faults). The policy is
the shipped ``policies/mds.yaml`` with every source's ``requests_per_second`` and ``max_batch_size``
overridden (100 and 50 by default; ``max_concurrency`` stays as shipped); the same ``SourcePool``
clients enforce it on every path.

1. The batched walker (the product), run as ``bench/enrich.py`` runs it: every entity's thin
   ``created`` event is ingested into a fresh PostgreSQL database (see ``_common``; not timed), then
   ``enrich_cycle`` runs until ``FactStore.due_work()`` is empty. Measured: elapsed (wall time from the
   first cycle's start until nothing is due), entities fully enriched per second, source calls as the
   simulator counted them (``/admin/stats``: every request that arrived, 429s included), calls per
   enriched entity; the derived edges are checked against the ones the simulator's graph implies. The
   loop pipelines: a round's hops are recorded while its next hop is fetched, and a round is settled in
   the background while the next one is claimed and walked, so source calls and SQL overlap.
2. The same enrichment with free sources, in the same run, once before run 1 and once after it: the
   same workload ingested into another fresh database on the same server and enriched the same way,
   against a second simulator with no latency and no rate limit and a policy whose sources allow
   100,000 calls/s (batch sizes unchanged). It makes the same calls and writes the same rows, but
   nothing waits on a source, so its elapsed is what the fact store and the Python around it need for
   those writes: the write time (the lower of the two, so a noisy neighbour inflates it less). (Replaying the
   captured record/settle calls alone was the alternative; it would leave out the claims and the reads
   of fresh hydrations the loop also makes, and settling needs the leases the original claims took.)
   Printed beside it: its SQL time and its rows by statement, against the first run's.
3. The naive baseline, in the same run: for one root entity after another, GET the root, then walk each
   of its policy paths hop by hop with one single-entity GET per entity reached, one GET at a time. No
   batching, no concurrency, nothing shared between roots; within one root's walk it remembers what it
   fetched, which only flatters it. It runs on ``--naive-sample`` roots drawn at random (seeded,
   stratified by type in proportion to the workload, so its entities/s is for the workload's mix) and is
   compared in entities/s; its edges are compared with the ones the batched walker stored.

Definitions, printed with the figures:

- minimum calls, per source: for each of the source's entity types, the distinct entities the whole
  enrichment needs (every root, and every entity its policy paths reach in the simulator's graph; each
  must be fetched at least once) divided by the source's ``max_batch_size`` and rounded up, or one call
  per entity for a type without a batch endpoint; summed over the source's types. Target: calls made,
  summed over sources, <= 1.05x the summed minimum.
- rate-limit bound: per source, its minimum calls divided by its ``requests_per_second``; the sources
  run in parallel, so the bound is the largest of these.
- write time: the lower elapsed of the two runs 2 (free sources).
- elapsed target: elapsed <= 1.15x max(rate-limit bound, write time): with the sources and the fact
  store working at the same time, the slower of the two should set the pace. Printed beside it: the
  time some source request was in flight, the time SQL was executing and how much of the two
  overlapped, so the reader sees what elapsed is made of.
- speedup: batched entities/s divided by naive entities/s. Target: >= 20x.

Timings are printed, never asserted.

Run: ``.venv/bin/python bench/hydrate.py [--scale 1] [--latency-ms 20] [--naive-sample 500]``
(``BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres`` to use an existing server).
At the defaults it takes about 4 minutes on a 2-core machine, most of it the naive baseline.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from _common import (
    SEED,
    console,
    cpu_reference,
    describe_server,
    fresh_database,
    postgres_server,
    print_table,
    shipped_policy_with,
    simulator_process,
    verdict,
)
from enrich import Batched, Naive, agreement, covered_seconds, print_time_and_checks, run_batched, run_naive

from enrichment_assets.dev.simulator.catalog import match_raw_path
from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.dev.simulator.stats import DEFAULT_LOG_SIZE
from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.hydration.limits import RateLimiter
from enrichment_assets.policy import Policy

CALLS_TARGET = 1.05
ELAPSED_TARGET = 1.15
SPEEDUP_TARGET = 20.0
FREE_RPS = 100_000.0


def issue_policy(requests_per_second: float, max_batch_size: int) -> Policy:
    """The shipped policy with every source's rate and batch size replaced; all else as shipped."""
    return shipped_policy_with(requests_per_second=requests_per_second, max_batch_size=max_batch_size)


# -- the floor: fewest calls and the rate-limit bound ----------------------------------------------


def needed_entities(graph: MdsGraph, policy: Policy) -> dict[str, set[str]]:
    """Per type, the entities enriching every root needs fetched: the roots (every entity, one thin
    event each) and every entity their policy paths reach, read from the simulator's graph. A path
    stops at an entity the graph lacks, as the walker's does; that entity still costs a call."""
    needed: dict[str, set[str]] = defaultdict(set)
    for root_type, root in graph.items():
        needed[root_type].add(root["id"])
        for rule in policy.effective(root_type).edges:
            frontier = [(root_type, root["id"])]
            for hop in rule.path:
                reached = []
                for entity_type, entity_id in frontier:
                    reference = policy.entity_types[entity_type].references[hop]
                    for target in graph.follow(entity_type, entity_id, str(reference.field)):
                        needed[reference.type].add(target)
                        if graph.get(reference.type, target) is not None:
                            reached.append((reference.type, target))
                frontier = reached
    return dict(needed)


def minimum_calls(policy: Policy, entity_type: str, distinct: int) -> int:
    """Fewest calls that fetch ``distinct`` entities of a type: full batches, or one per entity."""
    batch = policy.sources[policy.entity_types[entity_type].source].max_batch_size
    if policy.entity_types[entity_type].batch_path and batch:
        return math.ceil(distinct / batch)
    return distinct


@dataclass(frozen=True)
class SourceFloor:
    source: str
    types: tuple[str, ...]
    needed: int
    minimum: int
    requests_per_second: float

    @property
    def bound_seconds(self) -> float:
        return self.minimum / self.requests_per_second


def source_floors(policy: Policy, needed: Mapping[str, set[str]]) -> dict[str, SourceFloor]:
    floors = {}
    for name, source in policy.sources.items():
        types = tuple(t for t, spec in policy.entity_types.items() if spec.source == name)
        floors[name] = SourceFloor(
            source=name,
            types=types,
            needed=sum(len(needed.get(t, ())) for t in types),
            minimum=sum(minimum_calls(policy, t, len(needed.get(t, ()))) for t in types),
            requests_per_second=source.requests_per_second,
        )
    return floors


# -- what the simulator logged ----------------------------------------------------------------------


@dataclass(frozen=True)
class CallLog:
    """The batched run's calls per entity type (ids asked for, too) and 429s per source, from the
    simulator's request log; None where the log overflowed and lost calls."""

    calls: Counter[str]
    ids: Counter[str]
    throttled: Counter[str]


def call_log(sim_url: str, total_calls: int) -> CallLog | None:
    response = httpx.get(f"{sim_url}/admin/requests", params={"limit": DEFAULT_LOG_SIZE}, timeout=30)
    response.raise_for_status()
    # The log also holds the admin API's own requests (no source).
    records = [r for r in response.json()["requests"] if r["source"] is not None]
    if len(records) != total_calls:
        return None
    log = CallLog(Counter(), Counter(), Counter())
    for record in records:
        path, _, query = record["path"].partition("?")
        match = match_raw_path(path.encode("latin-1"))
        if match is None or match.entity_type is None:
            continue
        log.calls[match.entity_type.name] += 1
        log.ids[match.entity_type.name] += query.count("ids=") if match.entity_id is None else 1
        if record["status"] == 429:
            log.throttled[match.source.name] += 1
    return log


# -- report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """The three targets' numbers."""

    calls: int
    minimum: int
    elapsed: float
    bound: float
    write_time: float
    write_times: tuple[float, ...]  # every free-source run's, the lowest being write_time
    batched_rate: float
    naive_rate: float

    @property
    def calls_ratio(self) -> float:
        return self.calls / self.minimum

    @property
    def floor(self) -> float:
        """What elapsed is held to: the slower of the sources (at their limits) and the fact store."""
        return max(self.bound, self.write_time)

    @property
    def elapsed_ratio(self) -> float:
        return self.elapsed / self.floor

    @property
    def speedup(self) -> float:
        return self.batched_rate / self.naive_rate


def print_summary(
    batched: Batched, free: Batched, naive: Naive, figures: Figures, args: argparse.Namespace, server: str
) -> None:
    sampled = len(naive.roots)
    stopped = "" if batched.idle else " [red](stopped at --max-cycles with work still due)[/red]"
    cycles = ", ".join(f"{seconds:.1f}" for seconds in batched.cycle_seconds)
    print_table(
        f"Hydrating {batched.entities:,} entities: scale {args.scale:g}, {args.latency_ms:g} ms per call, "
        f"per source {args.requests_per_second:g} calls/s, batches of {args.max_batch_size}",
        ["path", "entities", "elapsed s", "entities/s", "source calls", "calls/entity"],
        [
            [
                "batched walker (enrich_cycle)",
                f"{batched.enriched:,}",
                f"{batched.wall:.1f}",
                f"{figures.batched_rate:,.0f}",
                f"{batched.total_requests:,}",
                f"{batched.total_requests / max(1, batched.enriched):.4f}",
            ],
            [
                "the same, free sources (lower of 2)",
                f"{free.enriched:,}",
                f"{free.wall:.1f}",
                f"{free.enriched / free.wall:,.0f}",
                f"{free.total_requests:,}",
                f"{free.total_requests / max(1, free.enriched):.4f}",
            ],
            [
                "naive, sequential (sample)",
                f"{sampled:,}",
                f"{naive.wall:.1f}",
                f"{figures.naive_rate:,.2f}",
                f"{naive.total_requests:,}",
                f"{naive.total_requests / sampled:.2f}",
            ],
        ],
        caption=(
            f"{server}\n"
            f"batched: {len(batched.cycle_seconds)} cycle(s) of {cycles} s{stopped}, claims of {args.claim_batch}, "
            f"after ingesting {batched.entities:,} thin events in {batched.ingest_seconds:.1f} s (not counted); "
            "entities = fully enriched at the end; calls = requests the simulator received.\n"
            f"naive: {sampled} roots drawn at random (seed {SEED}, stratified by type), one GET at a time, "
            "single-entity endpoint, nothing shared between roots; "
            f"{naive.extrapolated_requests() / sum(naive.workload.values()):.2f} calls per entity over the "
            "workload's mix (each type's mean per root, weighted)."
        ),
    )


def print_sources(batched: Batched, floors: Mapping[str, SourceFloor], log: CallLog | None) -> None:
    rows = []
    for name, floor in floors.items():
        made = batched.requests.get(name, 0)
        rows.append(
            [
                name,
                f"{floor.needed:,}",
                f"{floor.minimum:,}",
                f"{made:,}",
                f"{made / floor.minimum:.3f}x" if floor.minimum else "-",
                f"{floor.bound_seconds:.2f}",
                f"{batched.peak_rps.get(name, 0)}",
                f"{log.throttled[name]}" if log else "?",
            ]
        )
    minimum = sum(f.minimum for f in floors.values())
    bound = max(f.bound_seconds for f in floors.values())
    rows.append(
        [
            "all sources",
            f"{sum(f.needed for f in floors.values()):,}",
            f"{minimum:,}",
            f"{batched.total_requests:,}",
            f"{batched.total_requests / minimum:.3f}x",
            f"max {bound:.2f}",
            "",
            "",
        ]
    )
    print_table(
        "Source calls against the minimum, per source",
        ["source", "distinct needed", "min calls", "calls made", "made/min", "min calls/rps s", "peak rps", "429s"],
        rows,
        caption="distinct needed: every root plus every entity its policy paths reach in the simulator's graph. "
        "min calls: per type, distinct needed / max_batch_size rounded up, summed over the source's "
        "types.\nmin calls/rps: the least time the source's minimum calls take at its rate limit; the "
        "rate-limit bound is the largest (sources run in parallel). peak rps: most calls in any "
        "sliding 1 s, as the simulator saw them. Limits: requests_per_second and max_batch_size as "
        "overridden, max_concurrency as shipped.",
    )


def print_types(needed: Mapping[str, set[str]], policy: Policy, log: CallLog | None) -> None:
    if log is None:
        console.print(
            f"[dim]Calls per type left out: the simulator's request log ({DEFAULT_LOG_SIZE:,} "
            "records) overflowed.[/dim]"
        )
        return
    rows = []
    for entity_type in policy.entity_types:
        distinct = len(needed.get(entity_type, ()))
        minimum = minimum_calls(policy, entity_type, distinct)
        calls = log.calls[entity_type]
        rows.append(
            [
                entity_type,
                policy.entity_types[entity_type].source,
                f"{distinct:,}",
                f"{minimum:,}",
                f"{calls:,}",
                f"{calls - minimum:+,}",
                f"{log.ids[entity_type] / calls:.1f}" if calls else "-",
                f"{log.ids[entity_type] - distinct:+,}",
            ]
        )
    print_table(
        "Source calls per entity type (the batched run, from the simulator's request log)",
        ["type", "source", "distinct needed", "min calls", "calls made", "extra calls", "ids/call", "ids re-asked"],
        rows,
        caption="extra calls: part-full batches (the walker tops a hop's last batch up with other due entities "
        "of the type, so only a type's very last batch should be part-full) and calls for ids asked for "
        "again. ids re-asked: ids requested beyond one per distinct entity.",
    )


def print_elapsed(batched: Batched, free: Batched, figures: Figures) -> None:
    in_flight = batched.in_flight_seconds
    sql = covered_seconds(batched.sql.spans)
    either = covered_seconds(batched.sql.spans, batched.in_flight_spans)
    overlap, neither = in_flight + sql - either, batched.wall - either
    free_sql = covered_seconds(free.sql.spans)
    free_neither = free.wall - covered_seconds(free.sql.spans, free.in_flight_spans)
    setter = "the rate-limit bound" if figures.bound >= figures.write_time else "the write time"
    console.print(
        f"Rate-limit bound {figures.bound:.2f} s (the slowest source's minimum calls / its "
        f"requests_per_second); write time {figures.write_time:.2f} s (the same enrichment with free sources, "
        f"the lower of {' and '.join(f'{t:.1f}' for t in figures.write_times)} s, run before and after: "
        f"{free.total_requests:,} calls, {free.enriched:,} entities enriched, SQL executing {free_sql:.1f} s, "
        f"neither SQL nor a call {free_neither:.1f} s). "
        f"Elapsed {figures.elapsed:.1f} s = [bold]{figures.elapsed_ratio:.2f}x[/bold] the larger, {setter}. "
        f"In that time a source call was in flight {in_flight:.1f} s, SQL was executing {sql:.1f} s, the two "
        f"overlapped {overlap:.1f} s ({overlap / max(in_flight, 1e-9):.0%} of the in-flight time), neither "
        f"{neither:.1f} s. The client paces each source {RateLimiter.MARGIN:.2f}x below its limit "
        f"(RateLimiter.MARGIN), so fetching alone takes at least {RateLimiter.MARGIN * figures.bound:.2f} s."
    )
    rows = []
    for kind, seconds in batched.sql.seconds.most_common(6):
        rows.append(
            [
                kind,
                f"{batched.sql.rows[kind]:,}",
                f"{free.sql.rows[kind]:,}",
                f"{seconds:.1f}",
                f"{free.sql.seconds[kind]:.1f}",
            ]
        )
    print_table(
        "SQL by statement: the run at the limits against the same enrichment with free sources",
        ["statement", "rows", "rows, free", "s", "s, free"],
        rows,
        caption=f"Edges stored: {batched.edges:,} and {free.edges:,}; references: {batched.references:,} and "
        f"{free.references:,}. s: seconds in execute, summed over statements (threads overlap).",
    )
    if figures.elapsed_ratio <= ELAPSED_TARGET:
        return
    if sql + neither > in_flight:
        console.print(
            f"[red]Elapsed misses its floor by what the fact store and the Python around it add beyond "
            f"fetching:[/red] {sql - overlap:.1f} s of SQL with no call in flight and {neither:.1f} s of "
            f"neither, against {in_flight:.1f} s with a call in flight."
        )
    else:
        console.print(
            f"[red]Elapsed misses its floor in fetching itself:[/red] calls were in flight "
            f"{in_flight:.1f} s, {in_flight / figures.bound:.2f}x the bound."
        )


def print_targets(figures: Figures) -> None:
    print_table(
        "Targets (issue 3)",
        ["target", "measured", "goal", "verdict"],
        [
            [
                "source calls vs the minimum",
                f"{figures.calls_ratio:.3f}x ({figures.calls:,} vs {figures.minimum:,})",
                f"<= {CALLS_TARGET:g}x",
                verdict(figures.calls_ratio <= CALLS_TARGET),
            ],
            [
                "elapsed vs max(rate-limit bound, write time)",
                f"{figures.elapsed_ratio:.2f}x ({figures.elapsed:.1f} s vs max({figures.bound:.2f}, "
                f"{figures.write_time:.2f}) s)",
                f"<= {ELAPSED_TARGET:g}x",
                verdict(figures.elapsed_ratio <= ELAPSED_TARGET),
            ],
            [
                "entities/s vs the naive baseline",
                f"{figures.speedup:,.1f}x ({figures.batched_rate:,.0f} vs {figures.naive_rate:,.2f})",
                f">= {SPEEDUP_TARGET:g}x",
                verdict(figures.speedup >= SPEEDUP_TARGET),
            ],
        ],
    )


def run_free(server_url: str, policy: Policy, graph: MdsGraph, free_url: str, args: argparse.Namespace) -> Batched:
    """The same enrichment with free sources, into a fresh database on the same server."""
    with fresh_database(server_url) as url:
        store = FactStore.from_url(url)
        try:
            store.migrate()
            return run_batched(store, policy, graph, free_url, batch_size=args.claim_batch, max_cycles=args.max_cycles)
        finally:
            store.dispose()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="simulator graph scale (default 1, about 14,400 entities)"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=20.0, help="latency the simulator adds to every source call (default 20)"
    )
    parser.add_argument(
        "--requests-per-second",
        type=float,
        default=100.0,
        help="every source's rate limit, in the policy and at the simulator (default 100)",
    )
    parser.add_argument("--max-batch-size", type=int, default=50, help="every source's batch size (default 50)")
    parser.add_argument("--naive-sample", type=int, default=500, help="roots the naive baseline runs on (default 500)")
    parser.add_argument(
        "--claim-batch", type=int, default=500, help="claims per walker batch (default 500, as the assets)"
    )
    parser.add_argument("--max-cycles", type=int, default=5, help="enrichment cycles at most (default 5)")
    args = parser.parse_args(argv)
    if (
        args.scale <= 0
        or args.latency_ms < 0
        or args.requests_per_second <= 0
        or min(args.max_batch_size, args.naive_sample, args.claim_batch, args.max_cycles) < 1
    ):
        parser.error(
            "--scale, --requests-per-second, --max-batch-size, --naive-sample, --claim-batch and "
            "--max-cycles must be positive, --latency-ms not negative"
        )

    policy = issue_policy(args.requests_per_second, args.max_batch_size)
    graph = generate_graph(SEED, args.scale)
    needed = needed_entities(graph, policy)
    floors = source_floors(policy, needed)
    cpu_reference()  # timed now, before any load
    total = sum(graph.counts().values())
    free_policy = shipped_policy_with(requests_per_second=FREE_RPS, max_batch_size=args.max_batch_size)
    with (
        tempfile.TemporaryDirectory(prefix="bench-hydrate-") as tmp,
        simulator_process(
            args.scale, args.latency_ms, Path(tmp) / "simulator.log", rate_limit_rps=args.requests_per_second
        ) as sim_url,
        simulator_process(args.scale, 0.0, Path(tmp) / "free-simulator.log") as free_url,
        postgres_server() as server_url,
    ):
        with console.status(f"free sources (the write time), first of two: enriching {total:,} entities"):
            frees = [run_free(server_url, free_policy, graph, free_url, args)]
        with fresh_database(server_url) as url:
            store = FactStore.from_url(url)
            store.migrate()
            server = describe_server(store.engine)
            with console.status(f"batched walker: ingesting and enriching {total:,} entities"):
                batched = run_batched(
                    store, policy, graph, sim_url, batch_size=args.claim_batch, max_cycles=args.max_cycles
                )
                log = call_log(sim_url, batched.total_requests)
            with console.status(f"free sources (the write time), second of two: enriching {total:,} entities"):
                frees.append(run_free(server_url, free_policy, graph, free_url, args))
            with console.status(f"naive baseline, sequential, over {args.naive_sample} sampled roots"):
                naive = run_naive(policy, graph, sim_url, args.naive_sample, sequential=True)
            agreed: tuple[int, list[EntityKey]] = agreement(store, naive)
            store.dispose()

    free = min(frees, key=lambda run: run.wall)

    figures = Figures(
        calls=batched.total_requests,
        minimum=sum(f.minimum for f in floors.values()),
        elapsed=batched.wall,
        bound=max(f.bound_seconds for f in floors.values()),
        write_time=free.wall,
        write_times=tuple(run.wall for run in frees),
        batched_rate=batched.enriched / batched.wall,
        naive_rate=len(naive.roots) / naive.wall,
    )
    print_summary(batched, free, naive, figures, args, server)
    print_sources(batched, floors, log)
    print_types(needed, policy, log)
    print_elapsed(batched, free, figures)
    print_time_and_checks(batched, naive, agreed)
    print_targets(figures)


if __name__ == "__main__":
    main()
