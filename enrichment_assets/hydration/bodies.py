"""Reading a source's answer safely: a body bounded in bytes read and bytes decoded (a gzip bomb stops at
the limit), only JSON content types, JSON no deeper than ``MAX_JSON_DEPTH``. Used by ``client.py``."""

from __future__ import annotations

import json
import zlib
from typing import Any

import httpx

# Deeper documents are refused: real entities nest a few levels, and a deep one would later overflow
# the stack of whatever serializes or walks it (json.loads alone stops near 1,000 levels).
MAX_JSON_DEPTH = 100
# The body of a non-2xx answer is read up to this many bytes, so the connection can be reused.
DRAIN_BYTES = 64 * 1024


class Refused(Exception):
    """An answer refused for its shape (size, content type, encoding): not retried."""


class BoundedBody:
    """A response body collected up to ``limit`` bytes, counted both as read and as decoded.

    Sources are asked for ``identity``. One that sends gzip or deflate anyway is inflated here with
    ``max_length``, so no chunk inflates past the limit (a gzip bomb stops after ``limit`` bytes of
    output). Other or stacked encodings are refused: nothing we asked for, and each layer multiplies
    what a small body can inflate to.
    """

    def __init__(self, limit: int, *, encoding: str) -> None:
        self._limit = limit
        encodings = [e.strip().lower() for e in encoding.split(",")]
        encodings = [e for e in encodings if e not in ("", "identity")]
        self._inflater: Any = None
        if encodings in (["gzip"], ["x-gzip"], ["deflate"]):
            # 32 + MAX_WBITS reads a gzip or a zlib header, whichever comes: senders mix up the names.
            self._inflater = zlib.decompressobj(32 + zlib.MAX_WBITS)
        elif encodings:
            raise Refused(f"content encoding {encoding!r} was not asked for")
        self._read = 0
        self._size = 0
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._read += len(data)
        if self._read > self._limit:
            raise Refused(f"body over {self._limit} bytes")
        if self._inflater is not None:
            try:
                # One byte past the room left tells "over the limit" from "exactly at it".
                data = self._inflater.decompress(data, self._limit - self._size + 1)
            except zlib.error:
                raise Refused("malformed compressed body") from None
        self._size += len(data)
        if self._size > self._limit:
            raise Refused(
                f"body over {self._limit} bytes once decompressed"
                if self._inflater is not None
                else f"body over {self._limit} bytes"
            )
        self._chunks.append(data)

    def content(self) -> bytes:
        return b"".join(self._chunks)


async def drain(response: httpx.Response, limit: int) -> None:
    """Read an unused body to its end if it is short; a longer one is left, which closes the connection."""
    if response.is_stream_consumed:
        return
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > limit:
            return


def is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with or without parameters."""
    kind, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    return kind == "application" and (subtype == "json" or (subtype.endswith("+json") and len(subtype) > 5))


def json_object(body: bytes, limit: int) -> dict[str, Any]:
    if len(body) > limit:
        raise ValueError(f"body over {limit} bytes")
    try:
        document = json.loads(body)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(document, dict):
        raise ValueError(f"expected a JSON object, got {type(document).__name__}")
    if _nested_deeper_than(document, body, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return document


def _nested_deeper_than(document: Any, body: bytes, limit: int) -> bool:
    # Each level takes a bracket, so counting them (fast) settles almost every body without a walk.
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
