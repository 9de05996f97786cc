"""Search against the Elasticsearch-compatible server and real PostgreSQL: both ends of a changed edge
are re-indexed, an older version never overwrites a newer document, a full rebuild keeps searches
answering, reconciliation finds and repairs drift, tombstones leave the index and update the other
ends, and an entity ingested but not yet enriched is searchable as pending."""

from __future__ import annotations

import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import DerivedEdge, FactStore, Outcome, RetryPolicy
from enrichment_assets.factstore.schema import entities
from enrichment_assets.policy import load_policy
from enrichment_assets.search import (
    Action,
    SearchIndex,
    document_id,
    rebuild_index,
    reconcile,
    sync_changed,
    sync_index,
)

POLICY = load_policy(Path(__file__).parent / "policies" / "chain.yaml")
LEASE = timedelta(minutes=5)


@pytest.fixture
def store(pg_store: FactStore) -> FactStore:
    return pg_store


def ingest(store: FactStore, entity_type: str, *ids: str, event_type: str = "created") -> None:
    store.ingest_events([Event(entity_type=entity_type, entity_id=i, event_type=event_type) for i in ids])


def enrich(
    store: FactStore, entity_type: str, names: dict[str, str], edges: dict[str, list[tuple[str, str]]] | None = None
):
    claims = store.claim(entity_type, limit=100, owner="t", lease=LEASE)
    outcomes = []
    for claim in claims:
        derived = tuple(
            DerivedEdge(rel, "c", dst, ((entity_type, claim.entity_id), ("c", dst)))
            for rel, dst in (edges or {}).get(claim.entity_id, [])
        )
        outcomes.append(
            Outcome.of(
                claim,
                "enriched",
                attributes={"id": claim.entity_id, "name": names.get(claim.entity_id, claim.entity_id)},
                edges=derived,
            )
        )
    return store.finish("t", outcomes, RetryPolicy())


def doc(index: SearchIndex, entity_type: str, entity_id: str) -> dict | None:
    index.refresh()
    answer = index.client.options(ignore_status=404).get(index=index.alias, id=document_id(entity_type, entity_id))
    return answer["_source"] if answer.get("found") else None


def relations(document: dict) -> set[tuple[str, str, str]]:
    return {(r["relation"], r["direction"], r["other_id"]) for r in document["relationships"]}


def test_pending_entity_is_searchable_as_pending(store: FactStore, search_index: SearchIndex) -> None:
    ingest(store, "a", "fresh-one")
    report = sync_index(store, POLICY, search_index)
    assert report.indexed == 1 and not report.failures
    search_index.refresh()
    [hit] = search_index.search("fresh-one")
    assert (hit["state"], hit["last_enriched_at"], hit["version"]) == ("pending", None, 1)
    assert store.index_backlog(limit=10) == [], "acknowledged"


def test_both_ends_of_a_changed_edge_are_reindexed(store: FactStore, search_index: SearchIndex, clock) -> None:
    ingest(store, "c", "c1", "c2")
    enrich(store, "c", {"c1": "Cell One", "c2": "Cell Two"})
    ingest(store, "a", "a1")
    enrich(store, "a", {"a1": "Alpha"}, {"a1": [("reaches", "c1")]})
    sync_index(store, POLICY, search_index)
    assert relations(doc(search_index, "a", "a1")) == {("reaches", "out", "c1")}
    assert relations(doc(search_index, "c", "c1")) == {("reaches", "in", "a1")}
    assert doc(search_index, "c", "c1")["relationships"][0]["other_name"] == "Alpha"

    clock.advance(minutes=1)
    ingest(store, "a", "a1", event_type="updated")
    result = enrich(store, "a", {"a1": "Alpha"}, {"a1": [("reaches", "c2")]})
    assert {(c.dst_id, c.change) for c in result.edge_changes} == {("c1", "retracted"), ("c2", "asserted")}
    backlog = set(store.index_backlog(limit=10))
    assert backlog == {("a", "a1"), ("c", "c1"), ("c", "c2")}, "the root and both other ends"
    sync_index(store, POLICY, search_index)
    assert relations(doc(search_index, "a", "a1")) == {("reaches", "out", "c2")}
    assert relations(doc(search_index, "c", "c1")) == set()
    assert relations(doc(search_index, "c", "c2")) == {("reaches", "in", "a1")}


def test_an_older_version_never_overwrites_a_newer_document(store: FactStore, search_index: SearchIndex) -> None:
    ingest(store, "a", "a1")
    sync_index(store, POLICY, search_index)
    enrich(store, "a", {"a1": "New name"})
    sync_index(store, POLICY, search_index)
    newest = doc(search_index, "a", "a1")
    assert newest["name"] == "New name" and newest["version"] == 2
    late = search_index.write([Action(document_id("a", "a1"), 1, {**newest, "name": "Old name", "version": 1})])
    assert late.superseded == 1 and not late.failures
    assert doc(search_index, "a", "a1")["name"] == "New name"
    replay = search_index.write([Action(document_id("a", "a1"), 2, {**newest, "name": "Replayed"})])
    assert replay.superseded == 1, "the same version is not written twice either"
    assert doc(search_index, "a", "a1")["name"] == "New name"


def test_tombstone_removes_the_document_and_updates_the_other_ends(store: FactStore, search_index: SearchIndex) -> None:
    ingest(store, "c", "c1")
    enrich(store, "c", {"c1": "Cell"})
    ingest(store, "a", "a1")
    enrich(store, "a", {"a1": "Alpha"}, {"a1": [("reaches", "c1")]})
    sync_index(store, POLICY, search_index)
    ingest(store, "c", "c1", event_type="deleted")
    [tombstone] = store.claim("c", limit=10, owner="t", lease=LEASE)
    store.finish("t", [Outcome.of(tombstone, "deleted")], RetryPolicy())
    report = sync_index(store, POLICY, search_index)
    assert report.deleted == 1
    assert doc(search_index, "c", "c1") is None
    assert relations(doc(search_index, "a", "a1")) == set()


def test_reconciliation_finds_and_repairs_a_deleted_and_a_stale_document(
    store: FactStore, search_index: SearchIndex
) -> None:
    ingest(store, "a", *(f"a{i}" for i in range(20)))
    enrich(store, "a", {})
    sync_index(store, POLICY, search_index)
    assert reconcile(store, search_index, POLICY, exact=True).in_sync
    search_index.client.delete(index=search_index.alias, id=document_id("a", "a3"), refresh=True)
    # A write the index lost after acknowledging: the store moves on, the document does not.
    ingest(store, "a", "a7", event_type="updated")
    enrich(store, "a", {"a7": "renamed"})
    store.mark_indexed([(("a", "a7"), store.get_entity("a", "a7").doc_version)])
    assert store.index_backlog(limit=10) == []
    report = reconcile(store, search_index, POLICY, exact=True)
    assert (report.missing, report.stale, report.extra) == ([("a", "a3")], [("a", "a7")], [])
    assert report.counts["a"] == (20, 19) and not report.in_sync
    sampled = reconcile(store, search_index, POLICY, sample=20)
    assert set(sampled.missing) == {("a", "a3")} and set(sampled.stale) == {("a", "a7")}
    repaired = reconcile(store, search_index, POLICY, exact=True, repair=True)
    assert repaired.repaired is not None and repaired.repaired.indexed >= 1
    assert reconcile(store, search_index, POLICY, exact=True).in_sync
    assert doc(search_index, "a", "a3") is not None and doc(search_index, "a", "a7")["name"] == "renamed"


def test_a_document_ahead_of_a_store_whose_versions_went_back_is_found_and_rewritten(
    store: FactStore, search_index: SearchIndex
) -> None:
    """A store restored from an older backup (or rebuilt beside an old index): the index's external
    versions are higher, every write is refused as superseded, and only reconciliation can tell."""
    ingest(store, "a", "a1", "a2")
    enrich(store, "a", {"a1": "the index's old name"})
    sync_index(store, POLICY, search_index)
    before = store.get_entity("a", "a1").doc_version
    with store.engine.begin() as conn:  # the restore: versions back to 1, the name changed meanwhile
        conn.execute(
            sa.update(entities)
            .where(entities.c.entity_id == "a1")
            .values(doc_version=1, indexed_version=0, attributes={"name": "the store's name"})
        )
    assert before > 1
    sync_index(store, POLICY, search_index)
    assert doc(search_index, "a", "a1")["name"] == "the index's old name", "refused as superseded"
    report = reconcile(store, search_index, POLICY, exact=True)
    assert (report.ahead, report.stale, report.missing) == ([("a", "a1")], [], []) and not report.in_sync
    reconcile(store, search_index, POLICY, exact=True, repair=True)
    assert doc(search_index, "a", "a1")["name"] == "the store's name"
    assert reconcile(store, search_index, POLICY, exact=True).in_sync


def test_full_rebuild_keeps_searches_answering(store: FactStore, search_index: SearchIndex) -> None:
    ingest(store, "a", *(f"a{i:04d}" for i in range(3000)))
    enrich_all = store.claim("a", limit=5000, owner="t", lease=LEASE)
    store.finish(
        "t", [Outcome.of(c, "enriched", attributes={"name": f"model {c.entity_id}"}) for c in enrich_all], RetryPolicy()
    )
    sync_index(store, POLICY, search_index)
    search_index.refresh()
    before = search_index.current_indices()
    errors: list[BaseException] = []
    empty = 0
    searches = 0
    stop = threading.Event()

    def search_loop() -> None:
        nonlocal empty, searches
        while not stop.is_set():
            try:
                hits = search_index.search("model", size=5)
                searches += 1
                empty += not hits
            except BaseException as error:  # collected for the assertion
                errors.append(error)

    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        new_index, report = rebuild_index(store, POLICY, search_index, batch_size=500)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and empty == 0 and searches > 5
    assert search_index.current_indices() == [new_index] and new_index not in before
    assert not report.failures
    assert reconcile(store, search_index, POLICY, exact=True).in_sync


def test_a_hub_document_lists_its_first_edges_per_relation_and_counts_them_all(
    store: FactStore, search_index: SearchIndex
) -> None:
    cap = POLICY.defaults.document_relationship_cap
    ingest(store, "c", "hub")
    enrich(store, "c", {"hub": "Hub"})
    spokes = [f"a{i:04d}" for i in range(cap + 80)]
    ingest(store, "a", *spokes)
    for _ in range(2):  # enrich() claims 100 at a time
        enrich(store, "a", {}, {s: [("reaches", "hub")] for s in spokes})
    assert sync_index(store, POLICY, search_index).failures == {}
    hub = doc(search_index, "c", "hub")
    incoming = [r for r in hub["relationships"] if r["direction"] == "in"]
    assert len(incoming) == cap
    assert {r["other_id"] for r in incoming} == set(spokes[:cap]), "the first ones by id"
    assert hub["relationship_totals"] == [
        {"relation": "reaches", "direction": "in", "derived": True, "total": len(spokes)}
    ]
    assert len(store.edges_of("c", "hub", direction="in")) == len(spokes), "the full list stays in the store"
    spoke = doc(search_index, "a", spokes[-1])
    assert spoke["relationship_totals"] == [{"relation": "reaches", "direction": "out", "derived": True, "total": 1}]


def test_read_ahead_keeps_order_and_hands_over_the_producers_error() -> None:
    from enrichment_assets.search.sync import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("the store went away")

    seen = []
    with pytest.raises(ValueError, match="went away"):
        for item in read_ahead(failing()):
            seen.append(item)
    assert seen == [1]
    abandoned = read_ahead(iter(range(10**6)))
    assert next(abandoned) == 0
    abandoned.close()  # the consumer stops early: the producer thread stops too


def test_one_outbox_drain_at_a_time_across_processes(store: FactStore, search_index: SearchIndex) -> None:
    """Another process's drain (a second engine, so a second session) holds the lock: this sync waits
    for it instead of racing it for the same documents, then writes what is still behind."""
    ingest(store, "a", "a1", "a2")
    other = FactStore.from_url(store.engine.url.render_as_string(hide_password=False))
    finished = threading.Event()
    reports = []

    def drain() -> None:
        reports.append(sync_index(store, POLICY, search_index))
        finished.set()

    try:
        with other.draining_outbox():
            worker = threading.Thread(target=drain)
            worker.start()
            assert not finished.wait(1.5), "the second drain waits for the first"
            assert doc(search_index, "a", "a1") is None
        assert finished.wait(30)
        worker.join()
    finally:
        other.dispose()
    [report] = reports
    assert report.indexed == 2 and report.superseded == 0
    assert report.waited_seconds >= 1.0
    assert doc(search_index, "a", "a2")["state"] == "pending"
    with store.draining_outbox():
        pass  # released: taking it again does not block


def test_a_run_writes_its_own_documents_at_once_and_leaves_the_rest_to_a_running_drain(
    store: FactStore, search_index: SearchIndex
) -> None:
    ingest(store, "a", "a1", "a2", "a3")
    other = FactStore.from_url(store.engine.url.render_as_string(hide_password=False))
    try:
        with other.draining_outbox() as held:
            assert held
            own, drained = sync_changed(store, POLICY, search_index, [("a", "a1")])
            assert drained is None, "another process is draining: the rest is left to it, without waiting"
            assert own.indexed == 1 and own.changed == {("a", "a1")}
            assert doc(search_index, "a", "a1")["state"] == "pending"
            assert doc(search_index, "a", "a2") is None
            assert set(store.index_backlog(limit=10)) == {("a", "a2"), ("a", "a3")}
    finally:
        other.dispose()

    own, drained = sync_changed(store, POLICY, search_index, [("a", "a1")])
    assert own.indexed == 0, "already written at its version"
    assert drained is not None and drained.changed == {("a", "a2"), ("a", "a3")}
    assert store.index_backlog(limit=10) == []


def test_a_drain_looks_at_the_outbox_again_after_letting_the_lock_go(
    store: FactStore, search_index: SearchIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that enqueues while this drain holds the lock skips draining (sync_changed). If it enqueued
    after this drain's last look, only a look after the lock goes catches it: here, on the CLI's path."""
    from enrichment_assets.search import sync

    ingest(store, "a", "a1")
    real_drain, late = sync._drain, iter([("a", "a2")])

    def drain_then_someone_enqueues(*args, **kwargs):
        report = real_drain(*args, **kwargs)
        for key in late:  # once: after the drain's last look, before the lock goes
            ingest(store, *key)
        return report

    monkeypatch.setattr(sync, "_drain", drain_then_someone_enqueues)
    report = sync_index(store, POLICY, search_index)
    assert report.changed == {("a", "a1"), ("a", "a2")}
    assert store.index_backlog(limit=10) == []


def test_a_bulk_request_that_times_out_fails_its_documents_and_keeps_them_in_the_outbox(
    store: FactStore, search_index: SearchIndex
) -> None:
    """A server that takes the connection and never answers (a real socket, nothing accepted): the
    client times out, which the bulk helpers raise rather than report per item."""
    from elasticsearch import Elasticsearch

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        client = Elasticsearch(f"http://127.0.0.1:{silent.getsockname()[1]}", request_timeout=0.3, max_retries=0)
        stalled = SearchIndex(client, alias=search_index.alias)
        ingest(store, "a", "a1", "a2")
        own, _ = sync_changed(store, POLICY, stalled, [("a", "a1"), ("a", "a2")])
        client.close()
    assert set(own.failures) == {document_id("a", "a1"), document_id("a", "a2")}
    assert all("ConnectionTimeout" in reason for reason in own.failures.values())
    assert set(store.index_behind([("a", "a1"), ("a", "a2")])) == {("a", "a1"), ("a", "a2")}, "nothing acknowledged"
    sync_index(store, POLICY, search_index)
    assert doc(search_index, "a", "a1")["state"] == "pending" and not store.index_behind([("a", "a1"), ("a", "a2")])
