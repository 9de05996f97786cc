"""``uncached_entities_sensor``: turns due work in the fact store into runs, one per partition, each
enriching every type with due work in it (the branches the run selects)."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import dagster as dg

from enrichment_assets.defs.names import (
    BRANCH_STEPS,
    ENRICHMENT_JOB,
    INCREMENTAL,
    MODE_TAG,
    RUN_CLAIM_LIMIT,
    SENSOR_NAME,
    SLOT_TAG,
    TRIGGER_TAG,
    TYPES_TAG,
    branch_types,
    due_tag,
    job_name,
    step_key,
)
from enrichment_assets.defs.partitions import partition_key
from enrichment_assets.defs.resources import FactStoreResource
from enrichment_assets.factstore import DueWork, FactStore
from enrichment_assets.policy import Policy

NOT_STARTED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING]
IN_FLIGHT = [*NOT_STARTED, dg.DagsterRunStatus.STARTED]
DEFAULT_MAX_RUNS_PER_TYPE = 4


def _positive_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise dg.DagsterInvariantViolationError(f"{name} must be a positive integer, not {raw!r}")
    return int(raw)


def max_runs_per_type() -> int:
    """``ENRICHMENT_MAX_RUNS_PER_TYPE``: how many runs of one type may be in flight at once (default 4)."""
    return _positive_env("ENRICHMENT_MAX_RUNS_PER_TYPE", DEFAULT_MAX_RUNS_PER_TYPE)


def run_claim_limit() -> int:
    """``ENRICHMENT_RUN_CLAIM_LIMIT``: how many due entities of a type one sensor run claims (default
    5,000). The sensor passes it to the runs it asks for, so it knows how many runs a due set needs."""
    return _positive_env("ENRICHMENT_RUN_CLAIM_LIMIT", RUN_CLAIM_LIMIT)


def candidates_config(entity_types: Iterable[str], limit: int) -> dict[str, Any]:
    """Run config giving each type's candidates step the claim limit the sensor counted with."""
    return {
        "ops": {
            f"{step_key(t, 'candidates').to_python_identifier()}": {"config": {"limit": limit}} for t in entity_types
        }
    }


@dataclass(frozen=True)
class InFlight:
    """Runs already asked for: per (job, partition) those not started yet (each will claim up to a run's
    limit when it starts), and per entity type all of them, started or not."""

    waiting: Counter[tuple[str, str]]
    per_type: Counter[str]


def in_flight(instance: dg.DagsterInstance, entity_types: Iterable[str]) -> InFlight:
    """A run of ``ENRICHMENT_JOB`` counts for each type it selects."""
    types = set(entity_types)
    waiting: Counter[tuple[str, str]] = Counter()
    per_type: Counter[str] = Counter()
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=IN_FLIGHT)):
        partition = run.tags.get("dagster/partition", "")
        if run.job_name == ENRICHMENT_JOB:
            selected = [t for t in run.tags.get(TYPES_TAG, "").split(",") if t]
        else:
            selected = [t for t in types if run.job_name == job_name(t)]
        for entity_type in selected:
            if entity_type not in types:
                continue
            per_type[entity_type] += 1
            if run.status in NOT_STARTED:
                waiting[(job_name(entity_type), partition)] += 1
    return InFlight(waiting, per_type)


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
    max_runs: int | None = None,
    run_limit: int | None = None,
) -> tuple[list[dg.RunRequest], dict[str, str], list[DueWork]]:
    """Run requests for the (type, partition) pairs with due work, oldest window first.

    Due work excludes what running runs have leased, so a pair whose runs have all started gets new runs
    for what arrived since (leases keep them apart); runs still queued or starting count for the
    ``run_limit`` entities each will claim when it starts. A pair whose due set is more than one run
    takes gets several runs (``slot`` 0, 1, ...), as long as the type has fewer than ``max_runs`` in
    flight. A pair whose due set is the one already requested (``skip_keys``) is asked for again only if
    that run failed or was canceled, under a key naming the failed run, so a transient failure does not
    wait for the retry sweep. Returns the requests (at most ``limit``), the run key chosen for every
    pair due (requested or not), and the due work that falls before the first partition.
    """
    types = [t for t in branch_types(policy) if entity_types is None or t in set(entity_types)]
    intervals = {t: policy.effective(t).refresh_interval for t in types} if refresh else None
    due = [
        w
        for w in store.due_work(granularity=policy.defaults.partition_granularity, refresh_intervals=intervals)
        if w.entity_type in types
    ]
    flight = in_flight(instance, types)
    cap = max_runs or max_runs_per_type()
    run_limit = run_limit or run_claim_limit()
    requests: list[dg.RunRequest] = []
    keys: dict[str, str] = {}
    orphans: list[DueWork] = []
    for work in due:
        partition = partition_key(policy, work.window_start)
        if partition is None:
            orphans.append(work)
            continue
        pair = f"{work.entity_type}|{partition}"
        run_key = keys[pair] = f"{pair}|{work.oldest_due_at.isoformat()}|{work.due}{key_suffix}"
        uncovered = work.due - flight.waiting[(job_name(work.entity_type), partition)] * run_limit
        room = cap - flight.per_type[work.entity_type]
        if uncovered <= 0 or room <= 0:
            continue
        previous = (skip_keys or {}).get(pair, "")
        if previous == run_key or previous.startswith(f"{run_key}|after-"):
            failed = _failed_run(instance, work.entity_type, previous)
            if failed is None:
                continue
            run_key = keys[pair] = f"{run_key}|after-{failed[:8]}"
        for slot in range(min(math.ceil(uncovered / run_limit), room, limit - len(requests))):
            flight.per_type[work.entity_type] += 1
            requests.append(
                dg.RunRequest(
                    run_key=run_key if slot == 0 else f"{run_key}|run-{slot + 1}",
                    job_name=job_name(work.entity_type),
                    partition_key=partition,
                    run_config=candidates_config([work.entity_type], run_limit),
                    tags={
                        MODE_TAG: INCREMENTAL,
                        TRIGGER_TAG: trigger,
                        "entity_type": work.entity_type,
                        due_tag(work.entity_type): run_key,
                        SLOT_TAG: str(slot),
                    },
                )
            )
    return requests, keys, orphans


def combined(requests: list[dg.RunRequest], policy: Policy) -> list[dg.RunRequest]:
    """One run of ``ENRICHMENT_JOB`` per partition and slot for the per-type requests of ``due_requests``.

    Launching a run costs a process that imports the code location (seconds of CPU), and it is the
    same cost for one branch as for all of them; the sensor asks for several types every tick, so it
    asks for them together. Each type's due set stays on the run as a tag (``due_tag``), which is how
    a failed run's due sets are found again.
    """
    by_run: dict[tuple[str, str], list[dg.RunRequest]] = {}
    for request in requests:
        by_run.setdefault((request.partition_key or "", request.tags[SLOT_TAG]), []).append(request)
    merged = []
    for (partition, _slot), group in by_run.items():
        group.sort(key=lambda r: (-policy.effective(r.tags["entity_type"]).priority, r.tags["entity_type"]))
        types = [r.tags["entity_type"] for r in group]
        digest = hashlib.sha256("\n".join(r.run_key or "" for r in group).encode()).hexdigest()[:16]
        merged.append(
            dg.RunRequest(
                run_key=f"{partition}|{'+'.join(types)}|{digest}",
                job_name=ENRICHMENT_JOB,
                partition_key=partition,
                asset_selection=[step_key(t, step) for t in types for step in BRANCH_STEPS],
                run_config={"ops": {k: v for r in group for k, v in r.run_config.get("ops", {}).items()}},
                tags={
                    **{k: v for r in group for k, v in r.tags.items() if k != "entity_type"},
                    TYPES_TAG: ",".join(types),
                },
            )
        )
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
        name=SENSOR_NAME,
        jobs=jobs,
        minimum_interval_seconds=interval,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests incremental runs of the enrichment job per partition with due work, "
        "selecting the branch of every entity type due in it: new uncached entities, partial ones due for "
        "retry, and those whose forward references have arrived. A type whose due set is more than one run "
        "claims (ENRICHMENT_RUN_CLAIM_LIMIT, default 5,000) gets several runs at once, up to "
        "ENRICHMENT_MAX_RUNS_PER_TYPE "
        f"(default {DEFAULT_MAX_RUNS_PER_TYPE}) in flight; leases keep them apart. Each type's due set is named "
        "in the run's tags and key, so a repeated tick launches nothing; at most "
        f"{max_pairs} per-type runs per tick (ENRICHMENT_SENSOR_MAX_PAIRS).",
    )
    def uncached_entities_sensor(context: dg.SensorEvaluationContext, fact_store: FactStoreResource) -> dg.SensorResult:
        store = fact_store.store
        woken = store.wake_waiters()
        previous = json.loads(context.cursor) if context.cursor else {}
        requests, keys, orphans = due_requests(
            store,
            policy,
            context.instance,
            trigger="sensor",
            limit=max_pairs,
            skip_keys=previous.get("requested", {}),
        )
        if orphans:
            context.log.warning(
                f"{sum(w.due for w in orphans)} due entities were first seen before "
                f"partition_start ({policy.defaults.partition_start}); move it back to enrich them"
            )
        requested = {k: v for k, v in previous.get("requested", {}).items() if k in keys}
        requested.update(
            {f"{r.tags['entity_type']}|{r.partition_key}": r.tags[due_tag(r.tags["entity_type"])] for r in requests}
        )
        cursor = json.dumps({"requested": requested, "woken": woken}, sort_keys=True)
        if not requests:
            reason = (
                "nothing is due"
                if not keys
                else f"{len(keys)} (type, partition) pairs are due but already have runs queued or requested, "
                "or their types have ENRICHMENT_MAX_RUNS_PER_TYPE runs in flight"
            )
            return dg.SensorResult(skip_reason=reason, cursor=cursor)
        runs = combined(requests, policy)
        context.log.info(
            f"requesting {len(runs)} runs for {len(requests)} (type, partition) pairs ({woken} waiters woken)"
        )
        return dg.SensorResult(run_requests=runs, cursor=cursor)

    return uncached_entities_sensor
