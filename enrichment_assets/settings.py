"""Runtime configuration, read from the environment once per process (never at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from enrichment_assets.policy import Policy, PolicyError, load_policy

DEFAULT_DATABASE_URL = "sqlite:///.enrichment/facts.db"
SHIPPED_POLICY = Path(__file__).parent / "policies" / "mds.yaml"


class ConfigError(ValueError):
    """The environment or a referenced file is not usable; the message says which and how to fix it."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    policy_path: Path = SHIPPED_POLICY
    entity_types: frozenset[str] = frozenset()
    policy: Policy | None = field(default=None, repr=False, compare=False)
    max_events: int = 10_000
    max_body_bytes: int = 10 * 1024 * 1024
    # Kept out of repr so it can never reach a log line or a traceback by accident.
    api_token: str | None = field(default=None, repr=False)
    # Unset: search is off (the API answers 503 on /v1/search; enrichment does not index).
    elasticsearch_url: str | None = field(default=None, repr=False)
    index_alias: str = "enrichment-entities"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        policy_path = Path(env.get("ENRICHMENT_POLICY") or SHIPPED_POLICY)
        try:
            policy = load_policy(policy_path)
        except PolicyError as error:
            raise ConfigError(f"ENRICHMENT_POLICY: {error}") from None
        return cls(
            database_url=env.get("ENRICHMENT_DATABASE_URL") or DEFAULT_DATABASE_URL,
            policy_path=policy_path,
            entity_types=policy.entity_type_names,
            policy=policy,
            max_events=_positive_int(env, "ENRICHMENT_MAX_EVENTS", cls.max_events),
            max_body_bytes=_positive_int(env, "ENRICHMENT_MAX_BODY_BYTES", cls.max_body_bytes),
            api_token=env.get("ENRICHMENT_API_TOKEN") or None,
            elasticsearch_url=env.get("ELASTICSEARCH_URL") or None,
            index_alias=env.get("ENRICHMENT_INDEX_ALIAS") or cls.index_alias,
        )


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive integer, not {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, not {raw!r}")
    return value
