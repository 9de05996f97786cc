"""Graph writes on both backends: derived edges asserted idempotently with provenance, retracted (with
history) only after a complete walk, tombstones retracting both ends, references replaced per entity,
hydrations recorded without disturbing other workers, forward-reference waiters woken on arrival, and the
document sources search documents are built from."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import DerivedEdge, FactStore, Outcome, ReferenceFact, RetryPolicy
from enrichment_assets.factstore.schema import edges, references

LEASE = timedelta(minutes=5)
RETRY = RetryPolicy()


def ingest(store: FactStore, *ids: str, entity_type: str = "thing", event_type: str = "created") -> None:
    store.ingest_events([Event(entity_type=entity_type, entity_id=i, event_type=event_type) for i in ids])


def edge(relation: str, dst: str, via: str = "hop") -> DerivedEdge:
    return DerivedEdge(relation, "other", dst, (("thing", "root"), ("thing", via), ("other", dst)))


def walk(store: FactStore, status: str, *derived: DerivedEdge, **kwargs: object):
    claims = store.claim("thing", limit=10, owner="w", lease=LEASE)
    [claim] = [c for c in claims if c.entity_id == "root"]
    return store.finish("w", [Outcome.of(claim, status, attributes={}, edges=derived, **kwargs)], RETRY)


def live(store: FactStore) -> set[tuple[str, str]]:
    return {(e["relation"], e["dst_id"]) for e in store.edges_of("thing", "root")}


def test_complete_walk_asserts_edges_with_provenance(store: FactStore, clock) -> None:
    ingest(store, "root")
    result = walk(store, "enriched", edge("in", "x"), edge("in", "y"))
    assert (result.edges_asserted, result.edges_retracted, result.edges_confirmed) == (2, 0, 0)
    [first, _] = store.edges_of("thing", "root")
    assert first["path"] == [["thing", "root"], ["thing", "hop"], ["other", "x"]]
    assert first["policy"] == "thing" and first["kind"] == "deterministic"
    assert first["asserted_at"] == first["confirmed_at"] == clock.now


def test_rewalking_confirms_without_duplicates(store: FactStore, clock) -> None:
    ingest(store, "root")
    walk(store, "enriched", edge("in", "x"))
    asserted = clock.now
    clock.advance(minutes=1)
    ingest(store, "root", event_type="updated")
    result = walk(store, "enriched", edge("in", "x"))
    assert (result.edges_asserted, result.edges_confirmed) == (0, 1)
    [row] = store.edges_of("thing", "root")
    assert (row["asserted_at"], row["confirmed_at"]) == (asserted, clock.now)
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(edges)).scalar() == 1


def test_complete_walk_retracts_what_no_longer_holds_and_keeps_history(store: FactStore, clock) -> None:
    ingest(store, "root")
    walk(store, "enriched", edge("in", "old"))
    clock.advance(minutes=1)
    ingest(store, "root", event_type="updated")
    result = walk(store, "enriched", edge("in", "new"))
    assert {(c.dst_id, c.change) for c in result.edge_changes} == {("new", "asserted"), ("old", "retracted")}
    assert live(store) == {("in", "new")}
    [retracted] = [e for e in store.edges_of("thing", "root", include_retracted=True) if e["dst_id"] == "old"]
    assert retracted["retracted_at"] == clock.now, "retraction is a fact; the row is kept"


def test_reasserting_a_retracted_edge_starts_a_new_assertion(store: FactStore, clock) -> None:
    ingest(store, "root")
    walk(store, "enriched", edge("in", "x"))
    ingest(store, "root", event_type="updated")
    walk(store, "enriched")
    assert live(store) == set()
    clock.advance(minutes=5)
    ingest(store, "root", event_type="updated")
    result = walk(store, "enriched", edge("in", "x"))
    assert result.edges_asserted == 1
    [row] = store.edges_of("thing", "root")
    assert (row["asserted_at"], row["retracted_at"]) == (clock.now, None)


def test_partial_walk_asserts_but_retracts_nothing(store: FactStore) -> None:
    ingest(store, "root")
    walk(store, "enriched", edge("in", "x"), edge("in", "y"))
    ingest(store, "root", event_type="updated")
    result = walk(store, "partial", edge("in", "z"), waiting_on=(("other", "y"),))
    assert result.edges_retracted == 0
    assert live(store) == {("in", "x"), ("in", "y"), ("in", "z")}


def test_failed_and_superseded_results_write_no_edges(store: FactStore, clock) -> None:
    ingest(store, "root")
    assert walk(store, "failed", edge("in", "x"), error="boom").edge_changes == ()
    clock.advance(hours=1)
    [claim] = store.claim("thing", limit=10, owner="w", lease=LEASE)
    ingest(store, "root", event_type="updated")
    result = store.finish("w", [Outcome.of(claim, "enriched", attributes={}, edges=(edge("in", "x"),))], RETRY)
    assert result.superseded == 1 and result.edge_changes == ()
    assert live(store) == set()


def test_tombstone_retracts_edges_at_both_ends(store: FactStore) -> None:
    ingest(store, "root")
    walk(store, "enriched", edge("in", "x"), edge("in", "y"))
    ingest(store, "other-root")
    [claim] = store.claim("thing", limit=1, owner="w", lease=LEASE)
    store.finish(
        "w",
        [
            Outcome(
                claim.entity_type,
                claim.entity_id,
                claim.version,
                "enriched",
                attributes={},
                edges=(DerivedEdge("in", "other", "x", ()),),
            )
        ],
        RETRY,
    )
    ingest(store, "x", entity_type="other", event_type="deleted")
    [tombstone] = store.claim("other", limit=10, owner="w", lease=LEASE)
    result = store.finish("w", [Outcome.of(tombstone, "deleted")], RETRY)
    assert sorted((c.src_id, c.dst_id) for c in result.edge_changes) == [("other-root", "x"), ("root", "x")]
    assert live(store) == {("in", "y")}


def test_finish_settles_a_batch_in_one_statement_per_page_on_postgresql(pg_store: FactStore) -> None:
    ingest(pg_store, "root", "r2", "r3")
    ingest(pg_store, "x", entity_type="other")
    documents_before = pg_store.get_entity("other", "x").doc_version
    claims = pg_store.claim("thing", limit=10, owner="w", lease=LEASE)
    updates: list[bool] = []

    def count(conn, cursor, statement: str, parameters, context, executemany: bool) -> None:
        if statement.startswith("UPDATE entities"):
            updates.append(executemany)

    sa.event.listen(pg_store.engine, "before_cursor_execute", count)
    result = pg_store.finish(
        "w", [Outcome.of(c, "enriched", attributes={"n": c.entity_id}, edges=(edge("in", "x"),)) for c in claims], RETRY
    )
    sa.event.remove(pg_store.engine, "before_cursor_execute", count)
    assert result.enriched == 3 and result.edges_asserted == 3
    assert updates == [False, False], "one UPDATE for the outcomes, one for the other ends' documents"
    assert pg_store.get_entity("thing", "r2").attributes == {"n": "r2"}
    assert pg_store.get_entity("other", "x").doc_version == documents_before + 1


def test_references_are_replaced_per_entity(store: FactStore, clock) -> None:
    key = ("thing", "root")
    store.record_walk(
        [], {key: [ReferenceFact("run", "other", "r1", True), ReferenceFact("run", "other", "r2", False)]}
    )
    clock.advance(minutes=1)
    store.record_walk([], {key: [ReferenceFact("run", "other", "r2", True)]})
    with store.engine.connect() as conn:
        rows = {r.to_id: r for r in conn.execute(sa.select(references))}
    assert rows["r1"].retracted_at == clock.now
    assert rows["r2"].retracted_at is None and rows["r2"].resolved and rows["r2"].resolved_at == clock.now


def test_hydrations_are_reused_while_fresh_and_never_bump_versions(store: FactStore, clock) -> None:
    ingest(store, "known")
    [claim] = store.claim("thing", limit=1, owner="other-worker", lease=LEASE)
    store.record_walk([("thing", "known", {"v": 1}), ("thing", "new", {"v": 2})], {})
    assert store.get_entity("thing", "known").version == claim.version, "the other worker's claim stays valid"
    new = store.get_entity("thing", "new")
    assert (new.state, new.attributes) == ("uncached", {"v": 2})
    assert store.fresh_attributes("thing", ["known", "new", "absent"], ttl=timedelta(minutes=10)) == {
        "known": {"v": 1},
        "new": {"v": 2},
    }
    clock.advance(minutes=11)
    assert store.fresh_attributes("thing", ["known", "new"], ttl=timedelta(minutes=10)) == {}


def test_settling_on_a_reused_hydration_keeps_it_fresh(store: FactStore, clock) -> None:
    store.record_walk([("thing", "hop", {"v": 1})], {})
    clock.advance(seconds=1)
    [claim] = store.claim("thing", limit=1, owner="w", lease=LEASE)
    # No attributes: the walk reused the stored hydration instead of asking the source.
    store.finish("w", [Outcome.of(claim, "enriched")], RETRY)
    assert store.get_entity("thing", "hop").state == "fully_enriched"
    assert store.fresh_attributes("thing", ["hop"], ttl=timedelta(minutes=10)) == {"hop": {"v": 1}}


def test_an_event_makes_a_hydration_stale(store: FactStore, clock) -> None:
    store.record_walk([("thing", "a", {"v": 1})], {})
    clock.advance(seconds=1)
    ingest(store, "a", event_type="updated")
    assert store.fresh_attributes("thing", ["a"], ttl=timedelta(hours=1)) == {}


def test_waiters_wake_when_what_they_wait_on_arrives(store: FactStore, clock) -> None:
    ingest(store, "root")
    walk(store, "partial", waiting_on=(("other", "late"),))
    assert store.get_entity("thing", "root").next_attempt_at > clock.now
    assert store.wake_waiters() == 0
    clock.advance(seconds=5)
    ingest(store, "late", entity_type="other")
    assert store.wake_waiters() == 1
    assert [c.entity_id for c in store.claim("thing", limit=5, owner="w2", lease=LEASE)] == ["root"]


def test_document_sources_cap_count_and_name_every_relationship_across_key_pages(store: FactStore) -> None:
    """What a search document is built from, on both backends, for more keys than one statement takes
    (PostgreSQL pages its key arrays at 5,000, SQLite its IN lists at 500)."""
    from enrichment_assets.factstore import arrays

    cap = 3
    hops = [f"h{i}" for i in range(cap + 2)]
    ingest(store, "root", "gone")
    ingest(store, *hops, entity_type="other")
    store.record_walk(
        [("other", h, {"name": f"Hop {h}"}) for h in hops],
        {("thing", "root"): [ReferenceFact("uses", "other", h, True) for h in hops]},
    )
    walk(store, "enriched", *(edge("reaches", h) for h in hops))
    ingest(store, "gone", event_type="deleted")
    ingest(store, *(f"p{i:05d}" for i in range(arrays.PAGE)))

    keys = [("thing", f"p{i:05d}") for i in range(arrays.PAGE)] + [
        ("thing", "root"),
        ("thing", "gone"),
        ("other", "h0"),
        ("thing", "never-seen"),
    ]
    sources = {s.key: s for s in store.document_sources(keys, cap=cap)}

    assert len(sources) == arrays.PAGE + 3, "every known key once; an unknown one left out"
    root = sources[("thing", "root")]
    assert [e["dst_id"] for e in root.edges_out] == hops[:cap], "the first by the other end's id"
    assert root.edges_out[0]["path"] == [["thing", "root"], ["thing", "hop"], ["other", "h0"]]
    assert [r["to_id"] for r in root.references] == hops[:cap] and all(r["resolved"] for r in root.references)
    assert sorted((t["relation"], t["direction"], t["derived"], t["total"]) for t in root.totals) == [
        ("reaches", "out", True, len(hops)),
        ("uses", "out", False, len(hops)),
    ]
    assert root.neighbours[("other", "h1")] == {"name": "Hop h1"}
    hop = sources[("other", "h0")]
    assert [(e["src_id"], e["relation"]) for e in hop.edges_in] == [("root", "reaches")]
    assert hop.totals == [{"relation": "reaches", "direction": "in", "derived": True, "total": 1}]
    assert sources[("thing", "gone")].state == "deleted" and sources[("thing", "gone")].edges_out == []
    last = sources[("thing", f"p{arrays.PAGE - 1:05d}")]
    assert (last.state, last.edges_out, last.references, last.totals) == ("uncached", [], [], [])
