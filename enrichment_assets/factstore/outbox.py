"""Reads and writes of the search outbox: which documents are behind, and everything one needs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from enrichment_assets.factstore.models import EntityKey
from enrichment_assets.factstore.schema import EntityState, edges, entities, references

_CHUNK = 500


@dataclass(frozen=True)
class DocumentSource:
    """One entity as the fact store knows it, with its live edges (both directions) and references."""

    entity_type: str
    entity_id: str
    state: str
    doc_version: int
    attributes: dict[str, Any] | None
    first_seen_at: datetime
    hydrated_at: datetime | None
    last_enriched_at: datetime | None
    edges_out: list[dict[str, Any]] = field(default_factory=list)
    edges_in: list[dict[str, Any]] = field(default_factory=list)
    references: list[dict[str, Any]] = field(default_factory=list)
    # Attributes of the entities at the other end of every edge and reference, for their names.
    neighbours: dict[EntityKey, dict[str, Any]] = field(default_factory=dict)

    @property
    def key(self) -> EntityKey:
        return (self.entity_type, self.entity_id)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _key_in(table: sa.Table, type_column: str, id_column: str, chunk: Sequence[EntityKey]) -> sa.ColumnElement[bool]:
    return sa.tuple_(table.c[type_column], table.c[id_column]).in_(chunk)


def backlog(conn: sa.Connection, limit: int) -> list[EntityKey]:
    rows = conn.execute(
        sa.select(entities.c.entity_type, entities.c.entity_id)
        .where(entities.c.indexed_version < entities.c.doc_version)
        .limit(limit)
    )
    return [tuple(row) for row in rows]  # type: ignore[misc]


def document_sources(conn: sa.Connection, keys: Sequence[EntityKey]) -> list[DocumentSource]:
    rows: dict[EntityKey, dict[str, Any]] = {}
    columns = [entities.c[name] for name in ("entity_type", "entity_id", "state", "doc_version", "attributes",
                                              "first_seen_at", "hydrated_at", "last_enriched_at")]
    for chunk in _chunks(list(keys)):
        for row in conn.execute(sa.select(*columns).where(_key_in(entities, "entity_type", "entity_id", chunk))).mappings():
            rows[(row["entity_type"], row["entity_id"])] = {**row, "edges_out": [], "edges_in": [], "references": []}
    live = [k for k, row in rows.items() if row["state"] != EntityState.DELETED.value]
    edge_columns = [edges.c[n] for n in ("src_type", "src_id", "relation", "dst_type", "dst_id", "path", "kind")]
    others: set[EntityKey] = set()
    for chunk in _chunks(live):
        for edge in conn.execute(sa.select(*edge_columns).where(
                _key_in(edges, "src_type", "src_id", chunk), edges.c.retracted_at.is_(None))).mappings():
            rows[(edge["src_type"], edge["src_id"])]["edges_out"].append(dict(edge))
            others.add((edge["dst_type"], edge["dst_id"]))
        for edge in conn.execute(sa.select(*edge_columns).where(
                _key_in(edges, "dst_type", "dst_id", chunk), edges.c.retracted_at.is_(None))).mappings():
            rows[(edge["dst_type"], edge["dst_id"])]["edges_in"].append(dict(edge))
            others.add((edge["src_type"], edge["src_id"]))
        for ref in conn.execute(
            sa.select(references.c.from_type, references.c.from_id, references.c.field, references.c.to_type,
                      references.c.to_id, references.c.resolved)
            .where(_key_in(references, "from_type", "from_id", chunk), references.c.retracted_at.is_(None))
        ).mappings():
            rows[(ref["from_type"], ref["from_id"])]["references"].append(dict(ref))
            others.add((ref["to_type"], ref["to_id"]))
    neighbours: dict[EntityKey, dict[str, Any]] = {}
    for chunk in _chunks(sorted(others)):
        for etype, eid, attributes in conn.execute(
            sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.attributes)
            .where(_key_in(entities, "entity_type", "entity_id", chunk), entities.c.attributes.is_not(None))
        ):
            neighbours[(etype, eid)] = attributes
    return [DocumentSource(**row, neighbours=neighbours) for row in rows.values()]


def mark_indexed(conn: sa.Connection, written: Sequence[tuple[EntityKey, int]]) -> None:
    """Acknowledge documents written at a version; a newer change keeps its entity in the backlog."""
    if written:
        conn.execute(
            sa.update(entities)
            .where(
                entities.c.entity_type == sa.bindparam("k_type"),
                entities.c.entity_id == sa.bindparam("k_id"),
                entities.c.indexed_version < sa.bindparam("written"),
            )
            .values(indexed_version=sa.bindparam("written")),
            [{"k_type": k[0], "k_id": k[1], "written": v} for k, v in written],
        )


def requeue(conn: sa.Connection, keys: Sequence[EntityKey]) -> None:
    """Put entities back in the backlog (reconciliation found their documents missing or stale)."""
    for chunk in _chunks(list(keys)):
        conn.execute(sa.update(entities).where(_key_in(entities, "entity_type", "entity_id", chunk))
                     .values(indexed_version=0))


def versions(conn: sa.Connection) -> Iterator[tuple[str, str, int, str]]:
    """(type, id, doc_version, state) of every entity, streamed in key order."""
    yield from conn.execution_options(yield_per=5000).execute(
        sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.doc_version, entities.c.state)
        .order_by(entities.c.entity_type, entities.c.entity_id)
    )


def behind(conn: sa.Connection, keys: Sequence[EntityKey]) -> set[EntityKey]:
    """The keys whose search document is behind the fact store (still in the outbox)."""
    found: set[EntityKey] = set()
    for chunk in _chunks(list(keys)):
        found.update(
            tuple(row)  # type: ignore[misc]
            for row in conn.execute(
                sa.select(entities.c.entity_type, entities.c.entity_id).where(
                    _key_in(entities, "entity_type", "entity_id", chunk),
                    entities.c.indexed_version < entities.c.doc_version,
                )
            )
        )
    return found


def backlog_counts(conn: sa.Connection) -> dict[str, int]:
    """Outbox size per entity type."""
    rows = conn.execute(
        sa.select(entities.c.entity_type, sa.func.count())
        .where(entities.c.indexed_version < entities.c.doc_version)
        .group_by(entities.c.entity_type)
    )
    return {etype: count for etype, count in rows}
