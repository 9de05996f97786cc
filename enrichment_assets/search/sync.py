"""Incremental re-index: drain the fact store's search outbox into the index.

Whatever is behind (new entities as ``pending``, enriched ones, both ends of every changed edge,
tombstones to delete) is written in bulk with external versions, and acknowledged only once the index
took it. An item that fails stays in the outbox and is retried by the next sync, never dropped.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.policy import Policy
from enrichment_assets.search.documents import build_document, document_id
from enrichment_assets.search.index import Action, SearchIndex

T = TypeVar("T")


@dataclass
class IndexReport:
    indexed: int = 0
    deleted: int = 0
    superseded: int = 0
    failures: dict[str, str] = field(default_factory=dict)
    changed: set[EntityKey] = field(default_factory=set)
    waited_seconds: float = 0.0  # for another process's drain to finish

    def merge(self, other: IndexReport) -> IndexReport:
        self.indexed += other.indexed
        self.deleted += other.deleted
        self.superseded += other.superseded
        self.failures.update(other.failures)
        self.changed |= other.changed
        self.waited_seconds += other.waited_seconds
        return self


def actions_for(store: FactStore, policy: Policy, keys: list[EntityKey]) -> tuple[list[Action], dict[str, EntityKey]]:
    actions, ids = [], {}
    for source in store.document_sources(keys, cap=policy.defaults.document_relationship_cap):
        doc_id = document_id(*source.key)
        ids[doc_id] = source.key
        document = None if source.state == "deleted" else build_document(policy, source)
        actions.append(Action(doc_id, source.doc_version, document))
    return actions, ids


def sync_index(store: FactStore, policy: Policy, index: SearchIndex, *, batch_size: int = 1000) -> IndexReport:
    """Drain the outbox into the index, one drain at a time across every process sharing the store.

    A caller that finds another drain running waits for it, then writes only what is still behind
    (usually what was enqueued meanwhile), instead of racing it for the same documents.
    """
    report = _drain_outbox(store, policy, index, batch_size=batch_size, wait=True)
    assert report is not None  # a waiting caller always gets the lock
    return report


def sync_changed(
    store: FactStore, policy: Policy, index: SearchIndex, keys: Iterable[EntityKey], *, batch_size: int = 1000
) -> tuple[IndexReport, IndexReport | None]:
    """Write ``keys``' documents now, then drain the rest of the outbox unless another process is.

    What a run changed becomes searchable without queueing behind other runs. The rest (other ends of
    changed edges, other runs' entities) is drained here, or left to the drain already running, which
    cannot miss it: this process enqueued it before trying the lock, and every drain looks at the
    outbox again once it lets the lock go. Returns (the keys' report, the drain's or None if left).
    """
    own = IndexReport()
    behind = sorted(store.index_behind(list(keys)))
    for start in range(0, len(behind), batch_size):
        _write(store, policy, index, behind[start : start + batch_size], own)
    if not store.index_backlog(limit=1):
        return own, None
    return own, _drain_outbox(store, policy, index, batch_size=batch_size, wait=False)


def _drain_outbox(
    store: FactStore, policy: Policy, index: SearchIndex, *, batch_size: int, wait: bool
) -> IndexReport | None:
    """Drain under the outbox lock (waiting for it, or only if free), then look again after letting it
    go: whatever a process enqueued while failing to take the lock is drained here. None if the lock
    was never free."""
    drained: IndexReport | None = None
    while True:
        started = time.monotonic()
        with store.draining_outbox(wait=wait) as held:
            if not held:
                return drained  # the holder looks at the outbox again once it lets go
            waited = time.monotonic() - started
            report = _drain(store, policy, index, batch_size=batch_size, max_rounds=1000)
            report.waited_seconds = waited
        drained = report if drained is None else drained.merge(report)
        wait = False
        if not report.changed or not store.index_backlog(limit=1):
            return drained  # drained, or only failures left (they wait for the next sync)


def _drain(store: FactStore, policy: Policy, index: SearchIndex, *, batch_size: int, max_rounds: int) -> IndexReport:
    report = IndexReport()
    for _ in range(max_rounds):
        keys = store.index_backlog(limit=batch_size)
        if not keys:
            break
        if not _write(store, policy, index, keys, report):
            break  # only failures left this round: they stay in the outbox for the next sync
    return report


def _write(store: FactStore, policy: Policy, index: SearchIndex, keys: list[EntityKey], report: IndexReport) -> int:
    """Write ``keys``' documents at their current versions and acknowledge what the index took."""
    actions, ids = actions_for(store, policy, keys)
    result = index.write(actions)
    deletions = {a.doc_id for a in actions if a.document is None}
    store.mark_indexed([(ids[doc_id], version) for doc_id, version in result.written])
    report.deleted += sum(1 for doc_id, _ in result.written if doc_id in deletions)
    report.indexed += sum(1 for doc_id, _ in result.written if doc_id not in deletions)
    report.superseded += result.superseded
    report.failures.update(result.failures)
    report.changed.update(ids[doc_id] for doc_id, _ in result.written)
    return len(result.written)


def rebuild_index(
    store: FactStore,
    policy: Policy,
    index: SearchIndex,
    *,
    batch_size: int = 1000,
    progress: Callable[[int], None] | None = None,
) -> tuple[str, IndexReport]:
    """Build a new index from the whole fact store and swap the alias to it; searches keep answering.

    Incremental syncs that run meanwhile write to the old index. So once the alias has moved, every
    entity whose document version is ahead of what the rebuild wrote goes back in the outbox, and a
    closing sync writes it to the new index.
    """
    keys = [(t, i) for t, i, _, state in store.document_versions() if state != "deleted"]
    ids: dict[str, EntityKey] = {}

    def batches() -> Iterator[tuple[list[Action], dict[str, EntityKey]]]:
        for start in range(0, len(keys), batch_size):
            yield actions_for(store, policy, keys[start : start + batch_size])

    def actions() -> Iterator[Action]:
        # The next batch is read from the store while this one is written to the index.
        for batch, batch_ids in read_ahead(batches()):
            ids.update(batch_ids)
            yield from batch

    new_index, result = index.rebuild(actions(), progress=progress)
    written = dict(result.written)
    store.mark_indexed([(ids[doc_id], version) for doc_id, version in written.items()])
    behind = [
        (t, i)
        for t, i, version, state in store.document_versions()
        if state != "deleted" and written.get(document_id(t, i), 0) < version
    ]
    store.requeue_for_index(behind)
    report = sync_index(store, policy, index)
    report.indexed += len(written)
    report.failures.update(result.failures)
    return new_index, report


def read_ahead(source: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Yield ``source``'s items, producing up to ``depth`` ahead in a background thread (so reads from
    one system overlap writes to another). An exception in the producer is raised to the consumer."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in source:
                while not stop.is_set():
                    try:
                        items.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            items.put(("done", None))
        except BaseException as error:  # handed to the consumer
            items.put(("error", error))

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = items.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join(timeout=5)
