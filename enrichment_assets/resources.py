"""Dagster resources: one per external system."""

from __future__ import annotations

import dagster as dg
from pydantic import PrivateAttr

from enrichment_assets.factstore import FactStore
from enrichment_assets.settings import Settings


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
