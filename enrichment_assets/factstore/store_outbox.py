"""The search outbox's side of ``FactStore``: what the indexer reads and acknowledges."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa

from enrichment_assets.factstore import outbox
from enrichment_assets.factstore.models import EntityKey


class OutboxMethods:
    """Mixed into ``FactStore``; relies on its ``engine`` and ``_write``."""

    engine: sa.Engine
    _write: Callable[[Callable[[sa.Connection], Any]], Any]

    def draining_outbox(self, *, wait: bool = True) -> AbstractContextManager[bool]:
        """Hold the search outbox's drain lock (``outbox.drain_lock``): one drain at a time across
        every process. The context yields whether it is held; with ``wait=False`` it is not taken when
        another drain holds it."""
        return outbox.drain_lock(self.engine, wait=wait)

    def index_backlog(self, *, limit: int) -> list[EntityKey]:
        """Entities whose search document is behind the fact store."""
        with self.engine.connect() as conn:
            return outbox.backlog(conn, limit)

    def document_sources(
        self, keys: Sequence[EntityKey], *, cap: int = outbox.RELATIONSHIP_CAP
    ) -> list[outbox.DocumentSource]:
        with self.engine.connect() as conn:
            return outbox.document_sources(conn, keys, cap=cap)

    def mark_indexed(self, written: Sequence[tuple[EntityKey, int]]) -> None:
        ordered = sorted(written)
        self._write(lambda conn: outbox.mark_indexed(conn, ordered))

    def requeue_for_index(self, keys: Sequence[EntityKey]) -> None:
        ordered = sorted(set(keys))
        self._write(lambda conn: outbox.requeue(conn, ordered))

    def document_versions_of(self, keys: Sequence[EntityKey]) -> dict[EntityKey, int]:
        with self.engine.connect() as conn:
            return outbox.versions_of(conn, keys)

    def index_behind(self, keys: Sequence[EntityKey]) -> set[EntityKey]:
        """Which of ``keys`` are still waiting in the search outbox."""
        with self.engine.connect() as conn:
            return outbox.behind(conn, keys)

    def index_backlog_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return outbox.backlog_counts(conn)

    def document_versions(self) -> Iterator[tuple[str, str, int, str]]:
        """(type, id, doc_version, state) of every entity, in key order."""
        with self.engine.connect() as conn:
            yield from outbox.versions(conn)
