"""The source simulator: the seeded graph, its contract with ``policies/mds.yaml``, the six HTTP sources
on a real uvicorn port (single and batch GETs, 404s, path-traversal ids), every fault knob, the admin
API and stats, and the ``simulate`` command's ``--emit-events`` output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
import yaml
from click.testing import CliRunner

from enrichment_assets.dev.simulator import (
    DERIVED_EDGES,
    ENTITY_TYPES,
    REFERENCES,
    SOURCES,
    Simulator,
    SimulatorServer,
    field_values,
    generate_graph,
)
from enrichment_assets.dev.simulator.cli import simulate
from enrichment_assets.dev.simulator.graph import BASE_COUNTS, count_for
from enrichment_assets.dev.simulator.stats import RequestRecord, Stats

MDS = yaml.safe_load((Path(__file__).parents[1] / "enrichment_assets/policies/mds.yaml").read_text())
SEED, SCALE = 7, 0.02
GRAPH = generate_graph(SEED, SCALE)


def _encode(entity_id: str) -> str:
    """Encode an id as one path segment, the way the hydration client does (dots included)."""
    return quote(entity_id, safe="") if set(entity_id) - {"."} else entity_id.replace(".", "%2E")


def _entity_url(server: SimulatorServer, entity_type: str, raw_id: str) -> httpx.URL:
    spec = MDS["entity_types"][entity_type]
    path = urlsplit(MDS["sources"][spec["source"]]["base_url"]).path + spec["path"].replace("{id}", raw_id)
    return httpx.URL(server.url).copy_with(raw_path=path.encode("ascii"))


def _batch_url(entity_type: str) -> str:
    spec = MDS["entity_types"][entity_type]
    return urlsplit(MDS["sources"][spec["source"]]["base_url"]).path + spec["batch_path"]


@pytest.fixture(scope="module")
def server() -> Iterator[SimulatorServer]:
    with SimulatorServer(Simulator(GRAPH)) as running:
        yield running


@pytest.fixture
def client(server: SimulatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=5) as http:
        assert http.post("/admin/reset", json={"graph": True}).status_code == 200
        yield http


# --- the contract and the graph ---------------------------------------------------------------------


def test_catalog_matches_the_policy_file() -> None:
    for name, source in MDS["sources"].items():
        url = urlsplit(source["base_url"])
        assert (url.hostname, url.port) == ("127.0.0.1", 8700)
        assert (SOURCES[name].prefix, SOURCES[name].base_url_env) == (url.path, source["base_url_env"])
        assert SOURCES[name].max_batch_size == source.get("max_batch_size")
    assert set(SOURCES) == set(MDS["sources"])
    for name, spec in MDS["entity_types"].items():
        ours = ENTITY_TYPES[name]
        assert (ours.source, ours.path) == (spec["source"], spec["path"])
        assert ours.batch_path == spec.get("batch_path")
        refs = {ref: (r["field"], r["type"]) for ref, r in spec.get("references", {}).items()}
        assert dict(REFERENCES.get(name, {})) == refs
    assert set(ENTITY_TYPES) == set(MDS["entity_types"]) == set(BASE_COUNTS)
    policies = {
        t: {e["relation"]: tuple(e["path"]) for e in p["edges"]} for t, p in MDS["policies"].items() if p.get("edges")
    }
    assert {t: dict(edges) for t, edges in DERIVED_EDGES.items()} == policies


def test_same_seed_and_scale_give_the_same_graph() -> None:
    assert generate_graph(SEED, SCALE) == GRAPH
    assert generate_graph(SEED + 1, SCALE) != GRAPH


@pytest.mark.parametrize("scale", [0.001, 0.01, 0.1], ids=["tiny", "small", "tenth"])
def test_counts_scale_linearly_with_a_floor(scale: float) -> None:
    counts = generate_graph(3, scale).counts()
    assert counts == {t: count_for(t, scale) for t in BASE_COUNTS}
    assert all(n >= 2 for n in counts.values())
    assert counts["model_instance"] == max(2, round(10_000 * scale))


def test_graph_shapes_and_fan_in() -> None:
    keys = {
        "model": {"id", "name", "framework", "owner_id", "created_at"},
        "model_instance": {"id", "name", "stage", "model_id", "pipeline_run_id", "feature_ids", "created_at"},
        "pipeline_run": {"id", "name", "status", "input_dataset_ids", "ab_test_cells", "started_at"},
        "ab_test": {"id", "name", "status", "cells"},
        "feature": {"id", "name", "dataset_id"},
        "dataset": {"id", "name", "format"},
        "user": {"id", "name", "team_id"},
        "team": {"id", "name"},
    }
    graph = generate_graph(SEED, 0.1)
    for entity_type, entity in graph.items():
        assert set(entity) == keys[entity_type]
        for field, target in REFERENCES.get(entity_type, {}).values():
            refs = field_values(entity, field)
            assert all(graph.get(target, ref) for ref in refs), (entity_type, entity["id"])
    runs = list(graph.entities["pipeline_run"].values())
    assert any(not r["ab_test_cells"] for r in runs) and max(len(r["ab_test_cells"]) for r in runs) == 3
    for run in runs:
        assert 1 <= len(run["input_dataset_ids"]) <= 4
        assert all(c["cell"] in graph.get("ab_test", c["test_id"])["cells"] for c in run["ab_test_cells"])
    per_run = Counter(mi["pipeline_run_id"] for mi in graph.entities["model_instance"].values())
    shared = max(per_run.values())
    assert shared >= 10  # skewed: one run carries many instances


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("pipeline_run_id", ["run-1"]),
        ("ab_test_cells[*].test_id", ["ab-1", "ab-2"]),
        ("feature_ids[*]", ["f-1"]),
        ("nested.inner", []),
        ("missing[*].x", []),
    ],
    ids=["scalar", "fan-out-then-field", "fan-out", "absent-parent", "absent-list"],
)
def test_field_values(field: str, expected: list[str]) -> None:
    entity = {
        "pipeline_run_id": "run-1",
        "feature_ids": ["f-1", 5],
        "ab_test_cells": [{"test_id": "ab-1", "cell": "A"}, {"test_id": "ab-2"}, {"cell": "B"}],
    }
    assert field_values(entity, field) == expected


def test_expected_edges_follow_the_sources_hop_by_hop() -> None:
    mi = next(
        m
        for m in GRAPH.entities["model_instance"].values()
        if GRAPH.get("pipeline_run", m["pipeline_run_id"])["ab_test_cells"]
    )
    run = GRAPH.get("pipeline_run", mi["pipeline_run_id"])
    owner = GRAPH.get("user", GRAPH.get("model", mi["model_id"])["owner_id"])
    assert GRAPH.ab_tests_for_model_instance(mi["id"]) == {c["test_id"] for c in run["ab_test_cells"]}
    assert GRAPH.expected_edges("model_instance", mi["id"]) == {
        "evaluated_in": {c["test_id"] for c in run["ab_test_cells"]},
        "trained_on": set(run["input_dataset_ids"]),
        "uses_feature": set(mi["feature_ids"]),
        "owned_by_team": {owner["team_id"]},
    }
    assert GRAPH.follow("pipeline_run", run["id"], "input_dataset_ids[*]") == run["input_dataset_ids"]
    assert GRAPH.ab_tests_for_model_instance("mi-nope") == set()


# --- the HTTP sources ---------------------------------------------------------------------------------


@pytest.mark.parametrize("entity_type", list(MDS["entity_types"]))
def test_single_and_batch_get_for_every_entity_type(
    server: SimulatorServer, client: httpx.Client, entity_type: str
) -> None:
    first, second = GRAPH.ids(entity_type)[:2]
    answer = client.get(_entity_url(server, entity_type, _encode(first)))
    assert answer.status_code == 200 and answer.json() == GRAPH.get(entity_type, first)
    missing = client.get(_entity_url(server, entity_type, "no-such-id"))
    assert missing.status_code == 404 and missing.json() == {"error": "not found"}
    if "batch_path" not in MDS["entity_types"][entity_type]:
        return
    batch = client.get(_batch_url(entity_type), params=[("ids", first), ("ids", "nope"), ("ids", second)])
    assert batch.status_code == 200
    assert batch.json() == {
        "items": [GRAPH.get(entity_type, first), GRAPH.get(entity_type, second)],
        "missing": ["nope"],
    }
    limit = MDS["sources"][MDS["entity_types"][entity_type]["source"]]["max_batch_size"]
    assert client.get(_batch_url(entity_type), params=[("ids", first)] * limit).status_code == 200
    too_many = client.get(_batch_url(entity_type), params=[("ids", first)] * (limit + 1))
    assert too_many.status_code == 400 and str(limit) in too_many.json()["error"]


def test_bad_routes(client: httpx.Client) -> None:
    assert client.get("/datasets/nope", params={"ids": "ds-0001"}).status_code == 404  # no such batch path
    assert client.get("/model-registry/models").status_code == 400  # batch without ids
    assert client.get("/model-registry/nothing-here/x").json() == {"error": "no such route"}
    assert client.get("/unknown-source/models/x").status_code == 404
    assert client.post("/model-registry/models/model-0001").status_code == 405


@pytest.mark.parametrize("entity_id", ["../admin", "a/b?x=1#y", "%2e%2e", "..", ".", "../../admin/reset"])
def test_traversal_ids_stay_one_segment_and_never_reach_admin(
    server: SimulatorServer, client: httpx.Client, entity_id: str
) -> None:
    url = _entity_url(server, "pipeline_run", _encode(entity_id))
    answer = client.get(url)
    assert answer.status_code == 404 and answer.json() == {"error": "not found"}
    added = {"entity_type": "pipeline_run", "entity": {"id": entity_id, "name": "odd"}}
    assert client.post("/admin/entities", json=added).status_code == 201
    assert client.get(url).json() == {"id": entity_id, "name": "odd"}
    log = client.get("/admin/requests", params={"limit": 50}).json()["requests"]
    to_entity = [r for r in log if r["path"] == url.raw_path.decode()]
    assert [(r["source"], r["status"]) for r in to_entity] == [
        ("pipeline_orchestration", 404),
        ("pipeline_orchestration", 200),
    ]
    assert {r["path"] for r in log if r["source"] is None} == {"/admin/reset", "/admin/entities"}


# --- knobs ---------------------------------------------------------------------------------------------


def test_latency_and_jitter_apply_to_one_source(client: httpx.Client) -> None:
    client.post("/admin/knobs", json={"source": "datasets", "latency_ms": 200, "jitter_ms": 100})
    started = time.perf_counter()
    assert client.get("/datasets/datasets/ds-0001").status_code == 200
    assert 0.19 <= time.perf_counter() - started < 1.0
    started = time.perf_counter()
    client.get("/identity/teams/team-01")
    assert time.perf_counter() - started < 0.15


def test_error_rate_fails_about_that_fraction(client: httpx.Client) -> None:
    client.post("/admin/knobs", json={"error_rate": 0.25})
    statuses = [client.get("/identity/users/user-0001").status_code for _ in range(200)]
    failed = [s for s in statuses if s != 200]
    assert set(failed) == {500, 503} and 30 <= len(failed) <= 70
    assert client.get("/admin/stats").json()["sources"]["identity"]["by_status"]["200"] == 200 - len(failed)


def test_rate_limit_answers_429_with_retry_after(client: httpx.Client) -> None:
    client.post("/admin/knobs", json={"source": "experimentation_platform", "rate_limit_rps": 5})
    answers = [client.get("/experimentation/tests/ab-0001") for _ in range(12)]
    assert [a.status_code for a in answers[:5]] == [200] * 5
    throttled = [a for a in answers if a.status_code == 429]
    assert len(throttled) >= 5 and all(a.headers["Retry-After"] == "1" for a in throttled)
    assert client.get("/identity/teams/team-01").status_code == 200  # other sources unaffected
    time.sleep(1.05)
    assert client.get("/experimentation/tests/ab-0001").status_code == 200


def test_outage_then_recovery(client: httpx.Client) -> None:
    client.post("/admin/outage", json={"source": "experimentation_platform", "outage_seconds": 1})
    down = client.get("/experimentation/tests/ab-0001")
    assert down.status_code == 503 and down.headers["Retry-After"] == "1"
    assert client.get("/pipeline-orchestration/runs/run-00001").status_code == 200
    time.sleep(1.05)
    assert client.get("/experimentation/tests/ab-0001").status_code == 200
    client.post("/admin/outage", json={})  # every source, until cleared
    assert client.get("/identity/teams/team-01").status_code == 503
    client.post("/admin/outage", json={"clear": True})
    assert client.get("/identity/teams/team-01").status_code == 200


def test_malformed_bodies(client: httpx.Client) -> None:
    client.post("/admin/knobs", json={"source": "model_registry", "malformed_rate": 1.0})
    for _ in range(10):
        for answer in (
            client.get("/model-registry/models/model-0001"),
            client.get("/model-registry/models", params={"ids": "model-0001"}),
        ):
            assert answer.status_code == 200
            try:
                body: Any = answer.json()
            except json.JSONDecodeError:
                continue
            assert not isinstance(body, dict) or not isinstance(body.get("items"), list)


def test_late_entities_on_an_injected_clock() -> None:
    now = [1_000_000.0]
    simulator = Simulator(GRAPH, clock=lambda: now[0])
    with SimulatorServer(simulator) as server, httpx.Client(base_url=server.url) as http:
        marked = http.post(
            "/admin/late", json={"entity_type": "pipeline_run", "ids": ["run-00001"], "available_in_seconds": 30}
        )
        assert marked.json()["marked"] == 1
        assert http.get("/pipeline-orchestration/runs/run-00001").status_code == 404
        batch = http.get("/pipeline-orchestration/runs", params=[("ids", "run-00001"), ("ids", "run-00002")])
        assert batch.json()["missing"] == ["run-00001"]
        until = datetime.fromtimestamp(now[0], UTC) + timedelta(seconds=60)
        http.post("/admin/outage", json={"source": "identity", "until": until.isoformat()})
        assert http.get("/identity/teams/team-01").headers["Retry-After"] == "60"
        now[0] += 30
        arrived = http.get("/pipeline-orchestration/runs/run-00001")
        assert arrived.json() == GRAPH.get("pipeline_run", "run-00001")
        now[0] += 30
        assert http.get("/identity/teams/team-01").status_code == 200


def test_late_fraction_marks_a_seeded_share_of_runs() -> None:
    sims = [Simulator(GRAPH, late_fraction=0.5, late_seconds=60) for _ in range(2)]
    late = [{r for r in GRAPH.ids("pipeline_run") if sim.visible("pipeline_run", r) is None} for sim in sims]
    assert late[0] == late[1] and len(late[0]) == round(0.5 * len(GRAPH.ids("pipeline_run")))


def test_mutation_add_and_delete_change_the_answers(server: SimulatorServer, client: httpx.Client) -> None:
    mi = GRAPH.get("model_instance", "mi-000001")
    change = {"ab_test_cells": [{"test_id": "ab-0003", "cell": "B"}]}
    mutated = client.post(
        "/admin/mutate", json={"entity_type": "pipeline_run", "id": mi["pipeline_run_id"], "set": change}
    )
    assert mutated.status_code == 200
    assert (
        client.get(f"/pipeline-orchestration/runs/{mi['pipeline_run_id']}").json()["ab_test_cells"]
        == change["ab_test_cells"]
    )
    assert server.simulator.graph.snapshot().ab_tests_for_model_instance("mi-000001") == {"ab-0003"}
    assert client.post("/admin/entities/delete", json={"entity_type": "ab_test", "id": "ab-0003"}).json() == {
        "deleted": True
    }
    assert client.get("/experimentation/tests/ab-0003").status_code == 404
    assert server.simulator.graph.snapshot().ab_tests_for_model_instance("mi-000001") == set()
    client.post("/admin/reset", json={"graph": True})
    assert client.get("/experimentation/tests/ab-0003").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "status", "named"),
    [
        ("/admin/knobs", {"source": "nowhere", "latency_ms": 1}, 400, "nowhere"),
        ("/admin/knobs", {"error_rate": 2}, 400, "error_rate"),
        ("/admin/knobs", {"latency": 5}, 400, "latency"),
        ("/admin/mutate", {"entity_type": "pipeline_run", "id": "run-x", "set": {}}, 404, "run-x"),
        ("/admin/mutate", {"entity_type": "run", "id": "run-00001", "set": {}}, 400, "run"),
        ("/admin/mutate", {"entity_type": "pipeline_run", "id": "run-00001", "set": {"id": "other"}}, 400, "id"),
        ("/admin/late", {"entity_type": "pipeline_run", "ids": "run-1", "available_in_seconds": 1}, 400, "ids"),
    ],
    ids=[
        "unknown-source",
        "rate-out-of-range",
        "unknown-knob",
        "unknown-entity",
        "unknown-type",
        "id-change",
        "ids-not-a-list",
    ],
)
def test_admin_rejects_bad_bodies(
    client: httpx.Client, path: str, body: dict[str, Any], status: int, named: str
) -> None:
    answer = client.post(path, json=body)
    assert answer.status_code == status and named in answer.json()["error"]


def test_stats_peak_rate_and_batch_sizes(client: httpx.Client) -> None:
    for _ in range(5):
        client.get("/feature-store/features/feat-0001")
    time.sleep(1.05)
    for size in (2, 2, 3):
        client.get("/feature-store/features", params=[("ids", f"feat-000{i + 1}") for i in range(size)])
    stats = client.get("/admin/stats").json()["sources"]["feature_store"]
    assert stats["requests"] == 8 and stats["peak_rps"] == 5 and stats["by_status"] == {"200": 8}
    assert stats["batches"] == {"requests": 3, "ids": 7, "max": 3, "mean": 2.33, "histogram": {"2": 2, "3": 1}}
    assert client.get("/admin/stats").json()["sources"]["identity"]["requests"] == 0


def test_reset_returns_to_the_starting_knobs() -> None:
    sim = Simulator(GRAPH, knobs={"error_rate": 0.1})
    sim.knobs.set("identity", error_rate=0.9, rate_limit_rps=3)
    sim.knobs.reset()
    assert {s["error_rate"] for s in sim.knobs.as_dict()["sources"].values()} == {0.1}
    assert sim.knobs.as_dict()["sources"]["identity"]["rate_limit_rps"] is None


def test_request_log_is_a_bounded_ring() -> None:
    stats = Stats(log_size=3)
    for n in range(5):
        stats.finished(RequestRecord(0.0, "identity", "GET", f"/identity/users/{n}", 200, 1.0))
    assert [r["path"] for r in stats.recent(10)] == [f"/identity/users/{n}" for n in (2, 3, 4)]


# --- the command ---------------------------------------------------------------------------------------


def test_emit_events_covers_the_graph_with_forward_references(tmp_path: Path) -> None:
    result = CliRunner().invoke(simulate, ["--emit-events", "--seed", "7", "--scale", "0.01"])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in result.output.splitlines()]
    graph = generate_graph(7, 0.01)
    assert sorted((e["entity_type"], e["entity_id"]) for e in events) == sorted((t, e["id"]) for t, e in graph.items())
    assert {e["event_type"] for e in events} == {"created"} and all(e["occurred_at"] for e in events)
    position = {(e["entity_type"], e["entity_id"]): n for n, e in enumerate(events)}
    assert any(
        position[("model_instance", mi["id"])] < position[("pipeline_run", mi["pipeline_run_id"])]
        for mi in graph.entities["model_instance"].values()
    )
    out = tmp_path / "events.ndjson"
    again = CliRunner().invoke(simulate, ["--emit-events", "--scale", "0.01", "--output", str(out)])
    assert again.exit_code == 0 and out.read_text() == result.output
    assert CliRunner().invoke(simulate, ["--output", str(out)]).exit_code == 2


def test_module_entry_point_emits_events() -> None:
    command = [sys.executable, "-m", "enrichment_assets.dev.simulator", "--emit-events", "--scale", "0.001"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    assert len(done.stdout.splitlines()) == sum(count_for(t, 0.001) for t in BASE_COUNTS)
