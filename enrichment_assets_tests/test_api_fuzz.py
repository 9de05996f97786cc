"""Property-based fuzzing of the ingest and read API: 400 generated requests (derandomized, so CI
sees the same ones) sent byte for byte over a real socket to uvicorn, over PostgreSQL and the search
server. Every answer keeps the properties in ``fuzzing.violations``, and /healthz stays 200;
``bench/fuzz.py`` sends ten thousand more."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.factstore import FactStore
from enrichment_assets.search import SearchIndex
from enrichment_assets_tests.fuzzing import (
    READ_TOKEN,
    SETTINGS,
    WRITE_TOKEN,
    FuzzRequest,
    named_keys,
    requests,
    send,
    tally,
    violations,
)

READ = (("Authorization", f"Bearer {READ_TOKEN}"),)
WRITE = (("Authorization", f"Bearer {WRITE_TOKEN}"),)


@pytest.fixture
def fuzz_server(pg_store: FactStore, search_index: SearchIndex) -> Iterator[BackgroundServer]:
    with BackgroundServer(create_app(pg_store, SETTINGS, search_index), settings=SETTINGS) as server:
        yield server


@settings(
    max_examples=400,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fuzz_request=requests())
# What the fuzzer found: a NUL in a key or a relation reached PostgreSQL, which cannot hold one (500).
@example(FuzzRequest("GET", "/v1/entities/thing/a%00b", READ))
@example(FuzzRequest("GET", "/v1/entities/th%00ing/a/edges", READ))
@example(FuzzRequest("GET", "/v1/entities/thing/a/edges?relation=a%00b", READ))
def test_generated_requests_keep_every_property(
    fuzz_server: BackgroundServer, pg_store: FactStore, fuzz_request: FuzzRequest
) -> None:
    keys = named_keys(fuzz_request)
    before = tally(pg_store.engine, keys)
    answer = send(fuzz_server.port, fuzz_request)
    after = tally(pg_store.engine, keys)
    assert violations(fuzz_request, answer, before, after) == [], fuzz_request
    assert httpx.get(fuzz_server.url + "/healthz", timeout=10).status_code == 200


def test_a_line_separator_inside_an_id_is_part_of_the_id(fuzz_server: BackgroundServer, pg_store: FactStore) -> None:
    body = '{"entity_type": "thing", "entity_id": "a\u2028b", "event_type": "created"}'.encode()
    answer = send(fuzz_server.port, FuzzRequest("POST", "/v1/events", WRITE, body))
    assert answer.status == 202, answer.body
    assert pg_store.get_entity("thing", "a\u2028b") is not None
