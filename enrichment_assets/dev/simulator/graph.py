"""The seeded, MDS-shaped entity graph the simulator serves, and the answers tests expect from it.

``generate_graph(seed, scale)`` is a pure function of its arguments. At scale 1 it holds about 10,000
model instances, 2,000 pipeline runs, 400 A/B tests, 1,000 models, 500 features, 300 datasets, 200 users
and 40 teams; counts scale linearly with at least two of each. Fan-in is skewed the way real estates
are: a few pipeline runs (and models) carry most model instances, a third of the runs are in no test.

The expected-edge helpers walk the graph with their own field-path reader, independently of the
enrichment code, so a test can compare what enrichment derived with what the sources actually say.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from enrichment_assets.dev.simulator.catalog import DERIVED_EDGES, REFERENCES

Entity = dict[str, Any]

BASE_COUNTS: Mapping[str, int] = {
    "model_instance": 10_000,
    "pipeline_run": 2_000,
    "ab_test": 400,
    "model": 1_000,
    "feature": 500,
    "dataset": 300,
    "user": 200,
    "team": 40,
}
ID_FORMATS: Mapping[str, str] = {
    "model_instance": "mi-{:06d}",
    "pipeline_run": "run-{:05d}",
    "ab_test": "ab-{:04d}",
    "model": "model-{:04d}",
    "feature": "feat-{:04d}",
    "dataset": "ds-{:04d}",
    "user": "user-{:04d}",
    "team": "team-{:02d}",
}
EPOCH = datetime(2026, 1, 1, tzinfo=UTC)

_TOPICS = (
    "artwork",
    "search",
    "ranking",
    "churn",
    "encoding",
    "billing",
    "playback",
    "ads",
    "title",
    "member",
)
_KINDS = ("ranker", "classifier", "embedder", "forecaster", "scorer", "recommender")
_FIRST = ("Ada", "Bo", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivo", "Jun", "Kira", "Lars")
_LAST = ("Okafor", "Silva", "Novak", "Tanaka", "Haddad", "Berg", "Moreau", "Ivanova", "Reyes", "Kim")


@dataclass(frozen=True)
class MdsGraph:
    """Entity JSON by type and id. Treat the dicts as read-only: the app serves them as they are."""

    seed: int
    scale: float
    entities: Mapping[str, Mapping[str, Entity]]

    def get(self, entity_type: str, entity_id: str) -> Entity | None:
        """The entity's JSON, or None if there is no such entity."""
        return self.entities.get(entity_type, {}).get(entity_id)

    def ids(self, entity_type: str) -> list[str]:
        """All ids of one type, in id order."""
        return list(self.entities.get(entity_type, {}))

    def counts(self) -> dict[str, int]:
        """Number of entities per type."""
        return {entity_type: len(by_id) for entity_type, by_id in self.entities.items()}

    def items(self) -> Iterator[tuple[str, Entity]]:
        """Every (entity type, entity JSON) pair."""
        for entity_type, by_id in self.entities.items():
            for entity in by_id.values():
                yield entity_type, entity

    def follow(self, entity_type: str, entity_id: str, field_path: str) -> list[str]:
        """The ids one field path reads from one entity (``"ab_test_cells[*].test_id"``), in order."""
        entity = self.get(entity_type, entity_id)
        return [] if entity is None else field_values(entity, field_path)

    def walk(self, entity_type: str, entity_id: str, hops: Sequence[str]) -> set[str]:
        """Ids reached by following reference names hop by hop. Like the enrichment walker, a path only
        goes on through (and ends at) entities that exist."""
        frontier = {(entity_type, entity_id)} if self.get(entity_type, entity_id) else set()
        for hop in hops:
            reached: set[tuple[str, str]] = set()
            for current_type, current_id in frontier:
                field, target_type = REFERENCES[current_type][hop]
                for target in self.follow(current_type, current_id, field):
                    if self.get(target_type, target) is not None:
                        reached.add((target_type, target))
            frontier = reached
        return {target for _, target in frontier}

    def expected_edges(self, entity_type: str, entity_id: str) -> dict[str, set[str]]:
        """Every derived edge the MDS policies should give this entity: relation -> target ids."""
        return {
            relation: self.walk(entity_type, entity_id, hops)
            for relation, hops in DERIVED_EDGES.get(entity_type, {}).items()
        }

    def ab_tests_for_model_instance(self, model_instance_id: str) -> set[str]:
        """The 3-hop MDS question: instance -> pipeline run -> A/B test cell -> A/B test."""
        return self.walk("model_instance", model_instance_id, DERIVED_EDGES["model_instance"]["evaluated_in"])


def field_values(entity: Mapping[str, Any], field_path: str) -> list[str]:
    """Read a dotted field path with ``[*]`` fan-out from entity JSON; non-string leaves are skipped."""
    nodes: list[Any] = [entity]
    for part in field_path.split("."):
        name, fan_out = (part[:-3], True) if part.endswith("[*]") else (part, False)
        stepped = [node.get(name) for node in nodes if isinstance(node, Mapping)]
        if fan_out:
            stepped = [item for value in stepped if isinstance(value, list) for item in value]
        nodes = stepped
    return [node for node in nodes if isinstance(node, str)]


def count_for(entity_type: str, scale: float) -> int:
    """How many entities of a type ``generate_graph`` makes at ``scale`` (never fewer than two)."""
    return max(2, round(BASE_COUNTS[entity_type] * scale))


def generate_graph(seed: int, scale: float = 1.0) -> MdsGraph:
    """Build the graph for ``seed`` and ``scale``; the same arguments always give an equal graph."""
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    rng = random.Random(seed)
    ids = {t: [ID_FORMATS[t].format(n) for n in range(1, count_for(t, scale) + 1)] for t in BASE_COUNTS}
    out: dict[str, dict[str, Entity]] = {t: {} for t in BASE_COUNTS}

    for i, team_id in enumerate(ids["team"]):
        out["team"][team_id] = {"id": team_id, "name": f"{_TOPICS[i % len(_TOPICS)]} team {i + 1}"}
    for user_id in ids["user"]:
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        out["user"][user_id] = {"id": user_id, "name": name, "team_id": rng.choice(ids["team"])}
    for dataset_id in ids["dataset"]:
        kind = rng.choice(("events", "labels", "snapshots", "logs"))
        name = f"{rng.choice(_TOPICS)}_{kind}_{dataset_id[3:]}"
        out["dataset"][dataset_id] = {
            "id": dataset_id,
            "name": name,
            "format": rng.choice(("parquet", "iceberg", "avro", "csv")),
        }
    for feature_id in ids["feature"]:
        out["feature"][feature_id] = {
            "id": feature_id,
            "name": f"{rng.choice(_TOPICS)}_signal_{feature_id[5:]}",
            "dataset_id": rng.choice(ids["dataset"]),
        }
    for test_id in ids["ab_test"]:
        out["ab_test"][test_id] = {
            "id": test_id,
            "name": f"{rng.choice(_TOPICS)} experiment {test_id[3:]}",
            "status": rng.choices(("running", "completed", "draft"), (5, 4, 1))[0],
            "cells": list("ABCD"[: rng.randint(2, 4)]),
        }
    for model_id in ids["model"]:
        out["model"][model_id] = {
            "id": model_id,
            "name": f"{rng.choice(_TOPICS)}-{rng.choice(_KINDS)}-{model_id[6:]}",
            "framework": rng.choice(("pytorch", "tensorflow", "xgboost", "lightgbm", "sklearn")),
            "owner_id": rng.choice(ids["user"]),
            "created_at": _stamp(rng.uniform(0, 30 * 86400)),
        }
    for run_id in ids["pipeline_run"]:
        in_tests = rng.choices((0, 1, 2, 3), (35, 35, 20, 10))[0]  # a third of the runs are in no test
        tests = rng.sample(ids["ab_test"], min(len(ids["ab_test"]), in_tests))
        out["pipeline_run"][run_id] = {
            "id": run_id,
            "name": f"train-{rng.choice(_TOPICS)}-{run_id[4:]}",
            "status": rng.choices(("succeeded", "failed", "running"), (8, 1, 1))[0],
            "input_dataset_ids": rng.sample(ids["dataset"], min(len(ids["dataset"]), rng.randint(1, 4))),
            "ab_test_cells": [{"test_id": t, "cell": rng.choice(out["ab_test"][t]["cells"])} for t in tests],
            "started_at": _stamp(rng.uniform(30 * 86400, 90 * 86400)),
        }

    runs = _zipf_draws(rng, ids["pipeline_run"], len(ids["model_instance"]), exponent=0.9)
    models = _zipf_draws(rng, ids["model"], len(ids["model_instance"]), exponent=0.7)
    for mi_id, run_id, model_id in zip(ids["model_instance"], runs, models, strict=True):
        run_start = datetime.fromisoformat(out["pipeline_run"][run_id]["started_at"])
        out["model_instance"][mi_id] = {
            "id": mi_id,
            "name": f"{out['model'][model_id]['name']}#{mi_id[3:]}",
            "stage": rng.choices(("development", "staging", "production", "archived"), (4, 2, 3, 1))[0],
            "model_id": model_id,
            "pipeline_run_id": run_id,
            "feature_ids": rng.sample(ids["feature"], min(len(ids["feature"]), rng.randint(1, 6))),
            "created_at": _stamp((run_start - EPOCH).total_seconds() + rng.uniform(3600, 48 * 3600)),
        }
    return MdsGraph(seed=seed, scale=scale, entities=out)


def _zipf_draws(rng: random.Random, population: list[str], k: int, *, exponent: float) -> list[str]:
    """``k`` draws where the r-th most popular item (popularity order shuffled) has weight 1/r^exponent."""
    ranked = rng.sample(population, len(population))
    weights = [1.0 / (rank**exponent) for rank in range(1, len(ranked) + 1)]
    return rng.choices(ranked, weights=weights, k=k)


def _stamp(seconds_after_epoch: float) -> str:
    return (EPOCH + timedelta(seconds=int(seconds_after_epoch))).isoformat().replace("+00:00", "Z")
