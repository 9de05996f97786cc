"""The policy file: sources, entity types with their references, and per-type enrichment policies.

The whole domain is configuration. Loading validates structure (pydantic) and then meaning: every
source an entity type names exists, every reference points at a declared type, every edge path walks
real references hop by hop. Errors name the key path and, where the YAML has one, the line.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_NAME = r"^[a-z][a-z0-9_]*$"
_SEGMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(\[\*\])?$")


def parse_duration(value: Any) -> timedelta:
    """``90`` (seconds), ``"30s"``, ``"10m"``, ``"6h"``, ``"1d"``, ``"250ms"``."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration; use e.g. 30s, 10m, 6h, 1d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


Duration = Annotated[timedelta, pydantic.BeforeValidator(parse_duration)]
Name = Annotated[str, pydantic.StringConstraints(pattern=_NAME, max_length=128)]


@dataclass(frozen=True)
class FieldPath:
    """A dotted path into a source's JSON; ``[*]`` fans out over a list (``cells[*].test_id``)."""

    text: str
    segments: tuple[tuple[str, bool], ...]

    @classmethod
    def parse(cls, text: str) -> FieldPath:
        parts = text.split(".")
        segments = []
        for part in parts:
            match = _SEGMENT.match(part)
            if not match:
                raise ValueError(f"{text!r} is not a field path; use names, dots and [*], e.g. cells[*].test_id")
            segments.append((match[1], bool(match[2])))
        return cls(text, tuple(segments))

    def __str__(self) -> str:
        return self.text


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class AuthHeader(_Model):
    """A header sent to a source, its value read from an environment variable at run time."""

    name: str
    env: str


class Source(_Model):
    base_url: pydantic.AnyHttpUrl
    base_url_env: str | None = None
    auth_header: AuthHeader | None = None
    requests_per_second: pydantic.PositiveFloat = 50
    max_concurrency: pydantic.PositiveInt = 4
    timeout_seconds: pydantic.PositiveFloat = 10
    max_batch_size: pydantic.PositiveInt | None = None
    # Top up a walk's last, part-full batch request with other entities of the type that are due
    # anyway (the call costs the same); their hydrations are stored and reused when they are claimed.
    fill_batches: bool = True
    max_retries: pydantic.NonNegativeInt = 4
    max_body_bytes: pydantic.PositiveInt = 1024 * 1024
    circuit_failure_threshold: pydantic.PositiveInt = 5
    circuit_reset: Duration = timedelta(seconds=15)

    def resolved_base_url(self, environ: dict[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        chosen = (self.base_url_env and env.get(self.base_url_env)) or str(self.base_url)
        return chosen.rstrip("/")


class Reference(_Model):
    field: FieldPath
    type: Name

    @pydantic.field_validator("field", mode="before")
    @classmethod
    def _parse_field(cls, value: Any) -> FieldPath:
        return value if isinstance(value, FieldPath) else FieldPath.parse(str(value))


class EntityType(_Model):
    source: Name
    path: str
    batch_path: str | None = None
    name_field: str = "name"
    search_attributes: tuple[str, ...] = ()
    references: dict[Name, Reference] = {}

    @pydantic.field_validator("path")
    @classmethod
    def _one_id_segment(cls, value: str) -> str:
        segments = value.split("/")
        if not value.startswith("/") or segments.count("{id}") != 1 or value.count("{") != 1:
            raise ValueError(f"{value!r} must start with / and hold {{id}} exactly once, as a whole segment")
        return value

    @pydantic.field_validator("batch_path")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or "{" in value):
            raise ValueError(f"{value!r} must start with / and take no placeholders (ids go in ?ids=)")
        return value


class EdgeRule(_Model):
    relation: Name
    path: tuple[Name, ...] = pydantic.Field(min_length=1)


class Defaults(_Model):
    # The Dagster partitions: windows of first_seen_at, from partition_start on.
    partition_granularity: Literal["hour", "day"] = "day"
    partition_start: date = date(2026, 1, 1)
    staleness_budget: Duration = timedelta(hours=1)
    refresh_interval: Duration = timedelta(days=1)
    hydration_ttl: Duration = timedelta(minutes=10)
    max_attempts: pydantic.PositiveInt = 5
    retry_base_delay: Duration = timedelta(seconds=30)
    retry_max_delay: Duration = timedelta(hours=1)
    # Search documents list at most this many relationships per (relation, direction) and references
    # per field, first by the other end's id; relationship_totals counts them all, and the read API
    # serves the full lists. A hub (the team behind every model) is rewritten whenever any of its
    # edges changes, and every nested relationship costs the search server a hidden document.
    document_relationship_cap: pydantic.PositiveInt = 25


class TypePolicy(_Model):
    edges: tuple[EdgeRule, ...] = ()
    staleness_budget: Duration | None = None
    refresh_interval: Duration | None = None
    hydration_ttl: Duration | None = None
    max_attempts: pydantic.PositiveInt | None = None
    priority: int = 0


@dataclass(frozen=True)
class EffectivePolicy:
    """A type's policy with every default filled in."""

    entity_type: str
    edges: tuple[EdgeRule, ...]
    staleness_budget: timedelta
    refresh_interval: timedelta
    hydration_ttl: timedelta
    max_attempts: int
    retry_base_delay: timedelta
    retry_max_delay: timedelta
    priority: int


class Policy(_Model):
    defaults: Defaults = Defaults()
    sources: dict[Name, Source] = pydantic.Field(min_length=1)
    entity_types: dict[Name, EntityType] = pydantic.Field(min_length=1)
    policies: dict[Name, TypePolicy] = {}

    @pydantic.model_validator(mode="after")
    def _cross_references(self) -> Policy:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        for name, etype in self.entity_types.items():
            if etype.source not in self.sources:
                problems.append(
                    (
                        (("entity_types", name, "source")),
                        f"unknown source {etype.source!r}; declared: {sorted(self.sources)}",
                    )
                )
            elif etype.batch_path and self.sources[etype.source].max_batch_size is None:
                problems.append(
                    (
                        ("entity_types", name, "batch_path"),
                        f"source {etype.source!r} sets no max_batch_size for batch requests",
                    )
                )
            for ref_name, ref in etype.references.items():
                if ref.type not in self.entity_types:
                    problems.append(
                        (
                            ("entity_types", name, "references", ref_name, "type"),
                            f"unknown entity type {ref.type!r}; declared: {sorted(self.entity_types)}",
                        )
                    )
        for name, policy in self.policies.items():
            if name not in self.entity_types:
                problems.append(
                    (("policies", name), f"unknown entity type {name!r}; declared: {sorted(self.entity_types)}")
                )
                continue
            relations = [rule.relation for rule in policy.edges]
            for index, rule in enumerate(policy.edges):
                if relations.count(rule.relation) > 1:
                    problems.append(
                        (
                            ("policies", name, "edges", index, "relation"),
                            f"relation {rule.relation!r} is declared twice",
                        )
                    )
                current = name
                for hop, ref_name in enumerate(rule.path):
                    refs = self.entity_types[current].references if current in self.entity_types else {}
                    if ref_name not in refs:
                        problems.append(
                            (
                                ("policies", name, "edges", index, "path", hop),
                                f"{ref_name!r} is not a reference of {current}; it has: {sorted(refs) or 'none'}",
                            )
                        )
                        break
                    current = refs[ref_name].type
        if problems:
            raise _CrossReferenceErrors(problems)
        return self

    def effective(self, entity_type: str) -> EffectivePolicy:
        """The policy for any declared type: types without one are hydrated and marked, no edges."""
        policy = self.policies.get(entity_type, TypePolicy())
        d = self.defaults
        return EffectivePolicy(
            entity_type=entity_type,
            edges=policy.edges,
            staleness_budget=policy.staleness_budget or d.staleness_budget,
            refresh_interval=policy.refresh_interval or d.refresh_interval,
            hydration_ttl=policy.hydration_ttl or d.hydration_ttl,
            max_attempts=policy.max_attempts or d.max_attempts,
            retry_base_delay=d.retry_base_delay,
            retry_max_delay=d.retry_max_delay,
            priority=policy.priority,
        )

    def edge_target_type(self, entity_type: str, rule: EdgeRule) -> str:
        current = entity_type
        for ref_name in rule.path:
            current = self.entity_types[current].references[ref_name].type
        return current

    def sources_touched(self, entity_type: str) -> list[str]:
        """The source systems one enrichment of ``entity_type`` may call: its own, and the owner of
        every type its policy paths pass through. Sorted."""
        touched = {self.entity_types[entity_type].source}
        for rule in self.effective(entity_type).edges:
            current = entity_type
            for ref_name in rule.path:
                current = self.entity_types[current].references[ref_name].type
                touched.add(self.entity_types[current].source)
        return sorted(touched)

    @cached_property
    def entity_type_names(self) -> frozenset[str]:
        return frozenset(self.entity_types)


class _CrossReferenceErrors(ValueError):
    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in problems))


@dataclass(frozen=True)
class PolicyProblem:
    key: str
    message: str
    line: int | None

    def __str__(self) -> str:
        where = f"line {self.line}, " if self.line else ""
        key = "" if self.key.startswith("(") else f"{self.key}: "
        return f"{where}{key}{self.message}"


class PolicyError(ValueError):
    """A policy file that cannot be used; ``problems`` names each key (and line) at fault."""

    def __init__(self, path: Path | str, problems: list[PolicyProblem]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__(f"{path}: " + "; ".join(str(p) for p in problems))


def load_policy(path: Path | str) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise PolicyError(
            path, [PolicyProblem("(file)", f"cannot read policy file: {error.strerror}", None)]
        ) from error
    return parse_policy(text, source_name=str(path))


def parse_policy(text: str, *, source_name: str = "<policy>") -> Policy:
    try:
        document = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        raise PolicyError(
            source_name, [PolicyProblem("(yaml)", str(error).splitlines()[0], mark.line + 1 if mark else None)]
        ) from error
    if not isinstance(document, dict):
        raise PolicyError(source_name, [PolicyProblem("(root)", "the policy file must be a mapping", 1)])
    try:
        return Policy.model_validate(document)
    except pydantic.ValidationError as error:
        problems = []
        for detail in error.errors(include_url=False):
            ctx_error = (detail.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _CrossReferenceErrors):
                problems += [PolicyProblem(_dotted(loc), msg, _line_for(lines, loc)) for loc, msg in ctx_error.problems]
                continue
            loc = tuple(detail["loc"])
            message = detail["msg"].removeprefix("Value error, ")
            problems.append(PolicyProblem(_dotted(loc) or "(root)", message, _line_for(lines, loc)))
        raise PolicyError(source_name, problems) from None


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _key_lines(node: yaml.Node | None, prefix: tuple[str | int, ...] = ()) -> dict[tuple[str | int, ...], int]:
    """Map every key path in a composed YAML document to its 1-based line."""
    lines: dict[tuple[str | int, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, index)
            lines[path] = item.start_mark.line + 1
            lines.update(_key_lines(item, path))
    return lines


def _line_for(lines: dict[tuple[str | int, ...], int], loc: tuple[str | int, ...]) -> int | None:
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
