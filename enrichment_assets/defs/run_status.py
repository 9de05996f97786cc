"""Leases back at once when a run dies: a failed or canceled run's claims are released, unless a
re-execution of it is on its way (which settles them under the same owner).

A run worker killed mid-hydration or mid-settle is marked failed by Dagster's run monitoring; without
this its entities would stay leased until the lease expired (30 minutes), blowing their staleness
budget. Releasing gives the attempt back, so the next run enriches them as if nothing had happened.
"""

# No `from __future__ import annotations` here: Dagster inspects annotations at runtime.

import dagster as dg

from enrichment_assets.defs.resources import FactStoreResource

RELEASE_ON = {
    "leases_of_failed_runs": dg.DagsterRunStatus.FAILURE,
    "leases_of_canceled_runs": dg.DagsterRunStatus.CANCELED,
}
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def lease_owner(run: dg.DagsterRun) -> str:
    """The owner a run's claims are leased to: the root run of its re-execution family."""
    return f"dagster:{run.root_run_id or run.run_id}"


def release_leases(instance: dg.DagsterInstance, store: object, run: dg.DagsterRun) -> int | None:
    """Release ``run``'s family's leases; None when a run of the family is still in flight."""
    root = run.root_run_id or run.run_id
    family = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/root_run_id": root}, statuses=IN_FLIGHT))
    if family:
        return None
    return store.release_owners([lease_owner(run)])  # type: ignore[attr-defined]


def build_lease_release_sensors() -> list[dg.SensorDefinition]:
    return [_sensor(name, status) for name, status in RELEASE_ON.items()]


def _sensor(name: str, status: dg.DagsterRunStatus) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        name=name,
        run_status=status,
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Releases the claims of every run that ends {status.value.lower()} (a killed run worker, a "
        "cancel in the UI), unless a re-execution of it is queued or running, so its entities are enriched by "
        "the next run instead of waiting out their 30-minute lease.",
    )
    def release(context: dg.RunStatusSensorContext, fact_store: FactStoreResource) -> dg.SkipReason:
        released = release_leases(context.instance, fact_store.store, context.dagster_run)
        run_id = context.dagster_run.run_id
        if released is None:
            return dg.SkipReason(f"run {run_id} is being re-executed; its re-execution settles the leases")
        if released:
            context.log.info("released %d leases of %s run %s", released, status.value.lower(), run_id)
        return dg.SkipReason(f"released {released} leases of run {run_id}")

    return release
