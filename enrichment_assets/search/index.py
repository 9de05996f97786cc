"""``SearchIndex``: the entity index behind an alias, written with external versions.

Every document carries the fact store's ``doc_version`` as its external version, so a slow or repeated
write can never replace a newer document (Elasticsearch answers 409, which here means "already newer").
A full rebuild fills a new versioned index and swaps the alias in one atomic call, so searches keep
answering throughout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from elasticsearch import Elasticsearch, NotFoundError, TransportError, helpers

from enrichment_assets.search.mappings import MAPPINGS, SETTINGS

DEFAULT_ALIAS = "enrichment-entities"


@dataclass
class WriteResult:
    written: list[tuple[str, int]] = field(default_factory=list)  # (document id, version) now in the index
    superseded: int = 0  # a newer version was already there
    failures: dict[str, str] = field(default_factory=dict)  # document id -> reason


@dataclass(frozen=True)
class Action:
    doc_id: str
    version: int
    document: dict[str, Any] | None  # None: delete

    def as_bulk(self, index: str) -> dict[str, Any]:
        action = {"_index": index, "_id": self.doc_id, "version": self.version, "version_type": "external"}
        if self.document is None:
            return {**action, "_op_type": "delete"}
        return {**action, "_op_type": "index", "_source": self.document}


class SearchIndex:
    def __init__(
        self,
        client: Elasticsearch,
        *,
        alias: str = DEFAULT_ALIAS,
        chunk_size: int = 500,
        max_chunk_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.client = client
        self.alias = alias
        # A bulk request is at most chunk_size documents and max_chunk_bytes: a hub's document with
        # hundreds of nested relationships costs the server as much as dozens of small ones, and one
        # request must finish well inside the client's timeout.
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> SearchIndex:
        return cls(Elasticsearch(url, request_timeout=30, retry_on_timeout=True, max_retries=3), **kwargs)

    def close(self) -> None:
        self.client.close()

    # -- lifecycle ------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Install the template and, if the alias points nowhere yet, a first index behind it."""
        self.client.indices.put_index_template(
            name=f"{self.alias}-template",
            index_patterns=[f"{self.alias}-v*"],
            template={"settings": SETTINGS, "mappings": MAPPINGS},
            priority=100,
        )
        if not self.client.indices.exists_alias(name=self.alias):
            index = self._new_index_name()
            self.client.indices.create(index=index)
            self.client.indices.put_alias(index=index, name=self.alias)
        else:
            # Fields added to the mappings since the live index was created (adding is all a put
            # mapping may do; a changed field needs `enrichment reindex --full`).
            self.client.indices.put_mapping(index=self.alias, properties=MAPPINGS["properties"])

    def current_indices(self) -> list[str]:
        try:
            return sorted(self.client.indices.get_alias(name=self.alias))
        except NotFoundError:
            return []

    def _new_index_name(self) -> str:
        return f"{self.alias}-v{time.time_ns()}"

    # -- writes ---------------------------------------------------------------------------------------

    def write(self, actions: Iterable[Action], *, index: str | None = None) -> WriteResult:
        """Bulk-write documents and deletions; every item's outcome is accounted for."""
        result = WriteResult()
        by_id = {a.doc_id: a for a in actions}
        target = index or self.alias
        items = helpers.streaming_bulk(
            self.client,
            (a.as_bulk(target) for a in by_id.values()),
            chunk_size=self.chunk_size,
            max_chunk_bytes=self.max_chunk_bytes,
            raise_on_error=False,
            raise_on_exception=False,
            max_retries=3,
            initial_backoff=0.5,
        )
        try:
            for ok, item in items:
                self._account(ok, item, by_id, result)
        except TransportError as error:
            # A timeout or a lost connection (the helpers turn only answered errors into items):
            # everything not yet accounted for fails this time and stays in the outbox for the next.
            done = {doc_id for doc_id, _ in result.written} | set(result.failures)
            reason = f"bulk request failed: {type(error).__name__}: {error}"[:300]
            result.failures.update({doc_id: reason for doc_id in by_id if doc_id not in done})
        return result

    @staticmethod
    def _account(ok: bool, item: dict[str, Any], by_id: dict[str, Action], result: WriteResult) -> None:
        ((op, detail),) = item.items()
        doc_id = detail.get("_id")
        status = detail.get("status", 0)
        if ok or (op == "delete" and status == 404):
            result.written.append((doc_id, by_id[doc_id].version))
        elif status == 409:
            result.superseded += 1
            result.written.append((doc_id, by_id[doc_id].version))
        else:
            error = detail.get("error")
            reason = error.get("reason") if isinstance(error, dict) else str(error or status)
            result.failures[doc_id] = f"{op} answered {status}: {reason}"

    def refresh(self) -> None:
        self.client.indices.refresh(index=self.alias)

    def rebuild(
        self, actions: Iterable[Action], *, progress: Callable[[int], None] | None = None
    ) -> tuple[str, WriteResult]:
        """Fill a new index from ``actions`` and swap the alias to it atomically; drop the old ones."""
        self.ensure()
        old = self.current_indices()
        new = self._new_index_name()
        self.client.indices.create(index=new, settings={"refresh_interval": "-1", "number_of_shards": 1})
        result = WriteResult()

        def counted(source: Iterable[Action]) -> Iterable[Action]:
            n = 0
            for n, action in enumerate(source, start=1):
                if progress and n % 1000 == 0:
                    progress(1000)
                yield action
            if progress and n % 1000:
                progress(n % 1000)

        partial = self.write(counted(actions), index=new)
        result.written, result.superseded, result.failures = partial.written, partial.superseded, partial.failures
        self.client.indices.put_settings(index=new, settings={"refresh_interval": SETTINGS["refresh_interval"]})
        self.client.indices.refresh(index=new)
        self.client.indices.update_aliases(
            actions=[
                *({"remove": {"index": name, "alias": self.alias}} for name in old),
                {"add": {"index": new, "alias": self.alias}},
            ]
        )
        for name in old:
            self.client.indices.delete(index=name)
        return new, result

    # -- reads ----------------------------------------------------------------------------------------

    def search(self, query: str, *, entity_type: str | None = None, size: int = 20) -> list[dict[str, Any]]:
        must: list[dict[str, Any]] = (
            [
                {
                    "multi_match": {
                        "query": query,
                        "fields": ["name^3", "entity_id", "relationships.other_name"],
                        "lenient": True,
                    }
                }
            ]
            if query
            else [{"match_all": {}}]
        )
        filters = [{"term": {"entity_type": entity_type}}] if entity_type else []
        answer = self.client.search(
            index=self.alias,
            query={"bool": {"must": must, "filter": filters}},
            size=size,
            source_excludes=["relationships"],
        )
        return [hit["_source"] for hit in answer["hits"]["hits"]]

    def versions(self, doc_ids: list[str]) -> dict[str, int]:
        """Indexed versions of the given documents (absent ones are left out)."""
        if not doc_ids:
            return {}
        answer = self.client.mget(index=self.alias, ids=doc_ids, source_includes=["version"])
        return {d["_id"]: d["_source"]["version"] for d in answer["docs"] if d.get("found")}

    def all_versions(self) -> Iterable[tuple[str, int]]:
        for hit in helpers.scan(
            self.client, index=self.alias, query={"query": {"match_all": {}}}, _source=["version"], size=2000
        ):
            yield hit["_id"], hit["_source"]["version"]

    def counts_by_type(self) -> dict[str, int]:
        answer = self.client.search(
            index=self.alias, size=0, aggs={"types": {"terms": {"field": "entity_type", "size": 1000}}}
        )
        return {b["key"]: b["doc_count"] for b in answer["aggregations"]["types"]["buckets"]}

    def delete_documents(self, doc_ids: Iterable[str]) -> int:
        actions = ({"_op_type": "delete", "_index": self.alias, "_id": d} for d in doc_ids)
        deleted, _ = helpers.bulk(self.client, actions, raise_on_error=False, stats_only=True)
        return deleted
