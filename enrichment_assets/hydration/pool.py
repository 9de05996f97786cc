"""All the source clients of a policy, built once per run and closed together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from enrichment_assets.hydration.client import Fetched, SourceClient
from enrichment_assets.policy import Policy

if TYPE_CHECKING:
    from enrichment_assets.factstore import FactStore


class SourcePool:
    """``async with SourcePool(policy) as pool: await pool.fetch("team", ids)``.

    ``transports`` lets a test hand one source an ``httpx.MockTransport``. ``rate_shares`` gives a
    source's client only part of its requests/second, for processes that call it at the same time.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        environ: Mapping[str, str] | None = None,
        transports: Mapping[str, httpx.AsyncBaseTransport] | None = None,
        rate_shares: Mapping[str, float] | None = None,
        store: FactStore | None = None,
    ) -> None:
        self.policy = policy
        self.clients = {
            name: SourceClient(name, source, environ=environ, transport=(transports or {}).get(name),
                               rate_share=(rate_shares or {}).get(name, 1.0))
            for name, source in policy.sources.items()
        }

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
        return {name: client.stats.as_dict() | {"circuit_open": client.breaker.is_open}
                for name, client in self.clients.items()}

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()

    async def __aenter__(self) -> SourcePool:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
