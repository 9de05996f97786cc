"""The six MDS source systems as the simulator plays them: URL prefixes, routes and references.

This mirrors ``policies/mds.yaml`` (the contract) by hand, on purpose: the simulator stands in for
systems the enrichment code only knows through that file, so it must not read the file itself. The
tests compare this catalog with the YAML, so a drift on either side fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes


@dataclass(frozen=True)
class SourceSpec:
    """One source system: its URL prefix on the simulator's port, the environment variable the
    policy reads its base URL from, and its batch size limit."""

    name: str
    prefix: str
    base_url_env: str
    max_batch_size: int | None


@dataclass(frozen=True)
class TypeSpec:
    """One entity type: its source, its single-entity path (``{id}`` is one segment) and batch path."""

    name: str
    source: str
    path: str
    batch_path: str | None


SOURCES: Mapping[str, SourceSpec] = {
    s.name: s
    for s in (
        SourceSpec("model_registry", "/model-registry", "MDS_MODEL_REGISTRY_URL", 100),
        SourceSpec("pipeline_orchestration", "/pipeline-orchestration", "MDS_PIPELINE_ORCHESTRATION_URL", 50),
        SourceSpec("experimentation_platform", "/experimentation", "MDS_EXPERIMENTATION_URL", 50),
        SourceSpec("feature_store", "/feature-store", "MDS_FEATURE_STORE_URL", 100),
        SourceSpec("datasets", "/datasets", "MDS_DATASETS_URL", 100),
        SourceSpec("identity", "/identity", "MDS_IDENTITY_URL", 100),
    )
}

ENTITY_TYPES: Mapping[str, TypeSpec] = {
    t.name: t
    for t in (
        TypeSpec("model", "model_registry", "/models/{id}", "/models"),
        TypeSpec("model_instance", "model_registry", "/model-instances/{id}", "/model-instances"),
        TypeSpec("pipeline_run", "pipeline_orchestration", "/runs/{id}", "/runs"),
        TypeSpec("ab_test", "experimentation_platform", "/tests/{id}", "/tests"),
        TypeSpec("feature", "feature_store", "/features/{id}", "/features"),
        TypeSpec("dataset", "datasets", "/datasets/{id}", "/datasets"),
        TypeSpec("user", "identity", "/users/{id}", "/users"),
        TypeSpec("team", "identity", "/teams/{id}", "/teams"),
    )
}

# entity type -> reference name -> (field path, referenced type)
REFERENCES: Mapping[str, Mapping[str, tuple[str, str]]] = {
    "model": {"owner": ("owner_id", "user")},
    "model_instance": {
        "model": ("model_id", "model"),
        "pipeline_run": ("pipeline_run_id", "pipeline_run"),
        "features": ("feature_ids[*]", "feature"),
    },
    "pipeline_run": {
        "ab_tests": ("ab_test_cells[*].test_id", "ab_test"),
        "inputs": ("input_dataset_ids[*]", "dataset"),
    },
    "feature": {"dataset": ("dataset_id", "dataset")},
    "user": {"team": ("team_id", "team")},
}

# entity type -> relation -> reference names walked hop by hop (the policies in mds.yaml)
DERIVED_EDGES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "model_instance": {
        "evaluated_in": ("pipeline_run", "ab_tests"),
        "trained_on": ("pipeline_run", "inputs"),
        "uses_feature": ("features",),
        "owned_by_team": ("model", "owner", "team"),
    },
    "pipeline_run": {"evaluated_in": ("ab_tests",), "read": ("inputs",)},
    "feature": {"derived_from": ("dataset",)},
    "model": {"owned_by_team": ("owner", "team")},
    "user": {"member_of": ("team",)},
}


@dataclass(frozen=True)
class RouteMatch:
    """What a request path names. ``entity_type`` is None for a path under a source that is no route;
    ``entity_id`` is None for a batch request."""

    source: SourceSpec
    entity_type: TypeSpec | None = None
    entity_id: str | None = None


def _segments(template: str) -> tuple[str, ...]:
    return tuple(template.strip("/").split("/"))


_PREFIXES = {_segments(s.prefix)[0]: s for s in SOURCES.values()}
_SINGLE = {(t.source, _segments(t.path)[:-1]): t for t in ENTITY_TYPES.values()}
_BATCH = {(t.source, _segments(t.batch_path)): t for t in ENTITY_TYPES.values() if t.batch_path}


def match_raw_path(raw_path: bytes) -> RouteMatch | None:
    """Route a request by its *raw* path, segment by segment.

    The id segment is percent-decoded on its own, after the split, so ``%2F`` stays inside the id and
    ``..`` or ``%2E%2E`` are ids like any other: nothing is ever resolved against the path. None means
    the first segment names no source.
    """
    parts = raw_path.decode("latin-1").split("/")
    if len(parts) < 2 or parts[0] != "" or parts[1] not in _PREFIXES:
        return None
    source = _PREFIXES[parts[1]]
    rest = tuple(parts[2:])
    batch = _BATCH.get((source.name, rest))
    if batch is not None:
        return RouteMatch(source, batch)
    single = _SINGLE.get((source.name, rest[:-1])) if rest else None
    if single is None or not rest[-1]:
        return RouteMatch(source)
    try:
        entity_id = unquote_to_bytes(rest[-1]).decode("utf-8")
    except UnicodeDecodeError:
        return RouteMatch(source)
    return RouteMatch(source, single, entity_id)
