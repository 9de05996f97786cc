"""``RunScopedIOManager``: the DataFrames a run passes between its steps, kept per run.

Dagster's default IO manager stores an asset partition's value at one path per (asset, partition),
shared by every run. The sensor starts a run for new work while an earlier run of the same partition
may still be going, so the two would overwrite each other's ``hydrated`` frame between its writing and
the ``edges`` step reading it: a torn pickle, or worse, a run settling the other run's claims (which
the fact store refuses as not its lease, leaving its own leased until they expire). Here each run writes
under its own directory and a step reads what its upstream step wrote in the run that produced it (the
parent run, when a re-execution skips that step), so runs never see each other's frames and
"re-execute from failure" still finds the failed run's.

The directories live on any filesystem fsspec reaches, through ``universal_pathlib`` as in Dagster's
own ``UPathIOManager``: the run worker's disk by default, a bucket where runs go to different machines
(a pod per run), so that a re-execution started elsewhere still reads its parent's outputs.

A reader never sees half an output: on a local filesystem it is written to a temporary file renamed
into place, and an object store shows an object only once its single upload is complete. Run
directories last written more than ``retention_days`` ago are removed as new runs write, which bounds
the storage used and is how long a failed run stays re-executable from its failure.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import posixpath
import tempfile
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import dagster as dg
import pydantic
from fsspec.implementations.local import LocalFileSystem
from upath import UPath

BASE_PATH_ENV = "ENRICHMENT_IO_BASE_PATH"

# Pruning lists the run directories, which on an object store means listing every object under the
# base path; once per run (when its first step writes) is enough.
_PRUNE_ON_STEP = "candidates"

# Where fsspec backends keep a file's last write: local and gcsfs "mtime", s3fs "LastModified", adlfs
# "last_modified"; the memory filesystem has only "created" (its files are written once).
_WRITTEN_AT_KEYS = ("mtime", "LastModified", "last_modified", "created")

# The run id Dagster gives an upstream output that no step of this run or its parents produced (an
# asset the run did not select); test_io_manager.py notices if Dagster changes it.
_NO_RUN = "__EPHEMERAL_RUN_ID"


class RunScopedIOManager(dg.ConfigurableIOManagerFactory["RunScopedPickleIOManager"]):
    """Pickles each step output to ``<base path>/<run id>/<asset key>/<partition>``.

    The base path is ``base_path`` when set; else ``$ENRICHMENT_IO_BASE_PATH``, read when a run
    starts (``dg.EnvVar`` would fail every run of a deployment that leaves it unset); else the
    instance's storage directory, ``$DAGSTER_HOME/storage/runs``. That default is on the run
    worker's own disk: a deployment whose re-executions may start on another machine (Kubernetes,
    a pod per run) points the base path at storage every run sees, such as ``s3://bucket/prefix``
    or ``gs://bucket/prefix``, and installs that fsspec backend (``s3fs``, ``gcsfs``), which finds
    its credentials the usual way.
    """

    base_path: str | None = pydantic.Field(
        default=None, description=f"Local path or fsspec URL; unset: ${BASE_PATH_ENV}, else $DAGSTER_HOME/storage/runs."
    )
    retention_days: float = pydantic.Field(
        default=7.0, gt=0, description="Run directories last written longer ago are removed."
    )

    def create_io_manager(self, context: dg.InitResourceContext) -> RunScopedPickleIOManager:
        return RunScopedPickleIOManager(self.resolve_base_path(context.instance), retention_days=self.retention_days)

    def resolve_base_path(self, instance: dg.DagsterInstance | None) -> UPath:
        configured = self.base_path or os.environ.get(BASE_PATH_ENV)
        if configured:
            return UPath(configured)
        if instance is None:
            raise dg.DagsterInvariantViolationError(
                f"RunScopedIOManager needs base_path, ${BASE_PATH_ENV} or a Dagster instance to store outputs under"
            )
        return UPath(instance.storage_directory()) / "runs"


class RunScopedPickleIOManager(dg.UPathIOManager):
    """What a run uses: ``RunScopedIOManager`` builds one when the run starts, its base path resolved."""

    def __init__(self, base_path: UPath, *, retention_days: float) -> None:
        super().__init__(base_path=base_path)
        self.base_path = base_path
        self.retention_days = retention_days

    def get_asset_relative_path(self, context: dg.InputContext | dg.OutputContext) -> UPath:
        return UPath(_producing_run(context), *context.asset_key.path)

    def dump_to_path(self, context: dg.OutputContext, obj: Any, path: UPath) -> None:
        if isinstance(path.fs, LocalFileSystem):
            with tempfile.NamedTemporaryFile(dir=path.parent.path, prefix=f".{path.name}.", delete=False) as handle:
                pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(handle.name, path.path)
        else:
            # Pickled in full first: a stream interrupted by a failing pickle would still upload
            # what it had, as if it were the whole output.
            path.fs.pipe_file(path.path, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def load_from_path(self, context: dg.InputContext, path: UPath) -> Any:
        return pickle.loads(path.read_bytes())

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        super().handle_output(context, obj)
        if context.has_asset_key and context.asset_key.path[-1] == _PRUNE_ON_STEP:
            self._prune(keep=context.run_id)

    def load_input(self, context: dg.InputContext) -> Any:
        try:
            return super().load_input(context)
        except FileNotFoundError as missing:
            run_id = _producing_run(context)
            raise dg.DagsterInvariantViolationError(
                f"{context.asset_key.to_user_string()} of run {run_id} is not stored under "
                f"{self.base_path / run_id}: it was removed after {self.retention_days:g} days, or that step "
                "never finished; re-execute the whole run instead"
            ) from missing

    def _prune(self, *, keep: str) -> None:
        cutoff = time.time() - self.retention_days * 86_400
        for run_id, written_at in _last_written(self.base_path).items():
            if run_id != keep and written_at < cutoff:
                with contextlib.suppress(FileNotFoundError):  # another run pruned it meanwhile
                    self.base_path.fs.rm((self.base_path / run_id).path, recursive=True)


def _producing_run(context: dg.InputContext | dg.OutputContext) -> str:
    """The run whose directory holds the output: this run's for a write; for a read, the run that
    produced the upstream output (the parent run, when a re-execution skipped that step)."""
    if isinstance(context, dg.OutputContext):
        return context.run_id
    upstream = context.upstream_output
    if upstream is None:
        raise dg.DagsterInvariantViolationError(f"input {context.name} has no upstream output to load")
    if upstream.run_id == _NO_RUN:
        raise dg.DagsterInvariantViolationError(
            f"{context.asset_key.to_user_string()} was not computed in this run: RunScopedIOManager hands "
            "outputs only between the steps of one run and its re-executions; materialize both in one run"
        )
    return upstream.run_id


def _last_written(root: UPath) -> dict[str, float]:
    """When each run directory under ``root`` was last written, for those the filesystem can tell."""
    fs, top = root.fs, root.path.rstrip("/")
    fs.invalidate_cache(top)  # a listing cached earlier in this process would hide newer runs
    try:
        entries = fs.ls(top, detail=True)
    except FileNotFoundError:
        return {}
    runs = {posixpath.basename(e["name"].rstrip("/")): _written_at(e) for e in entries if e["type"] == "directory"}
    if None in runs.values():
        # An object store has no directories, only key prefixes without a time: a run directory was
        # last written when its newest object was. One listing of the whole base path finds them all.
        for name, info in fs.find(top, detail=True).items():
            run_id, written_at = name[len(top) :].lstrip("/").split("/", 1)[0], _written_at(info)
            if run_id in runs and written_at is not None:
                runs[run_id] = max(runs[run_id] or written_at, written_at)
    return {run_id: written_at for run_id, written_at in runs.items() if written_at is not None}


def _written_at(info: Mapping[str, Any]) -> float | None:
    for key in _WRITTEN_AT_KEYS:
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
    return None
