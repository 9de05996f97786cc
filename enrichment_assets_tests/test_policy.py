"""The policy file: the shipped MDS example loads, defaults fill in, and every kind of mistake is
rejected with a message that names the key (and line) at fault."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from enrichment_assets.cli import main
from enrichment_assets.policy import FieldPath, PolicyError, load_policy, parse_duration, parse_policy
from enrichment_assets.settings import SHIPPED_POLICY

MDS = SHIPPED_POLICY.read_text()


def test_shipped_policy_models_the_three_hop_example() -> None:
    policy = load_policy(SHIPPED_POLICY)
    assert len(policy.sources) == 6
    instance = policy.effective("model_instance")
    rules = {rule.relation: rule for rule in instance.edges}
    assert rules["evaluated_in"].path == ("pipeline_run", "ab_tests")
    assert policy.edge_target_type("model_instance", rules["evaluated_in"]) == "ab_test"
    assert policy.edge_target_type("model_instance", rules["owned_by_team"]) == "team"
    assert policy.edge_target_type("model_instance", rules["trained_on"]) == "dataset"
    assert instance.staleness_budget == timedelta(minutes=30)


def test_types_without_a_policy_get_the_defaults() -> None:
    policy = load_policy(SHIPPED_POLICY)
    team = policy.effective("team")
    assert team.edges == ()
    assert team.max_attempts == policy.defaults.max_attempts
    assert team.refresh_interval == policy.defaults.refresh_interval


def test_base_url_comes_from_env_when_set() -> None:
    source = load_policy(SHIPPED_POLICY).sources["identity"]
    assert source.resolved_base_url({}) == "http://127.0.0.1:8700/identity"
    assert source.resolved_base_url({"MDS_IDENTITY_URL": "https://id.internal/api/"}) == "https://id.internal/api"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "path: [pipeline_run, ab_tests]",
            "path: [pipeline_run, ab_testz]",
            "policies.model_instance.edges[0].path[1]: 'ab_testz' is not a reference of pipeline_run",
        ),
        (
            "source: feature_store\n    path",
            "source: feature_shop\n    path",
            "entity_types.feature.source: unknown source 'feature_shop'",
        ),
        (
            "{field: team_id, type: team}",
            "{field: team_id, type: squad}",
            "entity_types.user.references.team.type: unknown entity type 'squad'",
        ),
        ("path: /tests/{id}", "path: /tests/{id}/{id}", "entity_types.ab_test.path:"),
        ("path: /datasets/{id}", "path: datasets/{id}", "entity_types.dataset.path:"),
        (
            '{field: "ab_test_cells[*].test_id"',
            '{field: "ab_test_cells[*]..test_id"',
            "entity_types.pipeline_run.references.ab_tests.field: 'ab_test_cells[*]..test_id' is not a field path",
        ),
        (
            "staleness_budget: 2h",
            "staleness_budget: soon",
            "policies.feature.staleness_budget: 'soon' is not a duration",
        ),
        (
            "requests_per_second: 50\n    max_concurrency: 4\n    timeout_seconds: 5\n    max_batch_size: 50",
            "requests_per_second: 0\n    max_concurrency: 4\n    timeout_seconds: 5\n    max_batch_size: 50",
            "sources.experimentation_platform.requests_per_second: Input should be greater than 0",
        ),
        ("  feature:\n    edges", "  featur:\n    edges", "policies.featur: unknown entity type 'featur'"),
        (
            "relation: trained_on",
            "relation: evaluated_in",
            "policies.model_instance.edges[1].relation: relation 'evaluated_in' is declared twice",
        ),
        (
            "    max_batch_size: 100\n\nentity_types",
            "\nentity_types",
            "entity_types.user.batch_path: source 'identity' sets no max_batch_size",
        ),
        (
            "    name_field: name\n    search_attributes: [name, format]",
            "    name_feld: name",
            "entity_types.dataset.name_feld: Extra inputs are not permitted",
        ),
    ],
    ids=[
        "bad-hop",
        "unknown-source",
        "unknown-ref-type",
        "two-ids",
        "relative-path",
        "bad-field-path",
        "bad-duration",
        "zero-rate",
        "policy-for-unknown-type",
        "duplicate-relation",
        "batch-without-size",
        "typo-key",
    ],
)
def test_mistakes_name_the_key_and_line(old: str, new: str, expected: str) -> None:
    assert old in MDS, "the mutation must apply to the shipped file"
    with pytest.raises(PolicyError) as caught:
        parse_policy(MDS.replace(old, new, 1), source_name="mds.yaml")
    messages = [str(p) for p in caught.value.problems]
    assert any(expected in m for m in messages), messages
    assert all(p.line is not None and p.line > 0 for p in caught.value.problems)


def test_line_numbers_point_at_the_key() -> None:
    broken = MDS.replace("source: feature_store\n    path", "source: nowhere\n    path")
    with pytest.raises(PolicyError) as caught:
        parse_policy(broken)
    [problem] = caught.value.problems
    assert broken.splitlines()[problem.line - 1].strip() == "source: nowhere"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("10m", 600), ("6h", 21600), ("1d", 86400), (45, 45), ("1.5h", 5400)],
    ids=["ms", "s", "m", "h", "d", "bare-number", "fraction"],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("owner_id", (("owner_id", False),)),
        ("feature_ids[*]", (("feature_ids", True),)),
        ("ab_test_cells[*].test_id", (("ab_test_cells", True), ("test_id", False))),
    ],
    ids=["plain", "list", "list-of-objects"],
)
def test_field_paths(text: str, segments: tuple[tuple[str, bool], ...]) -> None:
    assert FieldPath.parse(text).segments == segments


def test_cli_validate(tmp_path: Path) -> None:
    ok = CliRunner().invoke(main, ["policy", "validate", str(SHIPPED_POLICY)])
    assert ok.exit_code == 0 and "is valid" in ok.output and "evaluated_in" in ok.output
    assert "Dagster branches" in ok.output and "model_registry" in ok.output
    things = CliRunner().invoke(
        main, ["policy", "validate", str(Path(__file__).parent / "policies" / "things.yaml")], env={"COLUMNS": "200"}
    )
    assert "no policy: hydrated only as a hop" in " ".join(things.output.split())
    bad = tmp_path / "bad.yaml"
    bad.write_text(MDS.replace("type: ab_test}", "type: ab_tst}"))
    result = CliRunner().invoke(main, ["policy", "validate", str(bad)])
    assert result.exit_code == 1
    assert "entity_types.pipeline_run.references.ab_tests.type: unknown entity type 'ab_tst'" in result.output
