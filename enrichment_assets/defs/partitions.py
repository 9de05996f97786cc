"""Time-window partitions over ``first_seen_at``: a partition of a branch is the entities of its type
first seen in that window, so a backfill of a range re-enriches exactly the entities first seen in it."""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg

from enrichment_assets.policy import Policy

_FORMATS = {"day": "%Y-%m-%d", "hour": "%Y-%m-%d-%H:%M"}


def partitions_for(policy: Policy) -> dg.TimeWindowPartitionsDefinition:
    """Daily or hourly windows (``defaults.partition_granularity``) from ``defaults.partition_start``.

    ``end_offset=1`` makes the window in progress a partition too: entities first seen today are
    enriched today, not once the day is over.
    """
    start = policy.defaults.partition_start
    if policy.defaults.partition_granularity == "hour":
        return dg.HourlyPartitionsDefinition(start_date=f"{start:%Y-%m-%d}-00:00", end_offset=1, timezone="UTC")
    return dg.DailyPartitionsDefinition(start_date=f"{start:%Y-%m-%d}", end_offset=1, timezone="UTC")


def partition_key(policy: Policy, window_start: datetime) -> str | None:
    """The partition whose window starts at ``window_start``; None before ``partition_start``."""
    start = window_start.astimezone(UTC)
    first = datetime.combine(policy.defaults.partition_start, datetime.min.time(), tzinfo=UTC)
    if start < first:
        return None
    return start.strftime(_FORMATS[policy.defaults.partition_granularity])
