"""The simulator's admin API: turn knobs, edit the graph, read stats and the request log.

Bodies are JSON objects; an unknown key, source or entity type is a 400 that names it. ``source``
omitted (or null) means every source.

=====================================  ============================================================
``GET  /healthz``                      ``{"status": "ok", "entities": {type: count}}``
``GET  /admin/knobs``                  current knobs per source and the number of late entities pending
``POST /admin/knobs``                  ``{"source"?, "latency_ms"?, "jitter_ms"?, "error_rate"?,
                                       "malformed_rate"?, "rate_limit_rps"?}`` (rates 0..1; rps null
                                       lifts the limit); only the keys given change
``POST /admin/outage``                 ``{"source"?, "outage_seconds"?}`` or ``{"source"?, "until": ISO}``
                                       (neither: down until cleared); ``{"source"?, "clear": true}`` ends it
``POST /admin/late``                   ``{"entity_type", "ids": [...], "available_in_seconds"}``: 404 (or
                                       ``missing`` in batches) until then
``POST /admin/mutate``                 ``{"entity_type", "id", "set": {field: value}}``: the source answers
                                       the changed JSON from now on
``POST /admin/entities``               ``{"entity_type", "entity": {"id", ...}}``: add or replace (201)
``POST /admin/entities/delete``        ``{"entity_type", "id"}``: 404 from now on
``GET  /admin/stats``                  per source: requests, by_status, peak_rps, batches
``GET  /admin/requests?limit=N``       the newest N logged requests (``&source=`` filters), oldest first
``POST /admin/reset``                  ``{"graph"?: bool}``: stats, log and knobs back to how the
                                       simulator started; with ``"graph": true`` also drop graph edits
=====================================  ============================================================
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pydantic
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enrichment_assets.dev.simulator.catalog import ENTITY_TYPES
from enrichment_assets.dev.simulator.state import EntityEditError, UnknownEntity

if TYPE_CHECKING:
    from enrichment_assets.dev.simulator.app import Simulator

MAX_BODY_BYTES = 1_000_000


class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class _EntityBody(_Body):
    entity_type: str

    @pydantic.field_validator("entity_type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in ENTITY_TYPES:
            raise ValueError(f"unknown entity type {value!r}; types are {', '.join(ENTITY_TYPES)}")
        return value


class KnobsBody(_Body):
    source: str | None = None
    latency_ms: float | None = None
    jitter_ms: float | None = None
    error_rate: float | None = None
    malformed_rate: float | None = None
    rate_limit_rps: float | None = None


class OutageBody(_Body):
    source: str | None = None
    outage_seconds: pydantic.PositiveFloat | None = None
    until: pydantic.AwareDatetime | None = None
    clear: bool = False


class LateBody(_EntityBody):
    ids: list[pydantic.StrictStr]
    available_in_seconds: pydantic.NonNegativeFloat


class MutateBody(_EntityBody):
    id: pydantic.StrictStr
    set: dict[str, Any]


class AddBody(_EntityBody):
    entity: dict[str, Any]


class DeleteBody(_EntityBody):
    id: pydantic.StrictStr


class ResetBody(_Body):
    graph: bool = False


class _BadRequest(Exception):
    pass


_B = TypeVar("_B", bound=_Body)


async def _parse(request: Request, model: type[_B]) -> _B:
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise _BadRequest(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return model.model_validate_json(body or b"{}")
    except pydantic.ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())
        raise _BadRequest(problems) from None


def admin_routes(sim: Simulator) -> list[Route]:
    """The ``/admin`` routes over one simulator."""

    async def get_knobs(request: Request) -> JSONResponse:
        return JSONResponse(sim.knobs.as_dict())

    async def set_knobs(body: KnobsBody) -> dict[str, Any]:
        sim.knobs.set(body.source, **body.model_dump(exclude_unset=True, exclude={"source"}))
        return sim.knobs.as_dict()

    async def outage(body: OutageBody) -> dict[str, Any]:
        if body.clear:
            sim.knobs.clear_outage(body.source)
        elif body.until is not None:
            sim.knobs.start_outage(body.source, max(0.0, body.until.timestamp() - sim.knobs.clock()))
        else:
            sim.knobs.start_outage(body.source, body.outage_seconds)
        return sim.knobs.as_dict()

    async def late(body: LateBody) -> dict[str, Any]:
        marked = sim.knobs.mark_late(body.entity_type, body.ids, body.available_in_seconds)
        return {"marked": marked, "available_in_seconds": body.available_in_seconds}

    async def mutate(body: MutateBody) -> dict[str, Any]:
        return sim.graph.mutate(body.entity_type, body.id, body.set)

    async def add(body: AddBody) -> dict[str, Any]:
        return sim.graph.put(body.entity_type, body.entity)

    async def delete(body: DeleteBody) -> dict[str, Any]:
        return {"deleted": sim.graph.delete(body.entity_type, body.id)}

    async def reset(body: ResetBody) -> dict[str, Any]:
        sim.stats.reset()
        sim.knobs.reset()
        if body.graph:
            sim.graph.reset()
        return {"reset": True, "graph": body.graph}

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(sim.stats.as_dict())

    async def requests(request: Request) -> JSONResponse:
        try:
            limit = int(request.query_params.get("limit", "100"))
        except ValueError:
            return JSONResponse({"error": "limit must be an integer"}, status_code=400)
        return JSONResponse({"requests": sim.stats.recent(limit, request.query_params.get("source"))})

    def post(
        path: str, handler: Callable[[Any], Awaitable[dict[str, Any]]], model: type[_Body], status: int = 200
    ) -> Route:
        async def endpoint(request: Request) -> JSONResponse:
            try:
                result = await handler(await _parse(request, model))
            except (_BadRequest, EntityEditError, ValueError) as error:
                code = 404 if isinstance(error, UnknownEntity) else 400
                return JSONResponse({"error": str(error)}, status_code=code)
            return JSONResponse(result, status_code=status)

        return Route(path, endpoint, methods=["POST"])

    return [
        Route("/admin/knobs", get_knobs, methods=["GET"]),
        post("/admin/knobs", set_knobs, KnobsBody),
        post("/admin/outage", outage, OutageBody),
        post("/admin/late", late, LateBody),
        post("/admin/mutate", mutate, MutateBody),
        post("/admin/entities", add, AddBody, status=201),
        post("/admin/entities/delete", delete, DeleteBody),
        post("/admin/reset", reset, ResetBody),
        Route("/admin/stats", stats, methods=["GET"]),
        Route("/admin/requests", requests, methods=["GET"]),
    ]
