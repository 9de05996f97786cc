"""A hostile source system on a real port, for ``test_hostile_sources.py``.

Under ``/hostile`` a ``lure`` answers according to its id (``/hostile/lures/<case>``): too big, trickled,
a gzip bomb, a redirect to another host, HTML, JSON nested 100,000 deep, or references to ids that try
to leave the path template; ``/hostile/targets/<id>`` answers any target with its id. Under ``/good``
every ``thing`` answers as it should. Every request's raw path is recorded, before any decoding.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from enrichment_assets.api.server import BackgroundServer

# Ids in a lure's body that try to leave ``/targets/{id}``.
ESCAPING_IDS = ("../admin", "a/b?x=1#y", "%2e%2e", "..", ".", "//elsewhere.test/x")
OVERSIZE_BYTES = 200 * 1024 * 1024
TRICKLE_SECONDS = 30.0
BOMB_BYTES = 8 * 1024**3
STACKED_BOMB_BYTES = 2 * 1024**3
NESTING = 100_000
_MIB = 1024 * 1024


def gzip_bomb(decoded_bytes: int) -> Iterator[bytes]:
    """A gzip member that inflates to ``{"blob": "000…"}`` of about ``decoded_bytes``, about 1,000 times
    its size, made without compressing it all: after a full flush, a mebibyte of zeros deflates to
    the same bytes every time. The trailer's checksum is right, so the stream is valid throughout."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head, zeros, tail = b'{"blob": "', b"0" * _MIB, b'"}'
    yield b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc, size = zlib.crc32(head), len(head)
    for _ in range(decoded_bytes // _MIB):
        crc, size = zlib.crc32(zeros, crc), size + _MIB
        yield block
    crc, size = zlib.crc32(tail, crc), size + len(tail)
    yield deflate.compress(tail) + deflate.flush() + struct.pack("<II", crc, size & 0xFFFFFFFF)


def stacked_gzip_bomb(decoded_bytes: int) -> bytes:
    """A few kilobytes that inflate to a gzip bomb, which inflates to ``decoded_bytes``."""
    outer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join(outer.compress(part) for part in gzip_bomb(decoded_bytes)) + outer.flush()


async def _in_chunks(parts: Iterator[bytes], size: int = 64 * 1024) -> AsyncIterator[bytes]:
    pending, pending_size = [], 0
    for part in parts:
        pending.append(part)
        pending_size += len(part)
        if pending_size >= size:
            yield b"".join(pending)
            pending, pending_size = [], 0
            # Once the client is gone uvicorn's send returns at once: without this the stream would
            # never give Starlette's disconnect watcher a turn, and would run to its end.
            await asyncio.sleep(0)
    yield b"".join(pending)


async def _filler(total: int) -> AsyncIterator[bytes]:
    yield b'{"blob": "'
    for _ in range(total // (64 * 1024)):
        yield b"x" * (64 * 1024)
        await asyncio.sleep(0)  # as in _in_chunks
    yield b'"}'


async def _trickle() -> AsyncIterator[bytes]:
    """A valid body, one byte every 0.2 s for ``TRICKLE_SECONDS``: no single read ever waits long."""
    body = b'{"id": "trickle", "pad": "' + b" " * int(TRICKLE_SECONDS / 0.2) + b'"}'
    for byte in body:
        yield bytes([byte])
        await asyncio.sleep(0.2)


class HostileSource:
    """The ASGI app. ``raw_paths`` holds every request's path as it arrived, in order."""

    def __init__(self) -> None:
        self.raw_paths: list[bytes] = []
        self.port = 0
        self._stacked_bomb = stacked_gzip_bomb(STACKED_BOMB_BYTES)
        self._app = Starlette(
            routes=[
                Route("/good/things/{id}", self._thing),
                Route("/hostile/lures/{case}", self._lure),
                Route("/hostile/targets/{rest:path}", self._target),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.raw_paths.append(scope["raw_path"])
        await self._app(scope, receive, send)

    async def _thing(self, request: Request) -> Response:
        return JSONResponse({"id": request.path_params["id"], "name": "a well-behaved thing"})

    async def _target(self, request: Request) -> Response:
        segment = request.scope["raw_path"].removeprefix(b"/hostile/targets/")
        return JSONResponse({"id": unquote(segment.decode("ascii"))})

    async def _lure(self, request: Request) -> Response:
        case = request.path_params["case"]
        if case == "fine-gzip":  # compressed though identity was asked for: allowed, and inflated
            body = json.dumps({"id": case, "targets": []}).encode()
            return Response(gzip_bytes(body), media_type="application/json", headers={"content-encoding": "gzip"})
        if case.startswith("fine"):
            return JSONResponse({"id": case, "targets": []})
        if case == "escaping-ids":
            return JSONResponse({"id": case, "targets": list(ESCAPING_IDS)})
        return self._hostile(case)

    def _hostile(self, case: str) -> Response:
        if case == "oversize":
            return StreamingResponse(
                _filler(OVERSIZE_BYTES),
                media_type="application/json",
                headers={"content-length": str(OVERSIZE_BYTES + 12)},
            )
        if case == "oversize-chunked":
            return StreamingResponse(_filler(OVERSIZE_BYTES), media_type="application/json")
        if case == "trickle":
            return StreamingResponse(_trickle(), media_type="application/json")
        if case == "gzip-bomb":
            return StreamingResponse(
                _in_chunks(gzip_bomb(BOMB_BYTES)), media_type="application/json", headers={"content-encoding": "gzip"}
            )
        if case == "gzip-bomb-stacked":
            return Response(
                self._stacked_bomb, media_type="application/json", headers={"content-encoding": "gzip, gzip"}
            )
        if case == "redirect":
            # Another host name for this same server: a request that followed it would be recorded.
            return Response(status_code=302, headers={"location": f"http://localhost:{self.port}/stolen"})
        if case == "html":
            return Response(json.dumps({"id": case, "targets": []}), media_type="text/html")
        if case == "deep":
            return Response(
                b'{"id": "deep", "x": ' + b"[" * NESTING + b"]" * NESTING + b"}", media_type="application/json"
            )
        return JSONResponse({"error": "not found"}, status_code=404)


def gzip_bytes(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


class HostileServer(BackgroundServer):
    """``with HostileServer() as server: server.url``, the app under uvicorn in a thread on a free port."""

    def __init__(self) -> None:
        self.source = HostileSource()
        super().__init__(self.source)
        self.source.port = self.port

    def environ(self) -> dict[str, str]:
        """The ``base_url_env`` variables of ``policies/hostile.yaml``, pointing at this server."""
        return {"HOSTILE_SOURCE_URL": f"{self.url}/hostile", "GOOD_SOURCE_URL": f"{self.url}/good"}
