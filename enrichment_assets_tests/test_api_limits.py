"""Slow and greedy clients over real sockets: a body trickled at 1 byte/s is cut off at the body
deadline with a 408 and nothing written; past the in-flight bound the excess gets a JSON 503 with
Retry-After at once (under ``enrichment serve`` as shipped, with its limits from the environment);
past the connection bound uvicorn refuses; the limits parse from the environment."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer, free_port
from enrichment_assets.factstore import FactStore
from enrichment_assets.settings import ConfigError, Settings

THINGS_POLICY = Path(__file__).parent / "policies" / "things.yaml"
BODY = json.dumps({"entity_type": "thing", "entity_id": "slow", "event_type": "created"}).encode()


def start_post(port: int, length: int, first_bytes: bytes = b"") -> socket.socket:
    """A connection that has sent a POST's head (declaring ``length`` body bytes) and ``first_bytes``."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    head = (
        "POST /v1/events HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-ndjson\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + first_bytes)
    return sock


def response_of(sock: socket.socket) -> tuple[http.client.HTTPResponse, bytes, float]:
    """The response read off ``sock``, its body, and when it arrived (``time.monotonic``)."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    sock.close()
    return response, body, time.monotonic()


def test_a_trickled_body_is_cut_off_at_the_deadline(pg_store: FactStore) -> None:
    settings = Settings(entity_types=frozenset({"thing"}), body_timeout_seconds=2)
    with BackgroundServer(create_app(pg_store, settings), settings=settings) as server:
        sock = start_post(server.port, len(BODY))
        sock.settimeout(1.0)
        started, sent = time.monotonic(), 0
        while sent < len(BODY):
            sock.sendall(BODY[sent : sent + 1])
            sent += 1
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except TimeoutError:
                continue
        sock.settimeout(5)
        response, body, arrived = response_of(sock)
    assert response.status == 408
    assert json.loads(body)["error"] == "the body did not arrive within 2 s; nothing was written"
    assert response.getheader("connection") == "close"
    assert 2 <= arrived - started < 4.5 and sent < len(BODY)
    assert pg_store.status() == []


@pytest.fixture
def shipped_server(postgres_url: str, pg_store: FactStore) -> Iterator[str]:
    """``enrichment serve`` in its own process, limits from its environment: 16 connections, 3
    requests in flight, a 2 s body deadline."""
    port = free_port()
    env = {
        **os.environ,
        "ENRICHMENT_DATABASE_URL": postgres_url,
        "ENRICHMENT_POLICY": str(THINGS_POLICY),
        "ENRICHMENT_MAX_CONNECTIONS": "16",
        "ENRICHMENT_MAX_IN_FLIGHT": "3",
        "ENRICHMENT_BODY_TIMEOUT_SECONDS": "2",
    }
    for unused in ("ENRICHMENT_API_TOKEN", "ENRICHMENT_READ_TOKEN", "ELASTICSEARCH_URL"):
        env.pop(unused, None)
    command = [str(Path(sys.executable).parent / "enrichment"), "serve", "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f"enrichment serve did not start: {process.stderr.read().decode()[-2000:]}")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_past_the_in_flight_bound_the_excess_gets_503_with_retry_after(
    shipped_server: str, pg_store: FactStore
) -> None:
    port = int(shipped_server.rsplit(":", 1)[1])
    started = time.monotonic()
    # 3 + 3 slow clients at once: each sends its head and one byte of a body that never finishes.
    sockets = [start_post(port, len(BODY), BODY[:1]) for _ in range(6)]
    with ThreadPoolExecutor(len(sockets)) as pool:
        answers = list(pool.map(response_of, sockets))
    by_status: dict[int, list[tuple[http.client.HTTPResponse, bytes, float]]] = {}
    for answer in answers:
        by_status.setdefault(answer[0].status, []).append(answer)
    assert sorted(by_status) == [408, 503] and [len(by_status[408]), len(by_status[503])] == [3, 3]
    for response, body, arrived in by_status[503]:
        assert (response.getheader("retry-after"), response.getheader("content-type")) == ("1", "application/json")
        assert json.loads(body) == {"error": "server busy; retry"}
        assert arrived - started < 1.5, "turned away at once, not after the slow ones"
    assert all(arrived - started >= 2 for _, _, arrived in by_status[408])
    assert httpx.get(shipped_server + "/v1/entities/thing/slow").status_code == 404, "free again; nothing written"
    assert pg_store.status() == []


def test_past_the_connection_bound_uvicorn_refuses(pg_store: FactStore) -> None:
    settings = Settings(entity_types=frozenset({"thing"}), max_connections=4, max_in_flight=2)
    with BackgroundServer(create_app(pg_store, settings), settings=settings) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        time.sleep(0.2)
        refused = httpx.get(server.url + "/healthz")
        for sock in idle:
            sock.close()
        time.sleep(0.2)
        served = httpx.get(server.url + "/healthz")
    assert (refused.status_code, served.status_code) == (503, 200)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (256, 64, 30.0)),
        ({"ENRICHMENT_MAX_CONNECTIONS": "32"}, (32, 31, 30.0)),
        ({"ENRICHMENT_MAX_CONNECTIONS": "100", "ENRICHMENT_MAX_IN_FLIGHT": "10"}, (100, 10, 30.0)),
        ({"ENRICHMENT_BODY_TIMEOUT_SECONDS": "2.5"}, (256, 64, 2.5)),
    ],
    ids=["defaults", "in-flight-follows-connections", "both-set", "fractional-deadline"],
)
def test_limits_from_the_environment(env: dict[str, str], expected: tuple[int, int, float]) -> None:
    settings = Settings.from_env(env)
    assert (settings.max_connections, settings.max_in_flight, settings.body_timeout_seconds) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"ENRICHMENT_MAX_CONNECTIONS": "10", "ENRICHMENT_MAX_IN_FLIGHT": "10"},
        {"ENRICHMENT_MAX_CONNECTIONS": "1"},
        {"ENRICHMENT_BODY_TIMEOUT_SECONDS": "0"},
        {"ENRICHMENT_BODY_TIMEOUT_SECONDS": "nan"},
        {"ENRICHMENT_MAX_IN_FLIGHT": "many"},
    ],
    ids=["in-flight-not-below-connections", "one-connection", "zero-deadline", "nan-deadline", "not-a-number"],
)
def test_bad_limits_are_refused_by_name(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)
