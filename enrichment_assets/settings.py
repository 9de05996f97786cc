"""Runtime configuration, read from the environment once per process (never at import)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_DATABASE_URL = "sqlite:///.enrichment/facts.db"
SHIPPED_POLICY = Path(__file__).parent / "policies" / "mds.yaml"


class ConfigError(ValueError):
    """The environment or a referenced file is not usable; the message says which and how to fix it."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    policy_path: Path = SHIPPED_POLICY
    entity_types: frozenset[str] = frozenset()
    max_events: int = 10_000
    max_body_bytes: int = 10 * 1024 * 1024
    # Kept out of repr so it can never reach a log line or a traceback by accident.
    api_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        policy_path = Path(env.get("ENRICHMENT_POLICY") or SHIPPED_POLICY)
        listed = env.get("ENRICHMENT_ENTITY_TYPES", "")
        entity_types = (
            frozenset(t.strip() for t in listed.split(",") if t.strip())
            if listed.strip()
            else declared_entity_types(policy_path)
        )
        return cls(
            database_url=env.get("ENRICHMENT_DATABASE_URL") or DEFAULT_DATABASE_URL,
            policy_path=policy_path,
            entity_types=entity_types,
            max_events=_positive_int(env, "ENRICHMENT_MAX_EVENTS", cls.max_events),
            max_body_bytes=_positive_int(env, "ENRICHMENT_MAX_BODY_BYTES", cls.max_body_bytes),
            api_token=env.get("ENRICHMENT_API_TOKEN") or None,
        )


def declared_entity_types(policy_path: Path) -> frozenset[str]:
    """The entity types a policy file declares (the keys of its ``entity_types`` mapping)."""
    try:
        document = yaml.safe_load(policy_path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read policy file {policy_path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"policy file {policy_path} is not valid YAML: {error}") from error
    declared = document.get("entity_types") if isinstance(document, dict) else None
    if not isinstance(declared, dict) or not declared:
        raise ConfigError(f"policy file {policy_path}: 'entity_types' must be a non-empty mapping")
    return frozenset(str(name) for name in declared)


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
