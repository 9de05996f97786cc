"""Thin change events and the all-or-nothing parser shared by the HTTP API and the CLI.

An event says only *that* an entity changed: ``{"entity_type", "entity_id", "event_type",
"occurred_at"?}``. A batch is one JSON object or NDJSON (one object per line). Any bad line rejects the
whole batch; the error names every bad line (up to a cap) so a producer can fix its input in one pass.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pydantic

MAX_ID_LENGTH = 512
MAX_REPORTED_PROBLEMS = 50
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class EventType(enum.StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    DELETED = "deleted"


class Event(pydantic.BaseModel):
    """One thin change event. ``occurred_at`` without an offset is read as UTC."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    entity_type: pydantic.StrictStr
    entity_id: pydantic.StrictStr
    event_type: EventType
    occurred_at: datetime | None = None

    @pydantic.field_validator("entity_type")
    @classmethod
    def _type_is_a_name(cls, value: str) -> str:
        if not value or _CONTROL_CHARS.search(value) or len(value) > 128:
            raise ValueError("entity_type must be a non-empty name of at most 128 printable characters")
        return value

    @pydantic.field_validator("entity_id")
    @classmethod
    def _id_is_printable(cls, value: str) -> str:
        if not value:
            raise ValueError("entity_id must not be empty")
        if len(value) > MAX_ID_LENGTH:
            raise ValueError(f"entity_id is {len(value)} characters; the limit is {MAX_ID_LENGTH}")
        if _CONTROL_CHARS.search(value):
            raise ValueError("entity_id must not contain control characters")
        return value

    @pydantic.field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


@dataclass(frozen=True)
class Problem:
    line: int
    message: str

    def as_dict(self) -> dict[str, object]:
        return {"line": self.line, "message": self.message}


class EventBatchError(ValueError):
    """A batch was rejected whole. ``status`` is the HTTP status that fits: 400 unparsable, 413 too big,
    422 well-formed JSON that is not a valid event."""

    def __init__(self, status: int, problems: list[Problem], *, truncated: bool = False) -> None:
        self.status = status
        self.problems = problems
        self.truncated = truncated
        first = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"line {first.line}: {first.message}{more}")

    def as_dict(self) -> dict[str, object]:
        return {
            "error": "batch rejected; nothing was written",
            "problems": [p.as_dict() for p in self.problems],
            "problems_truncated": self.truncated,
        }


def _describe(error: pydantic.ValidationError) -> str:
    parts = []
    for detail in error.errors(include_url=False):
        where = ".".join(str(p) for p in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def parse_events(
    body: bytes | str,
    *,
    entity_types: Collection[str],
    max_events: int,
) -> list[Event]:
    """Parse a JSON object or an NDJSON batch into events, or raise :class:`EventBatchError`.

    Blank lines are ignored; line numbers in errors are 1-based lines of ``body``.
    """
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    lines = _split(text)
    if not lines:
        raise EventBatchError(400, [Problem(0, "the request has no events")])
    if len(lines) > max_events:
        raise EventBatchError(
            413, [Problem(lines[max_events][0], f"more than {max_events} events in one batch; split it")]
        )
    return validate_lines(lines, entity_types=entity_types)


def _split(text: str) -> list[tuple[int, str]]:
    stripped = text.strip()
    # A single pretty-printed object spans lines; NDJSON never does.
    if stripped.startswith("{") and "\n" in stripped:
        try:
            json.loads(stripped)
        except ValueError:
            pass
        else:
            return [(1, stripped)]
    # NDJSON lines end at \n (\r\n too); str.splitlines would also break at U+2028, U+2029 and U+0085,
    # which JSON strings may hold raw.
    return [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]


def validate_lines(lines: Iterable[tuple[int, str]], *, entity_types: Collection[str]) -> list[Event]:
    """Validate numbered JSON lines; every problem is collected before raising."""
    events: list[Event] = []
    problems: list[Problem] = []
    status = 422
    for number, line in lines:
        try:
            event = Event.model_validate_json(line)
        except pydantic.ValidationError as error:
            if any(d["type"] == "json_invalid" for d in error.errors()):
                status = 400
                problems.append(Problem(number, "not valid JSON: " + error.errors()[0]["msg"]))
            else:
                problems.append(Problem(number, _describe(error)))
            continue
        if event.entity_type not in entity_types:
            problems.append(
                Problem(number, f"entity_type {event.entity_type!r} is not declared; known: {sorted(entity_types)}")
            )
            continue
        events.append(event)
    if problems:
        raise EventBatchError(status, problems[:MAX_REPORTED_PROBLEMS], truncated=len(problems) > MAX_REPORTED_PROBLEMS)
    return events
