"""The run-scoped IO manager: two runs of one partition keep their own step outputs, a step reads
what its upstream step wrote in the run that produced it, a reader never sees a half-written file, and
run directories past their retention are removed, on a local disk and on fsspec's in-memory filesystem
alike; the base path comes from the field, the environment or the instance; and a re-execution from
failure in another process, with another DAGSTER_HOME, reads its parent's outputs from the shared base
path."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import yaml
from fsspec.implementations.local import LocalFileSystem
from sqlalchemy.engine import make_url
from upath import UPath

from enrichment_assets.defs.definitions import defs
from enrichment_assets.defs.io_manager import BASE_PATH_ENV, RunScopedIOManager, RunScopedPickleIOManager
from enrichment_assets_tests import reexec_defs

ROOT = Path(__file__).resolve().parents[1]
HYDRATED = dg.AssetKey(["model_instance", "hydrated"])
CANDIDATES = dg.AssetKey(["model_instance", "candidates"])
PARTITION = reexec_defs.PARTITION


@pytest.fixture(params=["local", "memory"])
def base_path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UPath]:
    """A base path on the local disk, then on fsspec's in-memory filesystem (standing in for a bucket)."""
    if request.param == "local":
        yield UPath(tmp_path)
        return
    root = UPath(f"memory://io-{uuid.uuid4().hex}")
    yield root
    if root.exists():
        root.fs.rm(root.path, recursive=True)


def _manager(base_path: UPath, **config: float) -> RunScopedPickleIOManager:
    return RunScopedIOManager(base_path=str(base_path), **config).create_io_manager(dg.build_init_resource_context())


def _output(run_id: str, key: dg.AssetKey = HYDRATED) -> dg.OutputContext:
    return dg.build_output_context(run_id=run_id, asset_key=key, partition_key=PARTITION, step_key="s", name="result")


def _load(manager: RunScopedPickleIOManager, upstream: dg.OutputContext) -> pd.DataFrame:
    return manager.load_input(
        dg.build_input_context(upstream_output=upstream, asset_key=upstream.asset_key, partition_key=PARTITION)
    )


def _age(run_dir: UPath, days: float) -> None:
    """Make a run directory look last written ``days`` ago."""
    then = time.time() - days * 86_400
    if isinstance(run_dir.fs, LocalFileSystem):
        os.utime(run_dir.path, (then, then))
        return
    for name in run_dir.fs.find(run_dir.path):  # the memory filesystem dates a file by its creation
        run_dir.fs.store[name].created = datetime.fromtimestamp(then, UTC)


def test_two_runs_of_one_partition_keep_their_own_frames(base_path: UPath) -> None:
    manager = _manager(base_path)
    first, second = pd.DataFrame({"entity_id": ["a1", "a2"]}), pd.DataFrame({"entity_id": ["b1"]})
    manager.handle_output(_output("run-a"), first)
    manager.handle_output(_output("run-b"), second)  # the sensor's next run, same partition, meanwhile
    pd.testing.assert_frame_equal(_load(manager, _output("run-a")), first)
    pd.testing.assert_frame_equal(_load(manager, _output("run-b")), second)
    assert (base_path / "run-a" / "model_instance" / "hydrated" / PARTITION).is_file()
    assert not [p for p in base_path.rglob("*") if p.name.startswith(".")], "no temporary file is left behind"


def test_a_missing_output_names_the_run_and_what_to_do(base_path: UPath) -> None:
    manager = _manager(base_path)
    with pytest.raises(dg.DagsterInvariantViolationError, match="run gone.*re-execute the whole run"):
        _load(manager, _output("gone"))


def test_run_directories_past_their_retention_are_removed(base_path: UPath) -> None:
    manager = _manager(base_path, retention_days=1)
    for run in ("old", "recent"):
        manager.handle_output(_output(run), pd.DataFrame())
    _age(base_path / "old", days=2)
    _age(base_path / "recent", days=0.5)
    manager.handle_output(_output("new", HYDRATED), pd.DataFrame())  # not a run's first step: no pruning
    assert sorted(p.name for p in base_path.iterdir()) == ["new", "old", "recent"]
    manager.handle_output(_output("newer", CANDIDATES), pd.DataFrame())  # a run's first step prunes
    assert sorted(p.name for p in base_path.iterdir()) == ["new", "newer", "recent"]


def test_the_base_path_is_the_field_else_the_environment_else_the_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    bound = defs.resources["io_manager"]
    assert isinstance(bound, RunScopedIOManager)
    monkeypatch.delenv(BASE_PATH_ENV, raising=False)
    with dg.instance_for_test() as instance:
        assert bound.resolve_base_path(instance) == UPath(instance.storage_directory()) / "runs"
        # Read when a run starts, not when the code location is imported.
        monkeypatch.setenv(BASE_PATH_ENV, "memory://shared/runs")
        assert bound.resolve_base_path(instance) == UPath("memory://shared/runs")
        assert RunScopedIOManager(base_path="memory://mine").resolve_base_path(instance) == UPath("memory://mine")


days = dg.DailyPartitionsDefinition(start_date="2026-01-01")


@dg.asset(key=["io_test", "upstream"], partitions_def=days)
def upstream() -> pd.DataFrame:
    return pd.DataFrame({"entity_id": ["e1", "e2"]})


@dg.asset(key=["io_test", "downstream"], ins={"upstream": dg.AssetIn(key=upstream.key)}, partitions_def=days)
def downstream(upstream: pd.DataFrame) -> pd.DataFrame:
    return upstream.assign(seen=True)


def test_a_run_passes_its_frames_through_any_filesystem_and_only_within_the_run() -> None:
    root = UPath(f"memory://io-{uuid.uuid4().hex}")
    resources = {"io_manager": RunScopedIOManager(base_path=str(root))}
    try:
        result = dg.materialize([upstream, downstream], resources=resources, partition_key=PARTITION)
        assert result.success
        assert result.output_for_node("io_test__downstream")["seen"].all()
        stored = root / result.run_id / "io_test" / "downstream" / PARTITION
        assert pickle.loads(stored.read_bytes())["entity_id"].tolist() == ["e1", "e2"]
        [materialization] = result.asset_materializations_for_node("io_test__downstream")
        assert materialization.metadata["path"].value == str(stored)

        with pytest.raises(Exception, match="io_test/upstream was not computed in this run"):
            dg.materialize([upstream, downstream], selection=[downstream], resources=resources, partition_key=PARTITION)
    finally:
        if root.exists():
            root.fs.rm(root.path, recursive=True)


def test_the_code_location_binds_it_for_every_asset() -> None:
    assert isinstance(defs.resources["io_manager"], RunScopedIOManager)


def _run_in_pod(home: Path, env: dict[str, str], *argv: str) -> str:
    """Run ``reexec_defs.main`` in a process of its own, as a run worker in its own pod would."""
    code = "import sys; from enrichment_assets_tests.reexec_defs import main; main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        check=False,
        cwd=ROOT,
        env={**env, "DAGSTER_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.split()[-1]


def test_a_reexecution_in_another_pod_reads_its_parents_outputs_from_the_shared_base_path(
    make_postgres_database: Callable[[], str], tmp_path: Path
) -> None:
    """The first run fails in pod A (its own DAGSTER_HOME); A is gone when pod B (another DAGSTER_HOME,
    the same run storage) re-executes from the failure, and B reads the parent's frames from the base
    path both share (a directory standing in for a bucket)."""
    storage_url = (
        make_url(make_postgres_database()).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    )
    homes = {pod: tmp_path / pod for pod in ("pod_a", "pod_b")}
    for home in homes.values():
        home.mkdir()
        (home / "dagster.yaml").write_text(
            yaml.safe_dump({"storage": {"postgres": {"postgres_url": storage_url}}, "telemetry": {"enabled": False}})
        )
    shared, marker, computed = tmp_path / "bucket", tmp_path / "fail-once", tmp_path / "computed.log"
    marker.touch()
    env = {
        **os.environ,
        BASE_PATH_ENV: str(shared),
        "REEXEC_FAIL_MARKER": str(marker),
        "REEXEC_COMPUTED_LOG": str(computed),
    }

    failed = _run_in_pod(homes["pod_a"], env, "execute")
    assert not marker.exists(), "the first run reached hydrated and failed there"
    assert (shared / failed / "reexec" / "candidates" / reexec_defs.PARTITION).is_file()
    assert not (homes["pod_a"] / "storage" / "runs").exists(), "nothing was stored on pod A's disk"
    shutil.rmtree(homes["pod_a"])  # the pod is gone, and its disk with it

    rerun = _run_in_pod(homes["pod_b"], env, "reexecute", failed)

    with dg.DagsterInstance.from_config(str(homes["pod_b"])) as instance:
        assert instance.get_run_by_id(failed).status == dg.DagsterRunStatus.FAILURE
        run = instance.get_run_by_id(rerun)
        failures = [
            e.dagster_event.event_specific_data.error.to_string()
            for e in instance.all_logs(rerun)
            if e.dagster_event and e.dagster_event.is_step_failure
        ]
        assert run.status == dg.DagsterRunStatus.SUCCESS, failures
        assert run.parent_run_id == failed
        assert run.tags["dagster/partition"] == reexec_defs.PARTITION
    assert computed.read_text().split() == [failed], "the re-execution loaded candidates, not computed them"
    assert not (shared / rerun / "reexec" / "candidates").exists()
    edges = pickle.loads((shared / rerun / "reexec" / "edges" / reexec_defs.PARTITION).read_bytes())
    assert set(edges["claimed_in"]) == {failed} and edges["name"].tolist() == ["one", "two"]
