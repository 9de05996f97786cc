"""Starlette app: thin-event ingestion and entity reads over the fact store.

Ingestion never calls a source: an accepted batch is one upsert. Writes are guarded by a bearer token
when ``ENRICHMENT_API_TOKEN`` is set; the token is compared in constant time and never echoed.
"""

from __future__ import annotations

import hmac
import logging
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enrichment_assets.events import EventBatchError, Problem, parse_events
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.models import EntityRecord, IngestResult
from enrichment_assets.settings import Settings

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


def create_app(store: FactStore, settings: Settings) -> Starlette:
    """Build the app around an open, migrated fact store."""

    def _authorized(request: Request) -> bool:
        if settings.api_token is None:
            return True
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), settings.api_token.encode()
        )

    async def _read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    def _ingest(body: bytes) -> IngestResult:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as error:
            raise EventBatchError(400, [Problem(0, f"body is not UTF-8 (byte {error.start})")]) from None
        events = parse_events(text, entity_types=settings.entity_types, max_events=settings.max_events)
        return store.ingest_events(events)

    async def post_events(request: Request) -> JSONResponse:
        if not _authorized(request):
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="enrichment"'},
            )
        try:
            body = await _read_body(request)
        except _TooLarge:
            return JSONResponse(
                {"error": f"body larger than {settings.max_body_bytes} bytes; split the batch"}, status_code=413
            )
        try:
            result = await run_in_threadpool(_ingest, body)
        except EventBatchError as error:
            return JSONResponse(error.as_dict(), status_code=error.status)
        except sa.exc.SQLAlchemyError as error:
            log.error("ingest failed in the fact store: %s", type(error).__name__)
            return JSONResponse(
                {"error": "fact store unavailable; nothing was written, retry the batch"}, status_code=503
            )
        return JSONResponse({"accepted": True, **result.as_dict()}, status_code=202)

    async def get_entity(request: Request) -> JSONResponse:
        entity_type = request.path_params["entity_type"]
        entity_id = request.path_params["entity_id"]
        record = await run_in_threadpool(store.get_entity, entity_type, entity_id)
        if record is None:
            return JSONResponse(
                {"error": f"no entity {entity_type}/{entity_id} in the fact store"}, status_code=404
            )
        return JSONResponse(entity_document(record, store.now()))

    async def healthz(_request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(_ping, store)
        except sa.exc.SQLAlchemyError as error:
            return JSONResponse({"status": "unavailable", "fact_store": type(error).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "fact_store": "ok"})

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/v1/events", post_events, methods=["POST"]),
            Route("/v1/entities/{entity_type}/{entity_id:path}", get_entity, methods=["GET"]),
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


def _ping(store: FactStore) -> None:
    with store.engine.connect() as conn:
        conn.execute(sa.select(sa.literal(1)))
