"""No secret appears anywhere: with every source's auth header, both API tokens and a database password
configured, a whole enrichment (the Dagster job, its checks, a source failing on the way) and a round of
good and bad API requests leave none of those values in any log line, Dagster event or metadata entry,
API answer, stored error or search document."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg
import httpx
import pytest
from dagster._serdes import serialize_value
from elasticsearch.helpers import scan
from sqlalchemy.engine import make_url

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.defs.definitions import build_definitions
from enrichment_assets.defs.names import CHECKS_JOB, ENRICHMENT_JOB, INCREMENTAL, MODE_TAG
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import generate_graph
from enrichment_assets.dev.simulator.server import SimulatorServer, simulator_server
from enrichment_assets.factstore import FactStore
from enrichment_assets.policy import AuthHeader, Policy, load_policy
from enrichment_assets.search import SearchIndex
from enrichment_assets.settings import SHIPPED_POLICY, Settings

SCALE = 0.02
WRITE_TOKEN = "write-token-7f3a9c1e"
READ_TOKEN = "read-token-2b8d4e6f"
DB_PASSWORD = "db-password-5c0ffee9"


def source_token(name: str) -> str:
    return f"src-{name}-token-91ae"


def with_auth(policy: Policy) -> Policy:
    sources = {
        name: s.model_copy(update={"auth_header": AuthHeader(name="Authorization", env=f"TOKEN_{name.upper()}")})
        for name, s in policy.sources.items()
    }
    return policy.model_copy(update={"sources": sources})


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with simulator_server(seed=5, scale=SCALE) as server:
        yield server


def test_no_secret_appears_in_logs_events_answers_errors_or_documents(
    make_postgres_database,
    simulator: SimulatorServer,
    elasticsearch_url: str,
    search_index: SearchIndex,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    policy = with_auth(load_policy(SHIPPED_POLICY))
    secrets = [WRITE_TOKEN, READ_TOKEN, DB_PASSWORD, *(source_token(n) for n in policy.sources)]
    # Trust auth on the test server: the password is accepted and ignored, but it is in every URL.
    url = make_url(make_postgres_database()).set(password=DB_PASSWORD).render_as_string(hide_password=False)
    env = {
        **simulator.environ(),
        "ENRICHMENT_DATABASE_URL": url,
        "ENRICHMENT_API_TOKEN": WRITE_TOKEN,
        "ENRICHMENT_READ_TOKEN": READ_TOKEN,
        **{f"TOKEN_{n.upper()}": source_token(n) for n in policy.sources},
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    store = FactStore.from_url(url)
    store.migrate()
    answers = api_round(store, policy, search_index)

    # One source fails for the whole run, so error paths (retries, circuit, stored errors) run too.
    httpx.post(simulator.url + "/admin/outage", json={"source": "datasets", "outage_seconds": 600}).raise_for_status()
    defs = build_definitions(policy)
    resources = {
        "fact_store": FactStoreResource(database_url=url),
        "sources": SourcesResource(),
        "search": SearchResource(elasticsearch_url=elasticsearch_url, index_alias=search_index.alias),
    }
    with dg.instance_for_test() as instance:
        run = defs.resolve_job_def(ENRICHMENT_JOB).execute_in_process(
            partition_key=datetime.now(UTC).strftime("%Y-%m-%d"),
            instance=instance,
            resources=resources,
            tags={MODE_TAG: INCREMENTAL},
        )
        checks = defs.resolve_job_def(CHECKS_JOB).execute_in_process(
            instance=instance, resources=resources, raise_on_error=False
        )
        events = [serialize_value(record) for result in (run, checks) for record in instance.all_logs(result.run_id)]
    httpx.post(simulator.url + "/admin/outage", json={"source": "datasets"}).raise_for_status()

    states = {s.entity_type: s.counts for s in store.status()}
    assert states["model"].get("fully_enriched"), "the enrichment ran (models call no source that was down)"
    assert any("failed" in e or "deferred" in e or "unavailable" in e for e in events), "the failing source was hit"
    errors = [store.get_entity(t, i).last_error or "" for t in policy.policies for i in generate_ids(t)]
    search_index.refresh()
    documents = [
        json.dumps(hit["_source"])
        for hit in scan(search_index.client, index=search_index.alias, query={"query": {"match_all": {}}})
    ]
    captured = capfd.readouterr()
    places = {
        "log lines": caplog.text + captured.out + captured.err,
        "Dagster events and metadata": "\n".join(events),
        "API answers": "\n".join(answers),
        "stored errors": "\n".join(errors),
        "search documents": "\n".join(documents),
    }
    assert all(places.values()), "every place had something to search"
    leaks = {where: [s for s in secrets if s in text] for where, text in places.items()}
    assert leaks == {where: [] for where in places}
    store.dispose()


def generate_ids(entity_type: str) -> list[str]:
    return generate_graph(5, SCALE).ids(entity_type)


def api_round(store: FactStore, policy: Policy, index: SearchIndex) -> list[str]:
    """Good and bad requests to the API; every answer's status line, headers and body."""
    settings = Settings.from_env()
    events = "\n".join(json.dumps(e) for e in thin_events(generate_graph(5, SCALE)))
    write, read = {"authorization": f"Bearer {WRITE_TOKEN}"}, {"authorization": f"Bearer {READ_TOKEN}"}
    wrong = {"authorization": f"Bearer {WRITE_TOKEN}x"}
    ndjson = {"content-type": "application/x-ndjson"}
    with BackgroundServer(create_app(store, settings, index), settings=settings) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            answers = [
                client.post("/v1/events", content=events, headers={**write, **ndjson}),
                client.post("/v1/events", content=events, headers={**wrong, **ndjson}),
                client.post("/v1/events", content=events, headers={**read, **ndjson}),
                client.post("/v1/events", content='{"entity_type": "nope"}\n{bad', headers={**write, **ndjson}),
                client.get("/v1/entities/model_instance/mi-000001", headers=read),
                client.get("/v1/entities/model_instance/mi-000001", headers=write),
                client.get("/v1/entities/model_instance/mi-000001"),
                client.get("/v1/entities/model_instance/nobody/edges", headers=read),
                client.get("/v1/search?q=x&size=nope", headers=read),
                client.get("/healthz"),
            ]
    assert answers[0].status_code == 202 and answers[1].status_code == 401 and answers[4].status_code == 200
    return [f"{a.status_code} {dict(a.headers)} {a.text}" for a in answers]
