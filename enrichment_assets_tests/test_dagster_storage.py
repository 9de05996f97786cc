"""PooledPostgresStorage (local tooling) refuses to start when dagster-postgres no longer has the private
attributes it replaces, naming the attribute and the release it was written for; with the pinned
release it starts and pools."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage, PostgresScheduleStorage
from sqlalchemy.engine import make_url

from enrichment_assets.dev import dagster_storage
from enrichment_assets.dev.dagster_storage import (
    WRITTEN_FOR_DAGSTER_POSTGRES,
    DagsterPostgresInternalsChanged,
    PooledEventLogStorage,
    PooledRunStorage,
    PooledScheduleStorage,
)

STORAGES = [
    pytest.param(PooledRunStorage, PostgresRunStorage, id="run"),
    pytest.param(PooledEventLogStorage, PostgresEventLogStorage, id="event_log"),
    pytest.param(PooledScheduleStorage, PostgresScheduleStorage, id="schedule"),
]


@pytest.fixture(scope="module")
def storage_url(make_postgres_database: Callable[[], str]) -> str:
    return (
        make_url(make_postgres_database()).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    )


def test_the_pinned_release_is_the_one_installed() -> None:
    """The check's message names WRITTEN_FOR_DAGSTER_POSTGRES; it must be what pyproject.toml pins."""
    assert dagster_storage.DAGSTER_POSTGRES_VERSION == WRITTEN_FOR_DAGSTER_POSTGRES


@pytest.mark.parametrize(("pooled", "base"), STORAGES)
def test_pinned_dagster_postgres_gets_a_pooled_engine(pooled: type, base: type, storage_url: str) -> None:
    storage = pooled(storage_url)
    try:
        assert isinstance(storage._engine.pool, sa.pool.QueuePool)
    finally:
        storage.dispose()


@pytest.mark.parametrize("attribute", ["_engine", "postgres_url", "_token_provider"])
@pytest.mark.parametrize(("pooled", "base"), STORAGES)
def test_a_missing_private_attribute_fails_at_start(
    pooled: type, base: type, attribute: str, storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if a dagster-postgres upgrade had renamed the attribute: its __init__ runs, the attribute is gone."""
    original = base.__init__

    def init_without_attribute(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        delattr(self, attribute)

    monkeypatch.setattr(base, "__init__", init_without_attribute)
    with pytest.raises(DagsterPostgresInternalsChanged) as raised:
        pooled(storage_url)
    message = str(raised.value)
    assert f"{base.__name__}.{attribute}" in message
    assert "is missing" in message
    assert f"written for dagster-postgres {WRITTEN_FOR_DAGSTER_POSTGRES}" in message


def test_an_attribute_of_another_type_fails_at_start(storage_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that became, say, an async engine wrapper would not take the pool swap either."""
    original = PostgresRunStorage.__init__

    def init_with_other_engine(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self._engine = object()

    monkeypatch.setattr(PostgresRunStorage, "__init__", init_with_other_engine)
    with pytest.raises(
        DagsterPostgresInternalsChanged, match=r"PostgresRunStorage\._engine, which is object, not Engine,"
    ):
        PooledRunStorage(storage_url)
