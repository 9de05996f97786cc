"""Scaling out enrichment: 1, 2, 4 and 8 worker processes over one fact store, first where the sources
set the pace, then where the workers do.

Each run is ``enrichment enrich-once --workers N`` in a subprocess, as a script or an operator runs it:
for N > 1 it spawns N processes (``enrich_with_workers``), for N = 1 it enriches in its own process
(``enrich_once``). Every process runs one claim → walk → settle cycle over every type; they are kept
apart by their leases and share every source's ``requests_per_second`` and ``max_concurrency`` through
the fact store's PostgreSQL. The command repeats until ``FactStore.due_work()`` is empty (at most
``--max-cycles`` times). For every N the same workload (one thin ``created`` event per entity of the
simulator's seeded graph, not timed) is ingested into a fresh PostgreSQL database (see ``_common``),
and nothing else of this benchmark runs meanwhile. The source simulator runs in its own process;
``ENRICHMENT_POLICY`` is a temporary copy of the shipped ``policies/mds.yaml`` with the limits below;
search is off.

1. Source-bound. The simulator adds ``--latency-ms`` (150) to every answer and answers 429 above
   ``--threshold-rps`` (110) per source; every source is at ``--requests-per-second`` (100) and
   ``--max-concurrency`` (64), and no type has a batch endpoint, so the work is many single-entity
   GETs. Targets: no 429 at any N, every source's peak rate within its limit, and the busiest source
   kept at >= 80% of its limit at every N.
2. Worker-bound. No latency and no 429s; every source at 1,000 requests/s (``--worker-rps``; the run
   asks tens per second) and 64 in flight, batch endpoints as shipped: the workers, PostgreSQL and the
   machine's cores set the pace. Printed: entities enriched per second (also counted from the first
   source call, i.e. without worker start-up), its ratio to N=1 and per worker, and the cores the run
   used; then the per-worker rate a deployment sizes its run pods by (N=1's).

Definitions, printed with the figures:

- elapsed: wall time from starting the first ``enrich-once`` until the last one exits, start-up
  included (the command's and, for N > 1, spawning N interpreters that import the code). "1st call"
  is when the first source request arrived, from the same start.
- peak rate: the most requests that arrived at a source in any sliding 1 s, 429s included (the
  simulator's ``peak_rps``). Target: <= the source's ``requests_per_second``.
- sustained rate: for the source that received the most requests, its admitted requests (the
  simulator's request log, by arrival time) counted in consecutive 1-s windows from its request at the
  10th percentile of its requests to the one at the 90th; the median of those counts, against
  its ``requests_per_second``. The client paces each source ``RateLimiter.MARGIN`` (1.12x) under its
  limit, so 89% is the most to expect.
- rate-limit bound: that source's requests divided by its ``requests_per_second``.
- cores used: CPU seconds during the run of ``enrich-once`` and its worker processes (reaped children,
  ``getrusage``), the PostgreSQL server (its postmaster with every process under it, ``/proc``) and
  the simulator, divided by elapsed. Also printed: the rest of the machine ("others": ``/proc/stat``
  busy time minus all of this), which should be near 0 for the figures to stand. With
  ``BENCH_DATABASE_URL`` the PostgreSQL figure is that whole server's, other users' work included.

With ``--repeats R`` every worker count runs R times, the counts interleaved, and the run of median
elapsed is shown (every run's elapsed in the caption). Timings are printed, never asserted.

Run: ``.venv/bin/python bench/scale.py [--setup both|source|worker] [--workers 1,2,4,8]
[--source-scale 0.2] [--worker-scale 1] [--repeats 1]`` (about 6 minutes per repeat at the defaults on
a 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from _common import (
    SEED,
    RunningSimulator,
    console,
    describe_server,
    enrichment_executable,
    fresh_database,
    median,
    postgres_server,
    print_table,
    reset_stats,
    shipped_policy_yaml,
    simulator,
    source_environ,
    source_stats,
    verdict,
)
from enrich import expected_edge_count, ingest

from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.engine import create_engine
from enrichment_assets.hydration.limits import RateLimiter
from enrichment_assets.policy import Policy, parse_policy

SUSTAINED_TARGET = 0.8
LOG_POLL_SECONDS = 1.0
LOG_POLL_LIMIT = 2_000  # more than any source run here sends in LOG_POLL_SECONDS
# The worker-bound setup's "unlimited" rate: far above what its batched calls ask (tens per second), and
# below the rates at which the shared limiter books spans shorter than a booking's round trip and stalls.
UNLIMITED_RPS = 1_000.0


# -- CPU seconds (Linux /proc and getrusage) --------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of the process and of its children it has reaped)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            table[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return table


def tree_cpu_seconds(root: int, table: dict[int, tuple[int, float]]) -> float:
    """CPU seconds so far of ``root`` and every process under it, live or reaped."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (parent, _) in table.items():
        children[parent].append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += table.get(pid, (0, 0.0))[1]
        stack += children[pid]
    return total


def cpu_snapshot(postmaster: int, simulator_pid: int) -> dict[str, float]:
    """CPU seconds so far by role, and the whole machine's busy seconds."""
    table = _proc_stats()
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    with open("/proc/stat") as stat:
        jiffies = [int(v) for v in stat.readline().split()[1:]]
    return {
        "workers": reaped.ru_utime + reaped.ru_stime,
        "PostgreSQL": tree_cpu_seconds(postmaster, table),
        "simulator": tree_cpu_seconds(simulator_pid, table),
        "bench": me.ru_utime + me.ru_stime,
        # All but idle and iowait.
        "machine": (sum(jiffies) - jiffies[3] - jiffies[4]) / os.sysconf("SC_CLK_TCK"),
    }


def postmaster_pid(engine: sa.Engine) -> int:
    """The PostgreSQL server's main process: the parent of this connection's backend."""
    with engine.connect() as conn:
        backend = conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
    return _proc_stats()[backend][0]


# -- the simulator's request log --------------------------------------------------------------------


class RequestLog:
    """Arrival times of every source request during a run, read from the simulator's request log every
    second in a thread (the simulator keeps only its newest 10,000 records)."""

    def __init__(self, sim_url: str) -> None:
        self._url = sim_url
        self._seen: set[tuple[Any, ...]] = set()
        self.arrivals: dict[str, list[float]] = defaultdict(list)  # epoch seconds, answers other than 429
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)

    def __enter__(self) -> RequestLog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # requests that finished after the last poll

    def _run(self) -> None:
        while not self._stop.wait(LOG_POLL_SECONDS):
            self._poll()

    def _poll(self) -> None:
        response = httpx.get(f"{self._url}/admin/requests", params={"limit": LOG_POLL_LIMIT}, timeout=30)
        response.raise_for_status()
        for record in response.json()["requests"]:
            key = (record["at"], record["source"], record["path"], record["status"], record["duration_ms"])
            if record["source"] is None or key in self._seen:
                continue
            self._seen.add(key)
            if record["status"] != 429:
                self.arrivals[record["source"]].append(datetime.fromisoformat(record["at"]).timestamp())

    def first(self) -> float | None:
        return min((min(times) for times in self.arrivals.values() if times), default=None)


def sustained_rps(arrivals: Sequence[float]) -> float | None:
    """Median count of 1-s windows between the 10th- and 90th-percentile arrivals (None if under 1 s)."""
    ordered = sorted(arrivals)
    if not ordered:
        return None
    start, end = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
    windows = [0] * int(end - start)
    for at in ordered:
        slot = int(at - start)
        if at >= start and slot < len(windows):
            windows[slot] += 1
    return median(windows) if windows else None


# -- one run: N workers over a fresh database --------------------------------------------------------


@dataclass
class Run:
    workers: int
    entities: int
    enriched: int
    edges_match: bool
    cycles: int
    idle: bool
    failure: str | None  # the end of enrich-once's output when it exited with an error
    elapsed: float
    first_call: float | None
    load: float  # 1-min load average just before the run
    stats: dict[str, dict[str, Any]]
    arrivals: dict[str, list[float]]
    cpu: dict[str, float] = field(default_factory=dict)
    all_elapsed: tuple[float, ...] = ()  # of every repeat of this worker count

    @property
    def calls(self) -> int:
        return sum(s["requests"] for s in self.stats.values())

    @property
    def throttled(self) -> int:
        return sum(s["by_status"].get("429", 0) for s in self.stats.values())

    @property
    def rate(self) -> float:
        return self.enriched / self.elapsed

    def cores(self, role: str) -> float:
        return self.cpu[role] / self.elapsed

    @property
    def cores_used(self) -> float:
        return sum(self.cores(role) for role in ("workers", "PostgreSQL", "simulator"))

    @property
    def cores_others(self) -> float:
        return max(0.0, self.cores("machine") - self.cores_used - self.cores("bench"))

    @property
    def log_complete(self) -> bool:
        """Whether the request log holds every admitted request the simulator counted."""
        return all(
            len(self.arrivals.get(name, ())) == s["requests"] - s["by_status"].get("429", 0)
            for name, s in self.stats.items()
        )


@dataclass(frozen=True)
class Setup:
    name: str
    policy: Policy
    policy_yaml: str  # the same policy, as ENRICHMENT_POLICY's file
    graph: MdsGraph
    expected_edges: int
    batch_size: int
    max_cycles: int


def enrich_once(workers: int, batch_size: int, env: dict[str, str], log_path: Path) -> str | None:
    """One ``enrichment enrich-once --workers N``; None, or the end of its output if it failed."""
    command = [str(enrichment_executable()), "enrich-once", "--workers", str(workers), "--batch-size", str(batch_size)]
    with log_path.open("ab") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code == 0:
        return None
    lines = log_path.read_text(errors="replace").strip().splitlines() or [""]
    # The exception's own line, not the traceback's last (SQLAlchemy ends with a link).
    errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return f"exit {code}: {(errors or lines)[-1][:240]}"


def run_workers(
    setup: Setup, server_url: str, sim: RunningSimulator, workers: int, env: dict[str, str], log_path: Path
) -> Run:
    """Ingest the workload into a fresh database and run ``enrich-once --workers N`` until nothing is due."""
    with fresh_database(server_url) as url:
        store = FactStore.from_url(url)
        try:
            store.migrate()
            entities, _ = ingest(store, setup.graph)
            postmaster = postmaster_pid(store.engine)
            reset_stats(sim.url)
            load = os.getloadavg()[0]
            cycles, idle, failure = 0, False, None
            with RequestLog(sim.url) as log:
                before = cpu_snapshot(postmaster, sim.pid)
                started, wall_started = time.perf_counter(), time.time()
                while cycles < setup.max_cycles and not idle and failure is None:
                    failure = enrich_once(workers, setup.batch_size, env | {"ENRICHMENT_DATABASE_URL": url}, log_path)
                    cycles += 1
                    idle = not store.due_work()
                elapsed = time.perf_counter() - started
                after = cpu_snapshot(postmaster, sim.pid)
            enriched = sum(status.counts.get("fully_enriched", 0) for status in store.status())
            edges = sum(store.edge_counts().values())
        finally:
            store.dispose()
    first = log.first()
    return Run(
        workers=workers,
        entities=entities,
        enriched=enriched,
        edges_match=edges == setup.expected_edges,
        cycles=cycles,
        idle=idle,
        failure=failure,
        elapsed=elapsed,
        first_call=None if first is None else first - wall_started,
        load=load,
        stats=source_stats(sim.url),
        arrivals=dict(log.arrivals),
        cpu={role: after[role] - before[role] for role in after},
    )


def run_setup(
    setup: Setup,
    server_url: str,
    workers: Sequence[int],
    *,
    repeats: int,
    latency_ms: float,
    threshold_rps: float | None,
    scale: float,
) -> list[Run]:
    """Each worker count ``repeats`` times, the counts interleaved so that drift in the machine's speed
    spreads over all of them; per count, the run of median elapsed (the lower middle one of an even
    number), carrying every run's elapsed."""
    done: dict[int, list[Run]] = defaultdict(list)
    total = sum(setup.graph.counts().values())
    with (
        tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp,
        simulator(scale, latency_ms, Path(tmp) / "simulator.log", rate_limit_rps=threshold_rps) as sim,
    ):
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(setup.policy_yaml)
        # Search off (no ELASTICSEARCH_URL): indexing is not what is measured.
        env = {name: value for name, value in os.environ.items() if name != "ELASTICSEARCH_URL"}
        env |= source_environ(sim.url) | {"ENRICHMENT_POLICY": str(policy_path)}
        for _ in range(repeats):
            for count in workers:
                with console.status(f"{setup.name}: {count} worker(s) over {total:,} entities"):
                    run = run_workers(setup, server_url, sim, count, env, Path(tmp) / f"enrich-once-{count}.log")
                done[count].append(run)
                console.print(
                    f"[dim]{setup.name}, {count} worker(s): {run.elapsed:.1f} s"
                    + (f"; [red]failed[/red]: {run.failure}" if run.failure else "")
                    + "[/dim]"
                )
    chosen = []
    for count in workers:
        ordered = sorted(done[count], key=lambda r: r.elapsed)
        run = ordered[(len(ordered) - 1) // 2]
        run.all_elapsed = tuple(r.elapsed for r in done[count])
        chosen.append(run)
    return chosen


# -- report ---------------------------------------------------------------------------------------


def _notes(runs: Sequence[Run]) -> str:
    cycles = ", ".join(f"{r.cycles}{'' if r.idle else ' (work still due)'}" for r in runs)
    edges = (
        "all runs"
        if all(r.edges_match for r in runs)
        else "[red]not at N=" + ", ".join(f"{r.workers}" for r in runs if not r.edges_match) + "[/red]"
    )
    failed = [r for r in runs if r.failure]
    notes = (
        f"Per N: cycles {cycles}; 1-min load average before the run "
        f"{', '.join(f'{r.load:.1f}' for r in runs)}. Derived edges equal to the simulator graph's: {edges}."
    )
    if failed:
        notes += " [red]enrich-once failed[/red] at " + "; ".join(f"N={r.workers}: {r.failure}" for r in failed) + "."
    if len(runs[0].all_elapsed) > 1:
        notes += (
            " Each N ran " + f"{len(runs[0].all_elapsed)} times; shown: the run of median elapsed. Every "
            "run's elapsed s: "
            + "; ".join(f"N={r.workers}: " + ", ".join(f"{e:.1f}" for e in r.all_elapsed) for r in runs)
            + "."
        )
    return notes


def _odd_statuses(run: Run) -> Counter[str]:
    statuses: Counter[str] = Counter()
    for source in run.stats.values():
        statuses.update({code: n for code, n in source["by_status"].items() if code not in ("200", "404")})
    return statuses


def _first_call(run: Run) -> str:
    return "-" if run.first_call is None else f"{run.first_call:.1f}"


def print_source_bound(runs: Sequence[Run], policy: Policy, args: argparse.Namespace, server: str) -> None:
    limit = {name: source.requests_per_second for name, source in policy.sources.items()}
    rows = []
    for run in runs:
        busiest = max(run.stats, key=lambda name: run.stats[name]["requests"])
        sustained = sustained_rps(run.arrivals.get(busiest, [])) if run.log_complete else None
        over = [name for name, s in run.stats.items() if s["peak_rps"] > limit[name]]
        peak_share = max(s["peak_rps"] / limit[name] for name, s in run.stats.items())
        fraction = None if sustained is None else sustained / limit[busiest]
        met = (
            run.failure is None
            and run.throttled == 0
            and not over
            and fraction is not None
            and fraction >= SUSTAINED_TARGET
        )
        rows.append(
            [
                f"{run.workers}",
                f"{run.elapsed:.1f}",
                _first_call(run),
                f"{run.enriched:,}",
                f"{run.throttled}",
                f"{peak_share:.0%}",
                busiest,
                "?" if sustained is None else f"{sustained:g}",
                "?" if fraction is None else f"{fraction:.0%}",
                f"{run.stats[busiest]['requests'] / limit[busiest]:.1f}",
                verdict(met),
            ]
        )
    print_table(
        f"Source-bound: {args.latency_ms:g} ms per call, every source at {args.requests_per_second:g} "
        f"requests/s and {args.max_concurrency} in flight, no batch endpoints, 429 above "
        f"{args.threshold_rps:g}/s; {runs[0].entities:,} entities (scale {args.source_scale:g})",
        [
            "workers",
            "elapsed s",
            "1st call s",
            "enriched",
            "429s",
            "peak/limit",
            "busiest",
            "sustained/s",
            "of limit",
            "bound s",
            "targets",
        ],
        rows,
        caption=(
            f"{server}\n"
            "peak/limit: the highest of the sources' peak requests in a sliding 1 s over its limit. sustained: "
            "the busiest source's median admitted requests per 1-s window between its 10th- and 90th-percentile "
            "requests ('?': the request log missed requests). bound: its requests / its limit. The client "
            f"paces each source {RateLimiter.MARGIN:g}x under its limit ({1 / RateLimiter.MARGIN:.0%} at most). "
            f"Targets: no 429, every peak <= its limit, sustained >= {SUSTAINED_TARGET:.0%} of the limit.\n"
            + _notes(runs)
        ),
    )
    print_table(
        "Source-bound, per source: peak requests in a sliding 1 s (requests made)",
        ["source", "limit", *[f"N={run.workers}" for run in runs]],
        [
            *(
                [
                    name,
                    f"{limit[name]:g}",
                    *[f"{run.stats[name]['peak_rps']} ({run.stats[name]['requests']:,})" for run in runs],
                ]
                for name in policy.sources
            ),
            ["all sources", "", *[f"({run.calls:,})" for run in runs]],
        ],
        caption="answers other than 200 and 404, per N: "
        + "; ".join(
            f"{r.workers}: " + (", ".join(f"{n} x {code}" for code, n in _odd_statuses(r).items()) or "none")
            for r in runs
        ),
    )


def print_worker_bound(runs: Sequence[Run], args: argparse.Namespace, server: str) -> None:
    base = runs[0]
    print_table(
        f"Worker-bound: no latency, no 429s, every source at {args.worker_rps:,.0f} requests/s and "
        f"{args.max_concurrency} in flight, batch endpoints as shipped; {base.entities:,} entities "
        f"(scale {args.worker_scale:g}), {os.cpu_count()} cores",
        [
            "workers",
            "elapsed s",
            "1st call s",
            "enriched",
            "entities/s",
            f"vs N={base.workers}",
            "per worker",
            "after 1st call",
        ],
        [
            [
                f"{run.workers}",
                f"{run.elapsed:.1f}",
                _first_call(run),
                f"{run.enriched:,}",
                f"{run.rate:,.0f}",
                f"{run.rate / base.rate:.2f}x",
                f"{run.rate / run.workers:,.0f}",
                "-" if run.first_call is None else f"{run.enriched / (run.elapsed - run.first_call):,.0f}",
            ]
            for run in runs
        ],
        caption=(
            f"{server}\nentities/s: enriched / elapsed, start-up included; after 1st call: enriched / the "
            f"time from the first source call to the end.\n{_notes(runs)}"
        ),
    )
    print_table(
        "Worker-bound: cores used (CPU seconds during the run / elapsed)",
        ["workers", "enrich-once", "PostgreSQL", "simulator", "total", "entities/core-s", "others"],
        [
            [
                f"{run.workers}",
                f"{run.cores('workers'):.2f}",
                f"{run.cores('PostgreSQL'):.2f}",
                f"{run.cores('simulator'):.2f}",
                f"{run.cores_used:.2f}",
                f"{run.rate / run.cores_used:,.0f}",
                f"{run.cores_others:.2f}",
            ]
            for run in runs
        ],
        caption="enrich-once: the command and its worker processes. total: those, the PostgreSQL server and the "
        "simulator. others: the rest of the machine's busy time (work beside the benchmark; near 0 for "
        "the figures to stand).",
    )
    best = max(runs, key=lambda r: r.rate)
    console.print(
        f"Sizing: one worker (N={base.workers}) enriches [bold]{base.rate / base.workers:,.0f} entities/s[/bold] "
        f"on {base.cores('workers') / base.workers:.2f} cores of its own and {base.cores('PostgreSQL'):.2f} of "
        f"PostgreSQL's; run pods are sized by that rate per worker, each given that CPU and PostgreSQL its share. "
        f"The most here was {best.rate:,.0f}/s ({best.rate / base.rate:.2f}x) at N={best.workers}, "
        f"{best.cores_used:.2f} of the {os.cpu_count()} cores busy: past that, more workers on these cores only "
        "share them."
    )


def make_setup(
    name: str, args: argparse.Namespace, scale: float, *, batch_endpoints: bool, requests_per_second: float
) -> Setup:
    text = shipped_policy_yaml(
        batch_endpoints=batch_endpoints, requests_per_second=requests_per_second, max_concurrency=args.max_concurrency
    )
    graph = generate_graph(SEED, scale)
    return Setup(name, parse_policy(text), text, graph, expected_edge_count(graph), args.batch_size, args.max_cycles)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", choices=("both", "source", "worker"), default="both")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts, comma-separated (default 1,2,4,8)")
    parser.add_argument(
        "--source-scale",
        type=float,
        default=0.2,
        help="simulator graph scale of the source-bound setup (default 0.2, 2,888 entities)",
    )
    parser.add_argument(
        "--worker-scale",
        type=float,
        default=1.0,
        help="simulator graph scale of the worker-bound setup (default 1, 14,440 entities)",
    )
    parser.add_argument("--latency-ms", type=float, default=150.0, help="source-bound latency per call (150)")
    parser.add_argument(
        "--requests-per-second",
        type=float,
        default=100.0,
        help="source-bound: every source's requests_per_second (default 100)",
    )
    parser.add_argument(
        "--threshold-rps",
        type=float,
        default=110.0,
        help="source-bound: the simulator answers 429 above this per source (default 110)",
    )
    parser.add_argument(
        "--worker-rps",
        type=float,
        default=UNLIMITED_RPS,
        help=f"worker-bound: every source's requests_per_second (default {UNLIMITED_RPS:,.0f})",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=64, help="every source's max_concurrency in both setups (default 64)"
    )
    parser.add_argument("--batch-size", type=int, default=500, help="claims per round (default 500, as the CLI)")
    parser.add_argument("--max-cycles", type=int, default=3, help="cycles per run at most (default 3)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each worker count, interleaved; the median is shown (default 1)"
    )
    args = parser.parse_args(argv)
    try:
        workers = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error("--workers takes comma-separated integers, e.g. 1,2,4,8")
    if (
        min(workers) < 1
        or min(args.source_scale, args.worker_scale, args.requests_per_second, args.threshold_rps, args.worker_rps) <= 0
        or args.latency_ms < 0
        or min(args.max_concurrency, args.batch_size, args.max_cycles, args.repeats) < 1
    ):
        parser.error(
            "worker counts, scales, rates, --max-concurrency, --batch-size, --max-cycles and --repeats "
            "must be positive, --latency-ms not negative"
        )

    with postgres_server() as server_url:
        engine = create_engine(server_url)
        server = describe_server(engine)  # also times the CPU reference, before any load
        engine.dispose()
        console.print(server, highlight=False)
        if args.setup in ("both", "source"):
            setup = make_setup(
                "source-bound",
                args,
                args.source_scale,
                batch_endpoints=False,
                requests_per_second=args.requests_per_second,
            )
            runs = run_setup(
                setup,
                server_url,
                workers,
                repeats=args.repeats,
                latency_ms=args.latency_ms,
                threshold_rps=args.threshold_rps,
                scale=args.source_scale,
            )
            print_source_bound(runs, setup.policy, args, server)
        if args.setup in ("both", "worker"):
            setup = make_setup(
                "worker-bound", args, args.worker_scale, batch_endpoints=True, requests_per_second=args.worker_rps
            )
            runs = run_setup(
                setup,
                server_url,
                workers,
                repeats=args.repeats,
                latency_ms=0.0,
                threshold_rps=None,
                scale=args.worker_scale,
            )
            print_worker_bound(runs, args, server)


if __name__ == "__main__":
    main()
