"""Hostile sources, each a real HTTP server on a real port (``hostile_source.py``) driven by the real
enrichment cycle on PostgreSQL: a body over ``max_body_bytes`` (declared, and chunked with no length),
a body trickled a byte at a time, a gzip bomb (streamed, and stacked encodings), a redirect to another
host, HTML where JSON belongs, JSON nested 100,000 deep, and ids in a body that try to leave the path
template.

For each failing answer: the error is stored on its entity, the entity is quarantined after
``max_attempts`` (2 in ``policies/hostile.yaml``), the same cycles enrich the well-behaved entities of
both sources, and the worker's memory (resident now and at its peak) grows by less than 50 MB."""

from __future__ import annotations

import gc
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

import pytest

from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.policy import load_policy
from enrichment_assets.steps.cycle import enrich_once

from .conftest import FakeClock
from .hostile_source import ESCAPING_IDS, HostileServer

log = logging.getLogger(__name__)

POLICY = load_policy(Path(__file__).parent / "policies" / "hostile.yaml")
MAX_GROWTH_MB = 50.0
# Two attempts (max_retries: 1) of at most timeout_seconds (1 s) each, plus a backoff, with room to spare;
# the trickle alone would take 30 s if only each read were timed.
MAX_CYCLE_SECONDS = 8.0

CASES = [
    ("oversize", "body over 262144 bytes"),
    ("oversize-chunked", "body over 262144 bytes"),
    ("trickle", "gave up after 2 attempts: timed out after 1.0s"),
    ("gzip-bomb", "body over 262144 bytes once decompressed"),
    ("gzip-bomb-stacked", "content encoding 'gzip, gzip' was not asked for"),
    ("redirect", "answered a redirect (302); redirects are not followed"),
    ("html", "content type 'text/html; charset=utf-8', not JSON"),
    ("deep", "nested deeper than 100 levels"),
]


class Memory:
    """The worker's resident memory in MB (``/proc/self/status``) when entered, when left, and at its
    peak in between. The peak matters: a body buffered whole and then freed leaves no trace in the
    resident size afterwards. It is ``VmHWM`` reset on entry (``/proc/self/clear_refs``), or, where
    that may not be written, the largest of samples taken every 5 ms."""

    def __enter__(self) -> Memory:
        gc.collect()
        self.before = _status_mb("VmRSS")
        self._sampled = self.before
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = self._sampled
        else:
            self.peak = _status_mb("VmHWM")
        gc.collect()
        self.after = _status_mb("VmRSS")

    @property
    def growth(self) -> float:
        return self.after - self.before

    @property
    def peak_growth(self) -> float:
        return self.peak - self.before

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_mb("VmRSS"))


def _status_mb(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match, field
    return int(match[1]) / 1024


@pytest.fixture(scope="module")
def hostile_server() -> Iterator[HostileServer]:
    with HostileServer() as server:
        yield server


@pytest.fixture
def hostile(hostile_server: HostileServer, monkeypatch: pytest.MonkeyPatch) -> HostileServer:
    """The server with the policy's sources pointed at it and its request log emptied."""
    for name, value in hostile_server.environ().items():
        monkeypatch.setenv(name, value)
    hostile_server.source.raw_paths.clear()
    return hostile_server


@pytest.fixture
def store(pg_store: FactStore, hostile: HostileServer) -> FactStore:
    """A warmed-up store: one cycle has run (imports, connections, statement caches), so what a
    measured cycle adds to memory is its own."""
    arrive(pg_store, ("thing", "warm-up"), ("lure", "fine-warm-up"))
    enrich_once(pg_store, POLICY)
    assert pg_store.get_entity("thing", "warm-up").state == "fully_enriched"
    hostile.source.raw_paths.clear()
    return pg_store


def arrive(store: FactStore, *keys: tuple[str, str]) -> None:
    store.ingest_events(Event(entity_type=t, entity_id=i, event_type="created") for t, i in keys)


def measured_cycle(store: FactStore, label: str) -> Memory:
    with Memory() as memory:
        started = time.monotonic()
        enrich_once(store, POLICY)
        elapsed = time.monotonic() - started
    log.info("%s: %.1f s; resident %+.1f MB, peak %+.1f MB", label, elapsed, memory.growth, memory.peak_growth)
    assert elapsed < MAX_CYCLE_SECONDS, f"{label}: the cycle took {elapsed:.1f}s"
    assert memory.growth < MAX_GROWTH_MB, f"{label}: resident memory grew {memory.growth:.1f} MB"
    assert memory.peak_growth < MAX_GROWTH_MB, f"{label}: peak memory grew {memory.peak_growth:.1f} MB"
    return memory


@pytest.mark.parametrize(("case", "error"), CASES, ids=[case for case, _ in CASES])
def test_a_hostile_answer_fails_its_entity_until_quarantined_and_the_run_goes_on(
    case: str, error: str, store: FactStore, clock: FakeClock, hostile: HostileServer
) -> None:
    arrive(store, ("lure", case))
    for attempt, state in ((1, "uncached"), (2, "quarantined")):
        # Well-behaved entities of both sources arrive with each cycle; the lure first, as lures go
        # first (types run by name at equal priority) and a crash there would leave them unfetched.
        others = [("lure", f"fine-{attempt}"), ("thing", f"thing-{attempt}")]
        if attempt == 1:
            others.append(("lure", "fine-gzip"))
        arrive(store, *others)
        measured_cycle(store, f"{case} attempt {attempt}")
        record = store.get_entity("lure", case)
        assert (record.state, record.attempts) == (state, attempt)
        assert error in (record.last_error or ""), record.last_error
        for entity_type, entity_id in others:
            assert store.get_entity(entity_type, entity_id).state == "fully_enriched", (entity_type, entity_id)
        clock.advance(hours=2)
    assert store.get_entity("lure", "fine-gzip").attributes == {"id": "fine-gzip", "targets": []}
    assert store.due_work() == [], "a quarantined entity is not claimed again"
    stray = [path for path in hostile.source.raw_paths if not path.startswith((b"/hostile/lures/", b"/good/things/"))]
    assert stray == [], "no request outside the sources' templates (a followed redirect would be /stolen)"


def test_ids_in_a_body_stay_inside_their_path_template(store: FactStore, hostile: HostileServer) -> None:
    arrive(store, ("lure", "escaping-ids"), ("thing", "thing-1"))
    measured_cycle(store, "escaping-ids")
    assert store.get_entity("lure", "escaping-ids").state == "fully_enriched"
    assert store.get_entity("thing", "thing-1").state == "fully_enriched"
    edges = store.edges_of("lure", "escaping-ids", relation="points_at")
    assert {edge["dst_id"] for edge in edges} == set(ESCAPING_IDS)
    targets = [path for path in hostile.source.raw_paths if path.startswith(b"/hostile/targets/")]
    segments = [path.removeprefix(b"/hostile/targets/") for path in targets]
    assert all(b"/" not in s and b"?" not in s and b"#" not in s and s not in (b".", b"..") for s in segments), segments
    assert sorted(unquote(s.decode("ascii")) for s in segments) == sorted(ESCAPING_IDS)
    assert set(hostile.source.raw_paths) == {b"/hostile/lures/escaping-ids", b"/good/things/thing-1", *targets}
    for entity_id in ESCAPING_IDS:
        assert store.get_entity("target", entity_id).attributes == {"id": entity_id}
