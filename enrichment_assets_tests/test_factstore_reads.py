"""The read API's one-statement edge lookup, on both backends: state and freshness with the first live
edges and their total, both directions, a relation filter, retracted edges left out; and on PostgreSQL
a reader connection the server dropped costs nothing but a retry."""

from __future__ import annotations

from datetime import timedelta

import pytest
import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import DerivedEdge, FactStore, Outcome, RetryPolicy, reads


def _enrich(store: FactStore, entity_type: str, edges_of: dict[str, tuple[DerivedEdge, ...]]) -> None:
    claims = store.claim(entity_type, limit=len(edges_of), owner="w", lease=timedelta(minutes=1))
    store.finish(
        "w", [Outcome.of(c, "enriched", attributes={}, edges=edges_of[c.entity_id]) for c in claims], RetryPolicy()
    )


def _edge(relation: str, src: str, dst: str) -> DerivedEdge:
    return DerivedEdge(relation, "other", dst, (("thing", src), ("other", dst)))


def _build(store: FactStore, clock) -> FactStore:
    store.ingest_events(
        [
            Event(entity_type="thing", entity_id=i, event_type="created")
            for i in ("root", "bare", *(f"spoke{n}" for n in range(4)))
        ]
    )
    edges = {
        "root": (*(_edge("near", "root", f"o{n}") for n in (2, 0, 1)), _edge("far", "root", "o9")),
        "bare": (),
        **{f"spoke{n}": (_edge("near", f"spoke{n}", "hub"),) for n in range(4)},
    }
    _enrich(store, "thing", edges)
    clock.advance(seconds=42)
    return store


@pytest.fixture
def graph(store: FactStore, clock) -> FactStore:
    """root -> near x3 and far x1; spoke0..3 -> near hub."""
    return _build(store, clock)


def test_first_edges_and_total_in_one_lookup(graph: FactStore) -> None:
    found = graph.entity_edges("thing", "root", limit=2)
    assert (found.state, found.total, found.truncated) == ("fully_enriched", 4, True)
    assert [(e["relation"], e["dst_id"]) for e in found.edges] == [("far", "o9"), ("near", "o0")]
    assert found.staleness_seconds(graph.now()) == 42.0

    near = graph.entity_edges("thing", "root", relation="near", limit=10)
    assert (near.total, near.truncated, [e["dst_id"] for e in near.edges]) == (3, False, ["o0", "o1", "o2"])
    [first] = graph.entity_edges("thing", "root", relation="near", limit=1).edges
    assert first["path"] == [["thing", "root"], ["other", "o0"]] and first["policy"]


def test_edges_into_an_entity_and_entities_without_edges(graph: FactStore) -> None:
    graph.ingest_events([Event(entity_type="other", entity_id="hub", event_type="created")])
    into = graph.entity_edges("other", "hub", direction="in", limit=3)
    assert (into.total, [e["src_id"] for e in into.edges]) == (4, ["spoke0", "spoke1", "spoke2"])
    assert into.state == "uncached" and into.staleness_seconds(graph.now()) is None

    bare = graph.entity_edges("thing", "bare", limit=5)
    assert (bare.edges, bare.total, bare.truncated) == ([], 0, False)
    assert graph.entity_edges("thing", "nobody", limit=5) is None
    with pytest.raises(ValueError, match="direction"):
        graph.entity_edges("thing", "root", direction="sideways", limit=5)  # type: ignore[arg-type]


def test_retracted_edges_are_not_read(graph: FactStore) -> None:
    graph.ingest_events([Event(entity_type="thing", entity_id="root", event_type="updated")])
    _enrich(graph, "thing", {"root": (_edge("near", "root", "o1"),)})
    found = graph.entity_edges("thing", "root", limit=10)
    assert (found.total, [e["dst_id"] for e in found.edges]) == (1, ["o1"])
    assert len(graph.edges_of("thing", "root", include_retracted=True)) == 4, "history is kept"


@pytest.mark.parametrize(
    "direction, entity, relation",
    [
        ("out", ("thing", "root"), None),
        ("out", ("thing", "root"), "near"),
        ("in", ("other", "hub"), "near"),
        ("in", ("other", "o0"), None),
        ("out", ("thing", "bare"), None),
        ("out", ("thing", "nobody"), "near"),
    ],
    ids=["out-all", "out-relation", "in-relation", "in-all", "no-edges", "unknown"],
)
def test_the_prepared_lookup_answers_as_the_statement_does(
    pg_store: FactStore, clock, direction, entity, relation
) -> None:
    _build(pg_store, clock)
    pg_store.ingest_events([Event(entity_type="other", entity_id=i, event_type="created") for i in ("hub", "o0")])
    with pg_store.engine.connect() as conn:
        plain = reads.edge_lookup(conn, *entity, relation=relation, direction=direction, limit=2)
    prepared = pg_store.entity_edges(*entity, relation=relation, direction=direction, limit=2)  # type: ignore[arg-type]
    assert prepared == plain
    if plain is not None and plain.edges:
        assert plain.edges[0]["asserted_at"].utcoffset() == timedelta(0)


def test_a_reader_connection_dropped_by_the_server_is_retried(pg_store: FactStore) -> None:
    pg_store.ingest_events([Event(entity_type="thing", entity_id="a", event_type="created")])
    assert pg_store.entity_edges("thing", "a", limit=5) is not None  # opens the reader pool
    with pg_store.engine.connect() as conn:
        dropped = conn.execute(
            sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ).scalar_one()
    assert dropped >= 1, "the reader's pooled connection was open"
    found = pg_store.entity_edges("thing", "a", limit=5)
    assert found is not None and found.state == "uncached"
