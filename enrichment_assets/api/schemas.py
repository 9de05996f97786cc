"""Component schemas of the OpenAPI document: the JSON bodies the API takes and answers."""

from __future__ import annotations

from typing import Any

from enrichment_assets.events import MAX_ID_LENGTH, EventType
from enrichment_assets.factstore.schema import STATE_VALUES

_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}
_STALENESS = {
    "type": ["number", "null"],
    "description": "Seconds since the entity's graph was last verified against its sources; null if never.",
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Event": {
        "type": "object",
        "additionalProperties": False,
        "required": ["entity_type", "entity_id", "event_type"],
        "properties": {
            "entity_type": {
                "type": "string",
                "minLength": 1,
                "maxLength": 128,
                "description": "Declared by the policy.",
            },
            "entity_id": {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH},
            "event_type": {"type": "string", "enum": [e.value for e in EventType]},
            "occurred_at": {"type": "string", "format": "date-time", "description": "Without an offset: UTC."},
        },
    },
    "Accepted": {
        "type": "object",
        "properties": {
            "accepted": {"const": True},
            "received": {"type": "integer"},
            "entities": {"type": "integer"},
            "by_event_type": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "BatchRejected": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "problems": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"line": {"type": "integer"}, "message": {"type": "string"}},
                },
            },
            "problems_truncated": {"type": "boolean"},
        },
    },
    "Entity": {
        "type": "object",
        "properties": {
            "entity_type": {"type": "string"},
            "entity_id": {"type": "string"},
            "state": {"type": "string", "enum": list(STATE_VALUES)},
            "version": {"type": "integer"},
            "first_seen_at": _NULLABLE_TIME,
            "hydrated_at": _NULLABLE_TIME,
            "last_enriched_at": _NULLABLE_TIME,
            "staleness_seconds": _STALENESS,
            "attempts": {"type": "integer"},
            "next_attempt_at": _NULLABLE_TIME,
            "last_error": {"type": ["string", "null"]},
            "waiting_on": {"type": ["array", "null"], "items": {"type": "string"}},
            "attributes": {"type": ["object", "null"]},
        },
    },
    "Edge": {
        "type": "object",
        "properties": {
            **{name: {"type": "string"} for name in ("relation", "src_type", "src_id", "dst_type", "dst_id")},
            "kind": {"type": "string", "enum": ["deterministic", "inferred"]},
            "confidence": {"type": "number"},
            "policy": {"type": "string"},
            "path": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
            "asserted_at": _NULLABLE_TIME,
            "confirmed_at": _NULLABLE_TIME,
        },
    },
    "Edges": {
        "type": "object",
        "properties": {
            "entity_type": {"type": "string"},
            "entity_id": {"type": "string"},
            "state": {"type": "string", "enum": list(STATE_VALUES)},
            "last_enriched_at": _NULLABLE_TIME,
            "staleness_seconds": _STALENESS,
            "partial": {"type": "boolean", "description": "Some paths wait on entities not there yet."},
            "direction": {"type": "string", "enum": ["out", "in"]},
            "total": {"type": "integer", "description": "Live edges in all, past the limit too."},
            "truncated": {"type": "boolean"},
            "edges": {"type": "array", "items": {"$ref": "#/components/schemas/Edge"}},
        },
    },
    "SearchHits": {
        "type": "object",
        "properties": {
            "hits": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "entity_type": {"type": "string"},
                        "entity_id": {"type": "string"},
                        "name": {"type": ["string", "null"]},
                        "state": {"type": "string"},
                        "version": {"type": "integer"},
                        "last_enriched_at": _NULLABLE_TIME,
                        "staleness_seconds": _STALENESS,
                    },
                },
            }
        },
    },
    "Health": {
        "type": "object",
        "properties": {"status": {"enum": ["ok", "unavailable"]}, "fact_store": {"type": "string"}},
    },
}
