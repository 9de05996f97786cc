"""All the source clients of a policy, built once per run and closed together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from enrichment_assets.factstore.budgets import SourceBudgets
from enrichment_assets.hydration.client import Fetched, SourceClient
from enrichment_assets.hydration.limits import CircuitBreaker
from enrichment_assets.hydration.shared_limits import SharedLimits
from enrichment_assets.policy import Policy, Source

if TYPE_CHECKING:
    from enrichment_assets.factstore import FactStore


class SourcePool:
    """``async with SourcePool(policy) as pool: await pool.fetch("team", ids)``.

    ``transports`` lets a test hand one source an ``httpx.MockTransport``. With a PostgreSQL ``store``,
    every source's requests/second and concurrency are drawn from budgets in the store that all
    processes share (``shared_limits.py``); otherwise (SQLite, one process, or no store) each client
    limits itself.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        environ: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        store: FactStore | None = None,
        breakers: dict[str, CircuitBreaker] | None = None,
    ) -> None:
        """``breakers``: the circuit breakers to use, per source, kept by the caller across pools (created
        here for the sources missing), so one process has one breaker per source however many pools."""
        self.policy = policy
        kept = {} if breakers is None else breakers
        for name, source in policy.sources.items():
            kept.setdefault(
                name, CircuitBreaker(source.circuit_failure_threshold, source.circuit_reset.total_seconds())
            )
        self._budgets = (
            SourceBudgets(store.engine) if store is not None and store.engine.dialect.name == "postgresql" else None
        )
        self.clients = {
            name: SourceClient(
                name,
                source,
                environ=environ,
                transport=(transports or {}).get(name),
                limits=self._shared_limits(name, source),
                breaker=kept[name],
            )
            for name, source in policy.sources.items()
        }

    def _shared_limits(self, name: str, source: Source) -> SharedLimits | None:
        if self._budgets is None:
            return None
        return SharedLimits(
            self._budgets, name, requests_per_second=source.requests_per_second, max_concurrency=source.max_concurrency
        )

    def client_for(self, entity_type: str) -> SourceClient:
        return self.clients[self.policy.entity_types[entity_type].source]

    def spare_slots(self, entity_type: str, count: int) -> int:
        """How many more ids the last batch request for ``count`` ids of a type could carry at no
        extra call: 0 without a batch endpoint, with filling turned off, or when no call is made."""
        source = self.policy.sources[self.policy.entity_types[entity_type].source]
        size = source.max_batch_size
        if count == 0 or not size or not source.fill_batches or not self.policy.entity_types[entity_type].batch_path:
            return 0
        return -count % size

    async def fetch(self, entity_type: str, ids: Sequence[str]) -> dict[str, Fetched]:
        if not ids:
            return {}
        return await self.client_for(entity_type).fetch(self.policy.entity_types[entity_type], ids)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per source: the client's counters, whether its circuit is open, and the database calls its
        limits made (``budget_round_trips``, 0 for a process's own limits)."""
        return {
            name: client.stats.as_dict()
            | {"circuit_open": client.breaker.is_open, "budget_round_trips": client.limits.round_trips}
            for name, client in self.clients.items()
        }

    async def aclose(self) -> None:
        try:
            for client in self.clients.values():
                await client.aclose()
        finally:
            if self._budgets is not None:
                self._budgets.dispose()

    async def __aenter__(self) -> SourcePool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
