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
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal
from urllib.parse import quote

import httpx

from enrichment_assets.hydration.bodies import DRAIN_BYTES, BoundedBody, Refused, drain, is_json, json_object
from enrichment_assets.hydration.limits import CircuitBreaker, LocalLimits, SourceLimits
from enrichment_assets.policy import EntityType, Source

log = logging.getLogger(__name__)

Status = Literal["found", "missing", "error", "unavailable"]
MAX_RETRY_AFTER_SECONDS = 60.0


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
            "requests": self.requests,
            "retries": self.retries,
            "throttled": self.throttled,
            "entities_requested": self.entities_requested,
            "errors": self.errors,
            "by_status": dict(self.by_status),
            "budget_wait_seconds": round(self.budget_wait_seconds, 3),
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
        breaker: CircuitBreaker | None = None,
    ) -> None:
        """``limits`` default to the process's own (``LocalLimits``); the client closes them."""
        env = os.environ if environ is None else environ
        self.name = name
        self.source = source
        self.base = httpx.URL(source.resolved_base_url(dict(env)))
        # identity: httpx would inflate each compressed chunk whole, so a few kilobytes of gzip could
        # become gigabytes before any size check. A source that compresses anyway is inflated here, a
        # bounded step at a time (``bodies.BoundedBody``).
        headers = {"accept": "application/json", "accept-encoding": "identity", "user-agent": "enrichment-assets"}
        if source.auth_header is not None and env.get(source.auth_header.env):
            headers[source.auth_header.name] = env[source.auth_header.env]
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(source.timeout_seconds),
            follow_redirects=False,
            limits=httpx.Limits(
                max_connections=source.max_concurrency, max_keepalive_connections=source.max_concurrency
            ),
            transport=transport,
        )
        self.limits = limits or LocalLimits(
            requests_per_second=source.requests_per_second, max_concurrency=source.max_concurrency
        )
        # A breaker outlives the client when the caller keeps it (one per source per process): a source found
        # dead by one step is not probed afresh by the next.
        self.breaker = breaker or CircuitBreaker(source.circuit_failure_threshold, source.circuit_reset.total_seconds())
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
            document = json_object(body, self.source.max_body_bytes)
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
            document = json_object(body, self.source.max_body_bytes)
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
                            f"more after repeated failures ({last})",
                            unavailable=True,
                        )
                    self.stats.requests += 1
                    response, body = await self._send(url)
            except (httpx.TimeoutException, TimeoutError):
                last = f"timed out after {self.source.timeout_seconds}s"
                self.breaker.record_failure()
            except httpx.TransportError as error:
                last = f"connection failed ({type(error).__name__})"
                self.breaker.record_failure()
            except Refused as refused:
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
        raise _Failure(
            f"{self.name}: gave up after {self.source.max_retries + 1} attempts: {last}",
            unavailable=self.breaker.is_open,
        )

    async def _send(self, url: httpx.URL) -> tuple[httpx.Response, bytes]:
        """The answer and, for a 2xx, its body (for any other status, ``b""``: its body is never used)."""
        limit = self.source.max_body_bytes
        # httpx's timeout bounds each read; this bounds the request as a whole.
        async with asyncio.timeout(self.source.timeout_seconds), self._client.stream("GET", url) as response:
            if not response.is_success:
                await drain(response, min(limit, DRAIN_BYTES))
                return response, b""
            content_type = response.headers.get("content-type", "")
            if not is_json(content_type):
                raise Refused(f"answered {response.status_code} with content type {content_type or 'none'!r}, not JSON")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise Refused(f"body over {limit} bytes")
            if response.is_stream_consumed:
                # The transport handed over a body it had read and decoded already (httpx.MockTransport).
                body = BoundedBody(limit, encoding="")
                body.feed(response.content)
            else:
                body = BoundedBody(limit, encoding=response.headers.get("content-encoding", ""))
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
