"""The code location under a real ``dagster-webserver`` and ``dagster-daemon`` (``LocalDagster``), driven
the way an operator drives it: an asset backfill of one branch, launched through the webserver's
GraphQL and run by the daemon, re-enriches exactly the entities first seen in its partition range; and
the branch's lineage page renders in a real headless Chromium.

One instance serves the module (SQLite storage in a temporary DAGSTER_HOME, a fresh PostgreSQL database
as the fact store, the simulator as the sources, the Elasticsearch-compatible server as search), since
starting it is the slow part.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from enrichment_assets.defs.branch import INCREMENTAL, MODE_TAG
from enrichment_assets.defs.sensors import job_name
from enrichment_assets.dev.local_dagster import LOCATION, LocalDagster
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import generate_graph
from enrichment_assets.dev.simulator.server import simulator_server
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import EntityState, entities
from enrichment_assets.search import SearchIndex

ROOT = Path(__file__).resolve().parents[1]
SEED, SCALE = 7, 0.02
GROUP = "feature"  # ten entities at this scale and one hop (their dataset): the cheapest branch
BRANCH_ASSETS = ("candidates", "hydrated", "edges", "index_updates")
SOURCES_OF_GROUP = ("feature_store", "datasets")  # what `sources/...` nodes are labelled in the graph
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
SCHEDULE_KINDS = ("retry_sweep", "stale_refresh")  # each branch's schedules, named <type>_<kind>
FINISHED = ("SUCCESS", "FAILURE", "CANCELED")
# Debian's Chromium (`apt-get install chromium`); playwright's own browser download is never used.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def fact_store(make_postgres_database: Callable[[], str]) -> Iterator[FactStore]:
    store = FactStore.from_url(make_postgres_database())
    store.migrate()
    yield store
    store.dispose()


@pytest.fixture(scope="module")
def dagster(
    tmp_path_factory: pytest.TempPathFactory, fact_store: FactStore, elasticsearch_url: str
) -> Iterator[LocalDagster]:
    """Webserver + daemon on a free port over the simulator, with a search index of their own."""
    index = SearchIndex.from_url(elasticsearch_url, alias=f"test-ui-{uuid.uuid4().hex[:10]}")
    index.ensure()
    with simulator_server(seed=SEED, scale=SCALE) as simulator:
        env = {
            **simulator.environ(),
            "ENRICHMENT_DATABASE_URL": fact_store.engine.url.render_as_string(hide_password=False),
            "ELASTICSEARCH_URL": elasticsearch_url,
            "ENRICHMENT_INDEX_ALIAS": index.alias,
        }
        with LocalDagster(tmp_path_factory.mktemp("dagster_home"), env) as instance:
            yield instance
    for name in index.current_indices():
        index.client.indices.delete(index=name)
    index.client.indices.delete_index_template(name=f"{index.alias}-template")
    index.close()


@pytest.fixture
def artifacts_dir() -> Path:
    """Where screenshots go: ``ENRICHMENT_TEST_ARTIFACTS``, else a git-ignored folder beside the tests."""
    path = Path(os.environ.get("ENRICHMENT_TEST_ARTIFACTS") or ROOT / "enrichment_assets_tests" / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_asset_backfill_reenriches_exactly_its_partition_range(dagster: LocalDagster, fact_store: FactStore) -> None:
    # Nothing but this test may enrich the branch: its sensor and schedules are switched off first,
    # before any entity exists, so they have nothing to act on while they stop.
    _stop_automation(dagster)

    today = datetime.now(UTC).date()
    before, first, last = today - timedelta(days=20), today - timedelta(days=10), today - timedelta(days=9)
    events = [e for e in thin_events(generate_graph(SEED, SCALE)) if e["entity_type"] == GROUP]
    ids = sorted(e["entity_id"] for e in events)
    placed = {before: ids[:3], first: ids[3:5], last: ids[5:7]}  # ids[7:] stay in today's partition
    inside, outside = set(placed[first] + placed[last]), set(ids) - set(placed[first] + placed[last])
    fact_store.ingest_events(Event.model_validate(e) for e in events)
    _move_first_seen(fact_store, placed)

    # The range is enriched once already (incremental runs, as the sensor starts them), so the
    # backfill has to recompute it: an incremental claim would find nothing due there. Outside the
    # range everything is still uncached and due, so a backfill leaking out of its window would take it.
    baseline_runs = [_launch_incremental_run(dagster, day.isoformat()) for day in (first, last)]
    assert {r["status"] for r in _wait_for_runs(dagster, baseline_runs, timeout=120)} == {"SUCCESS"}
    baseline = _entity_states(fact_store)
    assert {i for i, (state, at) in baseline.items() if state == EntityState.FULLY_ENRICHED and at} == inside
    assert all(baseline[i] == (EntityState.UNCACHED, None) for i in outside)

    started = time.time()
    range_keys = [first.isoformat(), last.isoformat()]
    backfill_id = _launch_backfill(dagster, *range_keys)
    backfill = _wait_for_backfill(dagster, backfill_id, timeout=180)

    after = _entity_states(fact_store)
    started_at = datetime.fromtimestamp(started, UTC)
    assert {i for i, (_, at) in after.items() if at is not None and at > started_at} == inside
    assert {i: after[i] for i in outside} == {i: baseline[i] for i in outside}

    runs = backfill["runs"]
    assert sorted(_tags(r)["dagster/partition"] for r in runs) == range_keys
    assert all(_tags(r).get("dagster/backfill") == backfill_id for r in runs), runs
    assert all(r["status"] == "SUCCESS" for r in runs), runs
    touching_branch = {
        r["runId"]
        for r in _runs(dagster, createdAfter=started)
        if r["jobName"] == job_name(GROUP) or GROUP in {key["path"][0] for key in r["assetSelection"] or []}
    }
    assert touching_branch == {r["runId"] for r in runs}, "only the backfill ran the branch"

    updates = _materializations(dagster, "index_updates", after=started)
    assert sorted(m["partition"] for m in updates) == range_keys
    assert {m["runId"] for m in updates} == {r["runId"] for r in runs}
    claimed = {
        m["partition"]: _metadata(m, "mode", "claimed") for m in _materializations(dagster, "candidates", after=started)
    }
    assert claimed == {day.isoformat(): {"mode": "recompute", "claimed": len(placed[day])} for day in (first, last)}


def test_group_lineage_page_renders_in_chromium(dagster: LocalDagster, artifacts_dir: Path) -> None:
    executable = _chromium_executable()
    from playwright.sync_api import expect, sync_playwright

    # Until someone dismisses it, the UI covers every page with a "Join the Dagster community" modal
    # (its state is a file in DAGSTER_HOME; the webserver says whether it is due).
    community_modal = _graphql(dagster, "{ shouldShowNux }")["shouldShowNux"]
    screenshot = artifacts_dir / f"lineage-{GROUP}.png"
    screenshot.unlink(missing_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{dagster.url}/locations/{LOCATION}/asset-groups/{GROUP}")
            if community_modal:
                skip = page.get_by_role("button", name="Skip")
                skip.click()
                expect(skip).to_be_hidden()
            for text in (*BRANCH_ASSETS, *SOURCES_OF_GROUP):
                expect(page.get_by_text(text, exact=True).first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert screenshot.stat().st_size > 0


# -- the fact store ---------------------------------------------------------------------------------


def _move_first_seen(store: FactStore, placed: dict[date, list[str]]) -> None:
    """Put entities into other partitions: first seen at midday (UTC) of the given day."""
    rows = [
        {"b_type": GROUP, "b_id": entity_id, "b_first_seen": datetime.combine(day, time_of_day(12), UTC)}
        for day, ids in placed.items()
        for entity_id in ids
    ]
    stmt = (
        sa.update(entities)
        .where(entities.c.entity_type == sa.bindparam("b_type"), entities.c.entity_id == sa.bindparam("b_id"))
        .values(first_seen_at=sa.bindparam("b_first_seen"))
    )
    with store.engine.begin() as conn:
        conn.execute(stmt, rows)
        moved = conn.execute(
            sa.select(entities.c.entity_id, entities.c.first_seen_at).where(
                entities.c.entity_type == GROUP, entities.c.entity_id.in_([r["b_id"] for r in rows])
            )
        )
        assert dict(moved.all()) == {r["b_id"]: r["b_first_seen"] for r in rows}


def _entity_states(store: FactStore) -> dict[str, tuple[str, datetime | None]]:
    """entity id -> (state, last_enriched_at) of the branch's type."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(entities.c.entity_id, entities.c.state, entities.c.last_enriched_at).where(
                entities.c.entity_type == GROUP
            )
        )
        return {entity_id: (state, at) for entity_id, state, at in rows}


# -- Dagster through GraphQL ------------------------------------------------------------------------

SENSOR = """
query ($s: SensorSelector!) {
  sensorOrError(sensorSelector: $s) {
    __typename ... on Sensor { id sensorState { status ticks(limit: 1) { status } } }
  }
}"""
STOP_SENSOR = """
mutation ($id: String) {
  stopSensor(id: $id) {
    __typename ... on StopSensorMutationResult { instigationState { status } } ... on PythonError { message }
  }
}"""
SCHEDULE = """
query ($s: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $s) { __typename ... on Schedule { id scheduleState { status } } }
}"""
STOP_SCHEDULE = """
mutation ($id: String) {
  stopRunningSchedule(id: $id) {
    __typename ... on ScheduleStateResult { scheduleState { status } } ... on PythonError { message }
  }
}"""
LAUNCH_RUN = """
mutation ($p: ExecutionParams!) {
  launchRun(executionParams: $p) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on Error { message }
  }
}"""
RUNS = """
query ($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status jobName assetSelection { path } } } }
}"""
LAUNCH_BACKFILL = """
mutation ($p: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $p) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on Error { message }
  }
}"""
BACKFILL = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill {
      status isAssetBackfill error { message }
      runs(limit: 50) { runId status tags { key value } }
    }
    ... on PythonError { message }
  }
}"""
MATERIALIZATIONS = """
query ($key: AssetKeyInput!, $after: String) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(afterTimestampMillis: $after) {
        partition runId
        metadataEntries { label ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } }
      }
    }
  }
}"""


def _stop_automation(dagster: LocalDagster) -> None:
    """Stop the sensor and the branch's schedules, and make sure they stay stopped.

    The daemon reads a sensor's state when a tick starts and writes it back when the tick ends, so a
    stop landing in between is undone (and that tick may still launch runs). Hence: stop, let any
    tick under way finish, check that the stop held, and stop again if it did not.
    """
    sensor = {**REPOSITORY, "sensorName": "uncached_entities_sensor"}
    schedules = [{**REPOSITORY, "scheduleName": f"{GROUP}_{kind}"} for kind in SCHEDULE_KINDS]
    deadline = time.monotonic() + 60
    while True:
        result = _graphql(dagster, STOP_SENSOR, {"id": _instigator(dagster, sensor)["id"]})["stopSensor"]
        assert result["__typename"] == "StopSensorMutationResult", result
        for schedule in schedules:
            result = _graphql(dagster, STOP_SCHEDULE, {"id": _instigator(dagster, schedule)["id"]})
            assert result["stopRunningSchedule"]["__typename"] == "ScheduleStateResult", result
        time.sleep(1)
        while _instigator(dagster, sensor)["sensorState"]["ticks"][:1] == [{"status": "STARTED"}]:
            assert time.monotonic() < deadline, "a sensor tick did not finish within 60s"
            time.sleep(0.5)
        time.sleep(0.5)  # a tick's end is recorded just before the sensor's state is written back
        statuses = [
            _instigator(dagster, sensor)["sensorState"]["status"],
            *(_instigator(dagster, schedule)["scheduleState"]["status"] for schedule in schedules),
        ]
        if statuses == ["STOPPED"] * 3:
            return
        assert time.monotonic() < deadline, f"the sensor and schedules did not stay stopped: {statuses}"


def _instigator(dagster: LocalDagster, selector: dict[str, str]) -> dict[str, Any]:
    """The sensor or schedule the selector names: its id, status and (a sensor's) latest tick."""
    if "sensorName" in selector:
        found = _graphql(dagster, SENSOR, {"s": selector})["sensorOrError"]
    else:
        found = _graphql(dagster, SCHEDULE, {"s": selector})["scheduleOrError"]
    assert found["__typename"] in ("Sensor", "Schedule"), found
    return found


def _launch_incremental_run(dagster: LocalDagster, partition: str) -> str:
    """One run of the branch's job for one partition, tagged the way the sensor tags its runs."""
    tags = {"dagster/partition": partition, MODE_TAG: INCREMENTAL}
    params = {
        "selector": {**REPOSITORY, "jobName": job_name(GROUP)},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    result = _graphql(dagster, LAUNCH_RUN, {"p": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def _runs(dagster: LocalDagster, **runs_filter: Any) -> list[dict[str, Any]]:
    return _graphql(dagster, RUNS, {"filter": runs_filter})["runsOrError"]["results"]


def _wait_for_runs(dagster: LocalDagster, run_ids: list[str], *, timeout: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(dagster, runIds=run_ids)
        if len(runs) == len(run_ids) and all(r["status"] in FINISHED for r in runs):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(f"runs did not finish within {timeout:.0f}s: {runs}{_log_tail(dagster)}")
        time.sleep(1)


def _launch_backfill(dagster: LocalDagster, start: str, end: str) -> str:
    """An asset backfill of the group's four assets over [start, end], as the UI's dialog sends it."""
    params = {
        "partitionsByAssets": [
            {"assetKey": {"path": [GROUP, name]}, "partitions": {"range": {"start": start, "end": end}}}
            for name in BRANCH_ASSETS
        ],
        "title": "test_dagster_ui",
    }
    result = _graphql(dagster, LAUNCH_BACKFILL, {"p": params})["launchPartitionBackfill"]
    assert result["__typename"] == "LaunchBackfillSuccess", result
    return result["backfillId"]


def _wait_for_backfill(dagster: LocalDagster, backfill_id: str, *, timeout: float) -> dict[str, Any]:
    """The backfill once COMPLETED_SUCCESS. The daemon looks at backfills every 30 s, so this takes at
    least one such interval after the runs are done."""
    deadline = time.monotonic() + timeout
    while True:
        backfill = _graphql(dagster, BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", backfill
        if backfill["status"] == "COMPLETED_SUCCESS":
            assert backfill["isAssetBackfill"]
            return backfill
        if backfill["status"] in ("FAILED", "CANCELED", "COMPLETED_FAILED") or time.monotonic() > deadline:
            raise AssertionError(f"backfill {backfill_id} is {backfill['status']}: {backfill}{_log_tail(dagster)}")
        time.sleep(1)


def _materializations(dagster: LocalDagster, asset: str, *, after: float) -> list[dict[str, Any]]:
    variables = {"key": {"path": [GROUP, asset]}, "after": str(int(after * 1000))}
    return _graphql(dagster, MATERIALIZATIONS, variables)["assetOrError"]["assetMaterializations"]


def _metadata(materialization: dict[str, Any], *labels: str) -> dict[str, Any]:
    entries = {e["label"]: e.get("text", e.get("intValue")) for e in materialization["metadataEntries"]}
    return {label: entries.get(label) for label in labels}


def _graphql(dagster: LocalDagster, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """``dagster.graphql`` with the webserver's answer and log in the failure message."""
    try:
        return dagster.graphql(query, variables)
    except httpx.HTTPStatusError as error:
        detail = error.response.text[:2000]
        raise AssertionError(f"{error}\n{detail}{_log_tail(dagster, 'webserver')}") from error


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["tags"]}


def _log_tail(dagster: LocalDagster, process: str = "daemon", lines: int = 40) -> str:
    log = dagster.home / f"{process}.log"
    if not log.exists():
        return ""
    return f"\n--- {log} (tail) ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# -- the browser ------------------------------------------------------------------------------------


def _chromium_executable() -> str:
    """Debian's Chromium, or ``ENRICHMENT_CHROMIUM``. Missing is a failure, not a skip: CI installs it
    (``.ci/run``), and a laptop has to be told how to."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        pytest.fail("playwright is not installed: run `make install` (or `pip install -e '.[dev]'`)")
    given = os.environ.get("ENRICHMENT_CHROMIUM")
    found = given or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not os.access(found, os.X_OK):
        pytest.fail(
            "this test drives a real Chromium and found none"
            + (f" at ENRICHMENT_CHROMIUM={given}" if given else " on PATH")
            + ": install Debian's with `sudo apt-get install -y chromium` (.ci/run does this in CI), or "
            "point ENRICHMENT_CHROMIUM at a Chromium or Chrome binary. Never `playwright install`."
        )
    return found
