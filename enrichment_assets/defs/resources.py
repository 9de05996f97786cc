"""Dagster resources: one per external system. Each reads its settings from the environment when a run
starts (never at import), so loading the code location needs no database, index or source."""

from __future__ import annotations

import logging

import dagster as dg
from elasticsearch import TransportError
from pydantic import PrivateAttr

from enrichment_assets.factstore import FactStore
from enrichment_assets.hydration.limits import CircuitBreaker
from enrichment_assets.hydration.pool import SourcePool
from enrichment_assets.hydration.walker import PendingHydrations
from enrichment_assets.policy import Policy
from enrichment_assets.search.index import SearchIndex
from enrichment_assets.settings import Settings

log = logging.getLogger(__name__)


class FactStoreResource(dg.ConfigurableResource):
    """The fact store. ``database_url`` defaults to ``ENRICHMENT_DATABASE_URL``, read when a run starts
    (bind ``dg.EnvVar`` instead to keep a URL with credentials out of the UI entirely)."""

    database_url: str | None = None

    _store: FactStore | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        url = self.database_url or Settings.from_env().database_url
        self._store = FactStore.from_url(url)
        self._store.migrate()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.dispose()

    @property
    def store(self) -> FactStore:
        if self._store is None:
            raise dg.DagsterInvariantViolationError("FactStoreResource used outside a run")
        return self._store


class SourcesResource(dg.ConfigurableResource):
    """The source systems' HTTP APIs, as the policy file describes them. Base URLs and auth tokens come
    from the environment variables the policy names; tokens never reach config, logs or the UI.

    What a run keeps across its steps lives here: one circuit breaker per source (a source found dead by
    one step is not probed afresh by the next) and the hydrations fetched but not stored yet (a root of
    one branch is a hop of another, and every branch walks before any settles)."""

    _breakers: dict[str, CircuitBreaker] = PrivateAttr(default_factory=dict)
    _pending: PendingHydrations = PrivateAttr(default_factory=dict)

    def pool(self, policy: Policy, store: FactStore) -> SourcePool:
        """A fresh pool for one step (``async with``). On a PostgreSQL fact store every source's
        requests/second and concurrency are drawn from a budget in ``store`` that all runs share."""
        return SourcePool(policy, store=store, breakers=self._breakers)

    @property
    def pending(self) -> PendingHydrations:
        return self._pending


class SearchResource(dg.ConfigurableResource):
    """The Elasticsearch index behind ``index_alias``. ``elasticsearch_url`` defaults to
    ``ELASTICSEARCH_URL``; with neither set, search is off and index updates say so."""

    elasticsearch_url: str | None = None
    index_alias: str | None = None

    _index: SearchIndex | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        settings = Settings.from_env()
        url = self.elasticsearch_url or settings.elasticsearch_url
        if url:
            self._index = SearchIndex.from_url(url, alias=self.index_alias or settings.index_alias)
            try:
                self._index.ensure()
            except TransportError as error:
                # A search outage must not stop enrichment: documents wait in the outbox, the index
                # step says so, and the next run drains them.
                (context.log or log).warning(
                    "search unavailable at run start (%s); documents stay in the outbox", type(error).__name__
                )

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._index is not None:
            self._index.close()

    @property
    def index(self) -> SearchIndex | None:
        return self._index
