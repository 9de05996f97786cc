"""What CPU contention alone does to ingest latency, at each scheduling priority the contenders can have.

The staleness benchmark compares ingest p99 with enrichment running against idle. This one isolates
the part of that ratio that no enrichment code can remove: the same single-event ``POST /v1/events``
stream (``enrichment serve`` over a durable PostgreSQL, see ``_common``), sent at ``--rate`` per
second on a fixed schedule over one keep-alive connection, while ``--hogs`` processes that only burn
CPU (a pure-Python loop, touching no file, socket or database) run beside it:

1. none: nothing else running (the baseline);
2. normal: the hogs at the same priority as everything else (nice 0);
3. nice 19: the hogs at the lowest nice level;
4. SCHED_IDLE: the hogs in Linux's idle scheduling class, which gives way at once to any normal task
   that wakes (the strongest deprioritization Linux offers short of a CPU limit);
5. none again, to show the baseline held.

Printed per phase: p50/p90/p99/max latency and p99 against the baseline. The SCHED_IDLE row is the
floor for ``bench/staleness.py``'s ingest ratio on this machine: enrichment cannot get further out of
ingest's way than CPU work that yields at once, and what is left is what sharing the cores costs
(caches, memory bandwidth, and whatever the host runs beside this guest's virtual CPUs). Timings are
printed, never asserted.

Run: ``.venv/bin/python bench/contention.py [--rate 50] [--seconds 20] [--hogs 3]`` (about two
minutes; Linux only, for SCHED_IDLE).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from _common import api_server, console, describe_server, fresh_database, percentile, postgres_server, print_table

from enrichment_assets.factstore import FactStore
from enrichment_assets.policy import load_policy
from enrichment_assets.settings import SHIPPED_POLICY

HOG = "while True:\n    sum(range(10_000))\n"
# Any type the API accepts: the server validates against the shipped policy.
ENTITY_TYPE = sorted(load_policy(SHIPPED_POLICY).entity_types)[0]
PHASES: dict[str, Callable[[], None] | None] = {
    "none": None,
    "normal (nice 0)": lambda: None,
    "nice 19": lambda: os.nice(19),
    "SCHED_IDLE": lambda: os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0)),
    "none, again": None,
}


@contextmanager
def hogs(count: int, prepare: Callable[[], None] | None) -> Iterator[None]:
    """``count`` CPU-bound processes, each set up by ``prepare`` before it starts (none if None)."""
    if prepare is None:
        yield
        return
    processes = [subprocess.Popen([sys.executable, "-c", HOG], preexec_fn=prepare) for _ in range(count)]
    try:
        time.sleep(1.0)  # let them reach the scheduler's steady state
        yield
    finally:
        for process in processes:
            process.kill()
            process.wait()


def paced_posts(conn: http.client.HTTPConnection, first_id: int, count: int, rate: float) -> list[float]:
    """POST ``count`` single events on a fixed schedule (a late answer does not move the next slot);
    each latency in ms."""
    latencies: list[float] = []
    started = time.perf_counter()
    for n in range(count):
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        body = json.dumps({"entity_type": ENTITY_TYPE, "entity_id": f"e-{first_id + n}", "event_type": "created"})
        sent = time.perf_counter()
        conn.request("POST", "/v1/events", body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 202:
            raise RuntimeError(f"POST /v1/events answered {response.status}")
        latencies.append((time.perf_counter() - sent) * 1000)
    return latencies


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=50.0, help="events per second (default 50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per phase (default 20)")
    parser.add_argument(
        "--hogs",
        type=int,
        default=(os.cpu_count() or 2) + 1,
        help="CPU-bound processes beside the API (default: CPUs + 1)",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.seconds <= 0 or args.hogs < 1:
        parser.error("--rate, --seconds and --hogs must be positive")
    if not hasattr(os, "SCHED_IDLE"):
        raise SystemExit("SCHED_IDLE is Linux-only")
    per_phase = max(round(args.rate * args.seconds), 100)

    rows: list[tuple[str, list[float]]] = []
    with (
        postgres_server() as server,
        fresh_database(server) as url,
        tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp,
    ):
        store = FactStore.from_url(url)
        store.migrate()
        caption = describe_server(store.engine)
        store.dispose()
        env = {**os.environ, "ENRICHMENT_DATABASE_URL": url}
        env.pop("ENRICHMENT_API_TOKEN", None)
        with api_server(env, Path(tmp) / "serve.log") as api:
            conn = http.client.HTTPConnection(api.removeprefix("http://"), timeout=30)
            paced_posts(conn, 0, 200, args.rate)  # warm-up, untimed
            for n, (phase, prepare) in enumerate(PHASES.items(), start=1):
                with console.status(f"{phase}: {per_phase:,} events at {args.rate:g}/s"), hogs(args.hogs, prepare):
                    rows.append((phase, paced_posts(conn, n * 1_000_000, per_phase, args.rate)))
            conn.close()

    baseline = percentile(rows[0][1], 99)
    print_table(
        f"Single-event POST /v1/events at {args.rate:g}/s beside {args.hogs} CPU-bound processes (ms)",
        ["hogs' priority", "events", "p50", "p90", "p99", "max", "p99 vs none"],
        [
            [
                phase,
                f"{len(ms):,}",
                *(f"{percentile(ms, q):.2f}" for q in (50, 90, 99)),
                f"{max(ms):.1f}",
                f"{percentile(ms, 99) / baseline:.2f}x",
            ]
            for phase, ms in rows
        ],
        caption=f"{caption}; {os.cpu_count()} CPUs; one keep-alive connection, one request at a time",
    )


if __name__ == "__main__":
    main()
