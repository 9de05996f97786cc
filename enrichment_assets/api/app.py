"""Starlette app: thin-event ingestion and entity reads over the fact store.

Ingestion never calls a source: an accepted batch is one upsert. Writes are guarded by a bearer token
when ``ENRICHMENT_API_TOKEN`` is set; the token is compared in constant time and never echoed.
"""

from __future__ import annotations

import hmac
import logging
from functools import partial
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from elasticsearch import ApiError, TransportError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enrichment_assets.events import EventBatchError, Problem, parse_events
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.models import EntityRecord, IngestResult
from enrichment_assets.search import SearchIndex
from enrichment_assets.settings import Settings

# Edges per answer by default and at most; a hub with more says `truncated` and its `total`.
EDGE_LIMIT = 1000
MAX_EDGE_LIMIT = 10_000

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


class _Handlers:
    """The routes' handlers over one fact store, its settings and an optional search index."""

    def __init__(self, store: FactStore, settings: Settings, search: SearchIndex | None) -> None:
        self.store, self.settings, self.search = store, settings, search

    def _authorized(self, request: Request) -> bool:
        if self.settings.api_token is None:
            return True
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self.settings.api_token.encode()
        )

    async def _read_body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _ingest(self, body: bytes) -> IngestResult:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise EventBatchError(400, [Problem(0, f"body is not UTF-8 (byte {error.start})")]) from None
        events = parse_events(text, entity_types=self.settings.entity_types, max_events=self.settings.max_events)
        return self.store.ingest_events(events)

    async def post_events(self, request: Request) -> JSONResponse:
        if not self._authorized(request):
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="enrichment"'},
            )
        try:
            body = await self._read_body(request)
        except _TooLarge:
            return JSONResponse(
                {"error": f"body larger than {self.settings.max_body_bytes} bytes; split the batch"}, status_code=413
            )
        try:
            result = await run_in_threadpool(self._ingest, body)
        except EventBatchError as error:
            return JSONResponse(error.as_dict(), status_code=error.status)
        except sa.exc.SQLAlchemyError as error:
            log.error("ingest failed in the fact store: %s", type(error).__name__)
            return JSONResponse(
                {"error": "fact store unavailable; nothing was written, retry the batch"}, status_code=503
            )
        return JSONResponse({"accepted": True, **result.as_dict()}, status_code=202)

    async def get_entity(self, request: Request) -> JSONResponse:
        entity_type = request.path_params["entity_type"]
        entity_id = request.path_params["entity_id"]
        record = await run_in_threadpool(self.store.get_entity, entity_type, entity_id)
        if record is None:
            return JSONResponse(
                {"error": f"no entity {entity_type}/{entity_id} in the fact store"}, status_code=404
            )
        return JSONResponse(entity_document(record, self.store.now()))

    async def get_edges(self, request: Request) -> JSONResponse:
        entity_type = request.path_params["entity_type"]
        entity_id = request.path_params["entity_id"]
        relation = request.query_params.get("relation") or None
        direction = request.query_params.get("direction", "out")
        if direction not in ("out", "in"):
            return JSONResponse({"error": "direction must be 'out' (edges from the entity) or 'in' (edges into it)"},
                                status_code=400)
        try:
            limit = int(request.query_params.get("limit", str(EDGE_LIMIT)))
        except ValueError:
            limit = 0
        if not 1 <= limit <= MAX_EDGE_LIMIT:
            return JSONResponse({"error": f"limit must be an integer from 1 to {MAX_EDGE_LIMIT}"}, status_code=400)
        found = await run_in_threadpool(
            partial(self.store.entity_edges, relation=relation, direction=direction, limit=limit),  # type: ignore[arg-type]
            entity_type, entity_id)
        if found is None:
            return JSONResponse({"error": f"no entity {entity_type}/{entity_id} in the fact store"}, status_code=404)
        return JSONResponse({
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
        })

    async def search_entities(self, request: Request) -> JSONResponse:
        if self.search is None:
            return JSONResponse({"error": "search is not configured: set ELASTICSEARCH_URL"}, status_code=503)
        query = request.query_params.get("q", "")
        entity_type = request.query_params.get("type") or None
        try:
            size = min(max(int(request.query_params.get("size", "20")), 1), 100)
        except ValueError:
            return JSONResponse({"error": "size must be an integer"}, status_code=400)
        try:
            hits = await run_in_threadpool(self.search.search, query, entity_type=entity_type, size=size)
        except (ApiError, TransportError) as error:
            log.error("search failed: %s", type(error).__name__)
            return JSONResponse({"error": "search index unavailable; retry"}, status_code=503)
        now = self.store.now()
        return JSONResponse({"hits": [
            {**{k: hit.get(k) for k in ("entity_type", "entity_id", "name", "state", "version", "last_enriched_at")},
             "staleness_seconds": _staleness(hit.get("last_enriched_at"), now)}
            for hit in hits
        ]})

    async def healthz(self, _request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(_ping, self.store)
        except sa.exc.SQLAlchemyError as error:
            return JSONResponse({"status": "unavailable", "fact_store": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "fact_store": "ok"})


def create_app(store: FactStore, settings: Settings, search: SearchIndex | None = None) -> Starlette:
    """Build the app around an open, migrated fact store (and a search index, for /v1/search)."""
    handlers = _Handlers(store, settings, search)
    return Starlette(
        routes=[
            Route("/healthz", handlers.healthz, methods=["GET"]),
            Route("/v1/events", handlers.post_events, methods=["POST"]),
            Route("/v1/search", handlers.search_entities, methods=["GET"]),
            # Before the plain entity route: ids may hold '/', so ".../edges" must match here first.
            Route("/v1/entities/{entity_type}/{entity_id:path}/edges", handlers.get_edges, methods=["GET"]),
            Route("/v1/entities/{entity_type}/{entity_id:path}", handlers.get_entity, methods=["GET"]),
        ]
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


def _ping(store: FactStore) -> None:
    with store.engine.connect() as conn:
        conn.execute(sa.select(sa.literal(1)))
