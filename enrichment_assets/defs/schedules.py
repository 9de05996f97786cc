"""Schedules, per branch: a retry sweep for due work the sensor has not taken and a stale refresh from
the type's refresh interval; and one for the asset checks, so staleness is evaluated even when nothing
runs."""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

from typing import Any

import dagster as dg

from enrichment_assets.defs.names import job_name
from enrichment_assets.defs.resources import FactStoreResource
from enrichment_assets.defs.sensors import due_requests
from enrichment_assets.policy import Policy


def build_schedules(policy: Policy, jobs: list[Any], checks_job: Any) -> list[dg.ScheduleDefinition]:
    by_name = {job.name: job for job in jobs}

    def sweep(entity_type: str, kind: str, cron: str, description: str) -> dg.ScheduleDefinition:
        name = f"{entity_type}_{kind}"

        @dg.schedule(
            name=name,
            cron_schedule=cron,
            job=by_name[job_name(entity_type)],
            default_status=dg.DefaultScheduleStatus.RUNNING,
            execution_timezone="UTC",
            description=description,
        )
        def _schedule(context: dg.ScheduleEvaluationContext, fact_store: FactStoreResource):
            store = fact_store.store
            if kind == "retry_sweep":
                store.wake_waiters()
            tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else ""
            requests, _, _ = due_requests(
                store,
                policy,
                context.instance,
                trigger=kind,
                refresh=kind == "stale_refresh",
                key_suffix=f"|{kind}|{tick}",
                limit=100,
                entity_types=[entity_type],
            )
            return requests or dg.SkipReason(f"no {entity_type} work is due")

        return _schedule

    schedules = []
    for entity_type in sorted(policy.policies):
        interval = policy.effective(entity_type).refresh_interval
        schedules += [
            sweep(
                entity_type,
                "retry_sweep",
                "*/10 * * * *",
                f"Every 10 minutes: wakes {entity_type} entities whose forward references arrived and requests "
                "a run for each partition with due retries the sensor has not covered (a stopped sensor, a "
                "failed run, its per-tick cap).",
            ),
            sweep(
                entity_type,
                "stale_refresh",
                "*/15 * * * *",
                f"Every 15 minutes: requests runs for partitions holding {entity_type} entities last enriched "
                f"more than {interval} ago (the type's refresh interval).",
            ),
        ]
    schedules.append(
        dg.ScheduleDefinition(
            name="enrichment_checks_schedule",
            cron_schedule="*/5 * * * *",
            job=checks_job,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            execution_timezone="UTC",
            description="Every 5 minutes: staleness, quarantine and search-index checks.",
        )
    )
    return schedules
