"""The run-scoped IO manager: two runs of one partition keep their own step outputs, a step reads
what its upstream step wrote in the run that produced it, a reader never sees a half-written file,
and run directories past their retention are removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from enrichment_assets.defs.definitions import defs
from enrichment_assets.defs.io_manager import RunScopedIOManager

HYDRATED = dg.AssetKey(["model_instance", "hydrated"])
CANDIDATES = dg.AssetKey(["model_instance", "candidates"])
PARTITION = "2026-12-01"


def _output(run_id: str, key: dg.AssetKey = HYDRATED) -> dg.OutputContext:
    return dg.build_output_context(run_id=run_id, asset_key=key, partition_key=PARTITION, step_key="s", name="result")


def _load(manager: RunScopedIOManager, upstream: dg.OutputContext) -> pd.DataFrame:
    return manager.load_input(dg.build_input_context(upstream_output=upstream, asset_key=upstream.asset_key,
                                                     partition_key=PARTITION))


def test_two_runs_of_one_partition_keep_their_own_frames(tmp_path: Path) -> None:
    manager = RunScopedIOManager(base_dir=str(tmp_path))
    first, second = pd.DataFrame({"entity_id": ["a1", "a2"]}), pd.DataFrame({"entity_id": ["b1"]})
    manager.handle_output(_output("run-a"), first)
    manager.handle_output(_output("run-b"), second)  # the sensor's next run, same partition, meanwhile
    pd.testing.assert_frame_equal(_load(manager, _output("run-a")), first)
    pd.testing.assert_frame_equal(_load(manager, _output("run-b")), second)
    assert not list(tmp_path.rglob(".*")), "no temporary file is left behind"


def test_a_missing_output_names_the_run_and_what_to_do(tmp_path: Path) -> None:
    manager = RunScopedIOManager(base_dir=str(tmp_path))
    with pytest.raises(dg.DagsterInvariantViolationError, match="run gone.*re-execute the whole run"):
        _load(manager, _output("gone"))


def test_run_directories_past_their_retention_are_removed(tmp_path: Path) -> None:
    manager = RunScopedIOManager(base_dir=str(tmp_path), retention_days=1)
    for run in ("old", "recent"):
        manager.handle_output(_output(run), pd.DataFrame())
    two_days_ago = time.time() - 2 * 86_400
    os.utime(tmp_path / "old", (two_days_ago, two_days_ago))
    manager.handle_output(_output("new", CANDIDATES), pd.DataFrame())  # a run's first step prunes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "recent"]


def test_the_code_location_binds_it_for_every_asset() -> None:
    assert isinstance(defs.resources["io_manager"], RunScopedIOManager)
