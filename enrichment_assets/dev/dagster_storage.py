"""Dagster's PostgreSQL storage, holding its connections open instead of opening one per operation.

``dagster-postgres`` builds its run, event log and schedule storages on SQLAlchemy's ``NullPool`` (only
the webserver swaps in a pool, through ``optimize_for_webserver``), so the daemon and every run worker
open a new server connection for each storage call: each event a step logs, each sensor tick's reads,
each dequeue poll. Each new PostgreSQL connection costs server CPU (a forked backend, authentication,
catalog caches), taken on a small machine from the cores ingest and enrichment need; the README gives
the figures measured.

``PooledPostgresStorage`` takes the same configuration as ``storage: postgres`` and gives each of the
three storages a small pool: one connection kept per storage per process, more opened for concurrent
callers (the daemon's threads) and closed again when returned, each checked before use (a server
restart costs one reconnect, not a failed tick) and recycled hourly. A pool never crosses a fork: a
connection checked out in another process than the one that opened it is discarded. Use it as

    storage:
      custom:
        module: enrichment_assets.dev.dagster_storage
        class: PooledPostgresStorage
        config: {postgres_url: "postgresql://..."}   # or the postgres_db block of storage: postgres

Built on ``dagster-postgres`` internals (each storage's ``_engine``, ``_token_provider`` and
``postgres_url``), so tied to the pinned release: a storage whose internals have moved raises
``DagsterPostgresInternalsChanged`` when the instance is built, rather than running unpooled or half
swapped. Local tooling only; production runs ``storage: postgres`` (see deploy/).
"""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from dagster._serdes import ConfigurableClassData
from dagster_postgres import (
    DagsterPostgresStorage,
    PostgresEventLogStorage,
    PostgresRunStorage,
    PostgresScheduleStorage,
)
from dagster_postgres.utils import create_pg_engine, get_token_provider_from_config, pg_url_from_config
from dagster_postgres.version import __version__ as DAGSTER_POSTGRES_VERSION

POOL_SIZE = 1
MAX_OVERFLOW = 8
POOL_RECYCLE_SECONDS = 3600

# The release whose internals this module was written against (pyproject.toml pins it).
WRITTEN_FOR_DAGSTER_POSTGRES = "0.29.27"
# What each storage must still hold after dagster-postgres's __init__: attribute -> expected type.
PRIVATE_ATTRIBUTES: dict[str, type | None] = {"_engine": sa.Engine, "postgres_url": str, "_token_provider": None}


class DagsterPostgresInternalsChanged(RuntimeError):
    """The installed dagster-postgres no longer has an internal attribute PooledPostgresStorage replaces."""


def check_private_attributes(storage: Any) -> None:
    """Raise ``DagsterPostgresInternalsChanged`` unless ``storage`` has every attribute the pool swap uses.

    ``_token_provider`` may be ``None`` (password auth) but must exist; the others must have their type.
    """
    owner = next(
        (c.__name__ for c in type(storage).__mro__ if c.__module__.startswith("dagster_postgres")),
        type(storage).__name__,
    )
    for name, expected in PRIVATE_ATTRIBUTES.items():
        if not hasattr(storage, name):
            found = "is missing"
        elif expected is not None and not isinstance(getattr(storage, name), expected):
            found = f"is {type(getattr(storage, name)).__name__}, not {expected.__name__},"
        else:
            continue
        raise DagsterPostgresInternalsChanged(
            f"PooledPostgresStorage replaces the private attribute {owner}.{name}, which {found} in the installed "
            f"dagster-postgres {DAGSTER_POSTGRES_VERSION}; enrichment_assets/dev/dagster_storage.py was written "
            f"for dagster-postgres {WRITTEN_FOR_DAGSTER_POSTGRES}. Pin "
            f"dagster-postgres=={WRITTEN_FOR_DAGSTER_POSTGRES} with its Dagster release, update "
            "dagster_storage.py, or use `storage: postgres` (unpooled)."
        )


def pooled_engine(storage: Any) -> sa.Engine:
    """A pooled engine for one of dagster-postgres's storages, in place of its NullPool one."""
    kwargs: dict[str, Any] = {
        "isolation_level": "AUTOCOMMIT",
        "pool_size": POOL_SIZE,
        "max_overflow": MAX_OVERFLOW,
        "pool_recycle": POOL_RECYCLE_SECONDS,
        "pool_pre_ping": True,
    }
    options = storage._engine.url.query.get("options")
    if options:
        kwargs["connect_args"] = {"options": options}
    engine = create_pg_engine(storage.postgres_url, storage._token_provider, **kwargs)
    _discard_across_forks(engine)
    return engine


def _discard_across_forks(engine: sa.Engine) -> None:
    """SQLAlchemy's recipe for pools in forking programs: a connection is only used by its own process."""

    @sa.event.listens_for(engine, "connect")
    def remember_pid(dbapi_connection: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @sa.event.listens_for(engine, "checkout")
    def check_pid(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa.exc.DisconnectionError("connection opened in another process; opening a new one")


class _Pooled:
    _engine: sa.Engine

    def _use_pool(self) -> None:
        check_private_attributes(self)
        nullpool = self._engine
        self._engine = pooled_engine(self)
        nullpool.dispose()

    def dispose(self) -> None:
        super().dispose()  # type: ignore[misc]
        self._engine.dispose()


class PooledRunStorage(_Pooled, PostgresRunStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()


class PooledEventLogStorage(_Pooled, PostgresEventLogStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()


class PooledScheduleStorage(_Pooled, PostgresScheduleStorage):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._use_pool()


class PooledPostgresStorage(DagsterPostgresStorage):
    """``storage: postgres`` with pooled connections; configured exactly like it."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        self._run_storage = PooledRunStorage(postgres_url, should_autocreate_tables, token_provider=token_provider)
        self._event_log_storage = PooledEventLogStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        self._schedule_storage = PooledScheduleStorage(
            postgres_url, should_autocreate_tables, token_provider=token_provider
        )
        super(DagsterPostgresStorage, self).__init__()

    @classmethod
    def from_config_value(  # type: ignore[override]
        cls, inst_data: ConfigurableClassData | None, config_value: Any
    ) -> PooledPostgresStorage:
        return cls(
            inst_data=inst_data,
            postgres_url=pg_url_from_config(config_value),
            should_autocreate_tables=config_value.get("should_autocreate_tables", True),
            token_provider=get_token_provider_from_config(config_value),
        )
