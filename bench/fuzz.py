"""Fuzz the ingest and read API: ``--requests`` generated requests (10,000 by default) against a real
server, counted by answer.

Setup, on a fresh PostgreSQL database and the search server (see ``_common``): the API app in uvicorn
(``BackgroundServer``, the limits ``uvicorn_config`` sets) with both tokens set, a 16 KiB / 20-event
batch limit and a 1 s body deadline (``enrichment_assets_tests/fuzzing.SETTINGS``), and an empty index.

Sent, one request at a time on a new connection each, byte for byte: the mix that
``enrichment_assets_tests/fuzzing.requests()`` draws (two fifths ingest, two fifths reads, a fifth anything else;
see that module for what it generates), from ``--seed`` on (a random seed, printed, when unset). Around
each request the entities table is tallied, and ``fuzzing.violations`` names every property the answer
broke: a 5xx, no answer, a valid batch refused or an invalid one accepted, a write by a rejected
request or beyond an accepted batch (a partial write), a status the OpenAPI document does not give.

Printed: answers by status, 5xx (target 0), partial writes (target 0), other violations with an example
each, requests per second (over the round trips alone, and over the whole run with its tallies), and
whether ``/healthz`` answers 200 afterwards. Figures are printed, never asserted.

Run: ``.venv/bin/python bench/fuzz.py [--requests 10000] [--seed N]`` (a few minutes at the default).
"""

from __future__ import annotations

import argparse
import logging
import random
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from _common import bench_database, console, elasticsearch_server, print_table, verdict
from hypothesis import HealthCheck, Phase, given, seed, settings

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.factstore import FactStore
from enrichment_assets.search import SearchIndex

# The generators live with the tests, which run a slice of the same mix.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from enrichment_assets_tests.fuzzing import (  # noqa: E402
    SETTINGS,
    FuzzRequest,
    named_keys,
    requests,
    send,
    tally,
    violations,
)

PARTIAL_WRITE = ("wrote", "did not write", "outside it", "new rows")


@dataclass
class Tallies:
    statuses: Counter[int] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    partial_writes: int = 0
    round_trips: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


def fuzz(port: int, store: FactStore, count: int, first_seed: int) -> Tallies:
    """Send ``count`` generated requests, ``first_seed`` on, and tally what came back."""
    tallies = Tallies()

    def one(fuzz_request: FuzzRequest) -> None:
        if tallies.sent >= count:
            return
        keys = named_keys(fuzz_request)
        before = tally(store.engine, keys)
        answer = send(port, fuzz_request)
        after = tally(store.engine, keys)
        tallies.statuses[answer.status] += 1
        tallies.round_trips += answer.seconds
        found = violations(fuzz_request, answer, before, after)
        tallies.partial_writes += any(any(w in v for w in PARTIAL_WRITE) for v in found)
        for violation in found:
            kind = violation.split(":")[0][:80]
            tallies.violations[kind] += 1
            tallies.examples.setdefault(kind, f"{violation[:200]}\n    {fuzz_request!r:.600}")

    run_seed = first_seed
    while tallies.sent < count:
        # Generation only: nothing fails here, so there is nothing to shrink; every draw is sent.
        runner = settings(max_examples=count - tallies.sent, database=None, deadline=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))(given(fuzz_request=requests())(one))  # fmt: skip
        seed(run_seed)(runner)()
        run_seed += 1
    return tallies


def report(tallies: Tallies, wall: float, healthy: bool, first_seed: int) -> None:
    rows = [(str(status) if status else "no answer", f"{n:,}") for status, n in sorted(tallies.statuses.items())]
    print_table(f"{tallies.sent:,} requests by answer (seed {first_seed})", ["status", "requests"], rows)
    fives = sum(n for status, n in tallies.statuses.items() if status >= 500)
    print_table(
        "Properties",
        ["property", "count", "target", "verdict"],
        [
            ("5xx answers", f"{fives:,}", "0", verdict(fives == 0)),
            ("partial writes", f"{tallies.partial_writes:,}", "0", verdict(tallies.partial_writes == 0)),
            ("violations of any kind", f"{sum(tallies.violations.values()):,}", "0", verdict(not tallies.violations)),
            ("/healthz afterwards", "200" if healthy else "not 200", "200", verdict(healthy)),
        ],
    )
    for kind, n in tallies.violations.most_common():
        console.print(f"[red]{n:,} x {kind}[/red]\n    {tallies.examples[kind]}", soft_wrap=True)
    console.print(
        f"{tallies.sent / tallies.round_trips:,.0f} requests/s over the round trips alone; "
        f"{tallies.sent / wall:,.0f} requests/s over the whole run, tallies of the entities table included "
        f"({wall:.0f} s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests to send (default 10,000)")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: a random one, printed)")
    args = parser.parse_args(argv)
    first_seed = random.randrange(2**32) if args.seed is None else args.seed
    with bench_database() as url, elasticsearch_server() as search_url:
        store = FactStore.from_url(url)
        store.migrate()
        index = SearchIndex.from_url(search_url, alias=f"fuzz-{secrets.token_hex(4)}")
        index.ensure()
        try:
            with BackgroundServer(create_app(store, SETTINGS, index), settings=SETTINGS) as server:
                # uvicorn warns of every malformed request, and a tenth of these are malformed on purpose.
                logging.getLogger("uvicorn.error").setLevel(logging.ERROR)
                started = time.perf_counter()
                tallies = fuzz(server.port, store, args.requests, first_seed)
                wall = time.perf_counter() - started
                healthy = httpx.get(server.url + "/healthz", timeout=10).status_code == 200
        finally:
            for name in index.current_indices():
                index.client.indices.delete(index=name)
            index.close()
            store.dispose()
    report(tallies, wall, healthy, first_seed)


if __name__ == "__main__":
    main()
