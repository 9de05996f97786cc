"""The code location loads the way `dagster dev` loads it, its asset materializes against the fact
store, the shipped dagster.yaml configures PostgreSQL instance storage from the environment, and the
local instance pools its PostgreSQL storage connections."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy.engine import make_url

from enrichment_assets.defs.resources import FactStoreResource
from enrichment_assets.dev.local_dagster import write_instance_yaml
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore

ROOT = Path(__file__).resolve().parents[1]


def test_workspace_loads_like_dagster_dev(tmp_path: Path) -> None:
    env = {**os.environ, "DAGSTER_HOME": str(tmp_path)}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All code locations passed validation" in result.stdout + result.stderr


def test_fact_store_summary_materializes(database_url: str) -> None:
    from enrichment_assets.defs.summary import fact_store_summary

    store = FactStore.from_url(database_url)
    store.ingest_events([Event(entity_type="thing", entity_id=str(i), event_type="created") for i in range(3)])
    store.claim("thing", limit=1, owner="w", lease=timedelta(minutes=1))
    result = dg.materialize(
        [fact_store_summary], resources={"fact_store": FactStoreResource(database_url=database_url)}
    )
    assert result.success
    frame = result.output_for_node("fact_store_summary")
    assert frame.to_dict("records")[0]["count"] == 3
    [materialization] = result.asset_materializations_for_node("fact_store_summary")
    assert materialization.metadata["pending"].value == 3


def test_shipped_dagster_yaml_uses_postgres_from_env(
    make_postgres_database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = make_url(make_postgres_database())
    monkeypatch.setenv("DAGSTER_PG_USERNAME", url.username or "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", url.password or "")
    monkeypatch.setenv("DAGSTER_PG_HOST", url.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_DB", url.database)
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port or 5432))
    shutil.copy(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage", "plain storage: postgres in production"
        assert instance.get_runs_count() == 0
        assert_launches_side_by_side(instance, max_runs=8)


def assert_launches_side_by_side(instance: dg.DagsterInstance, *, max_runs: int) -> None:
    """Threaded dequeue (a run worker takes seconds to start), with the run limit still in force."""
    coordinator = instance.run_coordinator
    assert isinstance(coordinator, dg.QueuedRunCoordinator)
    assert coordinator.dequeue_use_threads and coordinator.dequeue_num_workers == 4
    assert coordinator.dequeue_interval_seconds == 2
    assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == max_runs
    assert instance.get_concurrency_config().pool_config.default_pool_limit is None, (
        "no pools: source limits live in the fact store"
    )


def test_local_instance_config_loads_with_threaded_dequeue(tmp_path: Path) -> None:
    write_instance_yaml(tmp_path, max_concurrent_runs=3)
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert_launches_side_by_side(instance, max_runs=3)


def test_local_instance_on_postgres_keeps_its_storage_connections_open(make_postgres_database, tmp_path: Path) -> None:
    """dagster-postgres opens a connection per storage call; the local instance's storage holds one per
    storage instead, and a forked process never uses its parent's."""
    import sqlalchemy as sa

    from enrichment_assets.dev.dagster_storage import PooledEventLogStorage, PooledRunStorage, PooledScheduleStorage

    url = make_url(make_postgres_database()).set(drivername="postgresql+psycopg2")
    write_instance_yaml(tmp_path, postgres_url=url.render_as_string(hide_password=False))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storages = (instance.run_storage, instance.event_log_storage, instance.schedule_storage)
        assert [type(s) for s in storages] == [PooledRunStorage, PooledEventLogStorage, PooledScheduleStorage]
        opened: list[int] = []
        for storage in storages:
            sa.event.listen(storage._engine, "connect", lambda *_: opened.append(os.getpid()))
        for _ in range(20):
            assert instance.get_runs_count() == 0
            assert instance.get_latest_materialization_event(dg.AssetKey("nothing")) is None
            assert instance.all_instigator_state() == []
        assert len(opened) == 3, "one connection per storage for 60 calls"
        assert_launches_side_by_side(instance, max_runs=4)

        child = os.fork()
        if child == 0:  # the child: its first call must open its own connection
            try:
                os._exit(0 if instance.get_runs_count() == 0 and len(opened) == 4 and opened[-1] == os.getpid() else 1)
            except BaseException:
                os._exit(2)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert instance.get_runs_count() == 0, "the parent's connection survived the child"
        assert len(opened) == 3


def test_local_dagster_processes_stop_when_their_parent_is_killed(tmp_path: Path) -> None:
    """A demo or benchmark killed with SIGKILL cannot stop what it started; code server, webserver and
    daemon run in their own sessions (out of reach of its process group), so the kernel tells them instead."""
    script = f"""
import sys, time
from pathlib import Path
from enrichment_assets.dev.local_dagster import LocalDagster
dagster = LocalDagster(Path({str(tmp_path / "home")!r}), {{"ENRICHMENT_DATABASE_URL": "sqlite:///{tmp_path}/facts.db"}})
dagster.start()
print(*[p.pid for p in dagster._processes], flush=True)
time.sleep(600)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]  # type: ignore[union-attr]
        assert len(pids) == 3 and all(_alive(pid) for pid in pids)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = [pid for pid in pids if _alive(pid)]
    for pid in leftovers:
        os.kill(pid, 9)
    assert not leftovers, "code server, webserver or daemon outlived the process that started them"


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped (their parent is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
