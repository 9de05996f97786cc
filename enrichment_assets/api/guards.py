"""What stands between a request and the fact store: bearer tokens, the in-flight bound, the body
deadline, and the JSON 503 every route answers when the fact store or the search index is down.

Tokens are compared in constant time and never logged or echoed; a failure is logged by its class
alone, since a driver's message may carry the database URL.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from elasticsearch import ApiError, TransportError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

# What a client that was turned away for being one too many should wait before trying again.
RETRY_AFTER_SECONDS = 1

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def requires_token(token: str | None, handler: Handler) -> Handler:
    """``handler`` behind ``Authorization: Bearer <token>``; open when ``token`` is None."""
    if token is None:
        return handler
    expected = token.encode()

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), expected):
            return await handler(request)
        return JSONResponse(
            {"error": "missing or invalid bearer token"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="enrichment"'},
        )

    return guarded


class BodyRejected(Exception):
    """The request body was not read whole; ``response`` says why. Nothing was written."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


async def read_body(request: Request, *, max_bytes: int, timeout: float) -> bytes:
    """The whole body, which must be at most ``max_bytes`` and arrive within ``timeout`` seconds, or
    :class:`BodyRejected` (413, 408, or 400 when the client hung up first)."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise BodyRejected(_closing(413, f"body larger than {max_bytes} bytes; split the batch"))
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise BodyRejected(_closing(413, f"body larger than {max_bytes} bytes; split the batch"))
                chunks.append(chunk)
    except TimeoutError:
        raise BodyRejected(
            _closing(408, f"the body did not arrive within {timeout:g} s; nothing was written")
        ) from None
    except ClientDisconnect:
        raise BodyRejected(_closing(400, "the client closed the connection before the body ended")) from None
    return b"".join(chunks)


def _closing(status: int, message: str) -> JSONResponse:
    # The rest of the body may still be on its way: the connection cannot carry another request.
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


class InFlightLimit:
    """Serve at most ``limit`` requests at once and answer the rest 503 with Retry-After at once, so
    excess load is shed in microseconds instead of queueing for a thread and a database connection.

    ``exempt`` paths (the health probe) are never turned away: a probe that failed because the API is
    busy would get the process restarted, which turns overload into an outage. The counter lives on
    the event loop, the only place it is touched, so it needs no lock.
    """

    def __init__(self, app: ASGIApp, *, limit: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app, self.limit, self.exempt = app, limit, exempt
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            await _send_json(send, 503, {"error": "server busy; retry"}, retry_after=RETRY_AFTER_SECONDS)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def _send_json(send: Send, status: int, document: dict[str, Any], *, retry_after: int) -> None:
    body = json.dumps(document).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def unavailable_handlers(
    dbapi_error: type[Exception],
) -> dict[Any, Callable[[Request, Exception], Awaitable[Response]]]:
    """Exception handlers that turn a failing fact store (SQLAlchemy's errors, and the driver's own
    ``dbapi_error`` that a raw-cursor read may raise) or search index into a JSON 503 on every route."""
    return {
        sa.exc.SQLAlchemyError: _store_unavailable,
        dbapi_error: _store_unavailable,
        ApiError: _search_unavailable,
        TransportError: _search_unavailable,
    }


async def _store_unavailable(request: Request, error: Exception) -> Response:
    log.error("%s %s: fact store failed (%s)", request.method, _route(request), type(error).__name__)
    return JSONResponse(
        {"error": "fact store unavailable; retry"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _search_unavailable(request: Request, error: Exception) -> Response:
    log.error("%s %s: search index failed (%s)", request.method, _route(request), type(error).__name__)
    return JSONResponse(
        {"error": "search index unavailable; retry"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


def _route(request: Request) -> str:
    # The route's template, not the path: ids in a path are the callers' data, not the log's.
    route = request.scope.get("route")
    return getattr(route, "path", "?")
