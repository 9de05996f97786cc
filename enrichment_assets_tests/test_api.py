"""The ingest and read API on a real port: batches are all-or-nothing, limits hold, writes need the
bearer token when one is set, the token never leaks, and reads report state and staleness."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore, Outcome, RetryPolicy
from enrichment_assets.settings import Settings

TOKEN = "s3cret-token-value-9f8e7d"


def ndjson(*events: dict[str, object]) -> str:
    return "\n".join(json.dumps(e) for e in events)


def ev(entity_id: str, event_type: str = "created", entity_type: str = "thing") -> dict[str, object]:
    return {"entity_type": entity_type, "entity_id": entity_id, "event_type": event_type}


def serve(store: FactStore, **settings: object) -> BackgroundServer:
    config = Settings(entity_types=frozenset({"thing", "other"}), max_events=5, max_body_bytes=4096, **settings)
    return BackgroundServer(create_app(store, config))


@pytest.fixture
def api(store: FactStore) -> Iterator[httpx.Client]:
    with serve(store) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        yield client


def snapshot(store: FactStore) -> list[tuple[str, dict[str, int]]]:
    return [(s.entity_type, s.counts) for s in store.status()]


def test_healthz(api: httpx.Client) -> None:
    response = api.get("/healthz")
    assert (response.status_code, response.json()["fact_store"]) == (200, "ok")


def test_single_event_is_accepted_and_readable(api: httpx.Client, store: FactStore, clock) -> None:
    response = api.post("/v1/events", json=ev("a/b?c=1"))
    assert response.status_code == 202
    assert response.json() == {"accepted": True, "received": 1, "entities": 1, "by_event_type": {"created": 1}}
    entity = api.get("/v1/entities/thing/a%2Fb%3Fc=1").json()
    assert (entity["entity_id"], entity["state"], entity["version"]) == ("a/b?c=1", "uncached", 1)
    assert entity["staleness_seconds"] is None and entity["last_enriched_at"] is None


def test_read_reports_staleness_after_enrichment(api: httpx.Client, store: FactStore, clock) -> None:
    api.post("/v1/events", json=ev("a")).raise_for_status()
    claims = store.claim("thing", limit=1, owner="w", lease=timedelta(minutes=1))
    store.finish("w", [Outcome.of(claims[0], "enriched", attributes={"name": "A"})], RetryPolicy())
    clock.advance(seconds=90)
    entity = api.get("/v1/entities/thing/a").json()
    assert entity["state"] == "fully_enriched"
    assert entity["staleness_seconds"] == 90
    assert entity["attributes"] == {"name": "A"}
    assert entity["attempts"] == 0


def test_unknown_entity_is_404(api: httpx.Client) -> None:
    response = api.get("/v1/entities/thing/missing")
    assert response.status_code == 404
    assert "thing/missing" in response.json()["error"]


def test_ndjson_batch_is_accepted(api: httpx.Client, store: FactStore) -> None:
    response = api.post("/v1/events", content=ndjson(ev("a"), ev("b"), ev("a", "updated"), ev("x", "deleted", "other")))
    assert response.status_code == 202
    assert response.json()["entities"] == 3
    assert snapshot(store) == [("other", {"deleted": 1}), ("thing", {"uncached": 2})]


def test_one_bad_line_rejects_the_whole_batch(api: httpx.Client, store: FactStore) -> None:
    api.post("/v1/events", json=ev("existing")).raise_for_status()
    before = snapshot(store), store.get_entity("thing", "existing")
    response = api.post(
        "/v1/events", content=ndjson(ev("new-1"), ev("existing", "deleted"), ev("bad\u0007id"), ev("new-2"))
    )
    assert response.status_code == 422
    body = response.json()
    assert body["problems"] == [{"line": 3, "message": "entity_id: entity_id must not contain control characters"}]
    assert "nothing was written" in body["error"]
    assert (snapshot(store), store.get_entity("thing", "existing")) == before


def test_unparsable_body_is_400(api: httpx.Client, store: FactStore) -> None:
    response = api.post("/v1/events", content=ndjson(ev("a")) + "\n{oops")
    assert response.status_code == 400
    assert response.json()["problems"][0]["line"] == 2
    assert store.status() == []


def test_non_utf8_body_is_400(api: httpx.Client) -> None:
    assert api.post("/v1/events", content=b"\xff\xfe{}").status_code == 400


def test_limits_are_enforced_before_anything_is_written(api: httpx.Client, store: FactStore) -> None:
    too_many = api.post("/v1/events", content=ndjson(*[ev(str(i)) for i in range(6)]))
    assert too_many.status_code == 413
    too_big = api.post("/v1/events", content=ndjson(ev("x" * 500)) + "\n" + " " * 5000)
    assert too_big.status_code == 413
    assert "4096 bytes" in too_big.json()["error"]
    assert store.status() == []


def test_writes_need_the_token_and_it_never_leaks(store: FactStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with serve(store, api_token=TOKEN) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        responses = [
            client.post("/v1/events", json=ev("a")),
            client.post("/v1/events", json=ev("a"), headers={"authorization": "Bearer wrong"}),
            client.post("/v1/events", json=ev("a"), headers={"authorization": f"Basic {TOKEN}"}),
            client.post("/v1/events", json=ev("a"), headers={"authorization": f"Bearer {TOKEN}x"}),
        ]
        assert [r.status_code for r in responses] == [401, 401, 401, 401]
        assert store.status() == []
        good = client.post("/v1/events", content=ndjson(ev("a"), ev("")), headers={"authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 422
        accepted = client.post("/v1/events", json=ev("a"), headers={"authorization": f"Bearer {TOKEN}"})
        assert accepted.status_code == 202
        assert client.get("/v1/entities/thing/a").status_code == 200, "reads stay open"
        responses += [good, accepted]
    assert all(TOKEN not in r.text and TOKEN not in str(r.headers) for r in responses)
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(Settings(api_token=TOKEN))


READ_TOKEN = "r34d-token-value-1a2b3c"


def test_reads_need_the_read_token_and_it_never_leaks(store: FactStore, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    store.ingest_events([Event(entity_type="thing", entity_id="a", event_type="created")])
    reads = ["/v1/entities/thing/a", "/v1/entities/thing/a/edges", "/v1/search?q=a"]
    with (
        serve(store, api_token=TOKEN, read_token=READ_TOKEN) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        refused = [
            client.get(path, headers=headers)
            for path in reads
            for headers in ({}, {"authorization": f"Bearer {TOKEN}"}, {"authorization": f"Bearer {READ_TOKEN}x"})
        ]
        allowed = [client.get(path, headers={"authorization": f"bearer  {READ_TOKEN}"}) for path in reads]
        open_routes = [client.get("/healthz"), client.get("/openapi.json")]
        write_with_read_token = client.post(
            "/v1/events", json=ev("b"), headers={"authorization": f"Bearer {READ_TOKEN}"}
        )
    assert {(r.status_code, r.json()["error"]) for r in refused} == {(401, "missing or invalid bearer token")}
    assert {r.headers["www-authenticate"] for r in refused} == {'Bearer realm="enrichment"'}
    assert [r.status_code for r in allowed] == [200, 200, 503], "search is not configured here"
    assert [r.status_code for r in open_routes] == [200, 200]
    assert write_with_read_token.status_code == 401, "each token opens its own door"
    everything = [*refused, *allowed, *open_routes, write_with_read_token]
    assert all(READ_TOKEN not in r.text and READ_TOKEN not in str(r.headers) for r in everything)
    assert READ_TOKEN not in caplog.text
    assert READ_TOKEN not in repr(Settings(read_token=READ_TOKEN))


def test_edges_endpoint_reports_provenance_staleness_and_partial(store: FactStore, clock) -> None:
    from enrichment_assets.factstore import DerivedEdge

    store.ingest_events([Event(entity_type="thing", entity_id="t/1", event_type="created")])
    [claim] = store.claim("thing", limit=1, owner="w", lease=timedelta(minutes=1))
    edge = DerivedEdge("near", "other", "o1", (("thing", "t/1"), ("other", "hop"), ("other", "o1")))
    store.finish(
        "w", [Outcome.of(claim, "partial", attributes={}, edges=(edge,), waiting_on=(("other", "o2"),))], RetryPolicy()
    )
    clock.advance(seconds=30)
    with serve(store) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        answer = client.get("/v1/entities/thing/t%2F1/edges").json()
        assert answer["partial"] is True and answer["state"] == "partially_resolved"
        assert answer["staleness_seconds"] is None, "never fully enriched"
        [only] = answer["edges"]
        assert (only["relation"], only["dst_id"], only["path"]) == (
            "near",
            "o1",
            [["thing", "t/1"], ["other", "hop"], ["other", "o1"]],
        )
        assert client.get("/v1/entities/thing/t%2F1/edges", params={"relation": "far"}).json()["edges"] == []
        assert client.get("/v1/entities/thing/nope/edges").status_code == 404
        assert client.get("/v1/search", params={"q": "x"}).status_code == 503, "search not configured"


def test_edges_into_a_hub_page_with_a_total(store: FactStore, clock) -> None:
    from enrichment_assets.factstore import DerivedEdge

    store.ingest_events(
        [Event(entity_type="thing", entity_id=f"s{i}", event_type="created") for i in range(5)]
        + [Event(entity_type="other", entity_id="hub", event_type="created")]
    )
    claims = store.claim("thing", limit=10, owner="w", lease=timedelta(minutes=1))
    store.finish(
        "w",
        [
            Outcome.of(
                c, "enriched", attributes={}, edges=(DerivedEdge("near", "other", "hub", (c.key, ("other", "hub"))),)
            )
            for c in claims
        ],
        RetryPolicy(),
    )
    with serve(store) as server, httpx.Client(base_url=server.url, timeout=10) as client:
        into = client.get("/v1/entities/other/hub/edges", params={"direction": "in", "limit": 3}).json()
        assert (into["direction"], into["total"], into["truncated"]) == ("in", 5, True)
        assert [e["src_id"] for e in into["edges"]] == ["s0", "s1", "s2"]
        assert all(e["dst_id"] == "hub" for e in into["edges"])
        out = client.get("/v1/entities/other/hub/edges").json()
        assert (out["edges"], out["total"], out["truncated"]) == ([], 0, False)
        assert client.get("/v1/entities/other/hub/edges", params={"direction": "sideways"}).status_code == 400
        assert client.get("/v1/entities/other/hub/edges", params={"limit": "0"}).status_code == 400
        assert client.get("/v1/entities/other/hub/edges", params={"limit": "lots"}).status_code == 400


def test_search_endpoint_answers_with_state_and_staleness(store: FactStore, search_index, clock) -> None:
    from enrichment_assets.policy import load_policy
    from enrichment_assets.search import sync_index

    policy = load_policy(Path(__file__).parent / "policies" / "things.yaml")
    store.ingest_events([Event(entity_type="thing", entity_id=i, event_type="created") for i in ("lamp", "lamp-2")])
    [claim] = store.claim("thing", limit=1, owner="w", lease=timedelta(minutes=1))
    store.finish("w", [Outcome.of(claim, "enriched", attributes={"name": "Desk lamp"})], RetryPolicy())
    sync_index(store, policy, search_index)
    search_index.refresh()
    clock.advance(seconds=42)
    config = Settings(entity_types=frozenset({"thing", "other"}))
    with (
        BackgroundServer(create_app(store, config, search_index)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        by_name = client.get("/v1/search", params={"q": "desk"}).json()["hits"]
        hits = {h["entity_id"]: h for h in client.get("/v1/search", params={"q": "", "type": "thing"}).json()["hits"]}
    assert [h["entity_id"] for h in by_name] == [claim.entity_id]
    enriched = hits[claim.entity_id]
    assert (enriched["state"], enriched["staleness_seconds"]) == ("fully_enriched", 42)
    pending = next(h for i, h in hits.items() if i != claim.entity_id)
    assert (pending["state"], pending["staleness_seconds"]) == ("pending", None)
