"""The claim-and-process queue under real concurrency: separate worker processes never overlap and
together take every candidate exactly once; a crashed worker's lease expires and its work is re-claimed;
results are checked against the claim's owner."""

from __future__ import annotations

import multiprocessing
import random
import time
from datetime import timedelta

import pytest

from enrichment_assets.events import Event
from enrichment_assets.factstore import ClaimError, FactStore, Outcome, RetryPolicy

CANDIDATES = 1200
WORKERS = 4


def _worker(url: str, owner: str, batch: int, queue: multiprocessing.Queue) -> None:
    """Claim and finish until nothing is left; report every key this worker claimed."""
    store = FactStore.from_url(url)
    rng = random.Random(owner)
    taken: list[tuple[str, str]] = []
    try:
        while True:
            claims = store.claim("thing", limit=batch, owner=owner, lease=timedelta(minutes=10))
            if not claims:
                break
            taken += [c.key for c in claims]
            time.sleep(rng.uniform(0, 0.01))  # hold the lease a moment, as real hydration would
            result = store.finish(
                owner, [Outcome.of(c, "enriched", attributes={"by": owner}) for c in claims], RetryPolicy()
            )
            assert not result.lost
        queue.put((owner, taken, None))
    except Exception as error:  # reported to the test, which fails with it
        queue.put((owner, taken, repr(error)))
    finally:
        store.dispose()


def test_concurrent_workers_take_every_candidate_exactly_once(database_url: str) -> None:
    store = FactStore.from_url(database_url)
    store.ingest_events(
        Event(entity_type="thing", entity_id=f"e{i:05d}", event_type="created") for i in range(CANDIDATES)
    )
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_worker, args=(database_url, f"worker-{n}", 37 + n * 11, queue)) for n in range(WORKERS)
    ]
    for process in workers:
        process.start()
    reports = [queue.get(timeout=240) for _ in workers]
    for process in workers:
        process.join(timeout=30)

    assert [error for _, _, error in reports if error] == []
    claimed = [key for _, keys, _ in reports for key in keys]
    assert len(claimed) == CANDIDATES, "no entity was claimed twice"
    assert set(claimed) == {("thing", f"e{i:05d}") for i in range(CANDIDATES)}, "every entity was claimed"
    busy = [owner for owner, keys, _ in reports if keys]
    assert len(busy) >= 2, f"the workers really ran side by side, not one after another: {busy}"
    [status] = store.status()
    assert status.counts == {"fully_enriched": CANDIDATES}
    by_owner = {owner: set(keys) for owner, keys, _ in reports}
    for key in random.Random(1).sample(claimed, 20):
        record = store.get_entity(*key)
        assert key in by_owner[record.attributes["by"]], "the result came from the worker that held the claim"
    store.dispose()


def test_expired_lease_is_reclaimed_and_the_crashed_owner_is_refused(store: FactStore, clock) -> None:
    store.ingest_events([Event(entity_type="thing", entity_id=str(i), event_type="created") for i in range(10)])
    crashed = store.claim("thing", limit=10, owner="crashed", lease=timedelta(seconds=30))
    assert len(crashed) == 10
    assert store.claim("thing", limit=10, owner="rescuer", lease=timedelta(seconds=30)) == []
    assert store.due_work() == []
    clock.advance(seconds=31)
    assert [w.due for w in store.due_work()] == [10], "an expired lease is due work again"
    rescued = store.claim("thing", limit=10, owner="rescuer", lease=timedelta(seconds=30))
    assert {c.key for c in rescued} == {c.key for c in crashed}
    assert all(c.attempts == 2 for c in rescued), "the crashed attempt counts"

    late = store.finish("crashed", [Outcome.of(c, "failed", error="late") for c in crashed], RetryPolicy())
    assert set(late.lost) == {c.key for c in crashed}
    assert store.renew("crashed", [c.key for c in crashed], timedelta(minutes=1)) == 0
    assert store.get_entity("thing", "0").last_error is None, "the refused result wrote nothing"

    done = store.finish("rescuer", [Outcome.of(c, "enriched", attributes={}) for c in rescued], RetryPolicy())
    assert done.enriched == 10 and not done.lost


def test_renewed_lease_is_not_taken(store: FactStore, clock) -> None:
    store.ingest_events([Event(entity_type="thing", entity_id="a", event_type="created")])
    [claim] = store.claim("thing", limit=1, owner="slow", lease=timedelta(seconds=30))
    clock.advance(seconds=25)
    assert store.renew("slow", [claim.key], timedelta(seconds=30)) == 1
    clock.advance(seconds=25)
    assert store.claim("thing", limit=1, owner="other", lease=timedelta(seconds=30)) == []


@pytest.mark.parametrize("owner", ["", None], ids=["empty", "none"])
def test_claim_needs_an_owner(store: FactStore, owner: str | None) -> None:
    with pytest.raises(ClaimError):
        store.claim("thing", limit=1, owner=owner, lease=timedelta(seconds=1))  # type: ignore[arg-type]
