"""A three-step chain stored by ``RunScopedIOManager``, for test_io_manager.py's re-execution in
another process: ``candidates`` -> ``hydrated`` -> ``edges`` on one daily partition.

``hydrated`` fails once: while the file named by ``REEXEC_FAIL_MARKER`` exists, it removes the file
and raises. Every computation of ``candidates`` appends its run id to ``REEXEC_COMPUTED_LOG``, and its
frame carries that run id through to ``edges``, so the test can tell a loaded frame from a recomputed one.

``main`` runs the job the way a run worker does, against ``DagsterInstance.get()`` (``$DAGSTER_HOME``)::

    python -c "import sys; from enrichment_assets_tests.reexec_defs import main; main(sys.argv[1:])" execute
    python -c "..." reexecute <run id>

Each prints the id of the run it made.
"""

# No `from __future__ import annotations` here: Dagster inspects the context annotation at runtime.

import os
import sys
from pathlib import Path

import dagster as dg
import pandas as pd

from enrichment_assets.defs.io_manager import RunScopedIOManager

PARTITION = "2026-03-14"
JOB = "reexec"
days = dg.DailyPartitionsDefinition(start_date="2026-01-01")


@dg.asset(key=["reexec", "candidates"], partitions_def=days)
def candidates(context: dg.AssetExecutionContext) -> pd.DataFrame:
    with open(os.environ["REEXEC_COMPUTED_LOG"], "a") as log:
        log.write(f"{context.run_id}\n")
    return pd.DataFrame({"entity_id": ["e1", "e2"], "claimed_in": context.run_id})


@dg.asset(key=["reexec", "hydrated"], ins={"candidates": dg.AssetIn(key=candidates.key)}, partitions_def=days)
def hydrated(candidates: pd.DataFrame) -> pd.DataFrame:
    marker = Path(os.environ["REEXEC_FAIL_MARKER"])
    if marker.exists():
        marker.unlink()
        raise RuntimeError("the source was down on the first attempt")
    return candidates.assign(name=["one", "two"])


@dg.asset(key=["reexec", "edges"], ins={"hydrated": dg.AssetIn(key=hydrated.key)}, partitions_def=days)
def edges(hydrated: pd.DataFrame) -> pd.DataFrame:
    return hydrated.assign(relation="related_to")


defs = dg.Definitions(
    assets=[candidates, hydrated, edges],
    jobs=[dg.define_asset_job(JOB, selection=dg.AssetSelection.assets(candidates, hydrated, edges))],
    resources={"io_manager": RunScopedIOManager()},
    executor=dg.in_process_executor,
)


def reexec_job() -> dg.JobDefinition:
    return defs.resolve_job_def(JOB)


def main(argv: list[str]) -> None:
    with dg.DagsterInstance.get() as instance:
        if argv[0] == "execute":
            options, tags = None, {"dagster/partition": PARTITION}
        else:
            # Unlike a re-execution from the UI, execute_job does not carry the parent's tags over.
            parent = instance.get_run_by_id(argv[1])
            assert parent is not None, f"no run {argv[1]}"
            options = dg.ReexecutionOptions.from_failure(parent.run_id, instance)
            tags = {"dagster/partition": parent.tags["dagster/partition"]}
        with dg.execute_job(
            dg.reconstructable(reexec_job), instance=instance, tags=tags, reexecution_options=options
        ) as result:
            sys.stdout.write(f"{result.run_id}\n")
