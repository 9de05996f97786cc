"""Starlette app: thin-event ingestion and entity reads over the fact store.

Ingestion never calls a source: an accepted batch is one upsert. Writes need ``ENRICHMENT_API_TOKEN``
and reads ``ENRICHMENT_READ_TOKEN`` when set; tokens, the in-flight bound, the body deadline and the 503
for a fact store that is down are in ``guards``, the route descriptions in ``openapi``.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import partial
from typing import Any

import pydantic
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enrichment_assets.api.guards import (
    RETRY_AFTER_SECONDS,
    BodyRejected,
    InFlightLimit,
    read_body,
    requires_token,
    unavailable_handlers,
)
from enrichment_assets.api.openapi import EDGE_LIMIT, MAX_EDGE_LIMIT, MAX_SEARCH_SIZE, openapi_document
from enrichment_assets.events import Event, EventBatchError, Problem, parse_events
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.models import EntityRecord, IngestResult
from enrichment_assets.search import SearchIndex
from enrichment_assets.settings import Settings

_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class _Handlers:
    """The routes' handlers over one fact store, its settings and an optional search index.

    A fact store or search index that fails raises out of a handler; ``guards.unavailable_handlers``
    answers it, the same way on every route.
    """

    def __init__(self, store: FactStore, settings: Settings, search: SearchIndex | None) -> None:
        self.store, self.settings, self.search = store, settings, search
        self.document = openapi_document(settings)

    def _ingest(self, body: bytes) -> IngestResult:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise EventBatchError(400, [Problem(0, f"body is not UTF-8 (byte {error.start})")]) from None
        events = parse_events(text, entity_types=self.settings.entity_types, max_events=self.settings.max_events)
        return self.store.ingest_events(events)

    async def post_events(self, request: Request) -> JSONResponse:
        try:
            body = await read_body(
                request, max_bytes=self.settings.max_body_bytes, timeout=self.settings.body_timeout_seconds
            )
        except BodyRejected as rejected:
            return rejected.response
        try:
            result = await run_in_threadpool(self._ingest, body)
        except EventBatchError as error:
            return JSONResponse(error.as_dict(), status_code=error.status)
        return JSONResponse({"accepted": True, **result.as_dict()}, status_code=202)

    async def get_entity(self, request: Request) -> JSONResponse:
        entity_type, entity_id = _key(request)
        record = None
        if _storable(entity_type, entity_id):
            record = await run_in_threadpool(self.store.get_entity, entity_type, entity_id)
        if record is None:
            return _no_entity(entity_type, entity_id)
        return JSONResponse(entity_document(record, self.store.now()))

    async def get_edges(self, request: Request) -> JSONResponse:
        entity_type, entity_id = _key(request)
        relation = request.query_params.get("relation") or None
        direction = request.query_params.get("direction", "out")
        if direction not in ("out", "in"):
            return _bad_request("direction must be 'out' (edges from the entity) or 'in' (edges into it)")
        if relation is not None and _CONTROL_CHARS.search(relation):
            return _bad_request("relation must not contain control characters")
        try:
            limit = int(request.query_params.get("limit", str(EDGE_LIMIT)))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_EDGE_LIMIT:
            return _bad_request(f"limit must be an integer from 1 to {MAX_EDGE_LIMIT}")
        found = None
        if _storable(entity_type, entity_id):
            lookup = partial(self.store.entity_edges, relation=relation, direction=direction, limit=limit)
            found = await run_in_threadpool(lookup, entity_type, entity_id)
        if found is None:
            return _no_entity(entity_type, entity_id)
        return JSONResponse(
            {
                "entity_type": entity_type,
                "entity_id": entity_id,
                "state": found.state,
                "last_enriched_at": _iso(found.last_enriched_at),
                "staleness_seconds": found.staleness_seconds(self.store.now()),
                # Partial: some paths wait on entities not there yet, so these edges may be incomplete.
                "partial": found.state == "partially_resolved",
                "direction": direction,
                "total": found.total,
                "truncated": found.truncated,
                "edges": [
                    {**e, "asserted_at": _iso(e["asserted_at"]), "confirmed_at": _iso(e["confirmed_at"])}
                    for e in found.edges
                ],
            }
        )

    async def search_entities(self, request: Request) -> JSONResponse:
        if self.search is None:
            return JSONResponse({"error": "search is not configured: set ELASTICSEARCH_URL"}, status_code=503)
        query = request.query_params.get("q", "")
        entity_type = request.query_params.get("type") or None
        try:
            size = min(max(int(request.query_params.get("size", "20")), 1), MAX_SEARCH_SIZE)
        except ValueError:
            return _bad_request("size must be an integer")
        hits = await run_in_threadpool(self.search.search, query, entity_type=entity_type, size=size)
        now = self.store.now()
        return JSONResponse(
            {
                "hits": [
                    {
                        **{
                            k: hit.get(k)
                            for k in ("entity_type", "entity_id", "name", "state", "version", "last_enriched_at")
                        },
                        "staleness_seconds": _staleness(hit.get("last_enriched_at"), now),
                    }
                    for hit in hits
                ]
            }
        )

    async def healthz(self, _request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(_ping, self.store)
        except sa.exc.SQLAlchemyError as error:
            return JSONResponse(
                {"status": "unavailable", "fact_store": type(error).__name__},
                status_code=503,
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        return JSONResponse({"status": "ok", "fact_store": "ok"})

    async def openapi(self, _request: Request) -> JSONResponse:
        return JSONResponse(self.document)


def create_app(store: FactStore, settings: Settings, search: SearchIndex | None = None) -> Starlette:
    """Build the app around an open, migrated fact store (and a search index, for /v1/search)."""
    handlers = _Handlers(store, settings, search)
    read = partial(requires_token, settings.read_token)
    write = partial(requires_token, settings.api_token)
    return Starlette(
        routes=[
            Route("/healthz", handlers.healthz, methods=["GET"]),
            Route("/openapi.json", handlers.openapi, methods=["GET"]),
            Route("/v1/events", write(handlers.post_events), methods=["POST"]),
            Route("/v1/search", read(handlers.search_entities), methods=["GET"]),
            # Before the plain entity route: ids may hold '/', so ".../edges" must match here first.
            Route("/v1/entities/{entity_type}/{entity_id:path}/edges", read(handlers.get_edges), methods=["GET"]),
            Route("/v1/entities/{entity_type}/{entity_id:path}", read(handlers.get_entity), methods=["GET"]),
        ],
        middleware=[Middleware(InFlightLimit, limit=settings.max_in_flight, exempt=frozenset({"/healthz"}))],
        # The driver's own errors too: the edge read runs on its raw cursor, past SQLAlchemy's wrapping.
        exception_handlers=unavailable_handlers(store.engine.dialect.loaded_dbapi.Error),
    )


def entity_document(record: EntityRecord, now: datetime) -> dict[str, Any]:
    """The JSON shape of an entity, with its staleness made explicit."""
    return {
        "entity_type": record.entity_type,
        "entity_id": record.entity_id,
        "state": record.state,
        "version": record.version,
        "first_seen_at": _iso(record.first_seen_at),
        "hydrated_at": _iso(record.hydrated_at),
        "last_enriched_at": _iso(record.last_enriched_at),
        "staleness_seconds": record.staleness_seconds(now),
        "attempts": record.attempts,
        "next_attempt_at": _iso(record.next_attempt_at),
        "last_error": record.last_error,
        "waiting_on": record.waiting_on,
        "attributes": record.attributes,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _staleness(last_enriched_at: str | None, now: datetime) -> float | None:
    if not last_enriched_at:
        return None
    return max((now - datetime.fromisoformat(last_enriched_at)).total_seconds(), 0.0)


def _key(request: Request) -> tuple[str, str]:
    return request.path_params["entity_type"], request.path_params["entity_id"]


def _storable(entity_type: str, entity_id: str) -> bool:
    """Whether ingestion would accept this key; one it would not (a NUL, say, which PostgreSQL cannot
    even compare) is known absent without asking the fact store."""
    try:
        Event(entity_type=entity_type, entity_id=entity_id, event_type="created")
    except pydantic.ValidationError:
        return False
    return True


def _no_entity(entity_type: str, entity_id: str) -> JSONResponse:
    return JSONResponse({"error": f"no entity {entity_type}/{entity_id} in the fact store"}, status_code=404)


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


def _ping(store: FactStore) -> None:
    with store.engine.connect() as conn:
        conn.execute(sa.select(sa.literal(1)))
