"""Graph writes inside a fact-store transaction: hydrated attributes, 1-hop references, derived edges.

Each function takes a live connection so ``FactStore`` can make a whole batch's writes one transaction.
Existing rows are read once per batch and diffed in Python, so callers learn exactly which edges were
asserted and retracted (search re-indexes both ends of each) without per-row statements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from enrichment_assets.factstore import arrays
from enrichment_assets.factstore.models import DerivedEdge, EdgeChange, EntityKey, ReferenceFact
from enrichment_assets.factstore.schema import EntityState, edges, entities, references, waits

_CHUNK = 500


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


def _upsert(
    conn: sa.Connection,
    table: sa.Table,
    rows: Sequence[dict[str, Any]],
    conflict: Sequence[str],
    updates: Callable[[Any], dict[str, Any]],
) -> None:
    """``INSERT ... ON CONFLICT (conflict) DO UPDATE SET updates(excluded)`` for every row.

    PostgreSQL gets one statement per page, the rows passed as one array per column and unnested
    (SQLAlchemy sends an ON CONFLICT without RETURNING row by row); SQLite an executemany.
    """
    if not rows:
        return
    # In key order, so two transactions upserting overlapping rows (runs of different types storing
    # the same hop) take the row locks in the same order and cannot deadlock on them.
    rows = sorted(rows, key=lambda row: tuple(row[c] for c in conflict))
    names = list(rows[0])
    if conn.dialect.name != "postgresql":
        stmt = sqlite.insert(table)
        conn.execute(stmt.on_conflict_do_update(index_elements=list(conflict), set_=updates(stmt.excluded)), rows)
        return
    columns = {n: table.c[n].type for n in names}
    batch = arrays.unnested(columns)
    select = sa.select(*[arrays.column(batch, n, t) for n, t in columns.items()])
    insert = postgresql.insert(table).from_select(names, select)
    stmt = insert.on_conflict_do_update(index_elements=list(conflict), set_=updates(insert.excluded))
    for page in arrays.pages(rows):
        conn.execute(stmt, arrays.parameters(columns, page))


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
    _upsert(
        conn,
        entities,
        [
            {
                "entity_type": t,
                "entity_id": i,
                "attributes": attrs,
                "state": EntityState.UNCACHED.value,
                "version": 1,
                "first_seen_at": now,
                "updated_at": now,
                "hydrated_at": now,
                "attempts": 0,
                "next_attempt_at": now,
            }
            for t, i, attrs in rows
        ],
        conflict=["entity_type", "entity_id"],
        updates=lambda new: {
            "attributes": new.attributes,
            "hydrated_at": now,
            "updated_at": now,
            # The document shows the attributes; the claim version stays put (see above).
            "doc_version": sa.case(
                (entities.c.attributes == new.attributes, entities.c.doc_version), else_=entities.c.doc_version + 1
            ),
        },
    )
    return [(t, i) for t, i, attrs in rows if before.get((t, i)) not in (None, attrs)]


def fresh_attributes(
    conn: sa.Connection, entity_type: str, ids: Sequence[str], *, ttl: timedelta, now: datetime
) -> dict[str, dict[str, Any]]:
    """Stored attributes worth reusing instead of calling the source: hydrated within ``ttl`` and not
    changed by an event since."""
    found: dict[str, dict[str, Any]] = {}
    for chunk in _chunks(ids):
        found.update(
            tuple(row)
            for row in conn.execute(  # type: ignore[misc]
                sa.select(entities.c.entity_id, entities.c.attributes).where(
                    entities.c.entity_type == entity_type,
                    entities.c.entity_id.in_(chunk),
                    entities.c.attributes.is_not(None),
                    entities.c.state != EntityState.DELETED.value,
                    entities.c.hydrated_at >= now - ttl,
                    entities.c.hydrated_at >= entities.c.updated_at,
                )
            )
        )
    return found


def stored_attributes(conn: sa.Connection, keys: Sequence[EntityKey]) -> dict[EntityKey, dict[str, Any]]:
    found: dict[EntityKey, dict[str, Any]] = {}
    for among in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), list(keys)):
        for etype, eid, attributes in conn.execute(
            sa.select(entities.c.entity_type, entities.c.entity_id, entities.c.attributes).where(
                among,
                entities.c.attributes.is_not(None),
            )
        ):
            found[(etype, eid)] = attributes
    return found


def referrers(conn: sa.Connection, field: str, to_type: str, to_ids: Sequence[str]) -> set[EntityKey]:
    """Entities whose live reference ``field`` points at one of ``to_ids``."""
    found: set[EntityKey] = set()
    for chunk in _chunks(list(to_ids)):
        found.update(
            tuple(row)
            for row in conn.execute(
                sa.select(references.c.from_type, references.c.from_id).where(
                    references.c.to_type == to_type,
                    references.c.to_id.in_(chunk),
                    references.c.field == field,
                    references.c.retracted_at.is_(None),
                )
            )
        )
    return found


def mark_dirty(conn: sa.Connection, keys: Sequence[EntityKey], now: datetime) -> int:
    """Make settled entities due again because something on their paths changed."""
    marked = 0
    for among in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), list(keys)):
        lock_in_key_order(conn, among)
        marked += conn.execute(
            sa.update(entities)
            .where(
                among,
                entities.c.state.in_((EntityState.FULLY_ENRICHED.value, EntityState.PARTIALLY_RESOLVED.value)),
            )
            .values(
                state=EntityState.UNCACHED.value,
                next_attempt_at=now,
                attempts=0,
                version=entities.c.version + 1,
                doc_version=entities.c.doc_version + 1,
            )
        ).rowcount
    return marked


def record_references(conn: sa.Connection, facts: dict[EntityKey, list[ReferenceFact]], now: datetime) -> None:
    """Replace the live 1-hop references of each entity in ``facts`` with the given set."""
    if not facts:
        return
    keys = list(facts)
    live: dict[tuple[str, str, str, str, str], bool] = {}
    for among in arrays.key_filters(conn, (references.c.from_type, references.c.from_id), keys):
        for ft, fi, field, tt, ti, resolved in conn.execute(
            sa.select(
                references.c.from_type,
                references.c.from_id,
                references.c.field,
                references.c.to_type,
                references.c.to_id,
                references.c.resolved,
            ).where(among, references.c.retracted_at.is_(None))
        ):
            live[(ft, fi, field, tt, ti)] = resolved
    current = {(ft, fi, f.field, f.to_type, f.to_id): f for (ft, fi), fs in facts.items() for f in fs}
    # Only what is new, revived or newly (un)resolved is written: a re-walk mostly finds it all unchanged.
    changed = {k: f for k, f in current.items() if live.get(k) is not f.resolved}
    _upsert(
        conn,
        references,
        [
            {
                "from_type": k[0],
                "from_id": k[1],
                "field": k[2],
                "to_type": k[3],
                "to_id": k[4],
                "resolved": f.resolved,
                "first_seen_at": now,
                "resolved_at": now if f.resolved else None,
            }
            for k, f in changed.items()
        ],
        conflict=["from_type", "from_id", "field", "to_type", "to_id"],
        updates=lambda new: {
            "resolved": new.resolved,
            "resolved_at": sa.case(
                (new.resolved & references.c.resolved_at.is_(None), now), else_=references.c.resolved_at
            ),
            "retracted_at": None,
        },
    )
    gone = sorted(set(live) - set(current))
    key = (references.c.from_type, references.c.from_id, references.c.field, references.c.to_type, references.c.to_id)
    for among in arrays.key_filters(conn, key, gone):
        conn.execute(sa.update(references).where(among).values(retracted_at=now))


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
    # root -> (relation, dst type, dst id) -> the path it was derived through
    live: dict[EntityKey, dict[tuple[str, str, str], list[list[str]]]] = {root: {} for root in roots}
    for among in arrays.key_filters(conn, (edges.c.src_type, edges.c.src_id), roots):
        for src_type, src_id, relation, dst_type, dst_id, path in conn.execute(
            sa.select(
                edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id, edges.c.path
            ).where(among, edges.c.retracted_at.is_(None))
        ):
            live[(src_type, src_id)][(relation, dst_type, dst_id)] = path
    rows, changes, confirmed = [], [], 0
    unchanged: list[tuple[str, str, str, str, str]] = []
    retract: list[tuple[str, str, str, str, str]] = []
    for root, (derived, complete) in walks.items():
        current = {(e.relation, e.dst_type, e.dst_id): e for e in derived}
        for key, edge in current.items():
            path = [list(hop) for hop in edge.path]
            if key in live[root]:
                confirmed += 1
                if live[root][key] == path:
                    unchanged.append((root[0], root[1], *key))
                    continue
            else:
                changes.append(EdgeChange(root[0], root[1], *key, "asserted"))
            rows.append(
                {
                    "src_type": root[0],
                    "src_id": root[1],
                    "relation": edge.relation,
                    "dst_type": edge.dst_type,
                    "dst_id": edge.dst_id,
                    "policy": root[0],
                    "path": path,
                    "kind": "deterministic",
                    "confidence": 1.0,
                    "asserted_at": now,
                    "confirmed_at": now,
                }
            )
        if complete:
            for key in sorted(set(live[root]) - set(current)):
                retract.append((root[0], root[1], *key))
                changes.append(EdgeChange(root[0], root[1], *key, "retracted"))
    _upsert(
        conn,
        edges,
        rows,
        conflict=["src_type", "src_id", "relation", "dst_type", "dst_id"],
        updates=lambda new: {
            "confirmed_at": now,
            "path": new.path,
            "policy": new.policy,
            # A re-asserted edge starts a new assertion; its earlier retraction is superseded.
            "asserted_at": sa.case((edges.c.retracted_at.is_not(None), now), else_=edges.c.asserted_at),
            "retracted_at": None,
        },
    )
    # Confirmed through the same path: only confirmed_at moves, set-wise.
    columns = (edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
    for among in arrays.key_filters(conn, columns, unchanged):
        conn.execute(sa.update(edges).where(among).values(confirmed_at=now))
    _retract(conn, retract, now)
    return changes, confirmed


def retract_touching(conn: sa.Connection, keys: Sequence[EntityKey], now: datetime) -> list[EdgeChange]:
    """Retract every live edge with a deleted entity at either end."""
    found: set[tuple[str, str, str, str, str]] = set()
    columns = (edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
    for end in ((edges.c.src_type, edges.c.src_id), (edges.c.dst_type, edges.c.dst_id)):
        for among in arrays.key_filters(conn, end, list(keys)):
            found.update(
                tuple(row) for row in conn.execute(sa.select(*columns).where(among, edges.c.retracted_at.is_(None)))
            )
    ordered = sorted(found)
    _retract(conn, ordered, now)
    return [EdgeChange(*edge, "retracted") for edge in ordered]


def _retract(conn: sa.Connection, keys: Sequence[tuple[str, str, str, str, str]], now: datetime) -> None:
    columns = (edges.c.src_type, edges.c.src_id, edges.c.relation, edges.c.dst_type, edges.c.dst_id)
    for among in arrays.key_filters(conn, columns, list(keys)):
        conn.execute(sa.update(edges).where(among).values(retracted_at=now))


def replace_waits(conn: sa.Connection, waiting: dict[EntityKey, Sequence[EntityKey]], now: datetime) -> None:
    """Forget what the given entities waited on; record what each still waits on."""
    keys = list(waiting)
    for among in arrays.key_filters(conn, (waits.c.entity_type, waits.c.entity_id), keys):
        conn.execute(sa.delete(waits).where(among))
    rows = [
        {"entity_type": k[0], "entity_id": k[1], "target_type": t[0], "target_id": t[1], "since": now}
        for k, targets in waiting.items()
        for t in set(targets)
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
    for among in arrays.key_filters(conn, (entities.c.entity_type, entities.c.entity_id), sorted(set(keys))):
        lock_in_key_order(conn, among)
        conn.execute(sa.update(entities).where(among).values(doc_version=entities.c.doc_version + 1))


def lock_in_key_order(conn: sa.Connection, among: sa.ColumnElement[bool]) -> None:
    """Lock the rows an update is about to touch, in key order, before it runs.

    An ``UPDATE ... WHERE (type, id) IN (unnest ...)`` locks rows in whatever order its plan visits them
    (a hash join, say), while other writers lock in key order: with several workers settling and
    recording the same hub entities, that made deadlock cycles faster than retries could clear them.
    ``SELECT ... ORDER BY ... FOR UPDATE`` locks as it returns rows, sorted. SQLite has one writer.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.select(sa.literal(1))
            .select_from(entities)
            .where(among)
            .order_by(entities.c.entity_type, entities.c.entity_id)
            .with_for_update()
        )
