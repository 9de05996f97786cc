"""An observation of the fact store itself: how many entities sit in each state, per type."""

# No `from __future__ import annotations` here: Dagster inspects the context annotation at runtime.

import dagster as dg
import pandas as pd

from enrichment_assets.defs.resources import FactStoreResource


@dg.asset(group_name="fact_store", kinds={"postgres", "pandas"})
def fact_store_summary(context: dg.AssetExecutionContext, fact_store: FactStoreResource) -> pd.DataFrame:
    """Entities by type and state, with the longest-waiting pending entity of each type.

    Materialize it to see how much enrichment work is outstanding; its metadata plots the pending
    backlog over time.
    """
    store = fact_store.store
    now = store.now()
    rows = [
        {
            "entity_type": row.entity_type,
            "state": state,
            "count": count,
            "oldest_waiting_seconds": (now - row.oldest_waiting_since).total_seconds()
            if row.oldest_waiting_since
            else None,
        }
        for row in store.status()
        for state, count in sorted(row.counts.items())
    ]
    frame = pd.DataFrame(rows, columns=["entity_type", "state", "count", "oldest_waiting_seconds"])
    pending = frame[frame["state"].isin(["uncached", "partially_resolved"])]["count"].sum()
    context.add_output_metadata(
        {
            "entities": dg.MetadataValue.int(int(frame["count"].sum())),
            "pending": dg.MetadataValue.int(int(pending)),
            "by_type_and_state": dg.MetadataValue.md(frame.to_markdown(index=False) if len(frame) else "empty"),
        }
    )
    return frame
