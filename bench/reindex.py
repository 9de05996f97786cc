"""Search re-index throughput: a full rebuild and an incremental sync, each against the raw bulk rate
of the same documents.

Setup, untimed, on one fresh PostgreSQL database and one Elasticsearch-compatible server (see
``_common`` for where both come from): the simulator's MDS-shaped graph (``generate_graph``, its scale
chosen to give about ``--entities`` entities over the eight types) is ingested as thin ``created``
events in batches of 10,000; then every entity is claimed and finished ``enriched`` in batches, as a
walk leaves it: its source JSON as attributes, its 1-hop references (``record_walk``) and the derived
edges the shipped policy's paths reach (``DerivedEdge`` with the full path). A document therefore
holds the name, the policy's indexed attributes, and one nested relationship per live edge out, edge
in and reference out, each named from the other end; hubs (teams, A/B tests, datasets) carry
thousands. The caption gives relationships per document and the bulk payload size.

Measured, in this order:

1. Full rebuild: ``rebuild_index`` of every entity into a new index and the alias swap, wall time
   from call to return (closing sync included), with where the time went: fact-store calls timed
   by a ``FactStore`` subclass, documents built (the last progress tick), the rest bulk and swap.
2. Baseline: the same documents, read and built beforehand (both timed on their own), written by
   ``elasticsearch.helpers.bulk`` (chunks as ``SearchIndex``, external versions, a refresh at the
   end) into a scratch index with the same mappings and ``refresh_interval: -1``: no fact-store
   reads. For reference, the same documents without their relationships are bulk-written too.
3. Incremental: ``--changed`` model instances get an ``updated`` event and are re-enriched with one
   attribute changed and the same edges, so exactly they are in the outbox; ``sync_index`` drains
   it. Baseline: the same changed documents, built beforehand, bulk-written over their older
   versions in the scratch index (now ``refresh_interval: 1s``, like the live index).

Target: full rebuild >= 5,000 documents/s. Figures are printed next to their baselines, never asserted.

Run: ``.venv/bin/python bench/reindex.py [--entities 100000] [--changed 20000]`` (about 5 minutes at
the defaults; ``BENCH_DATABASE_URL`` / ``BENCH_ELASTICSEARCH_URL`` to use existing servers).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from _common import (
    bench_database,
    console,
    describe_search,
    describe_server,
    elasticsearch_server,
    percentile,
    print_table,
    verdict,
)
from elasticsearch import Elasticsearch, helpers

from enrichment_assets.dev.simulator.graph import BASE_COUNTS, MdsGraph, generate_graph
from enrichment_assets.events import Event, EventType
from enrichment_assets.factstore import DerivedEdge, EntityKey, FactStore, Outcome, RetryPolicy
from enrichment_assets.factstore.models import ReferenceFact
from enrichment_assets.factstore.outbox import DocumentSource
from enrichment_assets.hydration.paths import extract_ids
from enrichment_assets.policy import Policy, load_policy
from enrichment_assets.search import Action, SearchIndex, actions_for, build_document, rebuild_index, sync_index
from enrichment_assets.search.documents import document_id
from enrichment_assets.search.mappings import MAPPINGS
from enrichment_assets.settings import SHIPPED_POLICY

OWNER = "bench-reindex"
LEASE = timedelta(minutes=30)
INGEST_BATCH = 10_000
ENRICH_BATCH = 5_000
READ_BATCH = 1_000  # keys per document_sources call, as rebuild_index and sync_index use
CHANGED_TYPE = "model_instance"
CHANGED_FIELD = "stage"
TARGET_RATE = 5_000


# -- timing the fact store's side -----------------------------------------------------------------


class TimedFactStore(FactStore):
    """A ``FactStore`` that records when each outbox call began and ended (``perf_counter``)."""

    def __init__(self, engine: Any, **kwargs: Any) -> None:
        super().__init__(engine, **kwargs)
        self.spans: list[tuple[str, float, float]] = []

    def _timed(self, name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        try:
            return call()
        finally:
            self.spans.append((name, started, time.perf_counter()))

    def index_backlog(self, *, limit: int) -> list[EntityKey]:
        return self._timed("index_backlog", lambda: super(TimedFactStore, self).index_backlog(limit=limit))

    def document_sources(self, keys: Sequence[EntityKey], *, cap: int) -> list[DocumentSource]:  # type: ignore[override]
        return self._timed("document_sources", lambda: super(TimedFactStore, self).document_sources(keys, cap=cap))

    def mark_indexed(self, written: Sequence[tuple[EntityKey, int]]) -> None:
        self._timed("mark_indexed", lambda: super(TimedFactStore, self).mark_indexed(written))

    def requeue_for_index(self, keys: Sequence[EntityKey]) -> None:
        self._timed("requeue_for_index", lambda: super(TimedFactStore, self).requeue_for_index(keys))

    def document_versions(self) -> Iterator[tuple[str, str, int, str]]:
        # Every caller here drains the stream at once, so reading it whole first times the same work.
        rows = self._timed("document_versions", lambda: list(super(TimedFactStore, self).document_versions()))
        yield from rows

    def seconds(self, name: str, start: float = 0.0, end: float = float("inf")) -> float:
        """Seconds spent in ``name`` calls that began in ``[start, end)``."""
        return sum(b - a for n, a, b in self.spans if n == name and start <= a < end)

    def first(self, name: str, after: float) -> tuple[float, float]:
        return next((a, b) for n, a, b in self.spans if n == name and a >= after)


# -- the fact store: an MDS-shaped graph, enriched ------------------------------------------------


def mds_graph(entities: int, seed: int) -> MdsGraph:
    return generate_graph(seed, entities / sum(BASE_COUNTS.values()))


def references_of(policy: Policy, graph: MdsGraph, key: EntityKey) -> list[ReferenceFact]:
    """The entity's declared 1-hop references, resolved where the target exists (as a walk records them)."""
    body = graph.get(*key) or {}
    return [
        ReferenceFact(name, ref.type, target, graph.get(ref.type, target) is not None)
        for name, ref in policy.entity_types[key[0]].references.items()
        for target in extract_ids(body, ref.field)
    ]


def derived_edges(policy: Policy, graph: MdsGraph, key: EntityKey) -> tuple[DerivedEdge, ...]:
    """The edges the policy's paths reach from ``key``, through (and ending at) entities that exist."""
    found: dict[tuple[str, str, str], DerivedEdge] = {}
    for rule in policy.effective(key[0]).edges:
        trails: list[tuple[EntityKey, ...]] = [(key,)]
        for hop in rule.path:
            reached = []
            for trail in trails:
                reference = policy.entity_types[trail[-1][0]].references[hop]
                for target in extract_ids(graph.get(*trail[-1]) or {}, reference.field):
                    if graph.get(reference.type, target) is not None:
                        reached.append((*trail, (reference.type, target)))
            trails = reached
        for trail in trails:
            dst_type, dst_id = trail[-1]
            found.setdefault((rule.relation, dst_type, dst_id), DerivedEdge(rule.relation, dst_type, dst_id, trail))
    return tuple(found.values())


def ingest(store: FactStore, keys: Sequence[EntityKey], event_type: EventType, at: datetime) -> None:
    for start in range(0, len(keys), INGEST_BATCH):
        store.ingest_events(
            [
                Event(entity_type=t, entity_id=i, event_type=event_type, occurred_at=at)
                for t, i in keys[start : start + INGEST_BATCH]
            ]
        )


def enrich_due(
    store: FactStore,
    policy: Policy,
    graph: MdsGraph,
    entity_type: str,
    attributes: Callable[[dict[str, Any]], dict[str, Any]] = dict,
) -> int:
    """Claim and finish every due entity of one type as ``enriched``; returns how many."""
    enriched = 0
    while claims := store.claim(entity_type, limit=ENRICH_BATCH, owner=OWNER, lease=LEASE):
        store.record_walk([], {c.key: references_of(policy, graph, c.key) for c in claims})
        outcomes = [
            Outcome.of(
                c, "enriched", attributes=attributes(graph.get(*c.key) or {}), edges=derived_edges(policy, graph, c.key)
            )
            for c in claims
        ]
        result = store.finish(OWNER, outcomes, RetryPolicy())
        if result.enriched != len(claims):
            raise RuntimeError(f"finish enriched {result.enriched} of {len(claims)} {entity_type} claims")
        enriched += len(claims)
    return enriched


def fill(store: FactStore, policy: Policy, graph: MdsGraph, at: datetime) -> int:
    keys = [(t, e["id"]) for t, e in graph.items()]
    random.Random(graph.seed).shuffle(keys)
    ingest(store, keys, EventType.CREATED, at)
    enriched = sum(enrich_due(store, policy, graph, t) for t in graph.counts())
    if enriched != len(keys):
        raise RuntimeError(f"enriched {enriched:,} of {len(keys):,} entities")
    return len(keys)


def change(store: FactStore, policy: Policy, graph: MdsGraph, keys: Sequence[EntityKey], at: datetime) -> None:
    """An ``updated`` event for each key, then re-enrichment with one attribute changed, same edges."""
    ingest(store, keys, EventType.UPDATED, at)

    def changed(attributes: dict[str, Any]) -> dict[str, Any]:
        return {**attributes, CHANGED_FIELD: f"{attributes.get(CHANGED_FIELD)}-changed"}

    enrich_due(store, policy, graph, CHANGED_TYPE, changed)


# -- documents built beforehand, and the raw bulk baseline ----------------------------------------


@dataclass
class Prebuilt:
    """Documents read and built ahead of a baseline, with the seconds each step took."""

    actions: list[Action] = field(default_factory=list)
    read_seconds: float = 0.0
    build_seconds: float = 0.0


def prebuild(store: FactStore, policy: Policy, keys: Sequence[EntityKey]) -> Prebuilt:
    """What ``actions_for`` does, with the fact-store reads and the document building timed apart."""
    out = Prebuilt()
    for start in range(0, len(keys), READ_BATCH):
        began = time.perf_counter()
        sources = store.document_sources(
            keys[start : start + READ_BATCH], cap=policy.defaults.document_relationship_cap
        )
        built = time.perf_counter()
        out.actions += [
            Action(document_id(*s.key), s.doc_version, None if s.state == "deleted" else build_document(policy, s))
            for s in sources
        ]
        out.read_seconds += built - began
        out.build_seconds += time.perf_counter() - built
    return out


def raw_bulk(client: Elasticsearch, index: str, actions: Sequence[Action], chunk_size: int, *, refresh: bool) -> float:
    """Seconds to bulk-write ``actions`` (and refresh, if asked); every item must succeed."""
    started = time.perf_counter()
    ok, failed = helpers.bulk(
        client, (a.as_bulk(index) for a in actions), chunk_size=chunk_size, raise_on_error=False, stats_only=True
    )
    if refresh:
        client.indices.refresh(index=index)
    elapsed = time.perf_counter() - started
    if failed or ok != len(actions):
        raise RuntimeError(f"raw bulk into {index}: {ok:,} written, {failed:,} failed of {len(actions):,}")
    return elapsed


def without_relationships(actions: Sequence[Action]) -> list[Action]:
    return [Action(a.doc_id, a.version, a.document and {**a.document, "relationships": []}) for a in actions]


@dataclass(frozen=True)
class DocumentShape:
    documents: int
    relationships_mean: float
    relationships_p99: float
    relationships_max: int
    megabytes: float


def shape(actions: Sequence[Action]) -> DocumentShape:
    counts = [len(a.document["relationships"]) for a in actions if a.document]
    size = sum(len(json.dumps(a.document, separators=(",", ":"))) for a in actions if a.document)
    return DocumentShape(len(counts), sum(counts) / len(counts), percentile(counts, 99), max(counts), size / 1e6)


# -- the runs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    label: str
    documents: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.documents / self.seconds


@dataclass(frozen=True)
class Phase:
    label: str
    seconds: float
    standalone: float | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_rebuild(store: TimedFactStore, policy: Policy, index: SearchIndex) -> tuple[Run, list[Phase], float]:
    """``rebuild_index`` timed, its phases, and how much the process's peak memory grew."""
    ticks: list[float] = []
    rss_before = peak_rss_mb()
    started = time.perf_counter()
    _, report = rebuild_index(store, policy, index, progress=lambda _n: ticks.append(time.perf_counter()))
    ended = time.perf_counter()
    if report.failures:
        raise RuntimeError(
            f"rebuild left {len(report.failures):,} failures, e.g. {next(iter(report.failures.items()))}"
        )
    listed = store.first("document_versions", started)
    first_read = store.first("document_sources", listed[1])
    built = ticks[-1]
    acked = store.first("mark_indexed", built)
    read = store.seconds("document_sources", started, built)
    phases = [
        Phase("list every entity (document_versions)", listed[1] - listed[0]),
        Phase("install the template, create the new index", first_read[0] - listed[1]),
        Phase("read document sources (document_sources)", read),
        Phase("build documents", built - first_read[0] - read),
        Phase("bulk write, refresh, alias swap", acked[0] - built),
        Phase("acknowledge (mark_indexed)", acked[1] - acked[0]),
        Phase("re-check versions, closing sync", ended - acked[1]),
    ]
    return Run("full rebuild: rebuild_index", report.indexed, ended - started), phases, peak_rss_mb() - rss_before


def time_sync(store: TimedFactStore, policy: Policy, index: SearchIndex, expected: int) -> tuple[Run, list[Phase]]:
    started = time.perf_counter()
    report = sync_index(store, policy, index)
    ended = time.perf_counter()
    if report.failures or report.indexed != expected:
        raise RuntimeError(f"sync indexed {report.indexed:,} of {expected:,}, {len(report.failures):,} failures")
    fact_store = {name: store.seconds(name, started) for name in ("index_backlog", "document_sources", "mark_indexed")}
    phases = [
        Phase("find the backlog (index_backlog)", fact_store["index_backlog"]),
        Phase("read document sources (document_sources)", fact_store["document_sources"]),
        Phase("build documents, bulk write", ended - started - sum(fact_store.values())),
        Phase("acknowledge (mark_indexed)", fact_store["mark_indexed"]),
    ]
    return Run(f"incremental: sync_index of {expected:,} changed", report.indexed, ended - started), phases


def create_scratch(client: Elasticsearch, name: str) -> None:
    """An index like the ones ``rebuild`` fills: same mappings, one shard, no refresh while filling."""
    client.indices.create(index=name, mappings=MAPPINGS, settings={"number_of_shards": 1, "refresh_interval": "-1"})


def drop(index: SearchIndex, scratch: Sequence[str]) -> None:
    for name in [*index.current_indices(), *scratch]:
        index.client.options(ignore_status=404).indices.delete(index=name)
    index.client.options(ignore_status=404).indices.delete_index_template(name=f"{index.alias}-template")


# -- report ---------------------------------------------------------------------------------------


def print_phases(title: str, total: Run, phases: Sequence[Phase], caption: str = "") -> None:
    rows = []
    for p in phases:
        standalone = "" if p.standalone is None else f"{p.standalone:.1f}"
        rows.append([p.label, f"{p.seconds:.1f}", f"{p.seconds / total.seconds:.0%}", standalone])
    rows.append(["total", f"{total.seconds:.1f}", "100%", ""])
    print_table(title, ["phase", "seconds", "share", "same work standalone (s)"], rows, caption=caption)


def report(
    runs: dict[str, Run],
    rebuild_phases: list[Phase],
    sync_phases: list[Phase],
    docs: DocumentShape,
    rss_growth: float,
    caption: str,
) -> None:
    rebuild, raw, bare = runs["rebuild"], runs["raw"], runs["bare"]
    sync, raw_changed = runs["sync"], runs["raw_changed"]
    rows = [
        [r.label, f"{r.documents:,}", f"{r.seconds:.1f}", f"{r.rate:,.0f}", f"{r.rate / base.rate:.0%}"]
        for r, base in ((rebuild, raw), (raw, raw), (bare, raw), (sync, raw_changed), (raw_changed, raw_changed))
    ]
    shape_line = (
        f"documents: {docs.documents:,}, relationships per document mean {docs.relationships_mean:.1f}, "
        f"p99 {docs.relationships_p99:.0f}, max {docs.relationships_max:,}; {docs.megabytes:,.0f} MB of JSON"
    )
    print_table(
        "Re-index throughput (documents per second)",
        ["path", "documents", "seconds", "docs/s", "vs raw bulk of the same docs"],
        rows,
        caption=f"{caption}\n{shape_line}",
    )
    print_phases(
        "Where the full rebuild's time went",
        rebuild,
        rebuild_phases,
        caption=f"process peak memory grew {rss_growth:,.0f} MB during the rebuild",
    )
    print_phases(f"Where the incremental sync's time went ({sync.documents:,} documents)", sync, sync_phases)
    share = rebuild.rate / raw.rate
    console.print(
        f"Full rebuild: [bold]{rebuild.rate:,.0f} documents/s[/bold] ({rebuild.documents:,} in "
        f"{rebuild.seconds:.1f} s), {verdict(rebuild.rate >= TARGET_RATE)} target >= {TARGET_RATE:,}/s; "
        f"{share:.0%} of the raw bulk rate of the same documents ({raw.rate:,.0f}/s)"
    )
    console.print(
        f"Incremental sync: [bold]{sync.rate:,.0f} documents/s[/bold] ({sync.documents:,} in {sync.seconds:.1f} s); "
        f"{sync.rate / raw_changed.rate:.0%} of the raw bulk rate of the same documents ({raw_changed.rate:,.0f}/s)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entities", type=int, default=100_000, help="entities in the store (default 100000)")
    parser.add_argument(
        "--changed",
        type=int,
        default=20_000,
        help=f"{CHANGED_TYPE} entities changed for the incremental sync (default 20000)",
    )
    parser.add_argument("--seed", type=int, default=7, help="graph seed (default 7)")
    args = parser.parse_args(argv)
    if args.entities < 100 or args.changed < 1:
        parser.error("--entities must be at least 100 and --changed positive")

    policy = load_policy(SHIPPED_POLICY)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    with console.status("generating the graph"):
        graph = mds_graph(args.entities, args.seed)
    changed_ids = graph.ids(CHANGED_TYPE)
    changed_keys = [
        (CHANGED_TYPE, i) for i in random.Random(args.seed).sample(changed_ids, min(args.changed, len(changed_ids)))
    ]

    with bench_database() as url, elasticsearch_server() as search_url:
        store = TimedFactStore.from_url(url)
        store.migrate()
        index = SearchIndex.from_url(search_url, alias=f"bench-reindex-{secrets.token_hex(4)}")
        scratch, bare_scratch = f"{index.alias}-scratch", f"{index.alias}-scratch-bare"
        try:
            caption = f"{describe_server(store.engine)}\n{describe_search(index.client)}"
            with console.status(f"filling the fact store: {sum(graph.counts().values()):,} entities, enriched"):
                started = time.perf_counter()
                total = fill(store, policy, graph, t0)
            by_type = ", ".join(f"{t} {n:,}" for t, n in graph.counts().items())
            console.print(
                f"filled and enriched {total:,} entities ({by_type}) in {time.perf_counter() - started:.0f} s"
            )

            with console.status(f"full rebuild of {total:,} documents"):
                index.ensure()
                rebuild, rebuild_phases, rss_growth = time_rebuild(store, policy, index)
            console.print(f"full rebuild: {rebuild.documents:,} documents in {rebuild.seconds:.1f} s")

            keys = [(t, i) for t, i, _, state in store.document_versions() if state != "deleted"]
            with console.status("baseline: reading and building the same documents"):
                pre = prebuild(store, policy, keys)
            docs = shape(pre.actions)
            with console.status(f"baseline: raw bulk of {len(pre.actions):,} documents"):
                create_scratch(index.client, scratch)
                create_scratch(index.client, bare_scratch)
                raw = Run(
                    "raw bulk of the same documents (baseline)",
                    len(pre.actions),
                    raw_bulk(index.client, scratch, pre.actions, index.chunk_size, refresh=True),
                )
                bare = Run(
                    "  reference: same documents, no relationships",
                    len(pre.actions),
                    raw_bulk(
                        index.client, bare_scratch, without_relationships(pre.actions), index.chunk_size, refresh=True
                    ),
                )
            for position, standalone in ((2, pre.read_seconds), (3, pre.build_seconds), (4, raw.seconds)):
                phase = rebuild_phases[position]
                rebuild_phases[position] = Phase(phase.label, phase.seconds, standalone)
            del pre

            with console.status(f"changing {len(changed_keys):,} {CHANGED_TYPE} entities"):
                change(store, policy, graph, changed_keys, t0 + timedelta(minutes=30))
                backlog = len(store.index_backlog(limit=len(changed_keys) * 2 + 1000))
            if backlog != len(changed_keys):
                console.print(
                    f"[yellow]the outbox holds {backlog:,} entities for {len(changed_keys):,} changed[/yellow]"
                )
            with console.status(f"baseline: raw bulk of the {backlog:,} changed documents"):
                changed_actions, _ = actions_for(store, policy, store.index_backlog(limit=backlog))
                index.client.indices.put_settings(index=scratch, settings={"refresh_interval": "1s"})
                raw_changed = Run(
                    f"raw bulk of the same {len(changed_actions):,} (baseline)",
                    len(changed_actions),
                    raw_bulk(index.client, scratch, changed_actions, index.chunk_size, refresh=False),
                )
            with console.status(f"incremental sync of {backlog:,} documents"):
                sync, sync_phases = time_sync(store, policy, index, backlog)
            left = len(store.index_backlog(limit=10))
            if left:
                console.print(f"[red]{left} entities still in the outbox after the sync[/red]")
            index.refresh()
            indexed = sum(index.counts_by_type().values())
            if indexed != total:
                console.print(f"[red]the index holds {indexed:,} documents for {total:,} entities[/red]")
        finally:
            drop(index, [scratch, bare_scratch])
            index.close()
            store.dispose()
    runs = {"rebuild": rebuild, "raw": raw, "bare": bare, "sync": sync, "raw_changed": raw_changed}
    report(runs, rebuild_phases, sync_phases, docs, rss_growth, caption)


if __name__ == "__main__":
    main()
