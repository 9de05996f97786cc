"""Parsing and validating thin-event batches: every rule, and the line numbers it reports."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from enrichment_assets.events import EventBatchError, EventType, parse_events

TYPES = {"thing", "other"}


def ok(**overrides: object) -> dict[str, object]:
    return {"entity_type": "thing", "entity_id": "t-1", "event_type": "created", **overrides}


def parse(body: str, max_events: int = 100):
    return parse_events(body, entity_types=TYPES, max_events=max_events)


def test_ndjson_batch_parses_in_order() -> None:
    body = "\n".join(json.dumps(ok(entity_id=f"t-{i}")) for i in range(3)) + "\n"
    assert [e.entity_id for e in parse(body)] == ["t-0", "t-1", "t-2"]


def test_single_pretty_printed_object_is_one_event() -> None:
    [event] = parse(json.dumps(ok(event_type="deleted"), indent=2))
    assert event.event_type is EventType.DELETED


def test_blank_lines_are_skipped_but_line_numbers_stay_true() -> None:
    body = "\n".join([json.dumps(ok()), "", "   ", json.dumps(ok(entity_type="nope"))])
    with pytest.raises(EventBatchError) as caught:
        parse(body)
    assert [p.line for p in caught.value.problems] == [4]


def test_occurred_at_with_and_without_offset() -> None:
    naive, aware = parse(
        json.dumps(ok(occurred_at="2026-01-02T03:04:05"))
        + "\n"
        + json.dumps(ok(occurred_at="2026-01-02T05:04:05+02:00"))
    )
    assert naive.occurred_at == aware.occurred_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (ok(entity_id=""), "must not be empty"),
        (ok(entity_id="x" * 513), "limit is 512"),
        (ok(entity_id="a\u0000b"), "control characters"),
        (ok(entity_id="line\nbreak"), "control characters"),
        (ok(entity_id="\u0085"), "control characters"),
        (ok(entity_id=42), "valid string"),
        (ok(entity_type="model"), "not declared"),
        (ok(event_type="renamed"), "event_type"),
        (ok(occurred_at="yesterday"), "occurred_at"),
        (ok(surprise=1), "surprise"),
        ({"entity_type": "thing", "event_type": "created"}, "entity_id: Field required"),
        ([ok()], "should be an object"),
    ],
    ids=[
        "empty-id",
        "long-id",
        "nul",
        "newline",
        "c1-control",
        "int-id",
        "undeclared-type",
        "bad-event-type",
        "bad-time",
        "extra-field",
        "missing-id",
        "array",
    ],
)
def test_invalid_event_is_rejected_with_its_line(event: object, message: str) -> None:
    body = json.dumps(ok()) + "\n" + json.dumps(event)
    with pytest.raises(EventBatchError) as caught:
        parse(body)
    assert caught.value.status == 422
    [problem] = caught.value.problems
    assert problem.line == 2
    assert message in problem.message


def test_512_character_id_is_accepted() -> None:
    assert len(parse(json.dumps(ok(entity_id="x" * 512)))[0].entity_id) == 512


def test_malformed_json_is_a_400_naming_every_bad_line() -> None:
    body = "\n".join(["{not json", json.dumps(ok()), '{"entity_type": "thing"', json.dumps(ok(entity_id=""))])
    with pytest.raises(EventBatchError) as caught:
        parse(body)
    assert caught.value.status == 400
    assert [p.line for p in caught.value.problems] == [1, 3, 4]


def test_too_many_events_is_a_413() -> None:
    body = "\n".join(json.dumps(ok(entity_id=str(i))) for i in range(6))
    with pytest.raises(EventBatchError) as caught:
        parse(body, max_events=5)
    assert caught.value.status == 413
    assert caught.value.problems[0].line == 6


def test_empty_body_is_a_400() -> None:
    with pytest.raises(EventBatchError) as caught:
        parse("\n\n")
    assert caught.value.status == 400


def test_problem_list_is_capped() -> None:
    body = "\n".join(json.dumps(ok(entity_id="")) for _ in range(80))
    with pytest.raises(EventBatchError) as caught:
        parse(body)
    assert len(caught.value.problems) == 50
    assert caught.value.as_dict()["problems_truncated"] is True
