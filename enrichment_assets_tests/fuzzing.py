"""Generated requests for fuzzing the ingest and read API over a real socket, and the properties every
answer must keep; ``test_api_fuzz.py`` runs a slice of them, ``bench/fuzz.py`` ten thousand.

Requests are written byte for byte (``FuzzRequest.wire``), so nothing between the generator and the
server tidies them: ids with ``/``, ``..``, ``%``, unicode and control characters, huge numbers in
query parameters, JSON and NDJSON bodies mixing valid and invalid events, chunked bodies, and a
Content-Length that lies. Properties (``violations``): no 5xx, an answer to every request the client
did not hang up on, a valid batch accepted and an invalid one rejected, a rejected request writes
nothing and an accepted batch writes exactly its events, and the app's statuses are the documented ones.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

import sqlalchemy as sa
from hypothesis import strategies as st

from enrichment_assets.api.openapi import openapi_document
from enrichment_assets.factstore.schema import entities
from enrichment_assets.settings import Settings

WRITE_TOKEN, READ_TOKEN = "fuzz-write-token", "fuzz-read-token"
SETTINGS = Settings(
    entity_types=frozenset({"thing", "other"}),
    max_events=20,
    max_body_bytes=16 * 1024,
    body_timeout_seconds=1.0,
    api_token=WRITE_TOKEN,
    read_token=READ_TOKEN,
)
DOCUMENT = openapi_document(SETTINGS)

_CONTROL = "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))
_NASTY_IDS = ["a", "a/b", "/", "//", "..", "../..", "%", "%2F", "%00", "a%zz", "?x=1", "#f", " ", "ü", "日本", "🙂",
              "a\u2028b", "x" * 512, "x" * 513, "", "a\x00b", "edges", "a/edges"]  # fmt: skip
_printable = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40)
_any_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
_control_ids = st.sampled_from(_CONTROL).map(lambda c: f"a{c}b")
_ids = st.one_of(st.sampled_from(_NASTY_IDS), _control_ids, _printable, _any_text)
_numbers = st.sampled_from(["0", "-1", "1", "20", "100", "1000", "10000", "10001", "9" * 40, "9" * 5000, "1e3",
                            "٣", "+5", " 7", "0x10", "", "nan", "1.5"])  # fmt: skip


@dataclass(frozen=True)
class FuzzRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    # What the Content-Length header claims: None sends the body's true length (none when empty).
    content_length: int | None = None
    chunked: bool = False
    # The client shuts its side after sending: the server sees the body end early and cannot answer.
    half_close: bool = False
    # For a batch: its events when every one is valid and the request is honest, so it must be accepted.
    events: tuple[dict[str, Any], ...] | None = None
    must_reject: bool = False

    def wire(self) -> bytes:
        lines = [f"{self.method} {self.target} HTTP/1.1", "Host: fuzz", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        body = self.body
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
            body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in _chunks(self.body)) + b"0\r\n\r\n"
        elif self.content_length is not None or self.body:
            lines.append(f"Content-Length: {len(self.body) if self.content_length is None else self.content_length}")
        return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def _chunks(body: bytes, size: int = 1000) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


@dataclass(frozen=True)
class Answer:
    status: int  # 0: the connection closed without an answer
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0


def send(port: int, request: FuzzRequest, *, timeout: float = 10.0) -> Answer:
    """Send ``request`` on a new connection to 127.0.0.1:``port`` and read the answer (status 0 when the
    connection closes, or stays silent for ``timeout`` seconds, without one)."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request.wire())
            if request.half_close:
                sock.shutdown(socket.SHUT_WR)
            response = http.client.HTTPResponse(sock, method=request.method)
            response.begin()
            body = response.read()
        except (ConnectionError, TimeoutError, http.client.HTTPException):
            return Answer(0, seconds=time.perf_counter() - started)
    headers = {k.lower(): v for k, v in response.getheaders()}
    return Answer(response.status, headers, body, time.perf_counter() - started)


def valid_events() -> st.SearchStrategy[dict[str, Any]]:
    when = st.datetimes(timezones=st.sampled_from([None, UTC])).map(lambda d: d.isoformat())
    return st.fixed_dictionaries(
        {"entity_type": st.sampled_from(sorted(SETTINGS.entity_types)),
         "entity_id": st.one_of(st.sampled_from(["a", "b", "a/b", "..", "%", "日本", "🙂", "x" * 512]), _printable),
         "event_type": st.sampled_from(["created", "updated", "deleted"])},
        optional={"occurred_at": when},
    )  # fmt: skip


def invalid_events() -> st.SearchStrategy[Any]:
    good = valid_events()
    broken = {
        "unknown type": st.just({"entity_type": "nope"}),
        "control id": st.builds(lambda c: {"entity_id": f"a{c}b"}, st.sampled_from(_CONTROL)),
        "long id": st.just({"entity_id": "x" * 513}),
        "empty id": st.just({"entity_id": ""}),
        "number id": st.just({"entity_id": 7}),
        "bad event": st.builds(lambda t: {"event_type": t}, _any_text),
        "bad time": st.builds(lambda t: {"occurred_at": t}, st.one_of(_any_text, st.just(1e308))),
        "extra field": st.just({"extra": True}),
    }
    patched = st.tuples(good, st.one_of(*broken.values())).map(lambda pair: {**pair[0], **pair[1]})
    missing = st.tuples(good, st.sampled_from(["entity_type", "entity_id", "event_type"])).map(
        lambda pair: {k: v for k, v in pair[0].items() if k != pair[1]}
    )
    return st.one_of(patched, missing, st.sampled_from([[], 5, "event", None, {}]))


@st.composite
def batches(draw: st.DrawFn) -> tuple[bytes, tuple[dict[str, Any], ...] | None, bool]:
    """(body, its events when all are valid and within limits, whether it must be rejected)."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "mixed", "too many", "junk", "huge", "empty"]))
    if kind in ("valid", "mixed", "too many"):
        size = draw(st.integers(21, 30) if kind == "too many" else st.integers(1, SETTINGS.max_events))
        events = draw(st.lists(valid_events(), min_size=size, max_size=size))
        lines: list[Any] = list(events)
        if kind == "mixed":
            lines.insert(draw(st.integers(0, len(lines))), draw(invalid_events()))
        ascii_only = draw(st.booleans())
        texts = [json.dumps(line, ensure_ascii=ascii_only) for line in lines]
        if draw(st.booleans()):
            texts.insert(draw(st.integers(0, len(texts))), "")
        body = "\n".join(texts).encode()
        within = len(body) <= SETTINGS.max_body_bytes
        return body, (tuple(events) if kind == "valid" and within else None), kind != "valid" or not within
    if kind == "junk":
        return draw(st.one_of(st.binary(max_size=200), _any_text.map(str.encode))), None, False
    if kind == "huge":
        return b'{"entity_type": "thing"}' + b" " * (SETTINGS.max_body_bytes + draw(st.integers(0, 5000))), None, True
    return draw(st.sampled_from([b"", b"\n\n", b"   "])), None, True


def _authorization(token: str) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Mostly the right token, so most requests reach their handler; else a wrong one, or none."""
    other = READ_TOKEN if token == WRITE_TOKEN else WRITE_TOKEN
    values = [f"Bearer {token}"] * 12 + [
        "Bearer wrong", f"Basic {token}", "Bearer", f"Bearer {token}x", "Bearer " + "t" * 20_000, "Bearer ÿ",
        f"Bearer {other}", "",
    ]  # fmt: skip
    return st.sampled_from(values).map(lambda value: (("Authorization", value),) if value else ())


def _segment(value: str) -> st.SearchStrategy[str]:
    """``value`` as a path segment: percent-encoded whole, with its slashes raw, encoded twice, or raw."""
    return st.sampled_from([
        urllib.parse.quote(value, safe=""),
        urllib.parse.quote(value, safe="/"),
        urllib.parse.quote(urllib.parse.quote(value, safe=""), safe=""),
        value,  # raw: a space, a control character or non-ASCII makes the request line malformed
    ])  # fmt: skip


def _query(names: list[str]) -> st.SearchStrategy[str]:
    """A query string of the route's own parameters (and strays), percent-encoded or raw."""
    values = st.one_of(_numbers, st.sampled_from(["in", "out", "sideways", "near", "%zz", "%", "%00"]), _any_text)
    pairs = st.lists(st.tuples(st.sampled_from([*names, *names, "x", ""]), values), max_size=4)
    encoded = pairs.map(lambda p: urllib.parse.urlencode(p))
    raw = pairs.map(lambda p: "&".join(f"{k}={v}" for k, v in p))
    return st.one_of(encoded, encoded, raw).map(lambda q: f"?{q}" if q else "")


@st.composite
def read_requests(draw: st.DrawFn) -> FuzzRequest:
    """GET (sometimes HEAD or another method) on an entity, its edges, or search."""
    route, names = draw(st.sampled_from([
        ("/v1/entities/{t}/{i}", []), ("/v1/entities/{t}/{i}/edges", ["limit", "direction", "relation"]),
        ("/v1/search", ["q", "type", "size"]),
    ]))  # fmt: skip
    entity_type = draw(st.one_of(st.sampled_from(["thing", "other", "nope", "..", "%2F"]), _ids))
    entity_id = draw(_ids)
    path = route.replace("{t}", draw(_segment(entity_type))).replace("{i}", draw(_segment(entity_id)))
    method = draw(st.sampled_from(["GET"] * 8 + ["HEAD", "POST", "DELETE"]))
    return FuzzRequest(method, path + draw(_query(names)), draw(_authorization(READ_TOKEN)))


@st.composite
def ingest_requests(draw: st.DrawFn) -> FuzzRequest:
    """POST /v1/events with a generated batch, an authorization, and sometimes a lie about its length."""
    body, events, invalid = draw(batches())
    headers = draw(_authorization(WRITE_TOKEN))
    authorized = headers == (("Authorization", f"Bearer {WRITE_TOKEN}"),)
    content_type = draw(st.sampled_from(["application/x-ndjson", "application/json", "text/plain", "", "ÿ/ÿ"]))
    if content_type:
        headers += (("Content-Type", content_type),)
    framing = draw(st.sampled_from(["honest"] * 12 + ["chunked"] * 3 + ["short", "long, closed", "long, open"]))
    lie: dict[str, Any] = {}
    if framing == "chunked":
        lie = {"chunked": True}
    elif framing == "short" and body:
        lie = {"content_length": draw(st.integers(0, len(body) - 1))}
    elif framing.startswith("long") and not invalid:  # an invalid body is refused before its end is awaited
        # Rare on purpose: an open connection waits out the body deadline (one second here).
        lie = {"content_length": len(body) + draw(st.integers(1, 10_000)), "half_close": framing == "long, closed"}
        if not lie["half_close"] and draw(st.integers(0, 4)):
            lie["half_close"] = True
    honest = "content_length" not in lie
    return FuzzRequest(
        "POST", "/v1/events", headers, body, **lie,
        events=events if authorized and honest else None,
        must_reject=(invalid and honest) or not authorized,
    )  # fmt: skip


_ODD_PATHS = ["/healthz", "/openapi.json", "/", "/v1", "/v1/entities", "/v1/entities/thing", "/v1/events/",
              "//v1/events", "/v1/../healthz", "/%2e%2e/healthz", "*", "/v1/search/"]  # fmt: skip
_ODD_HEADERS = st.tuples(
    st.sampled_from(["X-Fuzz", "Expect", "Content-Type", "Accept", "Cookie"]),
    st.sampled_from(["100-continue", "1", "ÿ", "a" * 3000, "*/*"]),
)


@st.composite
def odd_requests(draw: st.DrawFn) -> FuzzRequest:
    """Anything else: other methods and paths, the probe and the document, stray headers and bodies."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "get", "FOO"]))
    target = draw(st.sampled_from(_ODD_PATHS)) + draw(_query(["limit", "q"]))
    body = draw(st.one_of(st.just(b""), st.binary(max_size=64)))
    return FuzzRequest(method, target, tuple(draw(st.lists(_ODD_HEADERS, max_size=3))), body)


def requests() -> st.SearchStrategy[FuzzRequest]:
    """The mix both the test and the bench draw from: two fifths ingest, two fifths reads, a fifth odd."""
    return st.one_of(ingest_requests(), read_requests(), ingest_requests(), read_requests(), odd_requests())


Key = tuple[str, str]


@dataclass(frozen=True)
class Tally:
    """The entities table in brief: its rows, the sum of their versions (every write bumps a version,
    and versions only grow), and the versions of the keys a request names."""

    rows: int
    version_sum: int
    named: dict[Key, int]


def tally(engine: sa.Engine, keys: set[Key]) -> Tally:
    with engine.connect() as conn:
        rows, version_sum = conn.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(entities.c.version), 0))
        ).one()
        named = {}
        if keys:
            key = sa.tuple_(entities.c.entity_type, entities.c.entity_id)
            stmt = sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.version).where(
                key.in_(list(keys))
            )
            named = {(t, i): v for t, i, v in conn.execute(stmt)}
    return Tally(rows, int(version_sum), named)


def named_keys(request: FuzzRequest) -> set[Key]:
    """The entity keys a request's body names, as far as it can be read (and PostgreSQL can hold: no NUL)."""
    if request.events is not None:
        return {(e["entity_type"], e["entity_id"]) for e in request.events}
    keys = set()
    for line in request.body.decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(event, dict)
            and isinstance(event.get("entity_type"), str)
            and isinstance(event.get("entity_id"), str)
            and "\x00" not in event["entity_type"] + event["entity_id"]
        ):
            keys.add((event["entity_type"], event["entity_id"]))
    return keys


_ROUTES = [(re.compile(pattern), template) for pattern, template in [
    (r"/healthz", "/healthz"), (r"/openapi\.json", "/openapi.json"), (r"/v1/events", "/v1/events"),
    (r"/v1/search", "/v1/search"), (r"/v1/entities/[^/]+/.*/edges", "/v1/entities/{entity_type}/{entity_id}/edges"),
    (r"/v1/entities/[^/]+/.*", "/v1/entities/{entity_type}/{entity_id}"),
]]  # fmt: skip


def documented_statuses(request: FuzzRequest) -> set[str] | None:
    """The statuses the document gives for the operation ``request`` reaches; None if it reaches none."""
    path = urllib.parse.unquote(request.target.partition("?")[0])
    template = next((t for pattern, t in _ROUTES if pattern.fullmatch(path)), None)
    method = "get" if request.method == "HEAD" else request.method.lower()
    operation = DOCUMENT["paths"].get(template, {}).get(method)
    return set(operation["responses"]) if operation else None


def violations(request: FuzzRequest, answer: Answer, before: Tally, after: Tally) -> list[str]:
    """What ``answer`` to ``request`` broke, given the entities before and after it (empty: nothing)."""
    found = []
    if answer.status >= 500:
        found.append(f"answered {answer.status}: {answer.body[:200]!r}")
    if answer.status == 0 and not request.half_close:
        found.append("no answer")
    if request.events is not None and answer.status != 202:
        found.append(f"a valid batch was refused with {answer.status}: {answer.body[:300]!r}")
    if request.must_reject and not 400 <= answer.status < 500:
        found.append(f"an invalid or unauthorized batch got {answer.status}")
    if answer.headers.get("content-type") == "application/json":
        promised = documented_statuses(request)
        if promised is not None and str(answer.status) not in promised:
            found.append(f"{answer.status} is not among the documented {sorted(promised)}")
    if answer.status == 202:
        return found + _accepted(request, answer, before, after)
    if before != after:
        found.append(f"a rejected request ({answer.status}) wrote: {before.rows} -> {after.rows} rows")
    return found


def _accepted(request: FuzzRequest, answer: Answer, before: Tally, after: Tally) -> list[str]:
    """An accepted batch wrote exactly its events: every key it names, and nothing else."""
    keys = named_keys(request)
    found = []
    if request.events is not None and json.loads(answer.body).get("received") != len(request.events):
        found.append(f"accepted {len(request.events)} events but says {answer.body[:200]!r}")
    if missing := keys - after.named.keys():
        found.append(f"an accepted batch did not write {sorted(missing)[:3]}")
    if after.rows - before.rows != len(keys - before.named.keys()):
        found.append(f"{after.rows - before.rows} new rows for {len(keys - before.named.keys())} new keys")
    outside_before = before.version_sum - sum(before.named.values())
    if after.version_sum - sum(after.named.values()) != outside_before:
        found.append("an accepted batch changed entities outside it")
    return found
