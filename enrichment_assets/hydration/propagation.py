"""Change propagation: when an entity's attributes change at its source, the roots whose derived edges
were walked through it must be walked again.

A change to the entity at hop ``k`` of a policy path (0 < k < len(path)) can change what the path
reaches, so the recorded references are followed backwards, hop ``k`` to hop 0, to find those roots.
The last entity of a path only has to exist, so its own changes propagate nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from enrichment_assets.factstore import EntityKey, FactStore
from enrichment_assets.policy import Policy


def affected_roots(store: FactStore, policy: Policy, changed: Iterable[EntityKey]) -> set[EntityKey]:
    by_type: dict[str, set[str]] = defaultdict(set)
    for entity_type, entity_id in changed:
        by_type[entity_type].add(entity_id)
    roots: set[EntityKey] = set()
    if not by_type:
        return roots
    for root_type in policy.entity_types:
        for rule in policy.effective(root_type).edges:
            types = [root_type]
            for hop in rule.path:
                types.append(policy.entity_types[types[-1]].references[hop].type)
            for k in range(1, len(rule.path)):
                ids = by_type.get(types[k], set())
                for j in range(k, 0, -1):
                    if not ids:
                        break
                    ids = {i for t, i in store.referrers(rule.path[j - 1], types[j], sorted(ids)) if t == types[j - 1]}
                roots.update((root_type, i) for i in ids)
    return roots
