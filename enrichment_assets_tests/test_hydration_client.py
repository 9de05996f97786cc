"""The per-source hydration client against exact failure shapes (httpx.MockTransport): id encoding,
404 as "not there yet", retries, Retry-After, malformed, oversized, non-JSON, too deeply nested and
compressed bodies, redirects, timeouts (per read and per request), the circuit breaker, batch answers,
auth headers that never leak, and the rate limiter's even spacing of requests. The same hostile
answers from a real server, through the whole cycle, are in ``test_hostile_sources.py``."""

from __future__ import annotations

import asyncio
import json
import time
import zlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from enrichment_assets.hydration import CircuitBreaker, RateLimiter, SourceClient
from enrichment_assets.policy import EntityType, Source

from .hostile_source import gzip_bomb, gzip_bytes

RUN = EntityType(source="src", path="/runs/{id}", batch_path="/runs")
SINGLE_ONLY = EntityType(source="src", path="/runs/{id}")
SECRET = "tok-very-secret-123"


def source(**overrides: object) -> Source:
    settings = {
        "base_url": "http://source.test/api",
        "requests_per_second": 1000,
        "max_retries": 2,
        "circuit_failure_threshold": 3,
        "circuit_reset": "1s",
        "max_batch_size": 3,
        "max_body_bytes": 2000,
        "auth_header": {"name": "Authorization", "env": "SRC_TOKEN"},
    } | overrides
    return Source.model_validate(settings)


def client(
    handler: Callable[[httpx.Request], httpx.Response], **overrides: object
) -> tuple[SourceClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    built = SourceClient(
        "src", source(**overrides), environ={"SRC_TOKEN": f"Bearer {SECRET}"}, transport=httpx.MockTransport(record)
    )
    return built, seen


def fetch(c: SourceClient, ids: list[str], entity_type: EntityType = SINGLE_ONLY):
    async def go():
        try:
            return await c.fetch(entity_type, ids)
        finally:
            await c.aclose()

    return asyncio.run(go())


def ok(request: httpx.Request) -> httpx.Response:
    entity_id = request.url.path.rsplit("/", 1)[1]
    return httpx.Response(200, json={"id": entity_id})


class Streamed(httpx.AsyncByteStream):
    """A body that arrives in ``chunks``, ``delay`` seconds apart, read as it arrives (an
    ``httpx.Response`` made with ``content=`` is read whole, and decoded, before the client sees it)."""

    def __init__(self, chunks: list[bytes], delay: float = 0.0) -> None:
        self.chunks = chunks
        self.delay = delay

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await asyncio.sleep(self.delay)
            yield chunk


def streamed(
    chunks: list[bytes], *, delay: float = 0.0, encoding: str | None = None, content_type: str = "application/json"
) -> httpx.Response:
    headers = {"content-type": content_type} | ({"content-encoding": encoding} if encoding else {})
    return httpx.Response(200, headers=headers, stream=Streamed(chunks, delay))


def padded(size: int) -> bytes:
    """A JSON object of exactly ``size`` bytes."""
    body = json.dumps({"id": "r", "pad": ""}).encode()
    return body[:-2] + b"x" * (size - len(body)) + body[-2:]


HUNDRED_LEVELS = b'{"x": ' + b"[" * 99 + b"]" * 99 + b', "id": "r"}'


def deflated(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    "entity_id",
    ["../admin", "a/b?x=1#y", "%2e%2e", "..", ".", "//evil.example/x", "@evil.example", "sp ace\u00fc"],
    ids=["dotdot-slash", "query-fragment", "encoded-dots", "dotdot", "dot", "scheme-relative", "userinfo", "unicode"],
)
def test_ids_stay_inside_their_path_template(entity_id: str) -> None:
    c, seen = client(lambda r: httpx.Response(404))
    assert fetch(c, [entity_id])[entity_id].status == "missing"
    [request] = seen
    assert request.url.host == "source.test"
    raw = request.url.raw_path
    assert raw.startswith(b"/api/runs/")
    segment = raw.removeprefix(b"/api/runs/")
    assert b"/" not in segment and b"?" not in segment and b"#" not in segment
    assert segment not in (b".", b"..")
    assert httpx.URL(raw.decode()).path.count("/") == 3 or "%2F" in raw.decode()


def test_404_means_missing_not_error() -> None:
    c, _ = client(lambda r: httpx.Response(404, json={"error": "not found"}))
    result = fetch(c, ["run-1"])["run-1"]
    assert (result.status, result.error) == ("missing", None)
    assert c.stats.errors == 0


def test_5xx_is_retried_then_succeeds() -> None:
    answers = iter([httpx.Response(500), httpx.Response(503), httpx.Response(200, json={"id": "r"})])
    c, seen = client(lambda r: next(answers))
    assert fetch(c, ["r"])["r"].body == {"id": "r"}
    assert len(seen) == 3 and c.stats.retries == 2


def test_retries_are_bounded_and_the_error_says_why() -> None:
    c, seen = client(lambda r: httpx.Response(502), circuit_failure_threshold=100)
    result = fetch(c, ["r"])["r"]
    assert result.status == "error"
    assert "gave up after 3 attempts" in result.error and "502" in result.error
    assert len(seen) == 3


def test_429_honours_retry_after() -> None:
    answers = iter([httpx.Response(429, headers={"retry-after": "1"}), httpx.Response(200, json={"id": "r"})])
    c, seen = client(lambda r: next(answers))
    started = time.monotonic()
    assert fetch(c, ["r"])["r"].status == "found"
    assert time.monotonic() - started >= 0.95
    assert c.stats.throttled == 1 and len(seen) == 2


def test_timeouts_are_retried() -> None:
    calls = iter([httpx.ReadTimeout("slow"), httpx.ConnectError("refused"), None])

    def handler(request: httpx.Request) -> httpx.Response:
        error = next(calls)
        if error:
            raise error
        return httpx.Response(200, json={"id": "r"})

    c, seen = client(handler)
    assert fetch(c, ["r"])["r"].status == "found"
    assert len(seen) == 3


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(200, content=b"<html>oops</html>"), "content type 'none', not JSON"),
        (
            httpx.Response(200, content=b'{"id": "r"}', headers={"content-type": "text/html"}),
            "content type 'text/html', not JSON",
        ),
        (httpx.Response(200, content=b'{"id": ', headers={"content-type": "application/json"}), "not JSON"),
        (httpx.Response(200, json=["a", "list"]), "expected a JSON object"),
        (
            httpx.Response(
                200, content=b'{"x": ' + b"[" * 100 + b"]" * 100 + b"}", headers={"content-type": "application/json"}
            ),
            "nested deeper than 100 levels",
        ),
        (httpx.Response(200, json={"blob": "x" * 5000}), "over 2000 bytes"),
        (streamed([b'{"blob": "', b"x" * 1500, b"x" * 1500, b'"}']), "over 2000 bytes"),
        (streamed(list(gzip_bomb(64 * 1024 * 1024)), encoding="gzip"), "over 2000 bytes once decompressed"),
        (streamed([gzip_bytes(padded(2001))], encoding="gzip"), "over 2000 bytes once decompressed"),
        (streamed([gzip_bytes(gzip_bytes(b"{}"))], encoding="gzip, gzip"), "'gzip, gzip' was not asked for"),
        (streamed([b"\x1b\x00"], encoding="br"), "content encoding 'br' was not asked for"),
        (streamed([b"\x1f\x8b\x08\x00 not really gzip"], encoding="gzip"), "malformed compressed body"),
        (httpx.Response(302, headers={"location": "http://elsewhere.test/steal"}), "redirects are not followed"),
        (httpx.Response(403), "answered 403"),
    ],
    ids=[
        "no-content-type",
        "html-json-looking",
        "truncated",
        "array",
        "101-levels",
        "oversized",
        "oversized-undeclared",
        "gzip-bomb",
        "gzip-one-over",
        "stacked-encodings",
        "brotli",
        "corrupt-gzip",
        "redirect",
        "forbidden",
    ],
)
def test_bad_answers_fail_that_entity_and_the_batch_goes_on(response: httpx.Response, message: str) -> None:
    c, seen = client(lambda r: response if r.url.path.endswith("/bad") else ok(r))
    results = fetch(c, ["good-1", "bad", "good-2"])
    assert results["bad"].status == "error" and message in results["bad"].error
    assert results["good-1"].status == results["good-2"].status == "found"
    assert all(r.url.host == "source.test" for r in seen), "a redirect is never followed"


@pytest.mark.parametrize(
    ("response", "size"),
    [
        (streamed([padded(2000)]), 2000),
        (streamed([padded(2000)], content_type="application/vnd.source+json; charset=utf-8"), 2000),
        (streamed([gzip_bytes(padded(2000))], encoding="gzip"), 2000),
        (streamed([deflated(padded(1500))], encoding="deflate"), 1500),
        (streamed([gzip_bytes(padded(1500))], encoding="x-gzip, identity"), 1500),
        (streamed([HUNDRED_LEVELS]), len(HUNDRED_LEVELS)),
    ],
    ids=["at-the-limit", "vendor-json-type", "gzip-at-the-limit", "deflate", "x-gzip", "100-levels"],
)
def test_acceptable_answers_are_read_whole(response: httpx.Response, size: int) -> None:
    c, seen = client(lambda r: response)
    result = fetch(c, ["r"])["r"]
    assert result.status == "found", result.error
    assert len(json.dumps(result.body, separators=(", ", ": "))) == size
    assert seen[0].headers["accept-encoding"] == "identity", "compressed bodies are not asked for"


def test_json_nested_past_what_the_parser_takes_fails_that_entity() -> None:
    deep = b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    c, _ = client(lambda r: streamed([deep]) if r.url.path.endswith("/deep") else ok(r), max_body_bytes=300_000)
    results = fetch(c, ["deep", "fine"])
    assert results["deep"].status == "error" and "nested deeper than 100 levels" in results["deep"].error
    assert results["fine"].status == "found"


def test_an_unused_body_is_never_an_error() -> None:
    big = httpx.Response(
        404, headers={"content-type": "text/html", "content-encoding": "br"}, stream=Streamed([b"x" * 100_000] * 10)
    )
    c, _ = client(lambda r: big)
    assert fetch(c, ["r"])["r"].status == "missing"


def test_a_trickled_body_is_cut_off_at_the_timeout_of_the_whole_request() -> None:
    trickle = [b'{"id": "r", "pad": "'] + [b" "] * 100 + [b'"}']
    c, seen = client(lambda r: streamed(trickle, delay=0.05), timeout_seconds=0.3, max_retries=1)
    started = time.monotonic()
    result = fetch(c, ["r"])["r"]
    assert time.monotonic() - started < 1.5, "two attempts of 0.3 s and a backoff, not two of 5 s"
    assert result.status == "error" and "gave up after 2 attempts: timed out after 0.3s" in result.error
    assert len(seen) == 2


def test_open_circuit_fails_fast_and_costs_few_calls() -> None:
    c, seen = client(
        lambda r: httpx.Response(503),
        max_retries=4,
        circuit_failure_threshold=3,
        max_concurrency=1,
        circuit_reset="60s",
    )
    results = fetch(c, [f"r{i}" for i in range(40)])
    assert len(seen) <= 3, "the breaker opened after three failures"
    assert {r.status for r in results.values()} <= {"unavailable", "error"}
    unavailable = [r for r in results.values() if r.status == "unavailable"]
    assert len(unavailable) >= 39 and "circuit open" in unavailable[0].error


def test_circuit_half_opens_after_the_reset() -> None:
    now = [0.0]
    breaker = CircuitBreaker(2, 10, clock=lambda: now[0])
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 10.5
    assert breaker.allow(), "one probe after the reset"
    assert not breaker.allow(), "only one probe at a time"
    breaker.record_failure()
    assert breaker.is_open and not breaker.allow()
    now[0] = 21
    assert breaker.allow()
    breaker.record_success()
    assert not breaker.is_open and breaker.allow()


def test_batch_endpoint_chunks_and_maps_items_and_missing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        ids = request.url.params.get_list("ids")
        if "x/3" in ids:
            return httpx.Response(200, json={"items": [{"id": "x/3"}], "missing": []})
        return httpx.Response(200, json={"items": [{"id": i} for i in ids if i != "gone"], "missing": ["gone"]})

    c, seen = client(handler)
    results = fetch(c, ["a", "b", "gone", "a", "x/3", "left-out"], RUN)
    assert len(seen) == 2, "five distinct ids in batches of at most three"
    assert all(len(r.url.params.get_list("ids")) <= 3 for r in seen)
    assert results["a"].body == {"id": "a"} and results["x/3"].status == "found"
    assert results["gone"].status == "missing"
    assert results["left-out"].status == "error" and "left out" in results["left-out"].error


def test_malformed_batch_fails_only_its_chunk() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        ids = request.url.params.get_list("ids")
        if "poison" in ids:
            return httpx.Response(200, json={"items": "nope"})
        return httpx.Response(200, json={"items": [{"id": i} for i in ids], "missing": []})

    c, _ = client(handler)
    results = fetch(c, ["a", "b", "c", "poison", "d"], RUN)
    assert [results[i].status for i in "abc"] == ["found"] * 3
    assert results["poison"].status == results["d"].status == "error"


def test_auth_header_is_sent_and_never_reported() -> None:
    c, seen = client(lambda r: httpx.Response(500))
    result = fetch(c, ["r"])["r"]
    assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    assert SECRET not in result.error
    assert SECRET not in repr(c.stats.as_dict()) and SECRET not in repr(c.source)


def test_rate_limiter_never_exceeds_its_rate_in_any_second() -> None:
    limiter = RateLimiter(40)

    async def go() -> list[float]:
        starts = []
        for _ in range(100):
            await limiter.acquire()
            starts.append(time.monotonic())
        return starts

    starts = asyncio.run(go())
    peak = max(sum(1 for t in starts if s <= t < s + 1.0) for s in starts)
    assert peak <= 40
    assert starts[-1] - starts[0] >= 2.0
