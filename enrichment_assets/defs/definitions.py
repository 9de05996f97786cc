"""The code location: composes assets, checks, jobs, the sensor and schedules from the policy file
(``ENRICHMENT_POLICY``, the shipped MDS example by default) and binds resources. No logic lives here."""

import dagster as dg

from enrichment_assets.defs.branch import build_branch, search_index_spec, source_specs
from enrichment_assets.defs.checks import build_checks
from enrichment_assets.defs.io_manager import RunScopedIOManager
from enrichment_assets.defs.names import CHECKS_JOB, ENRICHMENT_JOB, branch_types, job_name
from enrichment_assets.defs.resources import FactStoreResource, SearchResource, SourcesResource
from enrichment_assets.defs.run_status import build_lease_release_sensors
from enrichment_assets.defs.schedules import build_schedules
from enrichment_assets.defs.sensors import build_sensor
from enrichment_assets.defs.summary import fact_store_summary
from enrichment_assets.policy import Policy
from enrichment_assets.settings import Settings


def build_definitions(policy: Policy) -> dg.Definitions:
    types = branch_types(policy)
    jobs = [
        dg.define_asset_job(
            job_name(t),
            selection=dg.AssetSelection.groups(t),
            description=f"Enrich one partition of {t}: candidates, hydration, edges, index.",
        )
        for t in types
    ]
    enrichment_job = dg.define_asset_job(
        ENRICHMENT_JOB,
        selection=dg.AssetSelection.groups(*types),
        description="Every branch: the sensor's runs select the branches of the types with due work in a partition.",
    )
    checks = build_checks(policy)
    checks_job = dg.define_asset_job(
        CHECKS_JOB,
        selection=dg.AssetSelection.checks(*checks),
        description="Every staleness, quarantine and search-index check.",
    )
    return dg.Definitions(
        assets=[
            *source_specs(policy),
            *[asset for t in types for asset in build_branch(policy, t)],
            search_index_spec(policy),
            fact_store_summary,
        ],
        asset_checks=checks,
        jobs=[*jobs, enrichment_job, checks_job],
        sensors=[build_sensor(policy, [enrichment_job]), *build_lease_release_sensors()],
        schedules=build_schedules(policy, jobs, checks_job),
        resources={
            "fact_store": FactStoreResource(database_url=dg.EnvVar("ENRICHMENT_DATABASE_URL")),
            "sources": SourcesResource(),
            "search": SearchResource(),
            "io_manager": RunScopedIOManager(),
        },
        executor=dg.in_process_executor,
    )


defs = build_definitions(Settings.from_env().policy)  # type: ignore[arg-type]
