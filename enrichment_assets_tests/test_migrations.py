"""Schema migrations: an existing database at the first revision upgrades in place with its data, the
newest revision matches the schema the code declares, and concurrent starts are safe."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.engine import _switch_to_wal
from enrichment_assets.factstore.migrations import VERSION_TABLE, head_revision
from enrichment_assets.factstore.schema import metadata


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgresql":
        make: Callable[[], str] = request.getfixturevalue("make_postgres_database")
        return make()
    return f"sqlite:///{tmp_path / 'old.db'}"


def test_existing_database_upgrades_in_place(empty_database_url: str) -> None:
    store = FactStore.from_url(empty_database_url)
    store.migrate("0001")
    assert store.revision() == "0001"
    seen = datetime(2026, 1, 1, tzinfo=UTC)
    old_entities = sa.table(
        "entities",
        *(
            sa.column(c)
            for c in (
                "entity_type",
                "entity_id",
                "state",
                "version",
                "first_seen_at",
                "updated_at",
                "attempts",
                "next_attempt_at",
                "last_enriched_at",
            )
        ),
    )
    with store.engine.begin() as conn:
        conn.execute(
            sa.insert(old_entities),
            [
                {
                    "entity_type": "thing",
                    "entity_id": "kept",
                    "state": "uncached",
                    "version": 4,
                    "first_seen_at": seen,
                    "updated_at": seen,
                    "attempts": 0,
                    "next_attempt_at": seen,
                    "last_enriched_at": None,
                },
                {
                    "entity_type": "thing",
                    "entity_id": "done",
                    "state": "fully_enriched",
                    "version": 9,
                    "first_seen_at": seen,
                    "updated_at": seen,
                    "attempts": 0,
                    "next_attempt_at": None,
                    "last_enriched_at": seen,
                },
            ],
        )

    store.migrate()
    assert store.revision() == head_revision()
    kept = store.get_entity("thing", "kept")
    assert (kept.state, kept.version, kept.first_seen_at, kept.claim_owner) == ("uncached", 4, seen, None)
    assert store.get_entity("thing", "done").last_enriched_at == seen
    [claim] = store.claim("thing", limit=10, owner="w", lease=timedelta(minutes=1))
    assert claim.entity_id == "kept", "the upgraded rows work with the claim queue"
    store.migrate()
    assert store.revision() == head_revision(), "upgrading twice is a no-op"


def test_newest_revision_matches_the_declared_schema(empty_database_url: str) -> None:
    store = FactStore.from_url(empty_database_url)
    store.migrate()
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_concurrent_first_starts_migrate_once(empty_database_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            FactStore.from_url(empty_database_url).migrate()
        except BaseException as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert FactStore.from_url(empty_database_url).revision() == head_revision()


def test_fact_store_version_table_leaves_dagsters_alone(empty_database_url: str) -> None:
    store = FactStore.from_url(empty_database_url)
    store.migrate()
    tables = set(sa.inspect(store.engine).get_table_names())
    assert VERSION_TABLE in tables
    assert "alembic_version" not in tables


class _RacingCursor:
    """A cursor whose WAL switch loses to other connections a few times, the way a new SQLite file
    opened by several run workers at once does (SQLite fails the switch at once, without waiting)."""

    def __init__(self, losses: int) -> None:
        self.losses = losses
        self.mode = "delete"

    def execute(self, sql: str) -> _RacingCursor:
        if sql == "PRAGMA journal_mode=WAL":
            if self.losses:
                self.losses -= 1
                raise sqlite3.OperationalError("database is locked")
            self.mode = "wal"
        return self

    def fetchone(self) -> tuple[str]:
        return (self.mode,)


def test_sqlite_wal_switch_retries_while_another_connection_holds_the_new_file() -> None:
    cursor = _RacingCursor(losses=3)
    _switch_to_wal(cursor)  # type: ignore[arg-type]
    assert (cursor.mode, cursor.losses) == ("wal", 0)


def test_sqlite_wal_switch_gives_up_after_its_wait() -> None:
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        _switch_to_wal(_RacingCursor(losses=10**6), wait=0.05)  # type: ignore[arg-type]
