"""Reading reference ids out of a source's JSON with a policy field path."""

from __future__ import annotations

from typing import Any

from enrichment_assets.policy import FieldPath


class MalformedField(ValueError):
    """The source's JSON does not have the shape the policy's field path expects."""


def extract_ids(document: dict[str, Any], path: FieldPath) -> list[str]:
    """Ids at ``path`` in ``document``, in order, without duplicates.

    A missing or null field means "no reference" (an optional link). A present field of the wrong
    shape (a list where a string id belongs, a number as an id, an object where a list belongs) is a
    malformed answer and raises :class:`MalformedField` naming the field.
    """
    values: list[Any] = [document]
    for name, fan_out in path.segments:
        next_values: list[Any] = []
        for value in values:
            if not isinstance(value, dict):
                raise MalformedField(f"field {path}: expected an object above {name!r}, got {type(value).__name__}")
            item = value.get(name)
            if item is None:
                continue
            if fan_out:
                if not isinstance(item, list):
                    raise MalformedField(f"field {path}: {name!r} should be a list, got {type(item).__name__}")
                next_values.extend(v for v in item if v is not None)
            else:
                next_values.append(item)
        values = next_values
    ids: list[str] = []
    for value in values:
        if not isinstance(value, str) or not value:
            raise MalformedField(f"field {path}: expected a non-empty string id, got {value!r:.40}")
        ids.append(value)
    return list(dict.fromkeys(ids))
