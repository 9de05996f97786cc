"""The graph as the sources currently answer it: the generated graph plus run-time edits.

Edits (mutations, additions, deletions) live in a copy-on-write overlay keyed by (type, id), so the
generated graph is never touched, an edit costs one entity, and resetting the graph drops the overlay.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from enrichment_assets.dev.simulator.graph import Entity, MdsGraph


class EntityEditError(ValueError):
    """An edit that cannot apply, such as a change to an entity's id."""


class UnknownEntity(EntityEditError):
    """The entity to edit does not exist."""


class LiveGraph:
    """Reads go to the overlay first, then to the generated graph. A None in the overlay is a deletion."""

    def __init__(self, base: MdsGraph) -> None:
        self.base = base
        self._overlay: dict[tuple[str, str], Entity | None] = {}

    def get(self, entity_type: str, entity_id: str) -> Entity | None:
        """What the owning source would answer for this entity now, or None."""
        key = (entity_type, entity_id)
        if key in self._overlay:
            return self._overlay[key]
        return self.base.get(entity_type, entity_id)

    def put(self, entity_type: str, entity: Mapping[str, Any]) -> Entity:
        """Add (or replace) an entity; it must carry a string ``id``."""
        entity_id = entity.get("id")
        if not isinstance(entity_id, str) or not entity_id:
            raise EntityEditError("an entity needs a non-empty string 'id'")
        stored = copy.deepcopy(dict(entity))
        self._overlay[(entity_type, entity_id)] = stored
        return stored

    def mutate(self, entity_type: str, entity_id: str, changes: Mapping[str, Any]) -> Entity:
        """Set top-level fields of an existing entity; from now on the source answers the new JSON."""
        current = self.get(entity_type, entity_id)
        if current is None:
            raise UnknownEntity(f"no {entity_type} {entity_id!r} to mutate")
        if "id" in changes and changes["id"] != entity_id:
            raise EntityEditError("a mutation cannot change an entity's id")
        return self.put(entity_type, {**current, **copy.deepcopy(dict(changes))})

    def delete(self, entity_type: str, entity_id: str) -> bool:
        """Make the entity answer 404 from now on; False if it did not exist."""
        existed = self.get(entity_type, entity_id) is not None
        self._overlay[(entity_type, entity_id)] = None
        return existed

    def reset(self) -> None:
        """Drop every edit: the sources answer the generated graph again."""
        self._overlay.clear()

    @property
    def edits(self) -> int:
        """Number of entities changed, added or deleted since start (or the last reset)."""
        return len(self._overlay)

    def snapshot(self) -> MdsGraph:
        """The current graph as an ``MdsGraph``, so tests can compute expected edges after edits."""
        if not self._overlay:
            return self.base
        entities = {t: dict(by_id) for t, by_id in self.base.entities.items()}
        for (entity_type, entity_id), entity in self._overlay.items():
            by_id = entities.setdefault(entity_type, {})
            if entity is None:
                by_id.pop(entity_id, None)
            else:
                by_id[entity_id] = entity
        return MdsGraph(seed=self.base.seed, scale=self.base.scale, entities=entities)

    def counts(self) -> dict[str, int]:
        """Number of entities per type as currently served."""
        return self.snapshot().counts() if self._overlay else self.base.counts()
