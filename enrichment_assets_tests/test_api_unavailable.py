"""Every route answers a JSON 503 with Retry-After when the fact store (or search index) is down: a
PostgreSQL server that refuses connections, and a database dropped under a warm connection pool.
The log names the error class, never the database URL or its password."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
import sqlalchemy as sa
from elasticsearch import Elasticsearch
from sqlalchemy.engine import make_url

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer, free_port
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.engine import create_engine
from enrichment_assets.search import SearchIndex
from enrichment_assets.settings import Settings

PASSWORD = "hunter2-not-for-logs"
SETTINGS = Settings(entity_types=frozenset({"thing"}))
EVENT = {"entity_type": "thing", "entity_id": "a/1", "event_type": "created"}


def store_routes(client: httpx.Client) -> dict[str, httpx.Response]:
    """One request to each route that reads or writes the fact store."""
    return {
        "POST /v1/events": client.post("/v1/events", json=EVENT),
        "GET entity": client.get("/v1/entities/thing/a%2F1"),
        "GET edges": client.get("/v1/entities/thing/a%2F1/edges", params={"direction": "in"}),
        "GET edges of a relation": client.get("/v1/entities/thing/a%2F1/edges", params={"relation": "near"}),
    }


def assert_unavailable(responses: dict[str, httpx.Response], message: str) -> None:
    for route, response in responses.items():
        assert response.status_code == 503, route
        assert response.headers["content-type"] == "application/json", route
        assert response.headers["retry-after"] == "1", route
        assert response.json() == {"error": message}, route


@pytest.fixture
def unreachable() -> Iterator[tuple[FactStore, SearchIndex]]:
    """A store on a PostgreSQL URL (with a password) whose port refuses connections, and a search
    index likewise."""
    port = free_port()
    store = FactStore.from_url(f"postgresql://enrichment:{PASSWORD}@127.0.0.1:{port}/facts")
    search = SearchIndex(Elasticsearch(f"http://127.0.0.1:{free_port()}", max_retries=0), alias="nowhere")
    yield store, search
    store.dispose()
    search.close()


def test_every_route_answers_503_json_when_postgres_refuses(
    unreachable: tuple[FactStore, SearchIndex], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store, search = unreachable
    with BackgroundServer(create_app(store, SETTINGS, search)) as server, httpx.Client(base_url=server.url) as client:
        responses = store_routes(client)
        searched = client.get("/v1/search", params={"q": "lamp"})
        health = client.get("/healthz")
        document = client.get("/openapi.json")
    assert_unavailable(responses, "fact store unavailable; retry")
    assert_unavailable({"search": searched}, "search index unavailable; retry")
    assert (health.status_code, health.json()["status"], health.headers["retry-after"]) == (503, "unavailable", "1")
    assert document.status_code == 200, "the document needs no fact store"
    assert "OperationalError" in caplog.text and "ConnectionError" in caplog.text
    assert PASSWORD not in caplog.text and "postgresql://" not in caplog.text
    assert all(PASSWORD not in r.text for r in (*responses.values(), searched, health))


def test_every_route_answers_503_json_when_the_database_goes_away(
    make_postgres_database: Callable[[], str], postgres_server_url: str
) -> None:
    url = make_postgres_database()
    store = FactStore.from_url(url)
    store.migrate()
    try:
        with BackgroundServer(create_app(store, SETTINGS)) as server, httpx.Client(base_url=server.url) as client:
            # Warm both pools (the writer's and the edge reader's) so the failure hits pooled connections.
            assert [r.status_code for r in store_routes(client).values()] == [202, 200, 200, 200]
            _drop(postgres_server_url, make_url(url).database)
            responses = store_routes(client)
            assert client.get("/healthz").status_code == 503
    finally:
        store.dispose()
    assert_unavailable(responses, "fact store unavailable; retry")


def _drop(server_url: str, database: str | None) -> None:
    admin = create_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{database}" WITH (FORCE)'))  # a name the fixture generated
    admin.dispose()
