"""The code location: composes assets and binds resources. No logic lives here."""

import dagster as dg

from enrichment_assets.assets import fact_store_summary
from enrichment_assets.resources import FactStoreResource

defs = dg.Definitions(
    assets=[fact_store_summary],
    resources={"fact_store": FactStoreResource()},
    executor=dg.in_process_executor,
)
