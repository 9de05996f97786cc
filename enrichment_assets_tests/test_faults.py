"""Faults survived, each injected into the real component: the search server stopped while runs index
(documents wait in the outbox, the check reports the gap, the next run drains it), and the fact store's
PostgreSQL stopped for 20 s under the API and a Dagster run (503s with nothing partial, then 202s without a
restart; the run fails cleanly and everything converges). The Dagster-side faults (killed run workers and
daemon, parallel runs, dead sources) are in ``test_faults_dagster.py``.

After recovery every test checks what the issue asks of all of them: nothing lost, nothing duplicated,
the index in sync."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
import sqlalchemy as sa

from enrichment_assets.defs.definitions import build_definitions
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.dev.devservers import LocalElasticsearch, LocalPostgres
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import generate_graph
from enrichment_assets.dev.simulator.server import SimulatorServer, simulator_server
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import edges as edges_table
from enrichment_assets.policy import load_policy
from enrichment_assets.search import SearchIndex
from enrichment_assets.search.reconcile import reconcile
from enrichment_assets.settings import SHIPPED_POLICY
from enrichment_assets_tests.testbed import Testbed, report, wait_for

MDS = load_policy(SHIPPED_POLICY)
SCALE = 0.02


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with simulator_server(seed=11, scale=SCALE) as server:
        yield server


@pytest.fixture
def live_store(make_postgres_database: Callable[[], str]) -> Iterator[FactStore]:
    store = FactStore.from_url(make_postgres_database())
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def own_search(tmp_path: Path) -> Iterator[LocalElasticsearch]:
    """A search server of this test's own, which it may stop and start again on the same port and data."""
    with LocalElasticsearch(tmp_path / "search") as server:
        yield server


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def no_duplicate_live_edges(store: FactStore) -> None:
    key = (
        edges_table.c.src_type,
        edges_table.c.src_id,
        edges_table.c.relation,
        edges_table.c.dst_type,
        edges_table.c.dst_id,
    )
    with store.engine.connect() as conn:
        duplicated = conn.execute(
            sa.select(*key).where(edges_table.c.retracted_at.is_(None)).group_by(*key).having(sa.func.count() > 1)
        ).all()
    assert duplicated == []


def test_search_down_during_index_updates_keeps_documents_in_the_outbox_and_the_next_run_drains_them(
    live_store: FactStore, own_search: LocalElasticsearch, sources_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", live_store.engine.url.render_as_string(hide_password=False))
    graph = generate_graph(11, SCALE)
    live_store.ingest_events(Event.model_validate(e) for e in thin_events(graph))
    index = SearchIndex.from_url(own_search.url, alias="faults")
    index.ensure()
    defs = build_definitions(MDS)
    resources: dict[str, Any] = {
        "fact_store": FactStoreResource(database_url=live_store.engine.url.render_as_string(hide_password=False)),
        "sources": SourcesResource(),
        "search": SearchResource(elasticsearch_url=own_search.url, index_alias="faults"),
    }
    job = defs.resolve_job_def("model_instance_enrichment")
    tags = {"enrichment/mode": "incremental"}
    with dg.instance_for_test() as instance:
        own_search.stop()
        down = job.execute_in_process(partition_key=today(), instance=instance, resources=resources, tags=tags)
        assert down.success, "a search outage does not fail enrichment"
        [materialization] = down.asset_materializations_for_node("model_instance__index_updates")
        assert materialization.metadata["failures"].value > 0
        waiting = sum(live_store.index_backlog_counts().values())
        assert waiting >= len(graph.ids("model_instance")), "every document written meanwhile waits in the outbox"
        check = defs.resolve_job_def("enrichment_checks").execute_in_process(instance=instance, resources=resources)
        [evaluation] = [e for e in check.get_asset_check_evaluations() if e.check_name == "search_index_in_sync"]
        assert not evaluation.passed and evaluation.metadata["outbox_backlog"].value == waiting

        own_search.start()
        again = job.execute_in_process(partition_key=today(), instance=instance, resources=resources, tags=tags)
        assert again.success
    assert sum(live_store.index_backlog_counts().values()) == 0, "the next run drained the outbox"
    in_sync = reconcile(live_store, index, MDS, exact=True)
    assert not (in_sync.missing or in_sync.stale or in_sync.extra or in_sync.ahead), "0 documents lost"
    assert {s.entity_type: s.counts for s in live_store.status()}["model_instance"] == {
        "fully_enriched": len(graph.ids("model_instance"))
    }
    no_duplicate_live_edges(live_store)
    index.close()


PG_OUTAGE_SECONDS = 20


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[LocalPostgres]:
    """A PostgreSQL server of this test's own, which it stops and starts again on the same port and data."""
    server = LocalPostgres(tmp_path / "pgdata", delete_on_stop=False).start()
    try:
        admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE facts"))
        admin.dispose()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


def test_postgres_down_under_the_api_and_a_run(
    own_postgres: LocalPostgres, elasticsearch_url: str, tmp_path: Path
) -> None:
    # Dagster's own instance stays on SQLite, so only the fact store goes down.
    with Testbed(
        tmp_path / "bed", database_url=own_postgres.url("facts"), search_url=elasticsearch_url, scale=0.02
    ) as bed:
        bed.ingest(bed.created_events())
        bed.wait_settled(timeout=180)
        bed.knobs(latency_ms=2000)  # the run is still hydrating when the database goes
        since = time.time()
        bed.ingest(bed.touch(["model_instance"]))
        run = bed.wait_for_run(since=since, selecting="model_instance", step="hydrated")
        # Each batch in the outage touches entities of its own at a time of its own, so a batch written in
        # part would show in the store.
        keys = [(t, i) for t in sorted(bed.graph.counts()) for i in bed.graph.ids(t)]
        answers: list[tuple[list[dict[str, Any]], httpx.Response]] = []
        reads: list[httpx.Response] = []
        with httpx.Client(base_url=bed.api.url, timeout=30) as client:
            own_postgres.stop()
            down_at = time.monotonic()
            while time.monotonic() < down_at + PG_OUTAGE_SECONDS:
                batch = bed.touch(ids=keys[len(answers) * 2 : len(answers) * 2 + 2])
                answers.append((batch, bed.post(batch, client=client)))
                reads.append(client.get(f"/v1/entities/{keys[0][0]}/{keys[0][1]}"))
                time.sleep(0.5)
            own_postgres.start()
            up_at = time.monotonic()
            first = bed.post(bed.touch(ids=keys[-2:]), client=client)
        assert len(answers) * 2 < len(keys) - 2, "every batch touched entities of its own"
        bed.knobs(latency_ms=0)
        refused = [batch for batch, answer in answers if answer.status_code != 202]
        statuses = sorted({answer.status_code for _, answer in answers})
        assert refused, "the API took events with its database down"
        for _, answer in answers:
            assert answer.status_code in (202, 503), answer.text
            if answer.status_code == 503:
                assert answer.json() == {"error": "fact store unavailable; retry"}
                assert answer.headers["retry-after"] == "1"
        assert {r.status_code for r in reads} == {503}, [r.text[:200] for r in reads if r.status_code != 503]
        assert first.status_code == 202, f"the first batch after the restart: {first.status_code} {first.text}"

        rows = {(r.entity_type, r.entity_id): r for r in bed.rows()}
        partial = [
            (e["entity_type"], e["entity_id"])
            for batch in refused
            for e in batch
            if rows[(e["entity_type"], e["entity_id"])].last_event_at >= _utc(e["occurred_at"])
        ]
        assert partial == [], f"events of batches answered 503 were written: {partial[:5]}"
        for batch in refused:  # what a client told to retry does
            bed.ingest(batch)
        ended = bed.wait_for_status(run.run_id, [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE], timeout=120)
        wait_for(
            f"the leases of run {run.run_id} back",
            lambda: not bed.leased_by(run.run_id),
            timeout=120,
            seen=lambda: len(bed.leased_by(run.run_id)),
        )
        leases_back = time.monotonic() - up_at
        record = bed.instance.get_run_record_by_id(run.run_id)
        run_ended = (
            record.end_time - (time.time() - (time.monotonic() - down_at)) if record and record.end_time else None
        )
        releases = [t.status.value for t in reversed(bed.sensor_ticks("leases_of_failed_runs", limit=10))]
        recovered = time.monotonic() - up_at + bed.check_recovered(timeout=180)
        report(
            f"d. PostgreSQL (fact store) stopped {PG_OUTAGE_SECONDS}s under the API and a run",
            outage_s=round(up_at - down_at, 1),
            batches_in_outage=len(answers),
            answered=statuses,
            refused_batches=len(refused),
            partial_writes=0,
            first_post_after_restart=first.status_code,
            run=ended.status.value,
            run_ended_after_stop_s=run_ended and round(run_ended, 1),
            release_sensor_ticks=releases,
            leases_back_after_restart_s=round(leases_back, 1),
            recovered_after_restart_s=round(recovered, 1),
            lost=0,
            duplicate_edges=0,
            runs=bed.run_summary(since=since),
        )


def _utc(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))
