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
    # Reads (entities, edges, search) need this bearer token when it is set; /healthz never does.
    read_token: str | None = field(default=None, repr=False)
    # A request body must arrive whole within this many seconds of its headers (a trickling client
    # would otherwise hold a connection and an in-flight slot for as long as it likes).
    body_timeout_seconds: float = 30.0
    # Open connections uvicorn keeps at most, and requests the app serves at once (past either the
    # client gets 503; the app's own answer says Retry-After). In-flight must stay below connections.
    max_connections: int = 256
    max_in_flight: int = 64
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
        max_connections, max_in_flight = _concurrency_limits(env, cls.max_connections, cls.max_in_flight)
        return cls(
            database_url=env.get("ENRICHMENT_DATABASE_URL") or DEFAULT_DATABASE_URL,
            policy_path=policy_path,
            entity_types=policy.entity_type_names,
            policy=policy,
            max_events=_positive_int(env, "ENRICHMENT_MAX_EVENTS", cls.max_events),
            max_body_bytes=_positive_int(env, "ENRICHMENT_MAX_BODY_BYTES", cls.max_body_bytes),
            api_token=env.get("ENRICHMENT_API_TOKEN") or None,
            read_token=env.get("ENRICHMENT_READ_TOKEN") or None,
            body_timeout_seconds=_positive_float(env, "ENRICHMENT_BODY_TIMEOUT_SECONDS", cls.body_timeout_seconds),
            max_connections=max_connections,
            max_in_flight=max_in_flight,
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


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive number of seconds, not {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of seconds, not {raw!r}")
    return value


def _concurrency_limits(env: Mapping[str, str], connections: int, in_flight: int) -> tuple[int, int]:
    """``ENRICHMENT_MAX_CONNECTIONS`` and ``ENRICHMENT_MAX_IN_FLIGHT``, the second below the first:
    past the connection limit uvicorn answers a bare 503 without Retry-After, so the app's own limit
    must be the one a busy server reaches first."""
    max_connections = _positive_int(env, "ENRICHMENT_MAX_CONNECTIONS", connections)
    if max_connections < 2:
        raise ConfigError(f"ENRICHMENT_MAX_CONNECTIONS must be at least 2, not {max_connections}")
    if not env.get("ENRICHMENT_MAX_IN_FLIGHT"):
        return max_connections, min(in_flight, max_connections - 1)
    max_in_flight = _positive_int(env, "ENRICHMENT_MAX_IN_FLIGHT", in_flight)
    if max_in_flight >= max_connections:
        raise ConfigError(
            f"ENRICHMENT_MAX_IN_FLIGHT ({max_in_flight}) must be below ENRICHMENT_MAX_CONNECTIONS ({max_connections})"
        )
    return max_connections, max_in_flight
