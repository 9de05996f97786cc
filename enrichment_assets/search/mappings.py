"""The entity index's settings and mappings, installed as an index template.

Source JSON never becomes mapping: only the policy's ``search_attributes`` are indexed, into one
``flattened`` field, so a source adding fields cannot explode the mapping.
"""

from __future__ import annotations

from typing import Any

KEYWORD_AND_TEXT = {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 512}}}

MAPPINGS: dict[str, Any] = {
    "dynamic": "strict",
    "properties": {
        "entity_type": {"type": "keyword"},
        "entity_id": {"type": "keyword"},
        "name": KEYWORD_AND_TEXT,
        "state": {"type": "keyword"},
        "version": {"type": "long"},
        "first_seen_at": {"type": "date"},
        "hydrated_at": {"type": "date"},
        "last_enriched_at": {"type": "date"},
        "attributes": {"type": "flattened"},
        "relationships": {
            "type": "nested",
            "properties": {
                "relation": {"type": "keyword"},
                "direction": {"type": "keyword"},
                "derived": {"type": "boolean"},
                "other_type": {"type": "keyword"},
                "other_id": {"type": "keyword"},
                "other_name": KEYWORD_AND_TEXT,
                "path": {"type": "keyword"},
            },
        },
        "relationship_totals": {
            "type": "object",
            "properties": {
                "relation": {"type": "keyword"},
                "direction": {"type": "keyword"},
                "derived": {"type": "boolean"},
                "total": {"type": "integer"},
            },
        },
    },
}

SETTINGS: dict[str, Any] = {"number_of_shards": 1, "refresh_interval": "1s"}
