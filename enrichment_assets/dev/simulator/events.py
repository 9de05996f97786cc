"""Thin ``created`` events for a whole graph, in a seeded shuffled order.

The shuffle is what a real event bus delivers: a model instance often arrives before the pipeline
run it references, so enrichment meets forward references from the first event on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from typing import IO, Any

from enrichment_assets.dev.simulator.graph import EPOCH, MdsGraph

_TIME_FIELDS = ("created_at", "started_at")


def thin_events(graph: MdsGraph, *, seed: int | None = None) -> Iterator[dict[str, Any]]:
    """One ``created`` event per entity; the order depends only on the graph and ``seed``."""
    order = [(entity_type, entity) for entity_type, entity in graph.items()]
    random.Random(f"{graph.seed if seed is None else seed}:events").shuffle(order)
    epoch = EPOCH.isoformat().replace("+00:00", "Z")
    for entity_type, entity in order:
        occurred_at = next((entity[f] for f in _TIME_FIELDS if isinstance(entity.get(f), str)), epoch)
        yield {
            "entity_type": entity_type,
            "entity_id": entity["id"],
            "event_type": "created",
            "occurred_at": occurred_at,
        }


def write_ndjson(events: Iterator[dict[str, Any]], stream: IO[str]) -> int:
    """Write events one JSON object per line; returns how many were written."""
    written = 0
    for event in events:
        stream.write(json.dumps(event, separators=(",", ":")) + "\n")
        written += 1
    return written
