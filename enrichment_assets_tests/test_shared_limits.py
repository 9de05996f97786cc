"""Source limits shared by processes through the fact store's PostgreSQL: several processes calling one
real HTTP server stay within its rate and concurrency together; one process alone gets nearly the whole
rate; the slots of a process killed while holding them are free again within their lease; a dropped
database connection costs one retry; a SQLite fact store keeps the in-process limits."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.budgets import SourceBudgets
from enrichment_assets.factstore.schema import source_slots
from enrichment_assets.hydration.limits import LocalLimits, RateLimiter
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.shared_limits import SharedLimits
from enrichment_assets.policy import Policy, Source, load_policy

THINGS = load_policy(Path(__file__).parent / "policies" / "things.yaml")
SPAWN = multiprocessing.get_context("spawn")


class CountingSource:
    """A source that answers every ``/things/{id}`` after ``delay`` seconds and records when each request
    arrived and the most requests it ever had in flight at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.arrivals: list[float] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self.app = Starlette(routes=[Route("/things/{thing_id}", self.thing)])

    async def thing(self, request: Request) -> JSONResponse:
        with self._lock:
            self.arrivals.append(time.monotonic())
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            with self._lock:
                self.in_flight -= 1
        return JSONResponse({"id": request.path_params["thing_id"]})

    def peak_per_second(self) -> int:
        """The most requests that arrived in any one-second window."""
        times = sorted(self.arrivals)
        start, peak = 0, 0
        for end, at in enumerate(times):
            while times[start] <= at - 1.0:
                start += 1
            peak = max(peak, end - start + 1)
        return peak

    def mean_rate(self) -> float:
        """Requests per second over the busy interval, first arrival to last."""
        times = sorted(self.arrivals)
        return (len(times) - 1) / (times[-1] - times[0])


@pytest.fixture
def source() -> Iterator[tuple[CountingSource, str]]:
    counting = CountingSource(delay=0.03)
    with BackgroundServer(counting.app) as server:  # type: ignore[arg-type]
        yield counting, server.url


def policy_for(base_url: str, *, requests_per_second: float, max_concurrency: int) -> Policy:
    warehouse = Source.model_validate(
        {
            "base_url": base_url,
            "requests_per_second": requests_per_second,
            "max_concurrency": max_concurrency,
            "max_retries": 0,
        }
    )
    return THINGS.model_copy(update={"sources": {"warehouse": warehouse}})


def hammer(database_url: str, policy: Policy, seconds: float, start: Any, results: Any, worker: int) -> None:
    """A worker process: fetch things through a pool on the shared budget for ``seconds``."""
    store = FactStore.from_url(database_url)

    async def run() -> dict[str, Any]:
        async with SourcePool(policy, store=store) as pool:
            assert isinstance(pool.clients["warehouse"].limits, SharedLimits)
            # One request the server does not count opens the connections and warms every path.
            await pool.fetch("other", [f"warm-up-{worker}"])
            start.wait()
            deadline = time.monotonic() + seconds
            batch = 0
            while time.monotonic() < deadline:
                await pool.fetch("thing", [f"{worker}-{batch}-{n}" for n in range(24)])
                batch += 1
            return pool.stats()["warehouse"]

    try:
        results.put(asyncio.run(run()))
    finally:
        store.dispose()


def run_workers(database_url: str, policy: Policy, *, workers: int, seconds: float) -> list[dict[str, Any]]:
    start, results = SPAWN.Barrier(workers + 1), SPAWN.Queue()
    processes = [
        SPAWN.Process(target=hammer, args=(database_url, policy, seconds, start, results, n), daemon=True)
        for n in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        start.wait(timeout=60)
        return [results.get(timeout=seconds + 30) for _ in processes]
    finally:
        for process in processes:
            process.join(timeout=10)


def test_processes_together_stay_within_the_rate_and_concurrency(
    pg_store: FactStore, postgres_url: str, source: tuple[CountingSource, str]
) -> None:
    counting, url = source
    policy = policy_for(url, requests_per_second=80, max_concurrency=3)
    stats = run_workers(postgres_url, policy, workers=3, seconds=2.5)

    assert counting.peak_per_second() <= 80, counting.peak_per_second()
    assert counting.mean_rate() <= 80
    assert counting.peak_in_flight <= 3
    answered = [s["by_status"]["200"] for s in stats]
    assert sum(answered) == len(counting.arrivals) >= 0.6 * 80 * 2.5, answered
    assert min(answered) >= sum(answered) / 9, "no worker is starved"
    assert all(s["budget_wait_seconds"] > 0 for s in stats)


def test_one_process_alone_gets_nearly_the_whole_rate(
    pg_store: FactStore, postgres_url: str, source: tuple[CountingSource, str]
) -> None:
    counting, url = source
    policy = policy_for(url, requests_per_second=50, max_concurrency=4)
    [stats] = run_workers(postgres_url, policy, workers=1, seconds=2.5)

    assert 0.8 * 50 <= counting.mean_rate() <= 50, counting.mean_rate()
    assert counting.peak_per_second() <= 50
    # Bookings and slots are taken for groups of requests, not one by one.
    assert stats["budget_round_trips"] <= stats["requests"] / 2, stats


def hold_slots(database_url: str, lease: float, held: Any) -> None:
    """A worker process: take every slot of "warehouse" and keep them until killed."""
    store = FactStore.from_url(database_url)
    budgets = SourceBudgets(store.engine)
    limits = SharedLimits(budgets, "warehouse", requests_per_second=50, max_concurrency=3, lease=lease)

    async def hold() -> None:
        async with limits.slot():
            held.release()
            await asyncio.sleep(3600)

    async def run() -> None:
        await asyncio.gather(*(hold() for _ in range(3)))

    asyncio.run(run())


def slot_holders(store: FactStore) -> dict[int, str | None]:
    with store.engine.connect() as conn:
        live = sa.case((source_slots.c.expires_at > sa.func.clock_timestamp(), source_slots.c.holder))
        rows = conn.execute(sa.select(source_slots.c.slot, live).where(source_slots.c.source == "warehouse"))
        return {slot: holder for slot, holder in rows}


def test_a_killed_process_frees_its_slots_within_the_lease(pg_store: FactStore, postgres_url: str) -> None:
    lease = 1.5
    held = SPAWN.Semaphore(0)
    process = SPAWN.Process(target=hold_slots, args=(postgres_url, lease, held), daemon=True)
    process.start()
    try:
        for _ in range(3):
            assert held.acquire(timeout=60)
        time.sleep(lease * 1.5)
        holders = slot_holders(pg_store)
        assert len(holders) == 3 and len(set(holders.values())) == 1 and None not in holders.values(), (
            "all slots held by the live process past its first lease (renewed)"
        )
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=10)
    killed_at = time.monotonic()

    async def take_all() -> float:
        budgets = SourceBudgets(pg_store.engine)
        limits = SharedLimits(budgets, "warehouse", requests_per_second=50, max_concurrency=3)
        entered = asyncio.Event()
        inside = 0

        async def one() -> None:
            nonlocal inside
            async with limits.slot():
                inside += 1
                if inside == 3:
                    entered.set()
                await entered.wait()

        try:
            await asyncio.wait_for(asyncio.gather(*(one() for _ in range(3))), timeout=lease + 5)
            return time.monotonic() - killed_at
        finally:
            await limits.aclose()
            budgets.dispose()

    freed_after = asyncio.run(take_all())
    assert freed_after <= lease + 0.5, freed_after
    assert set(slot_holders(pg_store).values()) == {None}, "the new holder handed them back on close"


def test_a_dropped_connection_costs_one_retry(pg_store: FactStore, caplog: pytest.LogCaptureFixture) -> None:
    budgets = SourceBudgets(pg_store.engine)
    try:
        budgets.ensure("warehouse", slots=2, per_second=10)
        budgets.book("warehouse", holder="test", count=1, interval=0.1)
        activity = sa.table("pg_stat_activity", sa.column("pid"), sa.column("datname"))
        with pg_store.engine.connect() as conn:
            killed = (
                conn.execute(
                    sa.select(sa.func.pg_terminate_backend(activity.c.pid)).where(
                        activity.c.datname == sa.func.current_database(), activity.c.pid != sa.func.pg_backend_pid()
                    )
                )
                .scalars()
                .all()
            )
        assert any(killed), "the budget connection was open and got dropped"
        with caplog.at_level(logging.WARNING, logger="enrichment_assets.factstore.budgets"):
            booking = budgets.book("warehouse", holder="test", count=1, interval=0.1)
        assert 0 <= booking.starts_in <= 0.2
        assert "connection lost" in caplog.text, "the booking went through on the retry"
    finally:
        budgets.dispose()


def test_the_pool_shares_limits_only_on_postgresql(store: FactStore) -> None:
    policy = policy_for("http://warehouse.test/api", requests_per_second=200, max_concurrency=2)
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={"id": r.url.path.rsplit("/", 1)[1]}))

    async def run() -> tuple[type, dict[str, Any]]:
        async with SourcePool(policy, transports={"warehouse": transport}, store=store) as pool:
            fetched = await pool.fetch("thing", [f"t{n}" for n in range(10)])
            assert {f.status for f in fetched.values()} == {"found"}
            return type(pool.clients["warehouse"].limits), pool.stats()["warehouse"]

    limits, stats = asyncio.run(run())
    if store.dialect == "postgresql":
        assert limits is SharedLimits and stats["budget_round_trips"] > 0
    else:
        assert limits is LocalLimits and stats["budget_round_trips"] == 0
    assert stats["requests"] == 10 and stats["budget_wait_seconds"] > 0


@pytest.mark.parametrize("per_second", [3_000, 10_000, 100_000], ids=["3k", "10k", "100k"])
def test_a_rate_faster_than_a_booking_round_trip_is_still_served(pg_store: FactStore, per_second: int) -> None:
    """At high rates a span for the waiting requests is shorter than the booking's own round trip; a span
    already over when it arrives would be dropped unused, and the next one too, so nothing ever started.
    Spans now start no sooner than their answer can arrive."""
    budgets = SourceBudgets(pg_store.engine)
    limits = SharedLimits(budgets, "fast", requests_per_second=per_second, max_concurrency=8)

    async def request() -> None:
        async with limits.slot():
            await limits.turn()

    async def run() -> float:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(request() for _ in range(200))), timeout=20)
        elapsed = time.monotonic() - started
        await limits.aclose()
        return elapsed

    elapsed = asyncio.run(run())
    assert elapsed < 5, f"200 turns at {per_second}/s took {elapsed:.1f} s"
    assert elapsed >= 200 * RateLimiter.MARGIN / per_second * 0.9, "and never faster than the rate"
