"""Graph writes inside a fact-store transaction: hydrated attributes, 1-hop references, derived edges.

Each function takes a live connection so ``FactStore`` can make a whole batch's writes one transaction.
Existing rows are read once per batch and diffed in Python, so callers learn exactly which edges were
asserted and retracted (search re-indexes both ends of each) without per-row statements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from enrichment_assets.factstore.models import DerivedEdge, EdgeChange, EntityKey, ReferenceFact
from enrichment_assets.factstore.schema import EntityState, edges, entities, references, waits

_CHUNK = 500


def _insert(conn: sa.Connection, table: sa.Table) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def record_hydrations(
    conn: sa.Connection, rows: Sequence[tuple[str, str, dict[str, Any]]], now: datetime
) -> list[EntityKey]:
    """Store attributes fetched for entities met along a walk; return the known entities whose
    attributes changed (their referrers' derived edges may no longer hold).

    Unknown entities are added as ``uncached`` (they get their own enrichment, which will reuse this
    hydration while it is fresh). Known ones keep their state and version: another worker may hold
    them, and a version bump here would make its result look superseded.
    """
    if not rows:
        return []
    before = stored_attributes(conn, [(t, i) for t, i, _ in rows])
    stmt = _insert(conn, entities)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=[entities.c.entity_type, entities.c.entity_id],
            set_={
                "attributes": stmt.excluded.attributes, "hydrated_at": now, "updated_at": now,
                # The document shows the attributes; the claim version stays put (see above).
                "doc_version": sa.case((entities.c.attributes == stmt.excluded.attributes, entities.c.doc_version),
                                       else_=entities.c.doc_version + 1),
            },
        ),
        [
            {"entity_type": t, "entity_id": i, "attributes": attrs, "state": EntityState.UNCACHED.value,
             "version": 1, "first_seen_at": now, "updated_at": now, "hydrated_at": now, "attempts": 0,
             "next_attempt_at": now}
            for t, i, attrs in rows
        ],
    )
    return [(t, i) for t, i, attrs in rows if before.get((t, i)) not in (None, attrs)]


def stored_attributes(conn: sa.Connection, keys: Sequence[EntityKey]) -> dict[EntityKey, dict[str, Any]]:
    found: dict[EntityKey, dict[str, Any]] = {}
    for chunk in _chunks(list(keys)):
        for etype, eid, attributes in conn.execute(
            sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.attributes).where(
                sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(chunk),
                entities.c.attributes.is_not(None),
            )
        ):
            found[(etype, eid)] = attributes
    return found


def referrers(conn: sa.Connection, field: str, to_type: str, to_ids: Sequence[str]) -> set[EntityKey]:
    """Entities whose live reference ``field`` points at one of ``to_ids``."""
    found: set[EntityKey] = set()
    for chunk in _chunks(list(to_ids)):
        found.update(tuple(row) for row in conn.execute(
            sa.select(references.c.from_type, references.c.from_id).where(
                references.c.to_type == to_type, references.c.to_id.in_(chunk),
                references.c.field == field, references.c.retracted_at.is_(None),
            )
        ))
    return found


def mark_dirty(conn: sa.Connection, keys: Sequence[EntityKey], now: datetime) -> int:
    """Make settled entities due again because something on their paths changed."""
    marked = 0
    for chunk in _chunks(list(keys)):
        marked += conn.execute(
            sa.update(entities)
            .where(
                sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(chunk),
                entities.c.state.in_((EntityState.FULLY_ENRICHED.value, EntityState.PARTIALLY_RESOLVED.value)),
            )
            .values(state=EntityState.UNCACHED.value, next_attempt_at=now, attempts=0,
                    version=entities.c.version + 1, doc_version=entities.c.doc_version + 1)
        ).rowcount
    return marked


def record_references(conn: sa.Connection, facts: dict[EntityKey, list[ReferenceFact]], now: datetime) -> None:
    """Replace the live 1-hop references of each entity in ``facts`` with the given set."""
    if not facts:
        return
    keys = list(facts)
    live: set[tuple[str, str, str, str, str]] = set()
    for chunk in _chunks(keys):
        live.update(tuple(row) for row in conn.execute(
            sa.select(references.c.from_type, references.c.from_id, references.c.field,
                      references.c.to_type, references.c.to_id)
            .where(sa.tuple_(references.c.from_type, references.c.from_id).in_(chunk),
                   references.c.retracted_at.is_(None))
        ))
    current = {(ft, fi, f.field, f.to_type, f.to_id): f for (ft, fi), fs in facts.items() for f in fs}
    if current:
        stmt = _insert(conn, references)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[references.c.from_type, references.c.from_id, references.c.field,
                                references.c.to_type, references.c.to_id],
                set_={
                    "resolved": stmt.excluded.resolved,
                    "resolved_at": sa.case(
                        (stmt.excluded.resolved & references.c.resolved_at.is_(None), now),
                        else_=references.c.resolved_at,
                    ),
                    "retracted_at": None,
                },
            ),
            [
                {"from_type": k[0], "from_id": k[1], "field": k[2], "to_type": k[3], "to_id": k[4],
                 "resolved": f.resolved, "first_seen_at": now, "resolved_at": now if f.resolved else None}
                for k, f in current.items()
            ],
        )
    gone = sorted(live - set(current))
    for chunk in _chunks(gone):
        conn.execute(
            sa.update(references)
            .where(sa.tuple_(references.c.from_type, references.c.from_id, references.c.field,
                             references.c.to_type, references.c.to_id).in_(chunk))
            .values(retracted_at=now)
        )


def apply_edges(
    conn: sa.Connection, walks: dict[EntityKey, tuple[Sequence[DerivedEdge], bool]], now: datetime
) -> tuple[list[EdgeChange], int]:
    """Assert each root's derived edges; for complete walks, retract the root's edges not derived now.

    ``walks`` maps a root to (its edges, whether the walk was complete). A partial walk retracts
    nothing: an edge it could not reach may still hold. Returns the changes and how many existing edges
    were confirmed.
    """
    if not walks:
        return [], 0
    roots = list(walks)
    live: dict[EntityKey, set[tuple[str, str, str]]] = {root: set() for root in roots}
    for chunk in _chunks(roots):
        for src_type, src_id, relation, dst_type, dst_id in conn.execute(
            sa.select(edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
            .where(sa.tuple_(edges.c.src_type, edges.c.src_id).in_(chunk), edges.c.retracted_at.is_(None))
        ):
            live[(src_type, src_id)].add((relation, dst_type, dst_id))
    rows, changes, confirmed = [], [], 0
    retract: list[tuple[str, str, str, str, str]] = []
    for root, (derived, complete) in walks.items():
        current = {(e.relation, e.dst_type, e.dst_id): e for e in derived}
        for key, edge in current.items():
            rows.append({
                "src_type": root[0], "src_id": root[1], "relation": edge.relation, "dst_type": edge.dst_type,
                "dst_id": edge.dst_id, "policy": root[0], "path": [list(hop) for hop in edge.path],
                "kind": "deterministic", "confidence": 1.0, "asserted_at": now, "confirmed_at": now,
            })
            if key in live[root]:
                confirmed += 1
            else:
                changes.append(EdgeChange(root[0], root[1], *key, "asserted"))
        if complete:
            for key in sorted(live[root] - set(current)):
                retract.append((root[0], root[1], *key))
                changes.append(EdgeChange(root[0], root[1], *key, "retracted"))
    if rows:
        stmt = _insert(conn, edges)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id],
                set_={
                    "confirmed_at": now,
                    "path": stmt.excluded.path,
                    "policy": stmt.excluded.policy,
                    # A re-asserted edge starts a new assertion; its earlier retraction is superseded.
                    "asserted_at": sa.case((edges.c.retracted_at.is_not(None), now), else_=edges.c.asserted_at),
                    "retracted_at": None,
                },
            ),
            rows,
        )
    _retract(conn, retract, now)
    return changes, confirmed


def retract_touching(conn: sa.Connection, keys: Sequence[EntityKey], now: datetime) -> list[EdgeChange]:
    """Retract every live edge with a deleted entity at either end."""
    found: set[tuple[str, str, str, str, str]] = set()
    columns = (edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
    for chunk in _chunks(list(keys)):
        for end in ((edges.c.src_type, edges.c.src_id), (edges.c.dst_type, edges.c.dst_id)):
            found.update(tuple(row) for row in conn.execute(
                sa.select(*columns).where(sa.tuple_(*end).in_(chunk), edges.c.retracted_at.is_(None))
            ))
    ordered = sorted(found)
    _retract(conn, ordered, now)
    return [EdgeChange(*edge, "retracted") for edge in ordered]


def _retract(conn: sa.Connection, keys: Sequence[tuple[str, str, str, str, str]], now: datetime) -> None:
    columns = (edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
    for chunk in _chunks(list(keys)):
        conn.execute(sa.update(edges).where(sa.tuple_(*columns).in_(chunk)).values(retracted_at=now))


def replace_waits(conn: sa.Connection, waiting: dict[EntityKey, Sequence[EntityKey]], now: datetime) -> None:
    """Forget what the given entities waited on; record what each still waits on."""
    keys = list(waiting)
    for chunk in _chunks(keys):
        conn.execute(sa.delete(waits).where(sa.tuple_(waits.c.entity_type, waits.c.entity_id).in_(chunk)))
    rows = [
        {"entity_type": k[0], "entity_id": k[1], "target_type": t[0], "target_id": t[1], "since": now}
        for k, targets in waiting.items() for t in set(targets)
    ]
    if rows:
        conn.execute(sa.insert(waits), rows)


def wake_waiters(conn: sa.Connection, now: datetime) -> int:
    """Make partially resolved entities due now if something they wait on has arrived since."""
    target = entities.alias("target")
    arrived = (
        sa.select(waits.c.entity_type, waits.c.entity_id)
        .join(target, sa.and_(target.c.entity_type == waits.c.target_type, target.c.entity_id == waits.c.target_id))
        .where(target.c.updated_at > waits.c.since, target.c.state != EntityState.DELETED.value)
    )
    result = conn.execute(
        sa.update(entities)
        .where(
            entities.c.state == EntityState.PARTIALLY_RESOLVED.value,
            entities.c.next_attempt_at > now,
            sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(arrived),
        )
        .values(next_attempt_at=now)
    )
    return result.rowcount


def touch_documents(conn: sa.Connection, keys: Sequence[EntityKey]) -> None:
    """Move the document version of entities whose search document changed through an edge."""
    for chunk in _chunks(sorted(set(keys))):
        conn.execute(
            sa.update(entities)
            .where(sa.tuple_(entities.c.entity_type, entities.c.entity_id).in_(chunk))
            .values(doc_version=entities.c.doc_version + 1)
        )
