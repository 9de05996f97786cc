"""The fault tests' testbed: every component of the pattern, real and on local ports, plus the checks every
fault test runs once the fault is over.

``Testbed`` starts a fresh fact store database (the caller gives its URL), the simulator as its own process
(restartable on the same port; a source may get a simulator process of its own, so that it alone can refuse
connections), a fresh search alias, the ingest API (``BackgroundServer`` over ``create_app``) and
``LocalDagster`` on SQLite with the sensor every 5 s. Tests send thin events through the API (the testbed
remembers every event answered 202), inject a fault, wait for conditions with timeouts whose failure says
what was awaited and what was seen, read runs and events from the Dagster instance, and end with
``check_recovered``: nothing lost, no duplicate live edges, the derived edges equal to the simulator's graph,
the index in sync (exact reconciliation after the outbox drained) and every entity in a final state within
its type's staleness budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

import dagster as dg
import httpx
import sqlalchemy as sa

from enrichment_assets.api import create_app
from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.defs.names import ENRICHMENT_JOB, MODE_TAG
from enrichment_assets.defs.partitions import partition_key
from enrichment_assets.defs.sensors import IN_FLIGHT
from enrichment_assets.dev.devservers import die_with_parent, free_port
from enrichment_assets.dev.local_dagster import LOCATION, LocalDagster
from enrichment_assets.dev.simulator.catalog import SOURCES, match_raw_path
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph, generate_graph
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import edges as edges_table
from enrichment_assets.factstore.schema import entities
from enrichment_assets.policy import load_policy
from enrichment_assets.search import SearchIndex
from enrichment_assets.search.reconcile import reconcile
from enrichment_assets.settings import SHIPPED_POLICY, Settings

MDS = load_policy(SHIPPED_POLICY)
SENSOR_INTERVAL_SECONDS = 5
FINAL_STATES = ("fully_enriched", "partially_resolved", "quarantined", "deleted")
REPOSITORY = {"repositoryLocationName": LOCATION, "repositoryName": "__repository__"}
FINISHED = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)

_T = TypeVar("_T")


def wait_for(
    what: str,
    condition: Callable[[], _T],
    *,
    timeout: float,
    interval: float = 0.5,
    seen: Callable[[], object] | None = None,
) -> _T:
    """``condition()`` once it is truthy; after ``timeout`` seconds an AssertionError naming ``what`` and,
    if given, what ``seen()`` shows then."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            detail = f"; seen: {seen()}" if seen is not None else ""
            raise AssertionError(f"not within {timeout:.0f}s: {what}{detail}")
        time.sleep(interval)


def report(scenario: str, **figures: object) -> dict[str, object]:
    """Print a scenario's figures on one line (``pytest -s`` shows them; bench/RESULTS-faults.md has them)."""
    line = {"scenario": scenario, **figures}
    print(f"FAULT-FIGURES {json.dumps(line, default=str)}", flush=True)
    return line


class SimulatorProcess:
    """``enrichment simulate`` as a process of its own, which a test can stop (its port then refuses
    connections) and start again on the same port. Same seed and scale, same graph."""

    def __init__(self, log: Path, *, seed: int, scale: float, port: int | None = None) -> None:
        self.log, self.seed, self.scale = log, seed, scale
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen[bytes] | None = None

    def environ(self, sources: Iterable[str] = SOURCES) -> dict[str, str]:
        """The policy's ``base_url_env`` variables pointing ``sources`` here."""
        return {SOURCES[name].base_url_env: self.url + SOURCES[name].prefix for name in sources}

    def start(self, *, timeout: float = 60) -> SimulatorProcess:
        command = [
            str(Path(sys.executable).with_name("enrichment")),
            "simulate",
            "--port",
            str(self.port),
            "--seed",
            str(self.seed),
            "--scale",
            str(self.scale),
        ]
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=partial(die_with_parent, os.getpid()),
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the simulator did not start on port {self.port}; see {self.log}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=5)
        self._process = None

    def admin(self, path: str, body: Mapping[str, object]) -> dict[str, Any]:
        response = httpx.post(self.url + path, json=dict(body), timeout=10)
        response.raise_for_status()
        return response.json()

    def requests(self, *, since: float = 0.0, source: str | None = None) -> list[dict[str, Any]]:
        """Source requests logged at or after ``since`` (epoch seconds), oldest first, each with ``at`` as
        epoch seconds."""
        params: dict[str, Any] = {"limit": 100_000, **({"source": source} if source else {})}
        logged = httpx.get(self.url + "/admin/requests", params=params, timeout=30).json()["requests"]
        found = []
        for record in logged:
            at = datetime.fromisoformat(record["at"].replace("Z", "+00:00")).timestamp()
            if record["source"] is not None and at >= since:
                found.append({**record, "at": at})
        return found


def fetched_entities(requests: Iterable[Mapping[str, Any]]) -> Counter[tuple[str, str]]:
    """How many times each (type, id) was answered 200, single or in a batch."""
    counts: Counter[tuple[str, str]] = Counter()
    for request in requests:
        if request["status"] != 200:
            continue
        path, _, query = request["path"].partition("?")
        match = match_raw_path(path.encode("latin-1"))
        if match is None or match.entity_type is None:
            continue
        ids = [match.entity_id] if match.entity_id is not None else parse_qs(query).get("ids", [])
        counts.update((match.entity_type.name, i) for i in dict.fromkeys(ids))
    return counts


@dataclass(frozen=True)
class RunSpan:
    """A run and when its process ran (epoch seconds)."""

    dagster_run: dg.DagsterRun
    start: float
    end: float

    def overlap(self, start: float, end: float) -> float:
        return max(min(self.end, end) - max(self.start, start), 0.0)


@dataclass(frozen=True)
class Acknowledged:
    """The newest event the API answered 202 for one entity."""

    event_type: str
    occurred_at: datetime


class EventFlow(threading.Thread):
    """Events posted while a fault is on, and how many batches got each answer (0: no answer)."""

    def __init__(self, bed: Testbed, keys: Sequence[tuple[str, str]], per_second: int) -> None:
        super().__init__(name="event-flow", daemon=True)
        self.bed, self.keys, self.per_second = bed, list(keys), per_second
        self.statuses: Counter[int] = Counter()
        self._stopping = threading.Event()

    def run(self) -> None:
        position = 0
        with httpx.Client(base_url=self.bed.api.url, timeout=60) as client:
            while not self._stopping.is_set():
                started = time.monotonic()
                batch = [self.keys[(position + n) % len(self.keys)] for n in range(self.per_second)]
                position += self.per_second
                try:
                    status = self.bed.post(self.bed.touch(ids=batch), client=client).status_code
                except httpx.TransportError:
                    status = 0
                self.statuses[status] += 1
                self._stopping.wait(max(1.0 - (time.monotonic() - started), 0.0))

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=60)


class Testbed:
    """``with Testbed(tmp, database_url=..., search_url=...) as bed: bed.post(bed.touch(["model"]))``.

    ``own_simulator_for`` names sources served by a simulator process of their own (``bed.simulators[name]``),
    which a test may stop while the others keep answering. ``env`` goes to every Dagster process.
    """

    __test__ = False  # not a test class, whatever pytest thinks of its name

    def __init__(
        self,
        root: Path,
        *,
        database_url: str,
        search_url: str,
        seed: int = 7,
        scale: float = 0.05,
        own_simulator_for: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        max_concurrent_runs: int = 6,
    ) -> None:
        self.root = Path(root)
        self.database_url, self.search_url = database_url, search_url
        self.seed, self.scale = seed, scale
        self.graph: MdsGraph = generate_graph(seed, scale)
        self.own_simulator_for = tuple(own_simulator_for)
        self.extra_env = dict(env or {})
        self.max_concurrent_runs = max_concurrent_runs
        self.acknowledged: dict[tuple[str, str], Acknowledged] = {}
        self._acknowledging = threading.Lock()
        self._stack = ExitStack()

    # -- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = FactStore.from_url(self.database_url)
        self.store.migrate()
        self._stack.callback(self.store.dispose)
        self.index = SearchIndex.from_url(self.search_url, alias=f"faults-{uuid.uuid4().hex[:10]}")
        self.index.ensure()
        self._stack.callback(self._drop_index)
        self.simulator = self._simulator("simulator")
        self.simulators = {name: self._simulator(f"simulator-{name}") for name in self.own_simulator_for}
        sources = [name for name in SOURCES if name not in self.simulators]
        env = {
            **self.simulator.environ(sources),
            **{k: v for name, sim in self.simulators.items() for k, v in sim.environ([name]).items()},
            "ENRICHMENT_DATABASE_URL": self.database_url,
            "ELASTICSEARCH_URL": self.search_url,
            "ENRICHMENT_INDEX_ALIAS": self.index.alias,
            "ENRICHMENT_POLICY": str(SHIPPED_POLICY),
            "ENRICHMENT_SENSOR_INTERVAL_SECONDS": str(SENSOR_INTERVAL_SECONDS),
            **self.extra_env,
        }
        self.env = env
        self.settings = Settings.from_env(env)
        self.api = self._stack.enter_context(
            BackgroundServer(create_app(self.store, self.settings, self.index), settings=self.settings)
        )
        self.dagster = LocalDagster(self.root / "dagster", env, max_concurrent_runs=self.max_concurrent_runs)
        self._stack.enter_context(self.dagster)
        self.instance = self._stack.enter_context(dg.DagsterInstance.from_config(str(self.dagster.home)))
        self._client = self._stack.enter_context(httpx.Client(base_url=self.api.url, timeout=60))

    def _simulator(self, name: str) -> SimulatorProcess:
        simulator = SimulatorProcess(self.root / f"{name}.log", seed=self.seed, scale=self.scale).start()
        self._stack.callback(simulator.stop)
        return simulator

    def _drop_index(self) -> None:
        for name in self.index.current_indices():
            self.index.client.indices.delete(index=name)
        self.index.client.indices.delete_index_template(name=f"{self.index.alias}-template")
        self.index.close()

    def all_simulators(self) -> list[SimulatorProcess]:
        return [self.simulator, *self.simulators.values()]

    def knobs(self, **knobs: object) -> None:
        """Set knobs on every source of every simulator process (``latency_ms=3000``)."""
        for simulator in self.all_simulators():
            simulator.admin("/admin/knobs", knobs)

    # -- events in ----------------------------------------------------------------------------------

    def created_events(self) -> list[dict[str, Any]]:
        """The graph's thin ``created`` events, in the simulator's shuffled order."""
        return list(thin_events(self.graph))

    def touch(
        self,
        types: Iterable[str] | None = None,
        *,
        ids: Iterable[tuple[str, str]] | None = None,
        occurred_at: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """``updated`` events (occurred now) for every entity of ``types``, or for ``ids``."""
        keys = (
            list(ids)
            if ids is not None
            else [(t, i) for t in (types or self.graph.counts()) for i in self.graph.ids(t)]
        )
        at = (occurred_at or datetime.now(UTC)).isoformat()
        return [{"entity_type": t, "entity_id": i, "event_type": "updated", "occurred_at": at} for t, i in keys]

    def post(self, events: Sequence[Mapping[str, Any]], *, client: httpx.Client | None = None) -> httpx.Response:
        """POST the events as one NDJSON batch; the testbed remembers each one answered 202."""
        body = "\n".join(json.dumps(dict(e)) for e in events)
        response = (client or self._client).post(
            "/v1/events", content=body, headers={"content-type": "application/x-ndjson"}
        )
        if response.status_code == 202:
            with self._acknowledging:
                for event in events:
                    key = (event["entity_type"], event["entity_id"])
                    at = datetime.fromisoformat(str(event["occurred_at"]).replace("Z", "+00:00"))
                    known = self.acknowledged.get(key)
                    if known is None or at >= known.occurred_at:
                        self.acknowledged[key] = Acknowledged(str(event["event_type"]), at)
        return response

    @contextmanager
    def event_flow(self, keys: Sequence[tuple[str, str]], *, per_second: int = 10) -> Iterator[EventFlow]:
        """``updated`` events for ``keys``, round robin, ``per_second`` a second in one batch each second,
        from a thread of its own until the block ends."""
        flow = EventFlow(self, keys, per_second)
        flow.start()
        try:
            yield flow
        finally:
            flow.stop()

    def ingest(self, events: Sequence[Mapping[str, Any]]) -> None:
        response = self.post(events)
        assert response.status_code == 202, (response.status_code, response.text[:500])

    # -- the fact store -----------------------------------------------------------------------------

    def rows(self, *where: sa.ColumnElement[bool]) -> list[sa.Row[Any]]:
        columns = (
            entities.c.entity_type,
            entities.c.entity_id,
            entities.c.state,
            entities.c.attempts,
            entities.c.last_error,
            entities.c.waiting_on,
            entities.c.claim_owner,
            entities.c.next_attempt_at,
            entities.c.first_seen_at,
            entities.c.last_event_at,
            entities.c.last_enriched_at,
        )
        with self.store.engine.connect() as conn:
            return list(conn.execute(sa.select(*columns).where(*where)))

    def leased_by(self, run_id: str) -> set[tuple[str, str]]:
        """The entities leased to a run (to its re-execution family's root, which is the run itself here)."""
        return {(r.entity_type, r.entity_id) for r in self.rows(entities.c.claim_owner == f"dagster:{run_id}")}

    def duplicate_live_edges(self) -> list[tuple[Any, ...]]:
        key = (
            edges_table.c.src_type,
            edges_table.c.src_id,
            edges_table.c.relation,
            edges_table.c.dst_type,
            edges_table.c.dst_id,
        )
        with self.store.engine.connect() as conn:
            return [
                tuple(r)
                for r in conn.execute(
                    sa.select(*key)
                    .where(edges_table.c.retracted_at.is_(None))
                    .group_by(*key)
                    .having(sa.func.count() > 1)
                )
            ]

    @contextmanager
    def table_lock(self, table: str, mode: str) -> Iterator[sa.Connection]:
        """Hold ``LOCK TABLE <table> IN <mode> MODE`` in an open transaction until the block ends."""
        assert mode.replace(" ", "").isalpha() and table.isidentifier(), (table, mode)  # never input
        engine = sa.create_engine(self.store.engine.url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text(f"LOCK TABLE {table} IN {mode} MODE"))
                try:
                    yield conn
                finally:
                    conn.rollback()
        finally:
            engine.dispose()

    def lock_waiters(self) -> int:
        """Backends of the fact store's database waiting on a lock."""
        with self.store.engine.connect() as conn:
            return conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()

    # -- Dagster ------------------------------------------------------------------------------------

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.dagster.graphql(query, variables)

    def runs(self, *, since: float = 0.0) -> list[dg.DagsterRun]:
        """Runs created at or after ``since`` (epoch seconds), oldest first."""
        records = self.instance.get_run_records(filters=dg.RunsFilter(created_after=datetime.fromtimestamp(since, UTC)))
        return [r.dagster_run for r in sorted(records, key=lambda r: r.create_timestamp)]

    def run(self, run_id: str) -> dg.DagsterRun:
        run = self.instance.get_run_by_id(run_id)
        assert run is not None, run_id
        return run

    def run_summary(self, *, since: float = 0.0) -> list[str]:
        return [
            f"{r.run_id[:8]} {r.status.value} {r.tags.get('enrichment/types', r.job_name)}"
            for r in self.runs(since=since)
        ]

    def run_records_overlapping(self, start: float, end: float) -> list[RunSpan]:
        """Runs (their processes) that were running at some moment between ``start`` and ``end``."""
        spans = []
        for record in self.instance.get_run_records(
            filters=dg.RunsFilter(created_before=datetime.fromtimestamp(end, UTC))
        ):
            span = RunSpan(
                record.dagster_run,
                record.start_time or record.create_timestamp.timestamp(),
                record.end_time or time.time(),
            )
            if span.overlap(start, end) > 0:
                spans.append(span)
        return spans

    def source_calls(self, source: str, run_ids: Iterable[str]) -> dict[str, int]:
        """Per ``run id/type``, the calls a run's hydration step made to ``source`` (its metadata), where any."""
        calls = {}
        for run_id in run_ids:
            for event in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                materialization = event.asset_materialization
                entry = materialization.metadata.get(f"source_calls/{source}") if materialization else None
                if entry is not None and entry.value:
                    calls[f"{run_id[:8]}/{materialization.asset_key.path[0]}"] = int(entry.value)
        return calls

    def step_started(self, run_id: str, step_key: str) -> bool:
        events = self.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        return any(e.dagster_event is not None and e.dagster_event.step_key == step_key for e in events)

    def run_worker_pid(self, run_id: str) -> int | None:
        """The run worker's pid, from the engine event "Started process for run (pid: N)"."""
        for event in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
            if event.message.startswith("Started process for run"):
                data = event.dagster_event.engine_event_data if event.dagster_event else None
                if data is not None and "pid" in data.metadata:
                    return int(str(data.metadata["pid"].value))
        return None

    def wait_for_run(self, *, since: float, selecting: str, step: str, timeout: float = 90) -> dg.DagsterRun:
        """The first run created since ``since`` selecting ``selecting``'s branch once its ``step`` started."""

        def started() -> dg.DagsterRun | None:
            for run in self.runs(since=since):
                if selecting in run.tags.get("enrichment/types", "").split(",") and self.step_started(
                    run.run_id, f"{selecting}__{step}"
                ):
                    return run
            return None

        return wait_for(
            f"a run of {selecting} reaching {step}",
            started,
            timeout=timeout,
            seen=lambda: self.run_summary(since=since),
        )

    def wait_for_status(self, run_id: str, statuses: Iterable[dg.DagsterRunStatus], *, timeout: float) -> dg.DagsterRun:
        wanted = set(statuses)
        return wait_for(
            f"run {run_id} {'/'.join(s.value for s in wanted)}",
            lambda: (run := self.run(run_id)).status in wanted and run,
            timeout=timeout,
            seen=lambda: self.run(run_id).status.value,
        )

    def launch_run(self, *, partition: str, tags: Mapping[str, str] | None = None, job: str = ENRICHMENT_JOB) -> str:
        """One run of ``job`` for ``partition``, launched through GraphQL as the UI does."""
        query = """mutation ($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
            ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } ... on Error { message } } }"""
        all_tags = {"dagster/partition": partition, **(tags or {})}
        params = {
            "selector": {**REPOSITORY, "jobName": job},
            "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in all_tags.items()]},
        }
        result = self.graphql(query, {"p": params})["launchRun"]
        assert result["__typename"] == "LaunchRunSuccess", result
        return result["run"]["runId"]

    def terminate_run(self, run_id: str) -> None:
        """What the UI's Terminate button sends."""
        query = """mutation ($id: String!) { terminateRun(runId: $id) { __typename
            ... on TerminateRunSuccess { run { runId } } ... on PythonError { message } ... on Error { message } } }"""
        result = self.graphql(query, {"id": run_id})["terminateRun"]
        assert result["__typename"] == "TerminateRunSuccess", result

    def today(self) -> str:
        key = partition_key(MDS, datetime.now(UTC))
        assert key is not None
        return key

    def incremental_tags(self) -> dict[str, str]:
        return {MODE_TAG: "incremental"}

    def sensor_ticks(self, name: str = "uncached_entities_sensor", *, limit: int = 20) -> list[Any]:
        sensor = next(s for s in self.instance.all_instigator_state() if s.instigator_name == name)
        return list(self.instance.get_ticks(sensor.instigator_origin_id, sensor.selector_id, limit=limit))

    def sensor_cursor(self, name: str = "uncached_entities_sensor") -> dict[str, Any]:
        sensor = next(s for s in self.instance.all_instigator_state() if s.instigator_name == name)
        cursor = sensor.instigator_data.cursor if sensor.instigator_data else None
        return json.loads(cursor) if cursor else {}

    # -- settling and the checks after recovery -----------------------------------------------------

    def unsettled(self) -> str | None:
        """Why the bed is not at rest (runs in flight, entities not final or leased, documents in the
        outbox), or None."""
        in_flight = self.instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT))
        if in_flight:
            return f"{len(in_flight)} runs in flight"
        rows = self.rows()
        waiting = Counter(f"{r.entity_type}:{r.state}" for r in rows if r.state not in FINAL_STATES)
        if waiting:
            return f"not final: {dict(waiting)}"
        leased = Counter(r.claim_owner for r in rows if r.claim_owner is not None)
        if leased:
            return f"leased: {dict(leased)}"
        backlog = sum(self.store.index_backlog_counts().values())
        if backlog:
            return f"{backlog} documents in the search outbox"
        return None

    def wait_settled(self, *, timeout: float) -> float:
        """Seconds until nothing is in flight, due or unindexed."""
        started = time.monotonic()
        last: list[str | None] = [None]

        def settled() -> bool:
            last[0] = self.unsettled()
            return last[0] is None

        wait_for("the bed to settle", settled, timeout=timeout, interval=1, seen=lambda: last[0])
        return time.monotonic() - started

    def check_recovered(self, *, timeout: float = 180) -> float:
        """Wait until settled, then assert what every fault test asks of the recovery; returns the wait."""
        waited = self.wait_settled(timeout=timeout)
        now = self.store.now()
        rows = {(r.entity_type, r.entity_id): r for r in self.rows()}
        lost = [k for k in self.acknowledged if k not in rows]
        assert lost == [], f"{len(lost)} acknowledged events lost their entity: {lost[:5]}"
        for key, event in self.acknowledged.items():
            row = rows[key]
            assert row.last_event_at is not None and row.last_event_at >= event.occurred_at, (key, event, row)
            assert (row.state == "deleted") == (event.event_type == "deleted"), (key, event, row.state)
        assert self.duplicate_live_edges() == []
        for (entity_type, entity_id), row in rows.items():
            assert row.state in FINAL_STATES, row
            if row.state == "partially_resolved":
                assert row.waiting_on or row.last_error, f"partial without a reason: {row}"
            budget = MDS.effective(entity_type).staleness_budget
            age = now - (row.last_enriched_at or row.first_seen_at)
            assert age <= budget, f"{entity_type} {entity_id} is {age} old, past its budget {budget}"
            if entity_type in MDS.policies and row.state == "fully_enriched":
                derived: dict[str, set[str]] = {}
                for edge in self.store.edges_of(entity_type, entity_id):
                    derived.setdefault(edge["relation"], set()).add(edge["dst_id"])
                expected = {r: ids for r, ids in self.graph.expected_edges(entity_type, entity_id).items() if ids}
                assert derived == expected, (entity_type, entity_id)
        in_sync = reconcile(self.store, self.index, MDS, exact=True)
        assert not (in_sync.missing or in_sync.stale or in_sync.extra or in_sync.ahead), in_sync
        return waited
