"""The DataFrames a run's steps pass each other, and the metadata the UI plots: conversions to and from
the steps' own types, so the assets stay a few lines each."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import dagster as dg
import pandas as pd

from enrichment_assets.factstore import Claim, DerivedEdge, EdgeChange, Outcome, Staleness

CANDIDATE_COLUMNS = ["entity_type", "entity_id", "version", "state", "attempts", "first_seen_at", "reason"]
HYDRATED_COLUMNS = [
    "entity_type",
    "entity_id",
    "version",
    "outcome",
    "error",
    "retry_at",
    "waiting_on",
    "edges",
    "attributes",
]
EDGE_COLUMNS = ["src_type", "src_id", "relation", "dst_type", "dst_id", "change"]
INDEX_COLUMNS = ["entity_type", "entity_id"]
OUTCOMES = ("enriched", "partial", "failed", "deferred", "deleted")


def _reason(claim: Claim) -> str:
    return {"fully_enriched": "refresh", "deleted": "tombstone"}.get(claim.state, claim.state)


def claims_frame(claims: Iterable[Claim]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "entity_type": c.entity_type,
                "entity_id": c.entity_id,
                "version": c.version,
                "state": c.state,
                "attempts": c.attempts,
                "first_seen_at": c.first_seen_at,
                "reason": _reason(c),
            }
            for c in claims
        ],
        columns=CANDIDATE_COLUMNS,
    )


def claims_of(frame: pd.DataFrame) -> list[Claim]:
    return [
        Claim(
            row.entity_type, row.entity_id, int(row.version), row.state, int(row.attempts), _datetime(row.first_seen_at)
        )
        for row in frame.itertuples(index=False)
    ]


def outcomes_frame(outcomes: Iterable[Outcome]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "entity_type": o.entity_type,
                "entity_id": o.entity_id,
                "version": o.version,
                "outcome": o.status,
                "error": o.error,
                "retry_at": o.retry_at,
                "waiting_on": [f"{t}:{i}" for t, i in o.waiting_on],
                "edges": [
                    {
                        "relation": e.relation,
                        "dst_type": e.dst_type,
                        "dst_id": e.dst_id,
                        "path": [list(k) for k in e.path],
                    }
                    for e in o.edges
                ],
                "attributes": o.attributes,
            }
            for o in outcomes
        ],
        columns=HYDRATED_COLUMNS,
    )


def outcomes_of(frame: pd.DataFrame) -> list[Outcome]:
    return [_outcome(row) for row in frame.itertuples(index=False)]


def _outcome(row: Any) -> Outcome:
    retry_at = None if row.retry_at is None or pd.isna(row.retry_at) else _datetime(row.retry_at)
    error = None if row.error is None or (isinstance(row.error, float) and pd.isna(row.error)) else row.error
    return Outcome(
        row.entity_type,
        row.entity_id,
        int(row.version),
        row.outcome,
        attributes=row.attributes if isinstance(row.attributes, dict) else None,
        waiting_on=tuple(tuple(k.split(":", 1)) for k in row.waiting_on),  # type: ignore[misc]
        error=error,
        edges=tuple(
            DerivedEdge(e["relation"], e["dst_type"], e["dst_id"], tuple(tuple(k) for k in e["path"]))
            for e in row.edges
        ),
        retry_at=retry_at,
    )


def edge_changes_frame(changes: Iterable[EdgeChange]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "src_type": c.src_type,
                "src_id": c.src_id,
                "relation": c.relation,
                "dst_type": c.dst_type,
                "dst_id": c.dst_id,
                "change": c.change,
            }
            for c in changes
        ],
        columns=EDGE_COLUMNS,
    )


def _datetime(value: Any) -> Any:
    return value.to_pydatetime() if hasattr(value, "to_pydatetime") else value


def markdown(frame: pd.DataFrame, rows: int = 20) -> dg.MetadataValue:
    if frame.empty:
        return dg.MetadataValue.md("_none_")
    shown = frame.head(rows).astype(str)
    more = f"\n\n… and {len(frame) - rows} more" if len(frame) > rows else ""
    return dg.MetadataValue.md(shown.to_markdown(index=False) + more)


def staleness_metadata(staleness: Staleness) -> dict[str, dg.MetadataValue]:
    return {
        "entities_in_slice": dg.MetadataValue.int(staleness.count),
        "staleness_p50_seconds": dg.MetadataValue.float(round(staleness.p50, 1)),
        "staleness_p95_seconds": dg.MetadataValue.float(round(staleness.p95, 1)),
    }


def ints(values: Mapping[str, int]) -> dict[str, dg.MetadataValue]:
    return {name: dg.MetadataValue.int(int(value)) for name, value in values.items()}


def outcome_counts(frame: pd.DataFrame) -> dict[str, int]:
    by_outcome = Counter(frame["outcome"])
    return {f"outcome_{name}": by_outcome.get(name, 0) for name in OUTCOMES}
