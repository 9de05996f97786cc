"""The simulator's Starlette app: six source systems on one port, plus ``/admin`` and ``/healthz``.

Each source lives under its prefix from ``policies/mds.yaml`` (``/model-registry``, ...). Per entity
type: ``GET <prefix><path>`` answers 200 with the entity's JSON or 404 ``{"error": "not found"}``;
where the type has a batch path, ``GET <prefix><batch_path>?ids=a&ids=b`` answers 200
``{"items": [...], "missing": [...]}`` (400 with no ids or more than the source's ``max_batch_size``).

Source requests are routed on the raw request path, split before any percent-decoding: the id is
exactly one segment, decoded on its own, and never resolved against the path (``..%2Fadmin`` is an id
that is not found, not a way to the admin API).

Knobs apply in this order: outage (503), rate limit (429 with ``Retry-After``), latency, injected error
(500/503), malformed body (200). Every request, admin ones included, lands in the request log.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Mapping

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enrichment_assets.dev.simulator.admin import admin_routes
from enrichment_assets.dev.simulator.catalog import RouteMatch, match_raw_path
from enrichment_assets.dev.simulator.graph import Entity, MdsGraph
from enrichment_assets.dev.simulator.knobs import Clock, Knobs
from enrichment_assets.dev.simulator.state import LiveGraph
from enrichment_assets.dev.simulator.stats import DEFAULT_LOG_SIZE, RequestRecord, Stats

_MALFORMED_SINGLE = (
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"),
    (b'{"id": "', "application/json"),
    (b'["not", "an", "entity"]', "application/json"),
)
_MALFORMED_BATCH = (
    *_MALFORMED_SINGLE[:2],
    (b'{"items": {"unexpected": true}, "missing": "none"}', "application/json"),
)


class Simulator:
    """The sources' state: the live graph, the knobs and the stats. ``app`` serves it.

    ``knobs`` are applied to every source at start (``{"latency_ms": 20, "error_rate": 0.05}``);
    ``late_fraction`` of the pipeline runs, chosen by ``seed``, answer 404 for ``late_seconds``.
    ``POST /admin/reset`` returns to exactly this starting configuration.
    """

    def __init__(
        self,
        graph: MdsGraph,
        *,
        seed: int | None = None,
        knobs: Mapping[str, float | None] | None = None,
        late_fraction: float = 0.0,
        late_seconds: float = 0.0,
        clock: Clock = time.time,
        log_size: int = DEFAULT_LOG_SIZE,
    ) -> None:
        if not 0.0 <= late_fraction <= 1.0:
            raise ValueError(f"late_fraction must be between 0 and 1, got {late_fraction}")
        self.seed = graph.seed if seed is None else seed
        self.graph = LiveGraph(graph)
        self.knobs = Knobs(seed=self.seed, clock=clock)
        self.stats = Stats(log_size=log_size)
        if knobs:
            self.knobs.set(None, **knobs)
        if late_fraction and late_seconds > 0:
            runs = graph.ids("pipeline_run")
            late = random.Random(f"{self.seed}:late").sample(runs, round(late_fraction * len(runs)))
            self.knobs.mark_late("pipeline_run", late, late_seconds)
        self.knobs.remember_start()
        self.app = create_app(self)

    def visible(self, entity_type: str, entity_id: str) -> Entity | None:
        """The entity as its source answers it now: None if absent, deleted or not arrived yet."""
        if self.knobs.is_late(entity_type, entity_id):
            return None
        return self.graph.get(entity_type, entity_id)


def create_app(simulator: Simulator) -> Starlette:
    """The Starlette app over one simulator (``Simulator(...).app`` is the usual way to get it)."""

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "entities": simulator.graph.counts()})

    async def source(request: Request) -> Response:
        return await _answer(simulator, request, match_raw_path(_raw_path(request.scope)))

    routes = [
        Route("/healthz", healthz),
        *admin_routes(simulator),
        Route("/{rest:path}", source, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_RequestRecorder, simulator=simulator)])


def _raw_path(scope: Scope) -> bytes:
    return scope.get("raw_path") or scope["path"].encode("utf-8")


async def _faults(sim: Simulator, name: str) -> Response | None:
    """The knobs that answer before the request is looked at; None lets it through."""
    down = sim.knobs.outage_remaining(name)
    if down is not None:
        headers = {} if math.isinf(down) else {"Retry-After": str(math.ceil(down))}
        return _error(503, f"{name} is unavailable (simulated outage)", headers)
    wait = sim.knobs.admit(name)
    if wait is not None:
        return _error(429, "rate limit exceeded", {"Retry-After": str(max(1, math.ceil(wait)))})
    delay = sim.knobs.delay_seconds(name)
    if delay > 0:
        await asyncio.sleep(delay)
    injected = sim.knobs.injected_error(name)
    return None if injected is None else _error(injected, "injected failure")


async def _answer(sim: Simulator, request: Request, match: RouteMatch | None) -> Response:
    if match is None:
        return _error(404, "no such route")
    name = match.source.name
    refused = await _faults(sim, name)
    if refused is not None:
        return refused
    entity_type = match.entity_type
    if entity_type is None:
        return _error(404, "no such route")
    if match.entity_id is None:
        ids = request.query_params.getlist("ids")
        sim.stats.batch(name, len(ids))
        limit = match.source.max_batch_size
        if not ids:
            return _error(400, "give at least one id as ?ids=")
        if limit is not None and len(ids) > limit:
            return _error(400, f"at most {limit} ids per batch, got {len(ids)}")
    variant = sim.knobs.malformed_variant(name)
    if variant is not None:
        body, media_type = (_MALFORMED_SINGLE if match.entity_id is not None else _MALFORMED_BATCH)[variant]
        return Response(body, media_type=media_type)
    if match.entity_id is not None:
        entity = sim.visible(entity_type.name, match.entity_id)
        return JSONResponse(entity) if entity is not None else _error(404, "not found")
    items: list[Entity] = []
    missing: list[str] = []
    for entity_id in dict.fromkeys(ids):
        entity = sim.visible(entity_type.name, entity_id)
        if entity is None:
            missing.append(entity_id)
        else:
            items.append(entity)
    return JSONResponse({"items": items, "missing": missing})


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class _RequestRecorder:
    """Counts source requests on arrival and logs every request with its final status."""

    def __init__(self, app: ASGIApp, simulator: Simulator) -> None:
        self.app = app
        self.simulator = simulator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_path = _raw_path(scope)
        query: bytes = scope.get("query_string", b"")
        match = match_raw_path(raw_path)
        source = match.source.name if match else None
        stats = self.simulator.stats
        if source is not None:
            stats.arrived(source)
        started, at = time.monotonic(), time.time()
        status = 500

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            path = (raw_path + (b"?" + query if query else b"")).decode("latin-1")
            duration = (time.monotonic() - started) * 1000
            stats.finished(RequestRecord(at, source, scope["method"], path, status, duration))
