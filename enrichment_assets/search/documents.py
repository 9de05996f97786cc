"""Search documents built from the fact store, shaped by the policy (names, indexed attributes)."""

from __future__ import annotations

import hashlib
from typing import Any

from enrichment_assets.factstore.outbox import DocumentSource
from enrichment_assets.policy import Policy

# Elasticsearch ids are at most 512 bytes; entity ids may be 512 characters.
_MAX_ID_BYTES = 512


def document_id(entity_type: str, entity_id: str) -> str:
    """``type:id`` (a type name never holds ':'), hashed when too long for an Elasticsearch id."""
    plain = f"{entity_type}:{entity_id}"
    if len(plain.encode()) <= _MAX_ID_BYTES:
        return plain
    return f"{entity_type}:sha256:{hashlib.sha256(entity_id.encode()).hexdigest()}"


def search_state(state: str) -> str:
    """What search calls a state: an ingested entity not yet enriched is ``pending``."""
    return "pending" if state == "uncached" else state


def _name(policy: Policy, entity_type: str, attributes: dict[str, Any] | None) -> str | None:
    if not attributes or entity_type not in policy.entity_types:
        return None
    value = attributes.get(policy.entity_types[entity_type].name_field)
    return str(value) if value is not None else None


def _indexed_attributes(policy: Policy, source: DocumentSource) -> dict[str, Any]:
    if not source.attributes or source.entity_type not in policy.entity_types:
        return {}
    allowed = policy.entity_types[source.entity_type].search_attributes
    return {k: v for k, v in source.attributes.items() if k in allowed and v is not None}


def build_document(policy: Policy, source: DocumentSource) -> dict[str, Any]:
    relationships = []
    for edge in source.edges_out:
        other = (edge["dst_type"], edge["dst_id"])
        relationships.append(_relationship(policy, source, edge["relation"], "out", True, other, edge["path"]))
    for edge in source.edges_in:
        other = (edge["src_type"], edge["src_id"])
        relationships.append(_relationship(policy, source, edge["relation"], "in", True, other, edge["path"]))
    for ref in source.references:
        other = (ref["to_type"], ref["to_id"])
        relationships.append(_relationship(policy, source, ref["field"], "out", False, other, None))
    return {
        "entity_type": source.entity_type,
        "entity_id": source.entity_id,
        "name": _name(policy, source.entity_type, source.attributes),
        "state": search_state(source.state),
        "version": source.doc_version,
        "first_seen_at": source.first_seen_at.isoformat(),
        "hydrated_at": source.hydrated_at.isoformat() if source.hydrated_at else None,
        "last_enriched_at": source.last_enriched_at.isoformat() if source.last_enriched_at else None,
        "attributes": _indexed_attributes(policy, source),
        "relationships": relationships,
        # Documents list at most defaults.document_relationship_cap of each; these are the full counts.
        "relationship_totals": sorted(source.totals, key=lambda t: (t["relation"], t["direction"], t["derived"])),
    }


def _relationship(
    policy: Policy,
    source: DocumentSource,
    relation: str,
    direction: str,
    derived: bool,
    other: tuple[str, str],
    path: list[list[str]] | None,
) -> dict[str, Any]:
    return {
        "relation": relation,
        "direction": direction,
        "derived": derived,
        "other_type": other[0],
        "other_id": other[1],
        "other_name": _name(policy, other[0], source.neighbours.get(other)),
        "path": [f"{t}:{i}" for t, i in (path or [])],
    }
