"""Alembic migrations for the fact store, run programmatically (no alembic.ini to find).

The version table is ``factstore_alembic_version`` so the fact store can share a database with
Dagster's own storage, which keeps its revision in ``alembic_version``.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

VERSION_TABLE = "factstore_alembic_version"
# Any constant works; it only has to be the same in every process that migrates this database.
_ADVISORY_LOCK_KEY = 0x656E7269636801


def _config(connection: sa.Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Serializes processes that start at once; SQLite's BEGIN IMMEDIATE already does.
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
        command.upgrade(_config(connection), revision)


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(engine: sa.Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()
