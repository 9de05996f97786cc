"""Shared fixtures: a real PostgreSQL (``ENRICHMENT_TEST_DATABASE_URL`` or a throwaway embedded server),
a SQLite file, and fact stores on both with a controllable clock."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from enrichment_assets.dev.devservers import LocalPostgres
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.engine import create_engine
from enrichment_assets.factstore.schema import metadata
from enrichment_assets.search import SearchIndex


class FakeClock:
    """A clock the test moves by hand, so leases and backoff are checked without sleeping."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 3, 14, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> datetime:
        self.now += timedelta(**kwargs)
        return self.now


@pytest.fixture(scope="session")
def postgres_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server the tests may create databases on."""
    given = os.environ.get("ENRICHMENT_TEST_DATABASE_URL")
    if given:
        yield given
        return
    with LocalPostgres(tmp_path_factory.mktemp("embedded") / "pgdata") as server:
        yield server.url()


@pytest.fixture(scope="session")
def make_postgres_database(postgres_server_url: str) -> Iterator[Callable[[], str]]:
    """Factory for fresh, empty databases on the test server; all are dropped at the end."""
    admin = create_engine(postgres_server_url).execution_options(isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"enrichment_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))  # name is generated above, never input
        created.append(name)
        return make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(make_postgres_database: Callable[[], str]) -> str:
    """One migrated database shared by the session; ``store`` empties it before each test."""
    url = make_postgres_database()
    FactStore.from_url(url).migrate()
    return url


def _emptied(url: str) -> str:
    engine = create_engine(url)
    with engine.begin() as conn:
        for table in reversed(metadata.sorted_tables):
            conn.execute(sa.delete(table))
    engine.dispose()
    return url


@pytest.fixture(params=["postgresql", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty fact store database: the test runs once on each backend."""
    if request.param == "postgresql":
        return _emptied(request.getfixturevalue("postgres_url"))
    url = f"sqlite:///{tmp_path / 'facts.db'}"
    FactStore.from_url(url).migrate()
    return url


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(database_url: str, clock: FakeClock) -> Iterator[FactStore]:
    import random

    fact_store = FactStore.from_url(database_url, clock=clock, rng=random.Random(7))
    yield fact_store
    fact_store.dispose()


@pytest.fixture(scope="session")
def elasticsearch_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An Elasticsearch-compatible server for the session (``ENRICHMENT_TEST_ELASTICSEARCH_URL`` or
    a noida-db process started here)."""
    given = os.environ.get("ENRICHMENT_TEST_ELASTICSEARCH_URL")
    if given:
        yield given
        return
    from enrichment_assets.dev.devservers import LocalElasticsearch

    with LocalElasticsearch(tmp_path_factory.mktemp("elasticsearch")) as server:
        yield server.url


@pytest.fixture
def search_index(elasticsearch_url: str) -> Iterator[SearchIndex]:
    """A fresh index alias per test, removed afterwards."""
    from enrichment_assets.search import SearchIndex

    index = SearchIndex.from_url(elasticsearch_url, alias=f"test-{uuid.uuid4().hex[:10]}")
    index.ensure()
    yield index
    for name in index.current_indices():
        index.client.indices.delete(index=name)
    index.client.indices.delete_index_template(name=f"{index.alias}-template")
    index.close()


@pytest.fixture
def pg_store(postgres_url: str, clock: FakeClock) -> Iterator[FactStore]:
    """An empty fact store on PostgreSQL only, for tests whose subject is not the backend."""
    import random

    fact_store = FactStore.from_url(_emptied(postgres_url), clock=clock, rng=random.Random(5))
    yield fact_store
    fact_store.dispose()


@pytest.fixture
def sources_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sources' base-URL variables pointing at the module's ``simulator`` fixture."""
    simulator = request.getfixturevalue("simulator")
    for name, value in simulator.environ().items():
        monkeypatch.setenv(name, value)
