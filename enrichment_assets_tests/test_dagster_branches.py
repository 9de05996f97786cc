"""The Dagster layer in process, against real PostgreSQL, the simulator on a real port and the
Elasticsearch-compatible server: the asset graph the policy file gives, each branch materializing a
partition, incremental vs recompute runs, the sensor's run requests and cursor, the schedules and the
asset checks."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa

from enrichment_assets.defs.definitions import build_definitions
from enrichment_assets.defs.names import BRANCH_STEPS, ENRICHMENT_JOB, INCREMENTAL, MODE_TAG, TYPES_TAG, due_tag
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.dev.simulator.server import SimulatorServer, simulator_server
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import entities
from enrichment_assets.policy import load_policy
from enrichment_assets.search import SearchIndex
from enrichment_assets.search.documents import document_id
from enrichment_assets.settings import SHIPPED_POLICY

MDS = load_policy(SHIPPED_POLICY)
SCALE = 0.02
BRANCH_ASSETS = ("candidates", "hydrated", "edges", "index_updates")


@pytest.fixture(scope="module")
def graph() -> MdsGraph:
    return generate_graph(7, SCALE)


@pytest.fixture(scope="module")
def simulator() -> Iterator[SimulatorServer]:
    with simulator_server(seed=7, scale=SCALE) as server:
        yield server


@pytest.fixture
def database(make_postgres_database: Callable[[], str]) -> str:
    return make_postgres_database()


@pytest.fixture
def live_store(database: str) -> Iterator[FactStore]:
    """A fact store on the real clock, as the Dagster resources see it."""
    store = FactStore.from_url(database)
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture
def resources(database: str, elasticsearch_url: str, search_index: SearchIndex, sources_env: None) -> dict[str, Any]:
    return {
        "fact_store": FactStoreResource(database_url=database),
        "sources": SourcesResource(),
        "search": SearchResource(elasticsearch_url=elasticsearch_url, index_alias=search_index.alias),
    }


@pytest.fixture
def defs() -> dg.Definitions:
    return build_definitions(MDS)


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


def ingest(store: FactStore, graph: MdsGraph) -> None:
    store.ingest_events(Event.model_validate(e) for e in thin_events(graph))


def move_first_seen(store: FactStore, entity_type: str, ids: list[str], when: datetime) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(entities)
            .where(entities.c.entity_type == entity_type, entities.c.entity_id.in_(ids))
            .values(first_seen_at=when)
        )


def run_branch(
    defs: dg.Definitions,
    entity_type: str,
    partition: str,
    resources: dict[str, Any],
    instance: dg.DagsterInstance,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def(f"{entity_type}_enrichment")
    return job.execute_in_process(partition_key=partition, instance=instance, resources=resources, tags=tags)


def metadata(result: dg.ExecuteInProcessResult, entity_type: str, asset: str) -> dict[str, Any]:
    [materialization] = result.asset_materializations_for_node(f"{entity_type}__{asset}")
    return {k: v.value for k, v in materialization.metadata.items()}


# -- the asset graph ------------------------------------------------------------------------------------


def test_every_policy_type_is_a_branch_fed_by_its_source_systems(defs: dg.Definitions) -> None:
    graph = defs.resolve_asset_graph()
    keys = set(graph.get_all_asset_keys())
    for entity_type in MDS.policies:
        chain = [dg.AssetKey([entity_type, step]) for step in BRANCH_ASSETS]
        assert set(chain) <= keys
        for upstream, downstream in zip(chain, chain[1:], strict=False):
            assert upstream in graph.get(downstream).parent_keys
        hydrated = graph.get(chain[1])
        sources = {k for k in hydrated.parent_keys if k.path[0] == "sources"}
        assert sources == {dg.AssetKey(["sources", s]) for s in MDS.sources_touched(entity_type)}
        for key in chain:
            assert graph.get(key).group_name == entity_type
            assert graph.get(key).partitions_def is not None
        assert not hydrated.pools, "no one-step pools: the sources limits live in the fact store"
        freshness = graph.get(chain[-1]).freshness_policy
        assert freshness.fail_window.to_timedelta() == MDS.effective(entity_type).staleness_budget
    # The 3-hop MDS branch reads from the three systems on its path, and more.
    assert {"model_registry", "pipeline_orchestration", "experimentation_platform"} <= set(
        MDS.sources_touched("model_instance")
    )
    assert all(graph.get(dg.AssetKey(["sources", s])).is_external for s in MDS.sources)


# -- materializing branches ------------------------------------------------------------------------------


@pytest.mark.parametrize("entity_type", sorted(MDS.policies))
def test_each_branch_materializes_a_partition(
    entity_type: str,
    defs: dg.Definitions,
    resources: dict[str, Any],
    live_store: FactStore,
    graph: MdsGraph,
    search_index: SearchIndex,
) -> None:
    ingest(live_store, graph)
    with dg.instance_for_test() as instance:
        result = run_branch(defs, entity_type, today(), resources, instance)
    assert result.success
    count = live_store.status()
    states = {s.entity_type: s.counts for s in count}[entity_type]
    assert states == {"fully_enriched": len(graph.entities[entity_type])}
    candidates = metadata(result, entity_type, "candidates")
    assert (candidates["mode"], candidates["claimed"]) == ("recompute", len(graph.entities[entity_type]))
    assert metadata(result, entity_type, "edges")["enriched"] == len(graph.entities[entity_type])
    some_id = sorted(graph.entities[entity_type])[0]
    expected = {r: ids for r, ids in graph.expected_edges(entity_type, some_id).items() if ids}
    found: dict[str, set[str]] = {}
    for edge in live_store.edges_of(entity_type, some_id):
        found.setdefault(edge["relation"], set()).add(edge["dst_id"])
    assert found == expected
    search_index.refresh()
    document = search_index.client.get(index=search_index.alias, id=document_id(entity_type, some_id))["_source"]
    assert document["state"] == "fully_enriched"
    assert {r["relation"] for r in document.get("relationships", []) if r.get("direction", "out") == "out"} >= set(
        expected
    )
    index_meta = metadata(result, entity_type, "index_updates")
    assert index_meta["edge_ends_behind"] == 0
    assert index_meta["documents_indexed"] >= len(graph.entities[entity_type])


def test_model_instance_branch_answers_the_three_hop_question(
    defs: dg.Definitions, resources: dict[str, Any], live_store: FactStore, graph: MdsGraph
) -> None:
    ingest(live_store, graph)
    with dg.instance_for_test() as instance:
        result = run_branch(defs, "model_instance", today(), resources, instance)
    edges = result.output_for_node("model_instance__edges")
    hydrated = metadata(result, "model_instance", "hydrated")
    assert hydrated["source_calls/experimentation_platform"] >= 1
    assert hydrated["source_calls/model_registry"] < len(graph.entities["model_instance"]), "fetched in batches"
    for instance_id in sorted(graph.entities["model_instance"])[:20]:
        tests = set(edges[(edges.src_id == instance_id) & (edges.relation == "evaluated_in")].dst_id)
        assert tests == graph.ab_tests_for_model_instance(instance_id)


def test_incremental_runs_take_due_work_and_a_recompute_takes_its_whole_slice(
    defs: dg.Definitions, resources: dict[str, Any], live_store: FactStore, graph: MdsGraph
) -> None:
    ingest(live_store, graph)
    features = sorted(graph.entities["feature"])
    yesterday = datetime.now(UTC) - timedelta(days=1)
    move_first_seen(live_store, "feature", features[:3], yesterday)
    with dg.instance_for_test() as instance:
        first = run_branch(defs, "feature", today(), resources, instance, tags={MODE_TAG: INCREMENTAL})
        assert metadata(first, "feature", "candidates")["claimed"] == len(features) - 3, "only today's slice"
        assert {s.entity_type: s.counts for s in live_store.status()}["feature"] == {
            "fully_enriched": len(features) - 3,
            "uncached": 3,
        }
        before = {f: live_store.get_entity("feature", f).last_enriched_at for f in features[3:]}

        again = run_branch(defs, "feature", today(), resources, instance, tags={MODE_TAG: INCREMENTAL})
        assert metadata(again, "feature", "candidates")["claimed"] == 0, "nothing due: nothing claimed"

        recompute = run_branch(defs, "feature", today(), resources, instance)
        assert metadata(recompute, "feature", "candidates")["claimed_refresh"] == len(features) - 3
        assert all(live_store.get_entity("feature", f).last_enriched_at > before[f] for f in features[3:])
        assert all(live_store.get_entity("feature", f).state == "uncached" for f in features[:3]), (
            "yesterday's entities are not in today's partition"
        )

        past = run_branch(defs, "feature", yesterday.strftime("%Y-%m-%d"), resources, instance)
        assert metadata(past, "feature", "candidates")["claimed"] == 3
    assert {s.entity_type: s.counts for s in live_store.status()}["feature"] == {"fully_enriched": len(features)}


def test_a_failed_hydration_releases_its_leases(
    defs: dg.Definitions,
    resources: dict[str, Any],
    live_store: FactStore,
    graph: MdsGraph,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from enrichment_assets.hydration import walker

    ingest(live_store, graph)

    async def broken(self, entity_type, claims):  # type: ignore[no-untyped-def]
        raise RuntimeError("walker crashed")

    monkeypatch.setattr(walker.Walker, "walk", broken)
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("feature_enrichment").execute_in_process(
            partition_key=today(), instance=instance, resources=resources, raise_on_error=False
        )
    assert not result.success
    rows = [live_store.get_entity("feature", f) for f in graph.entities["feature"]]
    assert all(r.claim_owner is None and r.state == "uncached" for r in rows)


# -- the sensor and the schedules -------------------------------------------------------------------------


def evaluate_sensor(
    defs: dg.Definitions, instance: dg.DagsterInstance, database: str, cursor: str | None = None
) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("uncached_entities_sensor")
    with dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        definitions=defs,
        resources={"fact_store": FactStoreResource(database_url=database)},
    ) as context:
        return sensor(context)


def pairs(result: dg.SensorResult) -> dict[tuple[str, str], str]:
    """(per-type job, partition) -> the due set asked for, over the runs a sensor tick requested."""
    found = {}
    for request in result.run_requests:
        assert request.job_name == ENRICHMENT_JOB
        for entity_type in request.tags[TYPES_TAG].split(","):
            found[(f"{entity_type}_enrichment", request.partition_key)] = request.tags[due_tag(entity_type)]
    return found


def test_sensor_requests_one_run_per_partition_selecting_each_due_type_and_a_repeated_tick_none(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph
) -> None:
    sensor = defs.resolve_sensor_def("uncached_entities_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test() as instance:
        idle = evaluate_sensor(defs, instance, database)
        assert idle.run_requests == [] and idle.skip_reason.skip_message == "nothing is due"

        ingest(live_store, graph)
        move_first_seen(
            live_store, "feature", sorted(graph.entities["feature"])[:2], datetime.now(UTC) - timedelta(days=1)
        )
        first = evaluate_sensor(defs, instance, database, cursor=idle.cursor)
        requested = set(pairs(first))
        yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
        expected = {(f"{t}_enrichment", today()) for t in MDS.policies} | {("feature_enrichment", yesterday)}
        # capped per tick (ENRICHMENT_SENSOR_MAX_PAIRS, 8), oldest window first
        assert len(requested) == min(len(expected), 8) and requested <= expected
        assert ("feature_enrichment", yesterday) in requested
        assert sorted(r.partition_key for r in first.run_requests) == sorted({yesterday, today()}), (
            "one run per partition, whatever the number of types due in it"
        )
        [run] = [r for r in first.run_requests if r.partition_key == today()]
        types = run.tags[TYPES_TAG].split(",")
        assert set(run.asset_selection) == {dg.AssetKey([t, step]) for t in types for step in BRANCH_STEPS}
        assert types[0] == "model_instance", "highest priority first"
        assert all(r.tags[MODE_TAG] == INCREMENTAL for r in first.run_requests)
        assert len({r.run_key for r in first.run_requests}) == len(first.run_requests)
        cursor = json.loads(first.cursor)
        assert set(cursor["requested"]) >= {f"{j.removesuffix('_enrichment')}|{p}" for j, p in requested}

        repeat = evaluate_sensor(defs, instance, database, cursor=first.cursor)
        repeat_requested = set(pairs(repeat))
        assert not (repeat_requested & requested), "a repeated tick asks for nothing it already asked for"
        assert repeat_requested == expected - requested, "the rest of what the cap held back"


def test_sensor_leaves_a_queued_run_alone_and_gives_a_started_runs_leftovers_their_own_run(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)  # the code location binds it with dg.EnvVar
    ingest(live_store, graph)
    pair = ("model_instance_enrichment", today())
    due = {w.entity_type: w.due for w in live_store.due_work()}["model_instance"]
    job = defs.resolve_job_def("model_instance_enrichment")
    combined_job = defs.resolve_job_def(ENRICHMENT_JOB)
    with dg.instance_for_test() as instance:
        queued = instance.create_run_for_job(
            job, run_config={}, tags={"dagster/partition": today()}, status=dg.DagsterRunStatus.NOT_STARTED
        )
        result = evaluate_sensor(defs, instance, database)
        assert pair not in pairs(result), "a run not started yet will claim everything due when it starts"
        assert ("pipeline_run_enrichment", today()) in pairs(result), "other types are not held back"
        instance.delete_run(queued.run_id)

        # The same for a queued run of the enrichment job that selects the type among others.
        queued = instance.create_run_for_job(
            combined_job,
            run_config={},
            status=dg.DagsterRunStatus.NOT_STARTED,
            tags={"dagster/partition": today(), TYPES_TAG: "team,model_instance"},
        )
        result = evaluate_sensor(defs, instance, database)
        assert pair not in pairs(result) and ("team_enrichment", today()) not in pairs(result)
        assert ("pipeline_run_enrichment", today()) in pairs(result)
        instance.delete_run(queued.run_id)

        # It starts and leases part of the due set; what it did not take gets a run of its own.
        instance.create_run_for_job(
            job, run_config={}, tags={"dagster/partition": today()}, status=dg.DagsterRunStatus.STARTED
        )
        live_store.claim("model_instance", limit=due - 5, owner="dagster:started", lease=timedelta(minutes=5))
        result = evaluate_sensor(defs, instance, database)
    assert pairs(result)[pair].endswith("|5"), "its due set counts only the 5 entities nobody has leased"


def test_sensor_asks_for_parallel_runs_of_a_type_whose_due_set_is_more_than_one_run_claims(
    database: str, live_store: FactStore, graph: MdsGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)
    monkeypatch.setenv("ENRICHMENT_RUN_CLAIM_LIMIT", "10")
    monkeypatch.setenv("ENRICHMENT_MAX_RUNS_PER_TYPE", "3")
    monkeypatch.setenv("ENRICHMENT_SENSOR_MAX_PAIRS", "100")
    defs = build_definitions(MDS)
    ingest(live_store, graph)
    due = {w.entity_type: w.due for w in live_store.due_work()}
    assert due["model_instance"] > 30 and 10 < due["model"] <= 20, "the graph's sizes this test relies on"
    with dg.instance_for_test() as instance:
        result = evaluate_sensor(defs, instance, database)
        runs = [r for r in result.run_requests if "model_instance" in r.tags[TYPES_TAG].split(",")]
        assert len(runs) == 3, "as many runs as the due set needs, capped by ENRICHMENT_MAX_RUNS_PER_TYPE"
        assert len({r.run_key for r in result.run_requests}) == len(result.run_requests)
        assert sorted(r.tags["enrichment/slot"] for r in runs) == ["0", "1", "2"]
        assert all(r.run_config["ops"]["model_instance__candidates"]["config"]["limit"] == 10 for r in runs), (
            "each run claims the limit the sensor counted with"
        )
        assert len([r for r in result.run_requests if "model" in r.tags[TYPES_TAG].split(",")]) == 2

        # Three runs of the type in flight: the cap holds until one of them ends.
        job = defs.resolve_job_def(ENRICHMENT_JOB)
        for _ in runs:
            instance.create_run_for_job(
                job,
                run_config={},
                status=dg.DagsterRunStatus.STARTED,
                tags={"dagster/partition": today(), TYPES_TAG: "model_instance"},
            )
        live_store.claim("model_instance", limit=30, owner="dagster:started", lease=timedelta(minutes=5))
        held = evaluate_sensor(defs, instance, database, cursor=result.cursor)
        assert not [r for r in held.run_requests if "model_instance" in r.tags[TYPES_TAG].split(",")]


def test_sensor_asks_again_for_a_due_set_whose_run_failed(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A due set is named by its key, and a failed run leaves the same due set behind: without this the
    pair would wait for the retry sweep."""
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)  # the code location binds it with dg.EnvVar
    ingest(live_store, graph)
    pair = ("model_instance_enrichment", today())
    job = defs.resolve_job_def(ENRICHMENT_JOB)
    with dg.instance_for_test() as instance:
        first = evaluate_sensor(defs, instance, database)
        key = pairs(first)[pair]
        assert pair not in pairs(evaluate_sensor(defs, instance, database, cursor=first.cursor))

        failed = instance.create_run_for_job(
            job,
            run_config={},
            status=dg.DagsterRunStatus.FAILURE,
            tags={"dagster/partition": today(), due_tag("model_instance"): key},
        )
        again = evaluate_sensor(defs, instance, database, cursor=first.cursor)
        assert pairs(again).get(pair) == f"{key}|after-{failed.run_id[:8]}"
        assert pair not in pairs(evaluate_sensor(defs, instance, database, cursor=again.cursor)), (
            "asked once per failure, not on every tick"
        )


def test_retry_sweep_requests_runs_for_due_retries(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph
) -> None:
    ingest(live_store, graph)
    schedule = defs.resolve_schedule_def("feature_retry_sweep")
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime.now(UTC),
            repository_def=defs.get_repository_def(),
            resources={"fact_store": FactStoreResource(database_url=database)},
        ) as context:
            requests = list(schedule.evaluate_tick(context).run_requests or [])
    assert [(r.partition_key, r.tags[MODE_TAG], r.tags["enrichment/trigger"]) for r in requests] == [
        (today(), INCREMENTAL, "retry_sweep")
    ]


def test_stale_refresh_requests_runs_only_for_entities_past_their_refresh_interval(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph, resources: dict[str, Any]
) -> None:
    ingest(live_store, graph)
    with dg.instance_for_test() as instance:
        assert run_branch(defs, "dataset", today(), resources, instance).success
        schedule = defs.resolve_schedule_def("dataset_stale_refresh")

        def tick() -> list[dg.RunRequest]:
            with dg.build_schedule_context(
                instance=instance,
                scheduled_execution_time=datetime.now(UTC),
                repository_def=defs.get_repository_def(),
                resources={"fact_store": FactStoreResource(database_url=database)},
            ) as context:
                return list(schedule.evaluate_tick(context).run_requests or [])

        assert tick() == []
        with live_store.engine.begin() as conn:
            conn.execute(
                sa.update(entities)
                .where(entities.c.entity_type == "dataset")
                .values(last_enriched_at=datetime.now(UTC) - timedelta(days=2))
            )
        assert [r.partition_key for r in tick()] == [today()]


# -- asset checks -----------------------------------------------------------------------------------------


def run_checks(
    defs: dg.Definitions, resources: dict[str, Any], instance: dg.DagsterInstance
) -> dict[tuple[str, str], Any]:
    result = defs.resolve_job_def("enrichment_checks").execute_in_process(instance=instance, resources=resources)
    return {(e.asset_key.to_user_string(), e.check_name): e for e in result.get_asset_check_evaluations()}


def test_checks_report_staleness_quarantine_and_search_divergence(
    defs: dg.Definitions, resources: dict[str, Any], live_store: FactStore, graph: MdsGraph, search_index: SearchIndex
) -> None:
    ingest(live_store, graph)
    with dg.instance_for_test() as instance:
        for entity_type in MDS.policies:
            assert run_branch(defs, entity_type, today(), resources, instance).success
        checks = run_checks(defs, resources, instance)
        assert all(c.passed for c in checks.values()), {k: c.description for k, c in checks.items() if not c.passed}

        features = sorted(graph.entities["feature"])
        with live_store.engine.begin() as conn:
            conn.execute(
                sa.update(entities)
                .where(entities.c.entity_type == "feature")
                .values(last_enriched_at=datetime.now(UTC) - timedelta(hours=5))
            )
            conn.execute(
                sa.update(entities)
                .where(
                    entities.c.entity_type == "dataset", entities.c.entity_id == sorted(graph.entities["dataset"])[0]
                )
                .values(state="quarantined", last_error="source said 500 six times")
            )
        victim = features[0]
        search_index.client.delete(index=search_index.alias, id=document_id("feature", victim), refresh=True)
        search_index.client.indices.refresh(index=search_index.alias)
        checks = run_checks(defs, resources, instance)

    staleness = checks[("feature/index_updates", "staleness_budget")]
    assert not staleness.passed and staleness.severity == dg.AssetCheckSeverity.ERROR
    assert staleness.metadata["over_budget"].value == len(features)
    quarantined = checks[("dataset/index_updates", "quarantined")]
    assert not quarantined.passed and quarantined.severity == dg.AssetCheckSeverity.WARN
    assert quarantined.metadata["quarantined"].value == 1
    in_sync = checks[("search/entities", "search_index_in_sync")]
    assert not in_sync.passed and in_sync.severity == dg.AssetCheckSeverity.ERROR
    assert checks[("model_instance/index_updates", "staleness_budget")].passed


def test_search_check_allows_for_documents_still_in_the_outbox(
    defs: dg.Definitions, resources: dict[str, Any], live_store: FactStore, graph: MdsGraph
) -> None:
    ingest(live_store, graph)  # nothing indexed yet: everything waits in the outbox, nothing diverges
    with dg.instance_for_test() as instance:
        checks = run_checks(defs, resources, instance)
    in_sync = checks[("search/entities", "search_index_in_sync")]
    assert in_sync.passed, in_sync.description
    assert in_sync.metadata["outbox_backlog"].value == sum(len(v) for v in graph.entities.values())


def _feature_job() -> dg.JobDefinition:
    """The feature branch's job with the code location's own resources (bound from the environment)."""
    return build_definitions(MDS).resolve_job_def("feature_enrichment")


def test_re_executing_a_failed_run_from_its_failure_settles_the_original_leases(
    database: str,
    elasticsearch_url: str,
    search_index: SearchIndex,
    sources_env: None,
    live_store: FactStore,
    graph: MdsGraph,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)
    monkeypatch.setenv("ELASTICSEARCH_URL", elasticsearch_url)
    monkeypatch.setenv("ENRICHMENT_INDEX_ALIAS", search_index.alias)
    ingest(live_store, graph)
    # The database refuses edge writes for a while: the real failure shape, in whatever process runs the step.
    with live_store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_edges() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'edges are read-only for this test'; END $$"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_edges BEFORE INSERT ON edges FOR EACH ROW EXECUTE FUNCTION refuse_edges()"
        )
    features = sorted(graph.entities["feature"])
    with dg.instance_for_test() as instance:
        job = dg.reconstructable(_feature_job)
        with dg.execute_job(job, instance=instance, tags={"dagster/partition": today()}) as failed:
            assert not failed.success
            first_run = failed.run_id
        held = {live_store.get_entity("feature", f).claim_owner for f in features}
        assert held == {f"dagster:{first_run}"}, "hydrated, not yet settled: still leased to the run"

        with live_store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_edges ON edges")
        options = dg.ReexecutionOptions.from_failure(first_run, instance)
        with dg.execute_job(
            job, instance=instance, reexecution_options=options, tags={"dagster/partition": today()}
        ) as again:
            assert again.success
            assert again.run_id != first_run
            [settled] = again.asset_materializations_for_node("feature__edges")
    assert settled.metadata["enriched"].value == len(features)
    assert settled.metadata["leases_lost"].value == 0
    assert all(live_store.get_entity("feature", f).state == "fully_enriched" for f in features)


def test_two_runs_of_one_partition_settle_their_own_claims(
    database: str,
    elasticsearch_url: str,
    search_index: SearchIndex,
    sources_env: None,
    live_store: FactStore,
    graph: MdsGraph,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sensor starts a run for new work while an earlier run of the same partition is still going:
    each run's steps must read the frames that run wrote, not the other's."""
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)
    monkeypatch.setenv("ELASTICSEARCH_URL", elasticsearch_url)
    monkeypatch.setenv("ENRICHMENT_INDEX_ALIAS", search_index.alias)
    events = [Event.model_validate(e) for e in thin_events(graph) if e["entity_type"] == "feature"]
    early, late = events[: len(events) // 2], events[len(events) // 2 :]
    incremental = {"dagster/partition": today(), MODE_TAG: INCREMENTAL}
    live_store.ingest_events(early)
    # The first run's edges step is held up (the database refuses its edges) ...
    with live_store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE FUNCTION refuse_early() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.src_id = ANY(%(early)s) THEN RAISE EXCEPTION 'not yet'; END IF; RETURN NEW; END $$",
            {"early": [e.entity_id for e in early]},
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_early BEFORE INSERT ON edges FOR EACH ROW EXECUTE FUNCTION refuse_early()"
        )
    job = dg.reconstructable(_feature_job)
    with dg.instance_for_test() as instance:
        with dg.execute_job(job, instance=instance, tags=incremental) as first:
            assert not first.success
        # ... while a second run of the same partition enriches what arrived since, start to finish ...
        live_store.ingest_events(late)
        with dg.execute_job(job, instance=instance, tags=incremental) as second:
            assert second.success
            [own] = second.asset_materializations_for_node("feature__edges")
        # ... and then the first run, re-executed from its failure, settles its own claims.
        with live_store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER refuse_early ON edges")
        options = dg.ReexecutionOptions.from_failure(first.run_id, instance)
        with dg.execute_job(job, instance=instance, tags=incremental, reexecution_options=options) as rest:
            assert rest.success
            [settled] = rest.asset_materializations_for_node("feature__edges")
    assert own.metadata["enriched"].value == len(late) and own.metadata["leases_lost"].value == 0
    assert settled.metadata["enriched"].value == len(early) and settled.metadata["leases_lost"].value == 0
    assert {live_store.get_entity("feature", e.entity_id).state for e in events} == {"fully_enriched"}
    assert all(live_store.get_entity("feature", e.entity_id).claim_owner is None for e in events)


def test_run_config_that_would_claim_nothing_forever_is_refused(
    defs: dg.Definitions, resources: dict[str, Any], live_store: FactStore, graph: MdsGraph
) -> None:
    ingest(live_store, graph)
    job = defs.resolve_job_def("feature_enrichment")
    with dg.instance_for_test() as instance:
        for field in ("limit", "batch_size", "lease_minutes"):
            result = job.execute_in_process(
                partition_key=today(),
                instance=instance,
                resources=resources,
                raise_on_error=False,
                run_config={"ops": {"feature__candidates": {"config": {field: 0}}}},
            )
            assert not result.success, field
    assert all(live_store.get_entity("feature", f).claim_owner is None for f in graph.entities["feature"])


def test_a_failed_or_canceled_runs_leases_are_released_unless_it_is_being_re_executed(
    defs: dg.Definitions, database: str, live_store: FactStore, graph: MdsGraph, monkeypatch: pytest.MonkeyPatch
) -> None:
    from enrichment_assets.defs.run_status import release_leases

    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database)
    ingest(live_store, graph)
    job = defs.resolve_job_def(ENRICHMENT_JOB)
    with dg.instance_for_test() as instance:
        failed = instance.create_run_for_job(job, run_config={}, status=dg.DagsterRunStatus.FAILURE)
        claimed = live_store.claim(
            "model_instance", limit=20, owner=f"dagster:{failed.run_id}", lease=timedelta(minutes=30)
        )
        other = live_store.claim("model_instance", limit=5, owner="dagster:someone-else", lease=timedelta(minutes=30))
        retry = instance.create_run_for_job(
            job,
            run_config={},
            status=dg.DagsterRunStatus.STARTED,
            root_run_id=failed.run_id,
            parent_run_id=failed.run_id,
            tags={"dagster/root_run_id": failed.run_id, "dagster/parent_run_id": failed.run_id},
        )
        assert release_leases(instance, live_store, failed) is None, "its re-execution settles them"
        instance.report_run_failed(retry)
        assert release_leases(instance, live_store, instance.get_run_by_id(retry.run_id)) == len(claimed)
    again = live_store.claim("model_instance", limit=1000, owner="next", lease=timedelta(minutes=30))
    assert {c.key for c in claimed} <= {c.key for c in again}, "the next run takes them at once"
    assert not {c.key for c in other} & {c.key for c in again}, "another run's leases are untouched"
    assert {c.attempts for c in again if c.key in {k.key for k in claimed}} == {1}, "the attempt was given back"


def test_the_lease_release_sensors_run_by_default(defs: dg.Definitions) -> None:
    for name in ("leases_of_failed_runs", "leases_of_canceled_runs"):
        assert defs.resolve_sensor_def(name).default_status == dg.DefaultSensorStatus.RUNNING
