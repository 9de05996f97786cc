"""The entity state machine on PostgreSQL and SQLite: ingestion, claims, outcomes, backoff, quarantine,
supersession by a mid-flight event, refresh and release."""

from __future__ import annotations

from datetime import timedelta

import pytest

from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore, Outcome, RetryPolicy

LEASE = timedelta(minutes=5)
RETRY = RetryPolicy(max_attempts=3, base_delay=timedelta(seconds=60), max_delay=timedelta(hours=1), jitter=0.25)


def event(entity_id: str, event_type: str = "created", entity_type: str = "thing", **extra: object) -> Event:
    return Event(entity_type=entity_type, entity_id=entity_id, event_type=event_type, **extra)


def claim_all(store: FactStore, owner: str = "w1", entity_type: str = "thing", **kwargs: object):
    return store.claim(entity_type, limit=1000, owner=owner, lease=LEASE, **kwargs)


def test_created_entity_is_uncached_and_due_now(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    record = store.get_entity("thing", "a")
    assert record is not None
    assert (record.state, record.version, record.attempts) == ("uncached", 1, 0)
    assert record.first_seen_at == clock.now
    assert record.next_attempt_at == clock.now
    assert record.last_enriched_at is None
    assert record.staleness_seconds(clock.now) is None


def test_enriched_outcome_sets_last_enriched_at_and_bumps_version(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    [claim] = claim_all(store)
    assert claim.attempts == 1
    clock.advance(seconds=2)
    result = store.finish("w1", [Outcome.of(claim, "enriched", attributes={"name": "A"})], RETRY)
    assert result.enriched == 1 and not result.lost
    record = store.get_entity("thing", "a")
    assert record.state == "fully_enriched"
    assert record.version == 2
    assert record.attempts == 0
    assert record.last_enriched_at == clock.now
    assert record.attributes == {"name": "A"}
    assert record.claim_owner is None and record.next_attempt_at is None
    assert claim_all(store) == []
    clock.advance(seconds=30)
    assert record.staleness_seconds(clock.now) == 30


def test_update_makes_an_enriched_entity_dirty_again(store: FactStore) -> None:
    store.ingest_events([event("a")])
    store.finish("w1", [Outcome.of(c, "enriched", attributes={}) for c in claim_all(store)], RETRY)
    store.ingest_events([event("a", "updated")])
    record = store.get_entity("thing", "a")
    assert (record.state, record.version) == ("uncached", 3)
    assert record.last_enriched_at is not None, "history of the last enrichment is kept"
    assert [c.entity_id for c in claim_all(store)] == ["a"]


def test_reingesting_the_same_events_changes_nothing(store: FactStore) -> None:
    batch = [event("a"), event("b"), event("c", "deleted")]
    store.ingest_events(batch)
    before = {k: store.get_entity("thing", k) for k in "abc"}
    store.ingest_events(batch)
    store.ingest_events([event("a", "updated"), event("c", "deleted")])
    after = {k: store.get_entity("thing", k) for k in "abc"}
    assert after == before


def test_deleted_entity_is_a_tombstone_claimed_once_for_cleanup(store: FactStore, clock) -> None:
    store.ingest_events([event("a"), event("b")])
    store.ingest_events([event("a", "deleted")])
    record = store.get_entity("thing", "a")
    assert (record.state, record.version, record.next_attempt_at) == ("deleted", 2, clock.now)
    claims = {c.entity_id: c for c in claim_all(store)}
    assert claims["a"].state == "deleted"
    result = store.finish(
        "w1",
        [Outcome.of(c, "deleted" if c.state == "deleted" else "enriched", attributes={}) for c in claims.values()],
        RETRY,
    )
    assert (result.deleted, result.enriched) == (1, 1)
    record = store.get_entity("thing", "a")
    assert (record.state, record.next_attempt_at) == ("deleted", None)
    assert claim_all(store) == [] and store.due_work() == []
    store.ingest_events([event("a", "created")])
    assert store.get_entity("thing", "a").state == "uncached", "a re-created entity comes back"


def test_last_event_in_a_batch_wins_unless_it_is_older(store: FactStore, clock) -> None:
    t = clock.now
    store.ingest_events(
        [
            event("a"),
            event("a", "deleted"),
            event("b", "deleted", occurred_at=t),
            event("b", "created", occurred_at=t - timedelta(minutes=1)),
        ]
    )
    assert store.get_entity("thing", "a").state == "deleted"
    assert store.get_entity("thing", "b").state == "deleted"


def test_an_event_older_than_the_last_applied_one_is_ignored(store: FactStore, clock) -> None:
    t = clock.now
    store.ingest_events([event("a", "deleted", occurred_at=t)])
    store.ingest_events([event("a", "created", occurred_at=t - timedelta(seconds=1))])
    record = store.get_entity("thing", "a")
    assert (record.state, record.version, record.last_event_at) == ("deleted", 1, t)
    store.ingest_events([event("a", "created", occurred_at=t + timedelta(seconds=1))])
    assert store.get_entity("thing", "a").state == "uncached"


def test_failure_backs_off_with_jitter_then_retries(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    [claim] = claim_all(store)
    store.finish("w1", [Outcome.of(claim, "failed", error="source returned 503")], RETRY)
    record = store.get_entity("thing", "a")
    assert record.state == "uncached"
    assert record.attempts == 1
    assert record.last_error == "source returned 503"
    delay = (record.next_attempt_at - clock.now).total_seconds()
    assert 45 <= delay <= 75, "base 60 s +/- 25% jitter"
    assert claim_all(store) == [], "not due before its backoff"
    clock.advance(seconds=76)
    [again] = claim_all(store)
    assert again.attempts == 2
    store.finish("w1", [Outcome.of(again, "failed", error="timeout")], RETRY)
    second = (store.get_entity("thing", "a").next_attempt_at - clock.now).total_seconds()
    assert 90 <= second <= 150, "the second delay doubles"


def test_max_attempts_quarantines_and_a_new_event_releases(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    for attempt in range(1, RETRY.max_attempts + 1):
        [claim] = claim_all(store)
        assert claim.attempts == attempt
        result = store.finish("w1", [Outcome.of(claim, "failed", error=f"boom {attempt}")], RETRY)
        clock.advance(hours=2)
    assert result.quarantined == 1
    record = store.get_entity("thing", "a")
    assert (record.state, record.last_error, record.next_attempt_at) == ("quarantined", "boom 3", None)
    assert claim_all(store) == []
    assert store.due_work() == []
    store.ingest_events([event("a", "updated")])
    record = store.get_entity("thing", "a")
    assert (record.state, record.attempts, record.last_error) == ("uncached", 0, None)


def test_partial_outcome_records_what_it_waits_on(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    [claim] = claim_all(store)
    store.finish(
        "w1", [Outcome.of(claim, "partial", attributes={"x": 1}, waiting_on=(("other", "9"), ("other", "2")))], RETRY
    )
    record = store.get_entity("thing", "a")
    assert record.state == "partially_resolved"
    assert record.waiting_on == [["other", "2"], ["other", "9"]]
    assert record.attributes == {"x": 1}
    assert record.next_attempt_at > clock.now
    assert claim_all(store) == []
    clock.advance(minutes=5)
    [again] = claim_all(store)
    assert again.state == "partially_resolved"
    store.finish("w1", [Outcome.of(again, "enriched", attributes={"x": 2})], RETRY)
    record = store.get_entity("thing", "a")
    assert (record.state, record.waiting_on, record.attributes) == ("fully_enriched", None, {"x": 2})


def test_partial_never_quarantines(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    for _ in range(RETRY.max_attempts + 2):
        clock.advance(hours=2)
        [claim] = claim_all(store)
        store.finish("w1", [Outcome.of(claim, "partial", waiting_on=(("other", "1"),))], RETRY)
    assert store.get_entity("thing", "a").state == "partially_resolved"


def test_event_during_hydration_supersedes_the_result(store: FactStore) -> None:
    store.ingest_events([event("a"), event("b")])
    claims = {c.entity_id: c for c in claim_all(store)}
    store.ingest_events([event("a", "updated"), event("b", "deleted")])
    result = store.finish("w1", [Outcome.of(c, "enriched", attributes={"seen": True}) for c in claims.values()], RETRY)
    assert result.superseded == 2
    a, b = store.get_entity("thing", "a"), store.get_entity("thing", "b")
    assert (a.state, a.last_enriched_at, a.attributes) == ("uncached", None, {"seen": True})
    assert b.state == "deleted", "a deletion that lands mid-flight is never undone"
    assert a.version == 3 and b.version == 3
    again = {c.entity_id: c.state for c in claim_all(store)}
    assert again == {"a": "uncached", "b": "deleted"}, "both are due again at once"


def test_claims_respect_limit_window_and_type(store: FactStore, clock) -> None:
    day1 = clock.now
    store.ingest_events([event(f"d1-{i}") for i in range(5)] + [event("other", entity_type="else")])
    clock.advance(days=1)
    store.ingest_events([event(f"d2-{i}") for i in range(3)])
    window = (day1.replace(hour=0), day1.replace(hour=0) + timedelta(days=1))
    first = store.claim("thing", limit=2, owner="w1", lease=LEASE, window=window)
    assert len(first) == 2 and all(c.entity_id.startswith("d1-") for c in first)
    rest = store.claim("thing", limit=100, owner="w2", lease=LEASE, window=window)
    assert sorted(c.entity_id for c in rest) == sorted({f"d1-{i}" for i in range(5)} - {c.entity_id for c in first})
    assert {c.entity_id for c in claim_all(store, "w3")} == {"d2-0", "d2-1", "d2-2"}
    assert [c.entity_id for c in claim_all(store, "w4", entity_type="else")] == ["other"]


def test_refresh_claims_enriched_entities_older_than_the_cutoff(store: FactStore, clock) -> None:
    store.ingest_events([event("old"), event("new")])
    claims = {c.entity_id: c for c in claim_all(store)}
    store.finish("w1", [Outcome.of(claims["old"], "enriched", attributes={})], RETRY)
    clock.advance(hours=2)
    store.finish("w1", [Outcome.of(claims["new"], "enriched", attributes={})], RETRY)
    assert claim_all(store) == []
    refreshed = claim_all(store, refresh_before=clock.now - timedelta(hours=1))
    assert [(c.entity_id, c.state) for c in refreshed] == [("old", "fully_enriched")]


def test_release_gives_the_claim_back_without_counting_an_attempt(store: FactStore) -> None:
    store.ingest_events([event("a")])
    [claim] = claim_all(store)
    assert store.release("intruder", [claim.key]) == 0
    assert claim_all(store, "w2") == []
    assert store.release("w1", [claim.key]) == 1
    [again] = claim_all(store, "w2")
    assert again.attempts == 1


def test_due_work_groups_by_type_and_window(store: FactStore, clock) -> None:
    start = clock.now
    store.ingest_events([event("a"), event("b"), event("x", entity_type="else")])
    clock.advance(days=1)
    store.ingest_events([event("c")])
    work = store.due_work(granularity="day")
    assert [(w.entity_type, w.window_start, w.due) for w in work] == [
        ("else", start.replace(hour=0), 1),
        ("thing", start.replace(hour=0), 2),
        ("thing", start.replace(hour=0) + timedelta(days=1), 1),
    ]
    assert all(w.window_end - w.window_start == timedelta(days=1) for w in work)
    hourly = store.due_work(granularity="hour")
    assert {(w.entity_type, w.window_start.hour) for w in hourly} == {("else", 12), ("thing", 12)}
    claim_all(store)
    assert [w.entity_type for w in store.due_work()] == ["else"], "leased entities are not due"


def test_due_work_includes_stale_enriched_entities_when_asked(store: FactStore, clock) -> None:
    store.ingest_events([event("a")])
    store.finish("w1", [Outcome.of(c, "enriched", attributes={}) for c in claim_all(store)], RETRY)
    assert store.due_work(refresh_intervals={"thing": timedelta(hours=1)}) == []
    clock.advance(hours=2)
    [work] = store.due_work(refresh_intervals={"thing": timedelta(hours=1)})
    assert (work.entity_type, work.due) == ("thing", 1)


def test_due_work_rejects_an_unknown_granularity(store: FactStore) -> None:
    with pytest.raises(ValueError, match="granularity"):
        store.due_work(granularity="week")  # type: ignore[arg-type]


def test_status_counts_states_and_names_the_oldest_waiting(store: FactStore, clock) -> None:
    store.ingest_events([event("first")])
    clock.advance(minutes=1)
    store.ingest_events([event("second"), event("gone", "deleted")])
    [report] = store.status()
    assert report.counts == {"uncached": 2, "deleted": 1}
    assert (report.oldest_waiting_id, report.oldest_waiting_since) == ("first", clock.now - timedelta(minutes=1))


def test_staleness_percentiles_agree_on_both_backends(store: FactStore, clock) -> None:
    """PostgreSQL computes them in the database, SQLite in Python: same nearest-rank answers."""
    import sqlalchemy as sa

    from enrichment_assets.factstore.schema import entities

    store.ingest_events([Event(entity_type="thing", entity_id=f"t{i}", event_type="created") for i in range(20)])
    store.ingest_events([Event(entity_type="thing", entity_id="gone", event_type="deleted")])
    with store.engine.begin() as conn:
        for i in range(19):  # t19 never enriched: its age counts from first seen
            conn.execute(
                sa.update(entities)
                .where(entities.c.entity_id == f"t{i}")
                .values(last_enriched_at=clock.now - timedelta(seconds=100 * (i + 1)))
            )
    clock.advance(seconds=50)
    summary = store.staleness("thing", budget=timedelta(seconds=1000))
    # ages 50 (t19), 150, 250, ..., 1950: nearest rank, the 10th and the 19th of 20
    assert (summary.count, summary.p50, summary.p95, summary.max) == (20, 950.0, 1850.0, 1950.0)
    assert summary.over_budget == 10  # t9 (1050 s) .. t18 (1950 s); t19 is 50 s old
    window = (clock.now - timedelta(hours=1), clock.now)
    assert store.staleness("thing", window).count == 20
    assert store.staleness("thing", (clock.now, clock.now + timedelta(hours=1))).count == 0
    assert store.staleness("nothing").p95 == 0.0
