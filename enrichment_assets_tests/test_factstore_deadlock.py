"""A write transaction that PostgreSQL aborts to break a real deadlock runs again from the start and
commits; other errors are not retried."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.schema import entities


def _bump(conn: sa.Connection, entity_id: str) -> None:
    conn.execute(
        sa.update(entities)
        .where(entities.c.entity_type == "thing", entities.c.entity_id == entity_id)
        .values(attempts=entities.c.attempts + 1)
    )


def test_a_transaction_aborted_by_a_deadlock_is_retried(pg_store: FactStore) -> None:
    pg_store.ingest_events([Event(entity_type="thing", entity_id=i, event_type="created") for i in ("a", "b")])
    a_locked, b_locked = threading.Event(), threading.Event()
    calls: list[int] = []

    def work(conn: sa.Connection) -> str:
        calls.append(len(calls) + 1)
        _bump(conn, "a")
        if len(calls) == 1:
            a_locked.set()
            assert b_locked.wait(10)
        _bump(conn, "b")  # the first time: waits on the other transaction, which then waits on "a"
        return "done"

    def other() -> None:
        with pg_store.engine.begin() as conn:
            conn.execute(sa.text("SET LOCAL deadlock_timeout = '5s'"))  # so the server aborts `work`, not this
            assert a_locked.wait(10)
            _bump(conn, "b")
            b_locked.set()
            _bump(conn, "a")

    thread = threading.Thread(target=other)
    thread.start()
    assert pg_store._write(work) == "done"
    thread.join(20)
    assert calls == [1, 2], "aborted once by the deadlock, then committed"
    with pg_store.engine.connect() as conn:
        attempts = dict(conn.execute(sa.select(entities.c.entity_id, entities.c.attempts)).all())
    assert attempts == {"a": 2, "b": 2}, "both transactions committed, the aborted try left nothing"


def test_other_database_errors_are_not_retried(pg_store: FactStore) -> None:
    calls: list[int] = []

    def work(conn: sa.Connection) -> None:
        calls.append(1)
        conn.execute(sa.text("SELECT 1/0"))

    with pytest.raises(sa.exc.DataError):
        pg_store._write(work)
    assert calls == [1]
