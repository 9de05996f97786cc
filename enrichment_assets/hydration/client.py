"""One async HTTP client per source system: the only code that talks to sources.

The rules live here, never in an asset: explicit timeouts; a rate limit and a concurrency cap per
source (the process's own, or shared by all processes: ``limits.py``); retries with exponential
backoff and jitter on 5xx, timeouts and connection errors; ``Retry-After`` honoured on 429; a circuit
breaker; 404 meaning "not there yet" (a forward reference, not an error). ``timeout_seconds`` bounds
every read and write and also the request as a whole, so a body trickled a byte at a time is cut off.
An answer must be JSON (``application/json`` or ``application/*+json``), at most ``max_body_bytes``
both as sent and decoded (checked as it streams in, never buffered past the limit) and nested at most
``MAX_JSON_DEPTH`` levels; anything else fails that entity, and the run goes on. Ids are
percent-encoded into exactly one path segment of the source's template and the request path is built
raw, so no id can change the host or step outside its template. Redirects are never followed. The
auth header's value is read from its environment variable once, when the client is built, and
appears in no log, metric or error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from enrichment_assets.hydration.limits import CircuitBreaker, LocalLimits, SourceLimits
from enrichment_assets.policy import EntityType, Source

log = logging.getLogger(__name__)

Status = Literal["found", "missing", "error", "unavailable"]
MAX_RETRY_AFTER_SECONDS = 60.0
# Deeper documents are refused: real entities nest a few levels, and a deep one would later overflow
# the stack of whatever serializes or walks it (json.loads alone stops near 1,000 levels).
MAX_JSON_DEPTH = 100
# The body of a non-2xx answer is read up to this many bytes, so the connection can be reused.
DRAIN_BYTES = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    """What a source said about one entity. ``unavailable`` means the source is down (circuit open):
    the attempt should be deferred, not counted against the entity."""

    status: Status
    body: dict[str, Any] | None = None
    error: str | None = None


@dataclass
class SourceStats:
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    entities_requested: int = 0
    by_status: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    # Seconds requests spent waiting for a concurrency slot and their turn, added over all requests.
    budget_wait_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "retries": self.retries, "throttled": self.throttled,
            "entities_requested": self.entities_requested, "errors": self.errors,
            "by_status": dict(self.by_status), "budget_wait_seconds": round(self.budget_wait_seconds, 3),
        }


class _Failure(Exception):
    def __init__(self, message: str, *, unavailable: bool = False) -> None:
        super().__init__(message)
        self.unavailable = unavailable


def encode_segment(entity_id: str) -> str:
    """Percent-encode an id as one path segment. ``.`` and ``..`` are encoded too: as literal segments
    they would be resolved away by anything that normalizes the path."""
    encoded = quote(entity_id, safe="")
    if set(entity_id) <= {"."}:
        encoded = encoded.replace(".", "%2E")
    return encoded


class SourceClient:
    """Fetch entities from one source. Build once per run; ``aclose()`` when done."""

    def __init__(
        self,
        name: str,
        source: Source,
        *,
        environ: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
        limits: SourceLimits | None = None,
    ) -> None:
        """``limits`` default to the process's own (``LocalLimits``); the client closes them."""
        env = os.environ if environ is None else environ
        self.name = name
        self.source = source
        self.base = httpx.URL(source.resolved_base_url(dict(env)))
        # identity: httpx would inflate each compressed chunk whole, so a few kilobytes of gzip could
        # become gigabytes before any size check. A source that compresses anyway is inflated here, a
        # bounded step at a time (``_BoundedBody``).
        headers = {"accept": "application/json", "accept-encoding": "identity", "user-agent": "enrichment-assets"}
        if source.auth_header is not None and env.get(source.auth_header.env):
            headers[source.auth_header.name] = env[source.auth_header.env]
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(source.timeout_seconds),
            follow_redirects=False,
            limits=httpx.Limits(max_connections=source.max_concurrency,
                                max_keepalive_connections=source.max_concurrency),
            transport=transport,
        )
        self.limits = limits or LocalLimits(requests_per_second=source.requests_per_second,
                                            max_concurrency=source.max_concurrency)
        self.breaker = CircuitBreaker(source.circuit_failure_threshold, source.circuit_reset.total_seconds())
        self._rng = rng or random.Random()
        self.stats = SourceStats()

    async def aclose(self) -> None:
        try:
            await self._client.aclose()
        finally:
            await self.limits.aclose()

    async def fetch(self, entity_type: EntityType, ids: Sequence[str]) -> dict[str, Fetched]:
        """Fetch distinct ``ids`` of one type, through the batch endpoint when the type has one."""
        unique = list(dict.fromkeys(ids))
        self.stats.entities_requested += len(unique)
        if entity_type.batch_path and len(unique) > 1:
            size = self.source.max_batch_size or 1
            chunks = [unique[i : i + size] for i in range(0, len(unique), size)]
            parts = await asyncio.gather(*(self._fetch_batch(entity_type, chunk) for chunk in chunks))
            return {k: v for part in parts for k, v in part.items()}
        results = await asyncio.gather(*(self._fetch_one(entity_type, entity_id) for entity_id in unique))
        return dict(zip(unique, results, strict=True))

    async def _fetch_one(self, entity_type: EntityType, entity_id: str) -> Fetched:
        path = entity_type.path.replace("{id}", encode_segment(entity_id))
        try:
            response, body = await self._get(self._url(path))
        except _Failure as failure:
            return self._failed(failure)
        if response.status_code == 404:
            return Fetched("missing")
        try:
            document = _json_object(body, self.source.max_body_bytes)
        except ValueError as error:
            return self._failed(_Failure(f"{self.name}: malformed body for {entity_id!r}: {error}"))
        return Fetched("found", document)

    async def _fetch_batch(self, entity_type: EntityType, ids: list[str]) -> dict[str, Fetched]:
        assert entity_type.batch_path is not None
        query = "&".join(f"ids={quote(entity_id, safe='')}" for entity_id in ids)
        try:
            response, body = await self._get(self._url(entity_type.batch_path, query))
            if response.status_code != 200:
                raise _Failure(f"{self.name}: batch request answered {response.status_code}")
            document = _json_object(body, self.source.max_body_bytes)
            items, missing = document.get("items"), document.get("missing", [])
            if not isinstance(items, list) or not isinstance(missing, list):
                raise ValueError("expected {'items': [...], 'missing': [...]}")
        except _Failure as failure:
            fetched = self._failed(failure)
            return dict.fromkeys(ids, fetched)
        except ValueError as error:
            fetched = self._failed(_Failure(f"{self.name}: malformed batch body: {error}"))
            return dict.fromkeys(ids, fetched)
        wanted = set(ids)
        results: dict[str, Fetched] = {}
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("id"), str) and item["id"] in wanted:
                results[item["id"]] = Fetched("found", item)
        for entity_id in missing:
            if isinstance(entity_id, str) and entity_id in wanted and entity_id not in results:
                results[entity_id] = Fetched("missing")
        for entity_id in ids:
            if entity_id not in results:
                results[entity_id] = self._failed(_Failure(f"{self.name}: batch answer left out {entity_id!r}"))
        return results

    def _url(self, path: str, query: str = "") -> httpx.URL:
        raw = self.base.raw_path.split(b"?")[0].rstrip(b"/") + path.encode("ascii")
        if query:
            raw += b"?" + query.encode("ascii")
        url = self.base.copy_with(raw_path=raw)
        if url.host != self.base.host or url.port != self.base.port:
            raise ValueError("request URL left its source")  # unreachable by construction; kept as a guard
        return url

    def _failed(self, failure: _Failure) -> Fetched:
        self.stats.errors += 1
        return Fetched("unavailable" if failure.unavailable else "error", error=str(failure))

    async def _get(self, url: httpx.URL) -> tuple[httpx.Response, bytes]:
        """GET with limits, retries and the breaker. Returns a 2xx or 404 answer, or raises _Failure."""
        last = "no attempt made"
        for attempt in range(self.source.max_retries + 1):
            if attempt:
                self.stats.retries += 1
            try:
                waiting_since = time.monotonic()
                async with self.limits.slot():
                    await self.limits.turn()
                    self.stats.budget_wait_seconds += time.monotonic() - waiting_since
                    # Checked after queueing for a slot: the breaker may have opened meanwhile.
                    if not self.breaker.allow():
                        raise _Failure(
                            f"{self.name} unavailable: circuit open for {self.breaker.seconds_until_retry():.0f}s "
                            f"more after repeated failures ({last})", unavailable=True)
                    self.stats.requests += 1
                    response, body = await self._send(url)
            except (httpx.TimeoutException, TimeoutError):
                last = f"timed out after {self.source.timeout_seconds}s"
                self.breaker.record_failure()
            except httpx.TransportError as error:
                last = f"connection failed ({type(error).__name__})"
                self.breaker.record_failure()
            except _Refused as refused:
                # The source answered; the answer is unacceptable and would be the same again.
                self.breaker.record_success()
                raise _Failure(f"{self.name}: {refused}") from None
            else:
                status = response.status_code
                self.stats.by_status[str(status)] += 1
                if status == 429:
                    self.stats.throttled += 1
                    await asyncio.sleep(self._retry_after(response, attempt))
                    last = "throttled (429)"
                    continue
                if status >= 500:
                    last = f"answered {status}"
                    self.breaker.record_failure()
                elif 300 <= status < 400:
                    self.breaker.record_success()
                    raise _Failure(f"{self.name}: answered a redirect ({status}); redirects are not followed")
                elif status >= 400 and status != 404:
                    self.breaker.record_success()
                    raise _Failure(f"{self.name}: answered {status}")
                else:
                    self.breaker.record_success()
                    return response, body
            if attempt < self.source.max_retries:
                await asyncio.sleep(self._backoff(attempt))
        # If the breaker is open the source is failing as a whole: defer rather than spend the
        # entity's attempts. If it is closed, others succeed and this request alone keeps failing.
        raise _Failure(f"{self.name}: gave up after {self.source.max_retries + 1} attempts: {last}",
                       unavailable=self.breaker.is_open)

    async def _send(self, url: httpx.URL) -> tuple[httpx.Response, bytes]:
        """The answer and, for a 2xx, its body (for any other status, ``b""``: its body is never used)."""
        limit = self.source.max_body_bytes
        # httpx's timeout bounds each read; this bounds the request as a whole.
        async with asyncio.timeout(self.source.timeout_seconds), self._client.stream("GET", url) as response:
            if not response.is_success:
                await _drain(response, min(limit, DRAIN_BYTES))
                return response, b""
            content_type = response.headers.get("content-type", "")
            if not _is_json(content_type):
                raise _Refused(f"answered {response.status_code} with content type {content_type or 'none'!r}, "
                               "not JSON")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise _Refused(f"body over {limit} bytes")
            if response.is_stream_consumed:
                # The transport handed over a body it had read and decoded already (httpx.MockTransport).
                body = _BoundedBody(limit, encoding="")
                body.feed(response.content)
            else:
                body = _BoundedBody(limit, encoding=response.headers.get("content-encoding", ""))
                async for chunk in response.aiter_raw():
                    body.feed(chunk)
        return response, body.content()

    def _backoff(self, attempt: int) -> float:
        base = min(0.2 * 2**attempt, 5.0)
        return base * self._rng.uniform(0.5, 1.5)

    def _retry_after(self, response: httpx.Response, attempt: int) -> float:
        raw = response.headers.get("retry-after", "").strip()
        seconds: float | None = None
        if raw.replace(".", "", 1).isdigit():
            seconds = float(raw)
        elif raw:
            try:
                seconds = (parsedate_to_datetime(raw) - datetime.now(UTC)).total_seconds()
            except (TypeError, ValueError):
                seconds = None
        if seconds is None:
            seconds = self._backoff(attempt)
        return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


class _Refused(Exception):
    """An answer refused for its shape (size, content type, encoding): not retried."""


class _BoundedBody:
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
            raise _Refused(f"content encoding {encoding!r} was not asked for")
        self._read = 0
        self._size = 0
        self._chunks: list[bytes] = []

    def feed(self, data: bytes) -> None:
        self._read += len(data)
        if self._read > self._limit:
            raise _Refused(f"body over {self._limit} bytes")
        if self._inflater is not None:
            try:
                # One byte past the room left tells "over the limit" from "exactly at it".
                data = self._inflater.decompress(data, self._limit - self._size + 1)
            except zlib.error:
                raise _Refused("malformed compressed body") from None
        self._size += len(data)
        if self._size > self._limit:
            raise _Refused(f"body over {self._limit} bytes once decompressed"
                           if self._inflater is not None else f"body over {self._limit} bytes")
        self._chunks.append(data)

    def content(self) -> bytes:
        return b"".join(self._chunks)


async def _drain(response: httpx.Response, limit: int) -> None:
    """Read an unused body to its end if it is short; a longer one is left, which closes the connection."""
    if response.is_stream_consumed:
        return
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read > limit:
            return


def _is_json(content_type: str) -> bool:
    """``application/json`` or ``application/<anything>+json``, with or without parameters."""
    kind, _, subtype = content_type.split(";", 1)[0].strip().lower().partition("/")
    return kind == "application" and (subtype == "json" or (subtype.endswith("+json") and len(subtype) > 5))


def _json_object(body: bytes, limit: int) -> dict[str, Any]:
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
