"""Configuration from the environment: defaults, the entity types a policy file declares, and errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from enrichment_assets.settings import DEFAULT_DATABASE_URL, ConfigError, Settings


def test_defaults_read_types_from_the_shipped_policy() -> None:
    settings = Settings.from_env({})
    assert settings.database_url == DEFAULT_DATABASE_URL
    assert settings.api_token is None
    assert (settings.max_events, settings.max_body_bytes) == (10_000, 10 * 1024 * 1024)
    assert len(settings.entity_types) >= 6


def test_types_come_from_the_policy_file_named(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "sources: {shop: {base_url: 'http://127.0.0.1:9'}}\n"
        "entity_types:\n  widget: {source: shop, path: '/w/{id}'}\n  gadget: {source: shop, path: '/g/{id}'}\n"
    )
    settings = Settings.from_env({"ENRICHMENT_POLICY": str(policy), "ENRICHMENT_MAX_EVENTS": "7"})
    assert settings.entity_types == {"widget", "gadget"}
    assert settings.max_events == 7


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ENRICHMENT_MAX_EVENTS": "lots"}, "ENRICHMENT_MAX_EVENTS must be a positive integer"),
        ({"ENRICHMENT_MAX_BODY_BYTES": "0"}, "ENRICHMENT_MAX_BODY_BYTES must be a positive integer"),
        ({"ENRICHMENT_POLICY": "/nonexistent/policy.yaml"}, "cannot read policy file"),
    ],
    ids=["max-events", "max-body", "missing-policy"],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("entity_types: [a, b]\n", "entity_types: Input should be a valid dictionary"),
        ("entity_types: {a: [\n", "line 2, while parsing"),
        (
            "sources: {s: {base_url: 'http://x'}}\nentity_types: {a: {source: t, path: '/a/{id}'}}\n",
            "line 2, entity_types.a.source: unknown source 't'",
        ),
    ],
    ids=["list", "broken-yaml", "unknown-source"],
)
def test_bad_policy_file_is_named(tmp_path: Path, text: str, message: str) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(text)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"ENRICHMENT_POLICY": str(policy)})
