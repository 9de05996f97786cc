"""The API's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Written by hand, next to the handlers it describes; a test checks that its paths and methods are
exactly the app's routes. Security requirements appear only for the tokens that are set.
"""

from __future__ import annotations

from typing import Any

from enrichment_assets.api.schemas import SCHEMAS
from enrichment_assets.settings import Settings

EDGE_LIMIT = 1000
MAX_EDGE_LIMIT = 10_000
MAX_SEARCH_SIZE = 100


def _json(description: str, schema: str, **headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }
    if headers:
        answer["headers"] = {
            name: {"description": text, "schema": {"type": "integer"}} for name, text in headers.items()
        }
    return answer


_UNAVAILABLE = _json(
    "The fact store or search index is unavailable, or the server is serving as many requests as it "
    "may (nothing was written); retry after the delay given.",
    "Error",
    **{"Retry-After": "Seconds to wait before retrying."},
)
_UNAUTHORIZED = _json("A bearer token is required and the request has none or another.", "Error")
_NOT_FOUND = _json("No such entity in the fact store.", "Error")


def _path_parameters() -> list[dict[str, Any]]:
    return [
        {"name": "entity_type", "in": "path", "required": True, "schema": {"type": "string"}},
        {
            "name": "entity_id",
            "in": "path",
            "required": True,
            "description": "May hold '/' (percent-encoded or not) and any printable character.",
            "schema": {"type": "string"},
        },
    ]


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _paths(settings: Settings) -> dict[str, Any]:
    read = [{"readToken": []}] if settings.read_token else []
    return {
        "/healthz": {"get": _healthz()},
        "/openapi.json": {"get": _openapi()},
        "/v1/events": {"post": _events(settings)},
        "/v1/entities/{entity_type}/{entity_id}": {"get": _entity(read)},
        "/v1/entities/{entity_type}/{entity_id}/edges": {"get": _edges(read)},
        "/v1/search": {"get": _search(read)},
    }


def _healthz() -> dict[str, Any]:
    return {
        "summary": "Whether the fact store answers. Open, and never turned away as busy.",
        "security": [],
        "responses": {
            "200": _json("Healthy.", "Health"),
            "503": _json("The fact store does not answer.", "Health", **{"Retry-After": "Seconds."}),
        },
    }


def _openapi() -> dict[str, Any]:
    return {
        "summary": "This document.",
        "security": [],
        "responses": {"200": {"description": "The OpenAPI document.", "content": {"application/json": {}}}},
    }


def _events(settings: Settings) -> dict[str, Any]:
    return {
        "summary": "Ingest thin change events: one JSON object, or NDJSON; all or nothing.",
        "security": [{"writeToken": []}] if settings.api_token else [],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Event"}},
                "application/x-ndjson": {"schema": {"type": "string", "description": "One Event per line."}},
            },
        },
        "responses": {
            "202": _json("Every event was written.", "Accepted"),
            "400": _json("Not UTF-8, not JSON, no events, or the client hung up mid-body.", "BatchRejected"),
            "401": _UNAUTHORIZED,
            "408": _json(f"The body did not arrive within {settings.body_timeout_seconds:g} s.", "Error"),
            "413": _json(
                f"More than {settings.max_body_bytes} bytes or {settings.max_events} events.", "BatchRejected"
            ),
            "422": _json("JSON that is not a valid event; every bad line is listed.", "BatchRejected"),
            "503": _UNAVAILABLE,
        },
    }


def _entity(security: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": "An entity's state, attributes and staleness.",
        "security": security,
        "parameters": _path_parameters(),
        "responses": {
            "200": _json("The entity.", "Entity"),
            "401": _UNAUTHORIZED,
            "404": _NOT_FOUND,
            "503": _UNAVAILABLE,
        },
    }


def _edges(security: list[dict[str, Any]]) -> dict[str, Any]:
    limit = {"type": "integer", "minimum": 1, "maximum": MAX_EDGE_LIMIT, "default": EDGE_LIMIT}
    return {
        "summary": "An entity's derived edges with their provenance, ordered by relation and other end.",
        "security": security,
        "parameters": [
            *_path_parameters(),
            _query("relation", {"type": "string"}, "Only edges of this relation."),
            _query("direction", {"enum": ["out", "in"], "default": "out"}, "Edges from the entity, or into it."),
            _query("limit", limit, "Edges per answer; `total` and `truncated` tell about the rest."),
        ],
        "responses": {
            "200": _json("The edges.", "Edges"),
            "400": _json("A bad query parameter.", "Error"),
            "401": _UNAUTHORIZED,
            "404": _NOT_FOUND,
            "503": _UNAVAILABLE,
        },
    }


def _search(security: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "summary": "Search entities by name, id and related names.",
        "security": security,
        "parameters": [
            _query("q", {"type": "string", "default": ""}, "Words to match; empty matches everything."),
            _query("type", {"type": "string"}, "Only entities of this type."),
            _query("size", {"type": "integer", "default": 20}, f"Hits, clamped to 1..{MAX_SEARCH_SIZE}."),
        ],
        "responses": {
            "200": _json("Hits, best first.", "SearchHits"),
            "400": _json("size is not an integer.", "Error"),
            "401": _UNAUTHORIZED,
            "503": _json(
                "Search is not configured, or unavailable, or the server is busy (then with Retry-After).", "Error"
            ),
        },
    }


def openapi_document(settings: Settings) -> dict[str, Any]:
    """The document for an app built with ``settings`` (its limits and which tokens are required)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "enrichment_assets ingest and read API",
            "version": "1",
            "description": "Thin events in; entities, derived edges and search hits out, with staleness.",
        },
        "paths": _paths(settings),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "writeToken": {"type": "http", "scheme": "bearer", "description": "ENRICHMENT_API_TOKEN"},
                "readToken": {"type": "http", "scheme": "bearer", "description": "ENRICHMENT_READ_TOKEN"},
            },
        },
    }
