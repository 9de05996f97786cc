"""The OpenAPI document at /openapi.json: exactly the app's routes and methods, their path parameters,
references that resolve, security only for the tokens that are set, and the statuses the app answers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Route

from enrichment_assets.api import create_app
from enrichment_assets.api.openapi import openapi_document
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.factstore import FactStore
from enrichment_assets.settings import Settings

SETTINGS = Settings(entity_types=frozenset({"thing"}), max_events=5, max_body_bytes=4096)


def operations_of(app: Starlette) -> set[tuple[str, str]]:
    """(OpenAPI path template, method) of every route; HEAD is implied by GET."""
    found = set()
    for route in app.routes:
        assert isinstance(route, Route)
        template = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
        found |= {(template, method.lower()) for method in route.methods or () if method != "HEAD"}
    return found


def documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item}


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[FactStore]:
    store = FactStore.from_url(f"sqlite:///{tmp_path / 'facts.db'}")
    store.migrate()
    yield store
    store.dispose()


def test_the_document_names_exactly_the_apps_routes(sqlite_store: FactStore) -> None:
    app = create_app(sqlite_store, SETTINGS)
    document = openapi_document(SETTINGS)
    assert operations_of(app) == documented(document)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (path, method)
            assert operation["responses"] and operation["summary"], (path, method)


def test_every_reference_resolves() -> None:
    document = openapi_document(SETTINGS)

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            yield from (v for k, v in node.items() if k == "$ref")
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    targets = set(refs(document))
    assert targets and all(
        t.removeprefix("#/components/schemas/") in document["components"]["schemas"] for t in targets
    )


@pytest.mark.parametrize(
    ("tokens", "write", "read"),
    [({}, [], []), ({"api_token": "w", "read_token": "r"}, [{"writeToken": []}], [{"readToken": []}])],
    ids=["open", "both-tokens"],
)
def test_security_follows_the_tokens_set(tokens: dict[str, str], write: list[Any], read: list[Any]) -> None:
    paths = openapi_document(Settings(**tokens))["paths"]
    assert paths["/v1/events"]["post"]["security"] == write
    assert [paths[p]["get"]["security"] for p in paths if p.startswith("/v1/entities") or p == "/v1/search"] == [
        read
    ] * 3
    assert paths["/healthz"]["get"]["security"] == [] == paths["/openapi.json"]["get"]["security"]


def test_served_document_and_the_statuses_it_promises(sqlite_store: FactStore) -> None:
    entity, edges = "/v1/entities/{entity_type}/{entity_id}", "/v1/entities/{entity_type}/{entity_id}/edges"
    requests = [
        ("/healthz", "get", {}, 200),
        ("/v1/events", "post", {"content": '{"entity_type": "thing", "entity_id": "a", "event_type": "created"}'}, 202),
        ("/v1/events", "post", {"content": "{oops"}, 400),
        ("/v1/events", "post", {"content": '{"entity_type": "nope", "entity_id": "a", "event_type": "x"}'}, 422),
        ("/v1/events", "post", {"content": " " * 5000}, 413),
        (entity, "get", {}, 200),
        (entity.replace("{entity_id}", "missing"), "get", {}, 404),
        (edges, "get", {}, 200),
        (edges, "get", {"params": {"limit": "0"}}, 400),
        ("/v1/search", "get", {}, 503),
    ]
    with BackgroundServer(create_app(sqlite_store, SETTINGS)) as server, httpx.Client(base_url=server.url) as client:
        served = client.get("/openapi.json").json()
        for template, method, options, status in requests:
            path = template.replace("{entity_type}", "thing").replace("{entity_id}", "a")
            response = client.request(method.upper(), path, **options)
            assert response.status_code == status, (template, response.text)
            documented_template = re.sub(r"/missing$", "/{entity_id}", template)
            assert str(status) in served["paths"][documented_template][method]["responses"], (template, status)
    assert served == openapi_document(SETTINGS)
