"""The pool-queue repair: a step Dagster's slot queue left waiting beside a free slot gets the slot;
a step waiting for a slot that is really held is left alone."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pytest

from enrichment_assets.orchestration import write_instance_yaml
from enrichment_assets.pools import repair_pool_queues

POOL = "source_model_registry"


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A local instance whose pool has one slot, held by run A's hydration step."""
    write_instance_yaml(tmp_path)
    with dg.DagsterInstance.from_config(str(tmp_path)) as local:
        local.event_log_storage.set_concurrency_slots(POOL, 1)
        assert local.event_log_storage.claim_concurrency_slot(POOL, "run-a", "hydrated").is_claimed
        yield local


def test_a_step_queued_just_after_the_slot_was_freed_gets_it(instance: dg.DagsterInstance) -> None:
    storage = instance.event_log_storage
    # The race: run B looked while A held the slot, A freed it, then B wrote itself into the queue.
    storage.free_concurrency_slot_for_step("run-a", "hydrated")
    storage.add_pending_step(POOL, "run-b", "hydrated", should_assign=False)
    assert not storage.claim_concurrency_slot(POOL, "run-b", "hydrated").is_claimed, "Dagster leaves it waiting"

    assert repair_pool_queues(instance, [POOL], stuck_after=timedelta(minutes=5)) == {}, "not stuck yet"
    assert repair_pool_queues(instance, [POOL], stuck_after=timedelta(0)) == {POOL: 1}
    assert storage.claim_concurrency_slot(POOL, "run-b", "hydrated").is_claimed


def test_a_step_waiting_for_a_held_slot_is_left_waiting(instance: dg.DagsterInstance) -> None:
    storage = instance.event_log_storage
    assert not storage.claim_concurrency_slot(POOL, "run-b", "hydrated").is_claimed
    assert repair_pool_queues(instance, [POOL, "source_unused"], stuck_after=timedelta(0)) == {}
    assert not storage.claim_concurrency_slot(POOL, "run-b", "hydrated").is_claimed
    storage.free_concurrency_slot_for_step("run-a", "hydrated")  # Dagster's own hand-over still works
    assert storage.claim_concurrency_slot(POOL, "run-b", "hydrated").is_claimed
    assert not storage.claim_concurrency_slot(POOL, "run-c", "hydrated").is_claimed, "still one at a time"


def test_the_repair_sensor_is_in_the_code_location_and_running_by_default() -> None:
    from enrichment_assets.definitions import defs

    sensor = defs.get_repository_def().get_sensor_def("pool_queue_repair")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert "source_model_registry" in (sensor.description or "")
