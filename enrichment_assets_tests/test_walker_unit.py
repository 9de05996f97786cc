"""The walker's logic against scripted sources (httpx.MockTransport): multi-hop edges, per-batch
de-duplication, forward references, malformed fields, errors, and deferral when a source is down."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.steps.cycle import enrich_cycle

POLICY = load_policy(Path(__file__).parent / "policies" / "chain.yaml")


class Sources:
    """Scripted entity JSON per (type, id); counts requests per entity."""

    def __init__(self, data: dict[tuple[str, str], Any]) -> None:
        self.data = data
        self.hits: dict[tuple[str, str], int] = {}
        self.requests: Counter[str] = Counter()
        self.down: set[str] = set()

    def transport(self, host: str) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            if host in self.down:
                return httpx.Response(503)
            parts = request.url.path.split("/")  # /api/<type>/<id> or /api/<type>?ids=
            etype = parts[2]
            ids = request.url.params.get_list("ids") if len(parts) == 3 else [parts[3]]
            self.requests[etype] += 1
            for i in ids:
                self.hits[(etype, i)] = self.hits.get((etype, i), 0) + 1
            if len(parts) == 3:
                items = [self.data[(etype, i)] for i in ids if (etype, i) in self.data]
                return httpx.Response(
                    200, json={"items": items, "missing": [i for i in ids if (etype, i) not in self.data]}
                )
            body = self.data.get((etype, ids[0]))
            return httpx.Response(404) if body is None else httpx.Response(200, json=body)

        return httpx.MockTransport(handle)


def cycle(
    store: FactStore, sources: Sources, types: list[str] | None = None, *, policy: Policy = POLICY, **kwargs: Any
):
    async def run():
        transports = {"alpha": sources.transport("alpha"), "beta": sources.transport("beta")}
        async with SourcePool(policy, transports=transports) as pool:
            return await enrich_cycle(store, policy, pool, owner="test", entity_types=types, **kwargs)

    return {r.entity_type: r for r in asyncio.run(run())}


def graph() -> Sources:
    data = {
        ("a", "a1"): {"id": "a1", "b_id": "b1", "c_ids": ["c9"]},
        ("a", "a2"): {"id": "a2", "b_id": "b1"},
        ("b", "b1"): {"id": "b1", "cells": [{"c_id": "c1"}, {"c_id": "c2"}, {"c_id": "c1"}]},
        ("c", "c1"): {"id": "c1"},
        ("c", "c2"): {"id": "c2"},
        ("c", "c9"): {"id": "c9"},
    }
    return Sources(data)


def edges(store: FactStore, entity_id: str) -> set[tuple[str, str]]:
    return {(e["relation"], e["dst_id"]) for e in store.edges_of("a", entity_id)}


@pytest.fixture
def store(database_url: str) -> FactStore:
    fact_store = FactStore.from_url(database_url)
    fact_store.ingest_events([Event(entity_type="a", entity_id=i, event_type="created") for i in ("a1", "a2")])
    return fact_store


def test_multi_hop_edges_with_provenance_and_shared_hops_fetched_once(store: FactStore) -> None:
    sources = graph()
    report = cycle(store, sources, ["a"])["a"]
    assert edges(store, "a1") == {("reaches", "c1"), ("reaches", "c2"), ("direct", "c9")}
    assert edges(store, "a2") == {("reaches", "c1"), ("reaches", "c2")}
    assert sources.hits[("b", "b1")] == 1 and sources.hits[("c", "c1")] == 1, "shared hops fetched once"
    [reach] = [e for e in store.edges_of("a", "a1") if e["dst_id"] == "c1"]
    assert reach["path"] == [["a", "a1"], ["b", "b1"], ["c", "c1"]]
    assert report.result.enriched == 2 and report.result.edges_asserted == 5
    assert store.get_entity("a", "a1").state == "fully_enriched"
    assert store.get_entity("b", "b1").attributes["cells"][0] == {"c_id": "c1"}, "hops are stored"
    assert {("a", "a1"), ("a", "a2"), ("c", "c1"), ("c", "c2"), ("c", "c9")} <= report.changed


def test_hops_are_reused_from_the_store_while_fresh(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources, ["a"])
    before = dict(sources.hits)
    report = cycle(store, sources, ["b", "c"])
    assert report["b"].cache_hits == 1 and report["c"].cache_hits == 3
    assert sources.hits == before, "their own enrichment made no source call"
    assert store.get_entity("b", "b1").state == "fully_enriched"


def test_a_hop_settled_on_its_reused_hydration_is_not_fetched_again(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources, ["a"])
    cycle(store, sources, ["b", "c"])
    sources.data[("a", "a3")] = {"id": "a3", "b_id": "b1"}
    store.ingest_events([Event(entity_type="a", entity_id="a3", event_type="created")])
    before = dict(sources.hits)
    report = cycle(store, sources, ["a"])["a"]
    assert report.result.enriched == 1 and edges(store, "a3") == {("reaches", "c1"), ("reaches", "c2")}
    assert {k: n - before.get(k, 0) for k, n in sources.hits.items() if n != before.get(k)} == {("a", "a3"): 1}


def test_missing_hop_is_a_forward_reference_then_resolves(store: FactStore) -> None:
    sources = graph()
    sources.data.pop(("c", "c2"))
    report = cycle(store, sources, ["a"])["a"]
    assert report.result.partial == 2
    record = store.get_entity("a", "a2")
    assert record.state == "partially_resolved" and record.waiting_on == [["c", "c2"]]
    assert edges(store, "a2") == {("reaches", "c1")}, "what resolved is asserted"
    sources.data[("c", "c2")] = {"id": "c2"}
    store.ingest_events([Event(entity_type="c", entity_id="c2", event_type="created")])
    report = cycle(store, sources, ["a"])["a"]
    assert report.result.enriched == 2
    assert edges(store, "a2") == {("reaches", "c1"), ("reaches", "c2")}


def test_malformed_field_fails_the_root_with_the_field_named(store: FactStore) -> None:
    sources = graph()
    sources.data[("b", "b1")] = {"id": "b1", "cells": {"c_id": "c1"}}
    report = cycle(store, sources, ["a"])["a"]
    assert report.result.failed == 2
    record = store.get_entity("a", "a1")
    assert "cells[*].c_id" in record.last_error and record.attempts == 1
    assert edges(store, "a1") == set()


def test_source_down_defers_without_counting_an_attempt(store: FactStore) -> None:
    sources = graph()
    sources.down.add("beta")
    report = cycle(store, sources, ["a"])["a"]
    assert report.result.deferred + report.result.failed == 2
    record = store.get_entity("a", "a1")
    assert record.state == "uncached" and record.last_error
    assert report.errors_by_source["beta"] >= 1


def test_changed_path_retracts_the_old_edge(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources, ["a"])
    sources.data[("b", "b1")] = {"id": "b1", "cells": [{"c_id": "c2"}]}
    store.ingest_events(
        [
            Event(entity_type="a", entity_id="a2", event_type="updated"),
            Event(entity_type="b", entity_id="b1", event_type="updated"),
        ]
    )
    report = cycle(store, sources, ["a"])["a"]
    assert edges(store, "a2") == {("reaches", "c2")}
    retracted = {(c.src_id, c.dst_id) for c in report.result.edge_changes if c.change == "retracted"}
    assert retracted == {("a2", "c1"), ("a1", "c1")}, "a1 walks through the changed b1 too"
    assert report.propagated == 1


def test_a_changed_hop_makes_the_roots_through_it_due_again(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources)
    assert store.get_entity("a", "a2").state == "fully_enriched"
    sources.data[("b", "b1")] = {"id": "b1", "cells": [{"c_id": "c2"}]}
    store.ingest_events([Event(entity_type="b", entity_id="b1", event_type="updated")])
    report = cycle(store, sources)
    assert report["b"].propagated == 2, "b1's referrers a1 and a2 are due again"
    assert store.get_entity("a", "a2").state == "uncached"
    cycle(store, sources)
    assert edges(store, "a2") == {("reaches", "c2")}
    assert edges(store, "a1") == {("reaches", "c2"), ("direct", "c9")}


def test_a_changed_path_end_propagates_nothing(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources)
    sources.data[("c", "c1")] = {"id": "c1", "label": "renamed"}
    store.ingest_events([Event(entity_type="c", entity_id="c1", event_type="updated")])
    report = cycle(store, sources)
    assert report["c"].propagated == 0
    assert store.get_entity("a", "a1").state == "fully_enriched"


def test_a_tombstone_retracts_the_edges_that_reach_it(store: FactStore) -> None:
    sources = graph()
    cycle(store, sources)
    store.ingest_events([Event(entity_type="c", entity_id="c1", event_type="deleted")])
    report = cycle(store, sources)
    assert report["c"].result.deleted == 1
    assert {(c.src_id, c.relation) for c in report["c"].result.edge_changes} == {("a1", "reaches"), ("a2", "reaches")}
    assert edges(store, "a1") == {("reaches", "c2"), ("direct", "c9")}
    assert store.get_entity("c", "c1").state == "deleted" and not store.due_work()


def many_roots(store: FactStore, sources: Sources, count: int) -> list[str]:
    ids = [f"m{n:02d}" for n in range(count)]
    for i in ids:
        sources.data[("a", i)] = {"id": i, "b_id": "b1"}
    store.ingest_events([Event(entity_type="a", entity_id=i, event_type="created") for i in ids])
    return ids


def batch_requests(sources: Sources, etype: str) -> int:
    return sources.requests[etype]


def test_part_full_batches_are_topped_up_with_entities_due_anyway(store: FactStore) -> None:
    sources = graph()
    ids = many_roots(store, sources, 23)  # 25 a's in all, claimed 12 at a time, batches of 10
    report = cycle(store, sources, ["a"], batch_size=12)["a"]
    assert report.result.enriched == 25
    assert {sources.hits[("a", i)] for i in ["a1", "a2", *ids]} == {1}, "each fetched once"
    assert batch_requests(sources, "a") == 3, "ceil(25 / 10): only the very last request is part-full"
    # Claim 1 fetches its 12 roots in two requests and fills the second with 8 more; which of the
    # rest claim 2 takes is up to the queue, and the last of them may be a filler too.
    assert report.prefetched in (8, 9)
    assert all(store.get_entity("a", i).state == "fully_enriched" for i in ids)


def test_a_filler_the_source_does_not_have_is_left_for_its_own_claim(store: FactStore) -> None:
    sources = graph()
    store.ingest_events([Event(entity_type="a", entity_id="late", event_type="created")])
    store.claim("a", limit=1, owner="someone-else", lease=timedelta(minutes=5))  # leases a1: not a filler
    report = cycle(store, sources, ["a"], batch_size=1, max_batches=1)["a"]
    assert report.prefetched == 1 and sources.hits[("a", "late")] == 1
    assert not report.errors_by_source
    late = store.get_entity("a", "late")
    assert late.state == "uncached" and late.attempts == 0 and late.attributes is None, "a 404 filler is untouched"
    assert ("a", "a1") not in sources.hits, "an entity leased to another worker is never a filler"


def test_filling_can_be_turned_off_per_source(store: FactStore, tmp_path: Path) -> None:
    text = (Path(__file__).parent / "policies" / "chain.yaml").read_text()
    path = tmp_path / "chain.yaml"
    path.write_text(text.replace("    max_batch_size: 10\n", "    max_batch_size: 10\n    fill_batches: false\n"))
    sources = graph()
    many_roots(store, sources, 23)
    report = cycle(store, sources, ["a"], batch_size=12, policy=load_policy(path))["a"]
    assert report.result.enriched == 25 and report.prefetched == 0
    assert batch_requests(sources, "a") == 5, "2 + 2 + 1: every claim ends in a part-full request"
