"""``RunScopedIOManager``: the DataFrames a run passes between its steps, kept per run.

Dagster's default IO manager stores an asset partition's value at one path per (asset, partition),
shared by every run. The sensor starts a run for new work while an earlier run of the same partition
may still be going, so the two would overwrite each other's ``hydrated`` frame between its writing and
the ``edges`` step reading it: a torn pickle, or worse, a run settling the other run's claims (which
the fact store refuses as not its lease, leaving its own leased until they expire). Here each run writes
under its own directory and a step reads what its upstream step wrote in the run that produced it (the
parent run, when a re-execution skips that step), so runs never see each other's frames and
"re-execute from failure" still finds the failed run's.

Writes go to a temporary file renamed into place, so a reader never sees half a file. Run directories
older than ``retention_days`` are removed as new runs write, which bounds the disk used and is how
long a failed run stays re-executable from its failure.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

# Pruning lists the run directories; once per run (when its first step writes) is enough.
_PRUNE_ON_STEP = "candidates"


class RunScopedIOManager(dg.ConfigurableIOManager):
    """Pickles each step output to ``<base_dir>/<run id>/<asset key>``; ``base_dir`` defaults to the
    instance's storage directory (``$DAGSTER_HOME/storage/runs``)."""

    base_dir: str | None = None
    retention_days: float = pydantic.Field(default=7.0, gt=0)

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        root = self._root(lambda: context.step_context.instance)
        path = root / context.run_id / _relative(context.asset_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            pickle.dump(obj, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(handle.name, path)
        if context.asset_key.path[-1] == _PRUNE_ON_STEP:
            self._prune(root, keep=context.run_id)

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        if upstream is None:
            raise dg.DagsterInvariantViolationError(f"input {context.name} has no upstream output to load")
        path = self._root(lambda: context.instance) / upstream.run_id / _relative(upstream.asset_key)
        if not path.exists():
            raise dg.DagsterInvariantViolationError(
                f"{upstream.asset_key.to_user_string()} of run {upstream.run_id} is not stored at {path}: "
                f"it was removed after {self.retention_days:g} days, or that step never finished; "
                "re-execute the whole run instead")
        with path.open("rb") as handle:
            return pickle.load(handle)

    def _root(self, instance: Callable[[], dg.DagsterInstance]) -> Path:
        return Path(self.base_dir) if self.base_dir else Path(instance().storage_directory()) / "runs"

    def _prune(self, root: Path, *, keep: str) -> None:
        cutoff = time.time() - self.retention_days * 86_400
        for entry in os.scandir(root):
            try:
                expired = entry.is_dir() and entry.name != keep and entry.stat().st_mtime < cutoff
            except FileNotFoundError:  # another run pruned it meanwhile
                continue
            if expired:
                shutil.rmtree(entry.path, ignore_errors=True)


def _relative(key: dg.AssetKey) -> Path:
    # Asset key parts come from the policy file's type names, which its loader restricts to
    # identifiers, so each part is one safe path segment.
    return Path(*key.path)
