"""``uncached_entities_sensor``: turns due work in the fact store into runs, one per partition, each
enriching every type with due work in it (the branches the run selects)."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import hashlib
import json
import os
from collections.abc import Iterable

from typing import Any

import dagster as dg

from enrichment_assets.assets.branch import BRANCH_STEPS, INCREMENTAL, MODE_TAG, TRIGGER_TAG, branch_types
from enrichment_assets.factstore import DueWork, FactStore
from enrichment_assets.partitions import partition_key
from enrichment_assets.policy import Policy
from enrichment_assets.resources import FactStoreResource

NOT_STARTED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING]
IN_FLIGHT = [*NOT_STARTED, dg.DagsterRunStatus.STARTED]

# The job the sensor launches: every branch, partitioned alike; a run selects the branches with due work.
ENRICHMENT_JOB = "enrichment"
# On a run of ENRICHMENT_JOB: the entity types it enriches, comma-separated.
TYPES_TAG = "enrichment/types"


def job_name(entity_type: str) -> str:
    return f"{entity_type}_enrichment"


def due_tag(entity_type: str) -> str:
    """The tag naming the due set a run was asked for, per type (the pair's run key)."""
    return f"enrichment/due.{entity_type}"


def waiting(instance: dg.DagsterInstance, job_names: Iterable[str]) -> set[tuple[str, str]]:
    """(job, partition) of every run of the given jobs that is queued or starting: it has not claimed
    anything yet, so it will take whatever is due when it starts. A queued run of ``ENRICHMENT_JOB``
    counts for each type it selects."""
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=NOT_STARTED))
    names = set(job_names)
    pairs: set[tuple[str, str]] = set()
    for run in runs:
        partition = run.tags.get("dagster/partition", "")
        if run.job_name == ENRICHMENT_JOB:
            pairs.update((job_name(t), partition) for t in run.tags.get(TYPES_TAG, "").split(",") if t)
        elif run.job_name in names:
            pairs.add((run.job_name, partition))
    return {pair for pair in pairs if pair[0] in names}


def due_requests(
    store: FactStore,
    policy: Policy,
    instance: dg.DagsterInstance,
    *,
    trigger: str,
    refresh: bool = False,
    key_suffix: str = "",
    limit: int,
    skip_keys: dict[str, str] | None = None,
    entity_types: Iterable[str] | None = None,
) -> tuple[list[dg.RunRequest], dict[str, str], list[DueWork]]:
    """Run requests for the (type, partition) pairs with due work, oldest window first.

    Due work excludes what running runs have leased, so a pair whose runs have all started gets a new
    run for what arrived since (leases keep the two apart); a pair with a run still queued or starting
    is left to it, as that run will claim everything due when it starts. A pair whose due set is the one
    already requested (``skip_keys``) is asked for again only if that run failed or was canceled, under a
    key naming the failed run, so a transient failure does not wait for the retry sweep. Returns the
    requests, the run key chosen for every pair due (requested or not), and the due work that falls
    before the first partition.
    """
    types = [t for t in branch_types(policy) if entity_types is None or t in set(entity_types)]
    intervals = {t: policy.effective(t).refresh_interval for t in types} if refresh else None
    due = [w for w in store.due_work(granularity=policy.defaults.partition_granularity,
                                     refresh_intervals=intervals) if w.entity_type in types]
    busy = waiting(instance, [job_name(t) for t in types])
    requests: list[dg.RunRequest] = []
    keys: dict[str, str] = {}
    orphans: list[DueWork] = []
    for work in due:
        partition = partition_key(policy, work.window_start)
        if partition is None:
            orphans.append(work)
            continue
        pair = f"{work.entity_type}|{partition}"
        run_key = f"{pair}|{work.oldest_due_at.isoformat()}|{work.due}{key_suffix}"
        keys[pair] = run_key
        if (job_name(work.entity_type), partition) in busy:
            continue
        previous = (skip_keys or {}).get(pair, "")
        if previous == run_key or previous.startswith(f"{run_key}|after-"):
            failed = _failed_run(instance, work.entity_type, previous)
            if failed is None:
                continue
            run_key = keys[pair] = f"{run_key}|after-{failed[:8]}"
        if len(requests) >= limit:
            continue
        requests.append(dg.RunRequest(
            run_key=run_key,
            job_name=job_name(work.entity_type),
            partition_key=partition,
            tags={MODE_TAG: INCREMENTAL, TRIGGER_TAG: trigger, "entity_type": work.entity_type,
                  due_tag(work.entity_type): run_key},
        ))
    return requests, keys, orphans


def combined(requests: list[dg.RunRequest], policy: Policy) -> list[dg.RunRequest]:
    """One run of ``ENRICHMENT_JOB`` per partition for the per-type requests of ``due_requests``.

    Launching a run costs a process that imports the code location (seconds of CPU), and it is the
    same cost for one branch as for all of them; the sensor asks for several types every tick, so it
    asks for them together. Each type's due set stays on the run as a tag (``due_tag``), which is how
    a failed run's due sets are found again.
    """
    by_partition: dict[str, list[dg.RunRequest]] = {}
    for request in requests:
        by_partition.setdefault(request.partition_key or "", []).append(request)
    merged = []
    for partition, group in by_partition.items():
        group.sort(key=lambda r: (-policy.effective(r.tags["entity_type"]).priority, r.tags["entity_type"]))
        types = [r.tags["entity_type"] for r in group]
        digest = hashlib.sha256("\n".join(r.run_key or "" for r in group).encode()).hexdigest()[:16]
        merged.append(dg.RunRequest(
            run_key=f"{partition}|{'+'.join(types)}|{digest}",
            job_name=ENRICHMENT_JOB,
            partition_key=partition,
            asset_selection=[dg.AssetKey([t, step]) for t in types for step in BRANCH_STEPS],
            tags={**{k: v for r in group for k, v in r.tags.items() if k != "entity_type"}, TYPES_TAG: ",".join(types)},
        ))
    return merged


def _failed_run(instance: dg.DagsterInstance, entity_type: str, run_key: str) -> str | None:
    """The id of the run asked for ``entity_type``'s due set ``run_key`` if it failed or was canceled."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={due_tag(entity_type): run_key}), limit=1)
    if runs and runs[0].status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
        return runs[0].run_id
    return None


def build_sensor(policy: Policy, jobs: list[Any]) -> dg.SensorDefinition:
    interval = int(os.environ.get("ENRICHMENT_SENSOR_INTERVAL_SECONDS", "30"))
    max_pairs = int(os.environ.get("ENRICHMENT_SENSOR_MAX_PAIRS", "8"))

    @dg.sensor(
        name="uncached_entities_sensor",
        jobs=jobs,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests one incremental run of the enrichment job per partition with due work, "
        "selecting the branch of every entity type due in it: new uncached entities, partial ones due for "
        "retry, and those whose forward references have arrived. Each type's due set is named in the run's "
        "tags and key, so a repeated tick launches nothing; due work excludes entities leased by running "
        "runs, and a (type, partition) with a run still queued is left to it; at most "
        f"{max_pairs} (type, partition) pairs per tick (ENRICHMENT_SENSOR_MAX_PAIRS).",
    )
    def uncached_entities_sensor(context: dg.SensorEvaluationContext,
                                 fact_store: FactStoreResource) -> dg.SensorResult:
        store = fact_store.store
        woken = store.wake_waiters()
        previous = json.loads(context.cursor) if context.cursor else {}
        requests, keys, orphans = due_requests(
            store, policy, context.instance, trigger="sensor", limit=max_pairs,
            skip_keys=previous.get("requested", {}),
        )
        if orphans:
            context.log.warning(f"{sum(w.due for w in orphans)} due entities were first seen before "
                                f"partition_start ({policy.defaults.partition_start}); move it back to enrich them")
        requested = {k: v for k, v in previous.get("requested", {}).items() if k in keys}
        requested.update({f"{r.tags['entity_type']}|{r.partition_key}": r.run_key for r in requests})
        cursor = json.dumps({"requested": requested, "woken": woken}, sort_keys=True)
        if not requests:
            reason = ("nothing is due" if not keys else
                      f"{len(keys)} (type, partition) pairs are due but already have a run queued or requested")
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        runs = combined(requests, policy)
        context.log.info(f"requesting {len(runs)} runs for {len(requests)} (type, partition) pairs "
                         f"({woken} waiters woken)")
        return dg.SensorResult(run_requests=runs, cursor=cursor)

    return uncached_entities_sensor
