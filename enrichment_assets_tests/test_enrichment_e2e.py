"""Enrichment end to end: the shipped MDS policy against the simulator on a real port and a real
PostgreSQL. Derived edges equal what the simulator's graph says, independently computed; re-runs add
nothing; a changed pipeline run retracts and re-asserts; late entities resolve; 429s and an outage lose
nothing; no source ever sees more than its configured rate; hostile ids stay inside their template."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from enrichment_assets.dev.devservers import free_port
from enrichment_assets.dev.simulator.app import Simulator
from enrichment_assets.dev.simulator.catalog import SOURCES
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.dev.simulator.server import SimulatorServer
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import edges as edges_table
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.settings import SHIPPED_POLICY
from enrichment_assets.steps.cycle import enrich_cycle

from .conftest import FakeClock

SCALE = 0.05
MDS = load_policy(SHIPPED_POLICY)


class SimClock:
    """The simulator's clock for outages and late entities: real time plus a jump the test controls."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def sim_clock() -> SimClock:
    return SimClock()


@pytest.fixture
def simulator(sim_clock: SimClock) -> Iterator[SimulatorServer]:
    with SimulatorServer(Simulator(generate_graph(7, SCALE), clock=sim_clock)) as server:
        yield server


@pytest.fixture
def store(pg_store: FactStore) -> FactStore:
    return pg_store


def tuned(policy: Policy, **source_overrides: object) -> Policy:
    """The shipped policy with every source's settings overridden (for fast, measurable tests)."""
    sources = {name: s.model_copy(update=source_overrides) for name, s in policy.sources.items()}
    return policy.model_copy(update={"sources": sources})


def cycle(store: FactStore, simulator: SimulatorServer | ProcessSimulator, policy: Policy = MDS, **kwargs: object):
    async def run():
        async with SourcePool(policy, environ=simulator.environ()) as pool:
            reports = await enrich_cycle(store, policy, pool, owner="e2e", **kwargs)
            return {r.entity_type: r for r in reports}, pool.stats()

    return asyncio.run(run())


def settle(store: FactStore, simulator: SimulatorServer, clock: FakeClock, policy: Policy = MDS, cycles: int = 6):
    """Run cycles (moving the store's clock past any backoff) until nothing is due."""
    for _ in range(cycles):
        cycle(store, simulator, policy)
        clock.advance(hours=2)
        if not store.due_work():
            return
    raise AssertionError(f"still due after {cycles} cycles: {store.due_work()}")


def ingest_graph(store: FactStore, graph: MdsGraph) -> None:
    store.ingest_events(Event.model_validate(e) for e in thin_events(graph))


def derived(store: FactStore, entity_type: str, entity_id: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for edge in store.edges_of(entity_type, entity_id):
        found.setdefault(edge["relation"], set()).add(edge["dst_id"])
    return found


def expected(graph: MdsGraph, entity_type: str, entity_id: str) -> dict[str, set[str]]:
    return {relation: ids for relation, ids in graph.expected_edges(entity_type, entity_id).items() if ids}


def admin(simulator: SimulatorServer, path: str, body: dict[str, object]) -> dict:
    response = httpx.post(simulator.url + path, json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def test_three_hop_edges_equal_the_graph(store: FactStore, simulator: SimulatorServer, clock: FakeClock) -> None:
    graph = simulator.simulator.graph.snapshot()
    ingest_graph(store, graph)
    settle(store, simulator, clock)
    instances = graph.ids("model_instance")
    in_tests = 0
    for mi in instances:
        ab_tests = {e["dst_id"] for e in store.edges_of("model_instance", mi, relation="evaluated_in")}
        assert ab_tests == graph.ab_tests_for_model_instance(mi), mi
        in_tests += bool(ab_tests)
    assert 0 < in_tests < len(instances), "the sample has instances both in and out of A/B tests"
    for entity_type in MDS.policies:
        for entity_id in graph.ids(entity_type):
            assert derived(store, entity_type, entity_id) == expected(graph, entity_type, entity_id)
    for status in store.status():
        assert set(status.counts) == {"fully_enriched"}, status
    [edge] = store.edges_of("model_instance", instances[0], relation="owned_by_team")
    assert [hop[0] for hop in edge["path"]] == ["model_instance", "model", "user", "team"]


def test_rerunning_adds_no_duplicate_edges(store: FactStore, simulator: SimulatorServer, clock: FakeClock) -> None:
    graph = simulator.simulator.graph.snapshot()
    ingest_graph(store, graph)
    settle(store, simulator, clock)
    with store.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(edges_table)).scalar()
    store.ingest_events(
        Event(entity_type=t, entity_id=i, event_type="updated") for t in graph.counts() for i in graph.ids(t)
    )
    reports, _ = cycle(store, simulator)
    assert sum(r.result.edges_asserted + r.result.edges_retracted for r in reports.values()) == 0
    assert sum(r.result.edges_confirmed for r in reports.values()) == count
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(edges_table)).scalar() == count


def test_changed_cells_retract_the_old_edge_and_assert_the_new(
    store: FactStore, simulator: SimulatorServer, clock: FakeClock
) -> None:
    graph = simulator.simulator.graph.snapshot()
    ingest_graph(store, graph)
    settle(store, simulator, clock)
    run_id = next(
        r
        for r in graph.ids("pipeline_run")
        if graph.get("pipeline_run", r)["ab_test_cells"]
        and any(graph.get("model_instance", m)["pipeline_run_id"] == r for m in graph.ids("model_instance"))
    )
    old_tests = {c["test_id"] for c in graph.get("pipeline_run", run_id)["ab_test_cells"]}
    new_test = next(t for t in graph.ids("ab_test") if t not in old_tests)
    admin(
        simulator,
        "/admin/mutate",
        {"entity_type": "pipeline_run", "id": run_id, "set": {"ab_test_cells": [{"test_id": new_test, "cell": "B"}]}},
    )
    store.ingest_events([Event(entity_type="pipeline_run", entity_id=run_id, event_type="updated")])
    settle(store, simulator, clock)
    after = simulator.simulator.graph.snapshot()
    through_run = [
        m for m in after.ids("model_instance") if after.get("model_instance", m)["pipeline_run_id"] == run_id
    ]
    for mi in through_run:
        assert derived(store, "model_instance", mi)["evaluated_in"] == {new_test}
        history = store.edges_of("model_instance", mi, relation="evaluated_in", include_retracted=True)
        assert {e["dst_id"] for e in history if e["retracted_at"] is not None} == old_tests, "history is kept"
    assert derived(store, "pipeline_run", run_id)["evaluated_in"] == {new_test}


def test_late_pipeline_run_resolves_on_the_next_cycle(
    store: FactStore, simulator: SimulatorServer, clock: FakeClock, sim_clock: SimClock
) -> None:
    graph = simulator.simulator.graph.snapshot()
    late_run = max(
        graph.ids("pipeline_run"),
        key=lambda r: sum(graph.get("model_instance", m)["pipeline_run_id"] == r for m in graph.ids("model_instance")),
    )
    waiting = [m for m in graph.ids("model_instance") if graph.get("model_instance", m)["pipeline_run_id"] == late_run]
    admin(simulator, "/admin/late", {"entity_type": "pipeline_run", "ids": [late_run], "available_in_seconds": 600})
    store.ingest_events(Event.model_validate(e) for e in thin_events(graph) if e["entity_id"] != late_run)
    cycle(store, simulator)
    for mi in waiting:
        record = store.get_entity("model_instance", mi)
        assert record.state == "partially_resolved" and record.waiting_on == [["pipeline_run", late_run]]
    sim_clock.offset = 601
    clock.advance(seconds=5)
    store.ingest_events([Event(entity_type="pipeline_run", entity_id=late_run, event_type="created")])
    cycle(store, simulator)
    for mi in waiting:
        assert store.get_entity("model_instance", mi).state == "fully_enriched"
        assert derived(store, "model_instance", mi) == expected(graph, "model_instance", mi)


def test_429s_and_an_outage_lose_nothing_and_stop_no_other_source(
    store: FactStore, simulator: SimulatorServer, clock: FakeClock, sim_clock: SimClock
) -> None:
    graph = simulator.simulator.graph.snapshot()
    policy = tuned(MDS, circuit_reset=timedelta(seconds=0.5), max_batch_size=25)
    admin(simulator, "/admin/knobs", {"source": "model_registry", "rate_limit_rps": 8})
    admin(simulator, "/admin/outage", {"source": "experimentation_platform", "outage_seconds": 30})
    ingest_graph(store, graph)
    reports, sources = cycle(store, simulator, policy)
    assert sources["model_registry"]["throttled"] > 0, "the simulator answered 429s"
    assert sources["experimentation_platform"]["circuit_open"]
    assert sources["experimentation_platform"]["requests"] <= 10, "a dead source costs a few calls"
    for other in ("dataset", "feature", "team", "user", "model"):
        assert set(next(s for s in store.status() if s.entity_type == other).counts) == {"fully_enriched"}, other
    assert reports["model_instance"].result.deferred > 0
    sim_clock.offset = 31
    time.sleep(0.6)  # the client's circuit breaker resets on real time
    settle(store, simulator, clock, policy)
    for status in store.status():
        assert set(status.counts) == {"fully_enriched"}, status
    for mi in graph.ids("model_instance"):
        assert derived(store, "model_instance", mi) == expected(graph, "model_instance", mi)


class ProcessSimulator:
    """The simulator as its own process (``enrichment simulate``), so the times it sees requests arrive
    are not bunched by this process's GIL; the rate test reads them."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def environ(self) -> dict[str, str]:
        return {spec.base_url_env: self.url + spec.prefix for spec in SOURCES.values()}

    def __enter__(self) -> ProcessSimulator:
        command = [
            str(Path(sys.executable).with_name("enrichment")),
            "simulate",
            "--port",
            str(self.port),
            "--seed",
            "7",
            "--scale",
            str(self.scale),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("the simulator process did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def test_no_source_ever_sees_more_than_its_rate(store: FactStore, clock: FakeClock) -> None:
    graph = generate_graph(7, 0.01)
    policy = tuned(MDS, requests_per_second=25, max_batch_size=1)
    ingest_graph(store, graph)
    with ProcessSimulator(0.01) as simulator:
        cycle(store, simulator, policy, entity_types=["model_instance"])  # type: ignore[arg-type]
        per_source = httpx.get(simulator.url + "/admin/stats", timeout=10).json()["sources"]
    busy = {name: s for name, s in per_source.items() if s["requests"] > 25}
    assert "model_registry" in busy, per_source
    for name, source_stats in busy.items():
        assert source_stats["peak_rps"] <= 25, (name, source_stats["peak_rps"])


@pytest.mark.parametrize(
    "hostile",
    ["../admin/reset", "a/b?x=1#y", "%2e%2e", "..", ".", "//evil.example/x"],
    ids=["traversal", "query-fragment", "encoded-dots", "dotdot", "dot", "scheme-relative"],
)
def test_hostile_ids_never_leave_their_template(
    store: FactStore, simulator: SimulatorServer, clock: FakeClock, hostile: str
) -> None:
    store.ingest_events(
        [
            Event(entity_type="pipeline_run", entity_id=hostile, event_type="created"),
            Event(entity_type="team", entity_id=hostile, event_type="created"),
        ]
    )
    httpx.post(simulator.url + "/admin/reset", json={}, timeout=10).raise_for_status()
    cycle(store, simulator, tuned(MDS, max_batch_size=None), entity_types=["pipeline_run", "team"])
    log = httpx.get(simulator.url + "/admin/requests", params={"limit": 100}, timeout=10).json()
    requests = [
        r
        for r in (log["requests"] if isinstance(log, dict) else log)
        if r["source"] is not None or "reset" not in r["path"]
    ]
    assert requests, "the walker called the sources"
    for request in requests:
        assert request["source"] in ("pipeline_orchestration", "identity"), request
        assert request["path"].startswith(("/pipeline-orchestration/runs/", "/identity/teams/")), request
        assert request["path"].count("/") == 3, request
        assert request["status"] == 404
    assert store.get_entity("team", hostile).waiting_on == [["team", hostile]]


def test_enrich_once_workers_share_the_work_and_enrich_everything_once(
    make_postgres_database, simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``enrich-once --workers 2``: two processes claim side by side from one fact store (leases keep them
    apart), and together they derive exactly the edges one process does."""
    from enrichment_assets.steps.cycle import enrich_with_workers

    for name, value in simulator.environ().items():
        monkeypatch.setenv(name, value)
    url = make_postgres_database()
    store = FactStore.from_url(url)
    store.migrate()
    graph = simulator.simulator.graph.snapshot()
    ingest_graph(store, graph)
    result = enrich_with_workers(url, MDS, workers=2, batch_size=50)
    assert len(result.claimed_per_worker) == 2 and all(result.claimed_per_worker), (
        f"both workers claimed work: {result.claimed_per_worker}"
    )
    assert not store.due_work()
    for status in store.status():
        assert set(status.counts) == {"fully_enriched"}, status
    for entity_type in MDS.policies:
        for entity_id in graph.ids(entity_type):
            assert derived(store, entity_type, entity_id) == expected(graph, entity_type, entity_id)
    store.dispose()


def test_enrich_once_workers_report_every_failure_after_all_have_finished(postgres_server_url: str) -> None:
    from sqlalchemy.engine import make_url

    from enrichment_assets.steps.cycle import WorkersFailed, enrich_with_workers

    missing = make_url(postgres_server_url).set(database="no_such_database_here").render_as_string(hide_password=False)
    with pytest.raises(WorkersFailed) as failed:
        enrich_with_workers(missing, MDS, workers=2, batch_size=50)
    assert len(failed.value.failures) == 2 and failed.value.partial is None
    assert "no_such_database_here" in failed.value.failures[0]
