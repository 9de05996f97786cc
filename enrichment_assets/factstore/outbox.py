"""Reads and writes of the search outbox: which documents are behind, and everything one needs."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from enrichment_assets.factstore import arrays
from enrichment_assets.factstore.models import EntityKey
from enrichment_assets.factstore.schema import EntityState, edges, entities, references

_CHUNK = 500
# A hub (a team every model is owned by, an A/B test thousands of instances ran in) would otherwise
# carry every edge into its one document: unbounded documents, slow bulk writes, and past
# Elasticsearch's index.mapping.nested_objects.limit (10,000) a rejected write. The read API serves
# the full lists from the fact store. The search sync passes the policy's document_relationship_cap;
# this is the default for other callers.
RELATIONSHIP_CAP = 25
# Any constant distinct from the migrations' key; the same in every process that drains this database.
_DRAIN_LOCK_KEY = 0x656E7269636802
_SQLITE_DRAIN_LOCK = threading.Lock()


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
    # Every live edge and reference counted per (relation, direction), including those past the cap.
    totals: list[dict[str, Any]] = field(default_factory=list)

    @property
    def key(self) -> EntityKey:
        return (self.entity_type, self.entity_id)


@contextmanager
def drain_lock(engine: sa.Engine, *, wait: bool) -> Iterator[bool]:
    """One drain at a time across every process; yields whether the lock is held (with
    ``wait=False`` it is not taken when another drain holds it).

    Concurrent drains read the same head of the outbox and write the same documents, so all but
    one write per document is refused as superseded: pure waste. PostgreSQL: a session advisory
    lock on a connection held for the drain (released by the server if the process dies). SQLite
    serializes writers by itself and is single-machine, so there the lock is per process.
    """
    if engine.dialect.name != "postgresql":
        if not _SQLITE_DRAIN_LOCK.acquire(blocking=wait):
            yield False
            return
        try:
            yield True
        finally:
            _SQLITE_DRAIN_LOCK.release()
        return
    with engine.connect() as conn:
        take = sa.func.pg_advisory_lock if wait else sa.func.pg_try_advisory_lock
        held = conn.execute(sa.select(take(_DRAIN_LOCK_KEY))).scalar() is not False
        conn.commit()
        try:
            yield held
        finally:
            if held:
                conn.execute(sa.select(sa.func.pg_advisory_unlock(_DRAIN_LOCK_KEY)))
                conn.commit()


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


def document_sources(
    conn: sa.Connection, keys: Sequence[EntityKey], *, cap: int = RELATIONSHIP_CAP
) -> list[DocumentSource]:
    """Everything the documents of ``keys`` need, with at most ``cap`` edges per (relation, direction)
    and references per field; ``totals`` counts them all.

    A rebuild reads every entity through here, so it runs a fixed number of statements per page of
    keys (``arrays.key_filters``: on PostgreSQL one unnested array per key column, compiled once) and
    builds rows as plain dicts from tuples: SQLAlchemy's row mappings cost more than the SQL did.
    """
    rows: dict[EntityKey, dict[str, Any]] = {}
    columns = [
        entities.c[name]
        for name in (
            "entity_type",
            "entity_id",
            "state",
            "doc_version",
            "attributes",
            "first_seen_at",
            "hydrated_at",
            "last_enriched_at",
        )
    ]
    for match in arrays.key_filters(conn, [entities.c.entity_type, entities.c.entity_id], list(keys)):
        for row in _dicts(conn, sa.select(*columns).where(match)):
            rows[(row["entity_type"], row["entity_id"])] = {
                **row,
                "edges_out": [],
                "edges_in": [],
                "references": [],
                "totals": [],
            }
    live = [k for k, row in rows.items() if row["state"] != EntityState.DELETED.value]
    edge_columns = [edges.c[n] for n in ("src_type", "src_id", "relation", "dst_type", "dst_id", "path", "kind")]
    ref_columns = [references.c[n] for n in ("from_type", "from_id", "field", "to_type", "to_id", "resolved")]
    others: set[EntityKey] = set()
    for direction, (key_type, key_id), (other_type, other_id) in (
        ("out", ("src_type", "src_id"), ("dst_type", "dst_id")),
        ("in", ("dst_type", "dst_id"), ("src_type", "src_id")),
    ):
        group = [edges.c[key_type], edges.c[key_id], edges.c.relation]
        for match in arrays.key_filters(conn, [edges.c[key_type], edges.c[key_id]], live):
            where = [match, edges.c.retracted_at.is_(None)]
            for edge in _capped(conn, edge_columns, where, group, [edges.c[other_type], edges.c[other_id]], cap):
                rows[(edge[key_type], edge[key_id])][f"edges_{direction}"].append(edge)
                others.add((edge[other_type], edge[other_id]))
            for k_type, k_id, relation, total in _totals(conn, where, group):
                rows[(k_type, k_id)]["totals"].append(
                    {"relation": relation, "direction": direction, "derived": True, "total": total}
                )
    group = [references.c.from_type, references.c.from_id, references.c.field]
    for match in arrays.key_filters(conn, [references.c.from_type, references.c.from_id], live):
        where = [match, references.c.retracted_at.is_(None)]
        for ref in _capped(conn, ref_columns, where, group, [references.c.to_type, references.c.to_id], cap):
            rows[(ref["from_type"], ref["from_id"])]["references"].append(ref)
            others.add((ref["to_type"], ref["to_id"]))
        for k_type, k_id, relation, total in _totals(conn, where, group):
            rows[(k_type, k_id)]["totals"].append(
                {"relation": relation, "direction": "out", "derived": False, "total": total}
            )
    neighbours: dict[EntityKey, dict[str, Any]] = {}
    for match in arrays.key_filters(conn, [entities.c.entity_type, entities.c.entity_id], sorted(others)):
        for etype, eid, attributes in conn.execute(
            sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.attributes).where(
                match, entities.c.attributes.is_not(None)
            )
        ):
            neighbours[(etype, eid)] = attributes
    return [DocumentSource(**row, neighbours=neighbours) for row in rows.values()]


def _dicts(conn: sa.Connection, stmt: sa.Select[Any]) -> list[dict[str, Any]]:
    result = conn.execute(stmt)
    names = tuple(result.keys())
    return [dict(zip(names, row, strict=True)) for row in result]


def _capped(
    conn: sa.Connection,
    columns: list[sa.ColumnElement[Any]],
    where: list[sa.ColumnElement[bool]],
    group: list[sa.ColumnElement[Any]],
    order: list[sa.ColumnElement[Any]],
    cap: int,
) -> list[dict[str, Any]]:
    """Rows matching ``where``, at most ``cap`` per ``group`` (first by ``order``)."""
    rank = sa.func.row_number().over(partition_by=group, order_by=order).label("rank")
    ranked = sa.select(*columns, rank).where(*where).subquery()
    return _dicts(conn, sa.select(*[ranked.c[c.name] for c in columns]).where(ranked.c.rank <= cap))


def _totals(
    conn: sa.Connection, where: list[sa.ColumnElement[bool]], group: list[sa.ColumnElement[Any]]
) -> list[tuple[str, str, str, int]]:
    return [tuple(row) for row in conn.execute(sa.select(*group, sa.func.count()).where(*where).group_by(*group))]  # type: ignore[misc]


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
        conn.execute(
            sa.update(entities).where(_key_in(entities, "entity_type", "entity_id", chunk)).values(indexed_version=0)
        )


def versions(conn: sa.Connection) -> Iterator[tuple[str, str, int, str]]:
    """(type, id, doc_version, state) of every entity, streamed in key order."""
    yield from conn.execution_options(yield_per=5000).execute(
        sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.doc_version, entities.c.state).order_by(
            entities.c.entity_type, entities.c.entity_id
        )
    )


def versions_of(conn: sa.Connection, keys: Sequence[EntityKey]) -> dict[EntityKey, int]:
    """The document version the store holds now for each of ``keys`` it knows."""
    found: dict[EntityKey, int] = {}
    for chunk in _chunks(list(keys)):
        found.update(
            ((t, i), v)
            for t, i, v in conn.execute(
                sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.doc_version).where(
                    _key_in(entities, "entity_type", "entity_id", chunk)
                )
            )
        )
    return found


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
