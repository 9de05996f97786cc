"""Rows sent to PostgreSQL as one array per column and unnested into a table in the statement.

psycopg2 runs an executemany of an UPDATE (or of an INSERT ... ON CONFLICT) a hundred rows per round
trip at best; a page of rows passed as arrays is one statement and one round trip.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

# Rows per statement: large enough that round trips stop mattering, small enough to keep each
# statement's arrays a few megabytes at most.
PAGE = 5000
_IN_CHUNK = 500


def unnested(columns: Mapping[str, sa.types.TypeEngine[Any]], name: str = "batch") -> sa.TableValuedAlias:
    """``unnest(:a, :b, ...) AS name(a, b, ...)``: one bound array per column, named like the column.

    JSON columns travel as text and come out as JSONB; timestamps as ``timestamptz``.
    """
    bound = [sa.cast(sa.bindparam(n), postgresql.ARRAY(_item_type(t))) for n, t in columns.items()]
    return sa.func.unnest(*bound).table_valued(*columns).render_derived(name=name)


def column(batch: sa.TableValuedAlias, name: str, type_: sa.types.TypeEngine[Any]) -> sa.ColumnElement[Any]:
    """A column of ``unnested`` in its declared type (JSON columns cast back from text)."""
    return sa.cast(batch.c[name], postgresql.JSONB) if _is_json(type_) else batch.c[name]


def parameters(
    columns: Mapping[str, sa.types.TypeEngine[Any]], rows: Sequence[Mapping[str, Any]]
) -> dict[str, list[Any]]:
    """The bind parameters of ``unnested`` for ``rows``: one list per column."""
    return {
        n: [json.dumps(r[n]) if r[n] is not None else None for r in rows] if _is_json(t) else [r[n] for r in rows]
        for n, t in columns.items()
    }


def pages(rows: Sequence[Any]) -> list[Sequence[Any]]:
    return [rows[start : start + PAGE] for start in range(0, len(rows), PAGE)]


def _is_json(type_: sa.types.TypeEngine[Any]) -> bool:
    return isinstance(type_, (sa.JSON, postgresql.JSONB))


def _item_type(type_: sa.types.TypeEngine[Any]) -> sa.types.TypeEngine[Any]:
    if _is_json(type_):
        return sa.Text()
    return sa.DateTime(timezone=True) if isinstance(type_, sa.TypeDecorator) else type_


def key_filters(
    conn: sa.Connection, columns: Sequence[sa.ColumnElement[Any]], keys: Sequence[Sequence[str]]
) -> Iterator[sa.ColumnElement[bool]]:
    """Conditions that ``columns`` (text) equal one of ``keys``, one per statement to run.

    PostgreSQL: ``(columns) IN (SELECT * FROM unnest(arrays))`` per page, a statement compiled once
    whatever the keys; elsewhere a tuple IN list per ``_IN_CHUNK`` keys, which stays inside SQLite's
    parameter limit (and is rendered afresh for every chunk).
    """
    if conn.dialect.name != "postgresql":
        for start in range(0, len(keys), _IN_CHUNK):
            yield sa.tuple_(*columns).in_(keys[start : start + _IN_CHUNK])
        return
    for page in pages(keys):
        bound = [
            sa.cast(sa.bindparam(f"key_{i}", value=[k[i] for k in page]), postgresql.ARRAY(sa.Text()))
            for i in range(len(columns))
        ]
        batch = sa.func.unnest(*bound).table_valued(*[f"k{i}" for i in range(len(columns))]).render_derived(name="keys")
        yield sa.tuple_(*columns).in_(sa.select(*batch.c))
