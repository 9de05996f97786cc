"""Engines for the two supported databases, set up so the same statements behave the same on both."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url


def create_engine(url: str) -> sa.Engine:
    """Create an engine for a PostgreSQL or SQLite URL.

    PostgreSQL URLs without a driver get psycopg2: SQLAlchemy 2.1 would otherwise pick psycopg 3,
    which is not installed. SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions, so
    concurrent writers queue for the single write lock instead of failing mid-transaction.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg2")
        return sa.create_engine(
            parsed,
            pool_pre_ping=True,
            executemany_mode="values_plus_batch",
            insertmanyvalues_page_size=5000,
            executemany_batch_page_size=500,
        )
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(parsed, connect_args={"timeout": 60})
        _serialize_sqlite_writers(engine)
        return engine
    raise ValueError(f"unsupported database {backend!r}: use a postgresql:// or sqlite:/// URL")


def create_read_engine(engine: sa.Engine, *, on_connect: Callable[[Any, Any], None] | None = None) -> sa.Engine:
    """A second PostgreSQL pool for single-statement reads, beside ``engine``.

    Autocommit, no ping at checkout and no rollback at checkin: a read statement needs no
    transaction, and each of those is a round trip that costs as much as the read itself. A connection
    the server dropped fails its statement, and SQLAlchemy then discards every older pooled connection,
    so one retry (``FactStore._read``) is always enough. ``on_connect(dbapi_connection, record)`` runs
    once per new connection (the store prepares its hot statements there).
    """
    reader = sa.create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_pre_ping=False,
        pool_reset_on_return=None,
        pool_size=8,
        max_overflow=8,
    )
    if on_connect is not None:
        sa.event.listen(reader, "connect", on_connect)
    return reader


def _serialize_sqlite_writers(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        # Let SQLAlchemy's "begin" below issue BEGIN itself (pysqlite would defer it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(connection):  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _switch_to_wal(cursor: sqlite3.Cursor, wait: float = 60.0) -> None:
    """Put the database file in WAL mode, waiting out connections that hold it meanwhile.

    WAL is stored in the file, so only the first connection to a new database switches. The switch
    needs an exclusive lock and SQLite reports "database is locked" at once rather than calling the
    busy handler, so several processes opening a new file together retry here until one has switched.
    """
    deadline = time.monotonic() + wait
    delay = 0.005
    while cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
