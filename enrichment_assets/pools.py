"""A sensor that hands free pool slots to steps Dagster's slot queue left waiting.

Each branch's hydration step runs in its source system's pool, one step at a time. Dagster queues a
step that finds the pool full and, when the holder frees its slot, assigns the next queued step. The
two are separate statements: a step that looked while the slot was held, but wrote itself into the
queue just after the holder freed it, is never assigned, and waits (``Step still blocked by limit for
pool ...`` every 5 minutes) with a free slot beside it, while its run keeps its claimed entities
leased. It happened in the demo when the schedules' quarter-hour runs started beside the sensor's.

``pool_queue_repair`` looks every 15 s: for a pool with more slots than assigned steps, and a step
queued for longer than ``STUCK_AFTER``, it assigns queued steps (oldest first, as Dagster would) up to
the free slots. Assigning never lets more steps run than the pool allows: a step still claims a slot
row before it runs, and waits if there is none.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import dagster as dg

from enrichment_assets.assets.branch import branch_types, pool_name
from enrichment_assets.policy import Policy

STUCK_AFTER = timedelta(seconds=30)


def repair_pool_queues(instance: dg.DagsterInstance, pools: Iterable[str], *,
                       stuck_after: timedelta = STUCK_AFTER) -> dict[str, int]:
    """Assign queued steps to the free slots of ``pools``; returns how many per pool."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    now = datetime.now(UTC)
    assigned: dict[str, int] = {}
    for pool in sorted(set(pools)):
        info = storage.get_concurrency_info(pool)
        free = info.slot_count - info.assigned_step_count
        waiting = [s for s in info.pending_steps if s.assigned_timestamp is None]
        if free <= 0 or not any(now - _aware(s.enqueued_timestamp) >= stuck_after for s in waiting):
            continue
        for _ in range(min(free, len(waiting))):
            storage.assign_pending_steps([pool])
        assigned[pool] = min(free, len(waiting))
    return assigned


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_pool_repair_sensor(policy: Policy) -> dg.SensorDefinition:
    pools = sorted({pool_name(policy, t) for t in branch_types(policy)})

    @dg.sensor(
        name="pool_queue_repair",
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Hands free source-pool slots to steps Dagster's slot queue left waiting "
                    f"(pools: {', '.join(pools)}).",
    )
    def pool_queue_repair(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        assigned = repair_pool_queues(context.instance, pools)
        if assigned:
            context.log.warning(f"assigned free pool slots to waiting steps: {assigned}")
            return dg.SkipReason(f"assigned free slots to waiting steps: {assigned}")
        return dg.SkipReason("no step waits beside a free pool slot")

    return pool_queue_repair
