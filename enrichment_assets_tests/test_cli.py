"""The ``enrichment`` command: ingesting NDJSON files (all-or-nothing), status, migrate, and the demo."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from enrichment_assets.cli import main
from enrichment_assets.events import Event
from enrichment_assets.factstore import FactStore
from enrichment_assets.factstore.migrations import head_revision

THINGS_POLICY = Path(__file__).parent / "policies" / "things.yaml"


@pytest.fixture
def env(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("ENRICHMENT_DATABASE_URL", database_url)
    monkeypatch.setenv("ENRICHMENT_POLICY", str(THINGS_POLICY))
    monkeypatch.delenv("ENRICHMENT_API_TOKEN", raising=False)
    return database_url


def write(path: Path, *events: dict[str, object]) -> Path:
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n")
    return path


def test_ingest_file_then_status(env: str, tmp_path: Path) -> None:
    events = [{"entity_type": "thing", "entity_id": f"t{i}", "event_type": "created"} for i in range(3)]
    events.append({"entity_type": "other", "entity_id": "o1", "event_type": "deleted"})
    runner = CliRunner()
    result = runner.invoke(main, ["ingest", str(write(tmp_path / "e.ndjson", *events))])
    assert result.exit_code == 0, result.output
    assert "ingested 4 events for 4 entities" in result.output
    status = runner.invoke(main, ["status"])
    assert status.exit_code == 0
    thing_row = next(line for line in status.output.splitlines() if line.startswith("│ thing"))
    assert [cell.strip() for cell in thing_row.split("│")[1:9]] == ["thing", "3", "0", "0", "0", "0", "3", "t0"]


def test_ingest_from_stdin(env: str) -> None:
    line = json.dumps({"entity_type": "thing", "entity_id": "s", "event_type": "created"})
    result = CliRunner().invoke(main, ["ingest", "-"], input=line + "\n")
    assert result.exit_code == 0, result.output
    assert FactStore.from_url(env).get_entity("thing", "s").state == "uncached"


def test_bad_file_is_rejected_whole_with_every_bad_line(env: str, tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.ndjson",
        {"entity_type": "thing", "entity_id": "good", "event_type": "created"},
        {"entity_type": "unknown", "entity_id": "x", "event_type": "created"},
        {"entity_type": "thing", "entity_id": "", "event_type": "created"},
    )
    result = CliRunner().invoke(main, ["ingest", str(path)])
    assert result.exit_code != 0
    assert "line 2" in result.output and "line 3" in result.output
    assert "nothing was written" in result.output
    assert FactStore.from_url(env).status() == []


def test_migrate_reports_the_revision(env: str) -> None:
    result = CliRunner().invoke(main, ["migrate"])
    assert result.exit_code == 0
    assert f"revision {head_revision()}" in result.output


def test_bad_configuration_is_a_clear_error(env: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ENRICHMENT_POLICY", str(tmp_path / "missing.yaml"))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code != 0
    assert "cannot read policy file" in result.output


@pytest.mark.timeout(600)
def test_demo_lets_dagster_enrich_everything_then_keeps_the_ui_up_until_ctrl_c(
    tmp_path: Path, elasticsearch_url: str
) -> None:
    """``make demo`` as a user runs it: embedded fact store, simulator, webserver and daemon; the sensor
    does the enriching. Ctrl-C stops every process it started, even when the demo was started with
    SIGINT ignored (what a background job of a non-interactive shell inherits)."""
    import re
    import signal
    import subprocess
    import sys

    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENRICHMENT_", "DAGSTER_", "DEMO_"))}
    env.update(
        {
            "ELASTICSEARCH_URL": elasticsearch_url,
            "ENRICHMENT_INDEX_ALIAS": f"demo-{tmp_path.name.lower()}",
            "COLUMNS": "200",
        }
    )
    demo = subprocess.Popen(
        [str(Path(sys.executable).parent / "enrichment"), "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    output = []
    try:
        for line in demo.stdout:  # type: ignore[union-attr]
            output.append(line)
            if "stays up until Ctrl-C" in line:
                break
        text = "".join(output)
        assert "stays up until Ctrl-C" in text, text
        ui = re.search(r"Dagster UI: (http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        assert httpx.get(f"{ui}/server_info", timeout=10).status_code == 200
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=90)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert demo.returncode == 0, text + rest
    assert "-> 422" in text and "-> 202" in text
    assert re.search(r"Dagster ran \d+ runs: \d+ success$", text, re.MULTILINE), text
    assert re.search(r"model_instance\s+│\s+0\s+│\s+0\s+│\s+1000\s+│", text), "all 1,000 instances enriched"
    assert "--evaluated_in--> ab_test" in text and "via pipeline_run" in text
    assert re.search(r"GET /v1/search\?type=model_instance -> \S+ .* state=fully_enriched staleness=", text)
    assert re.search(r"ingest -> searchable and enriched: p50 \d+ s, p95 \d+ s", text)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{ui}/server_info", timeout=5)
    # The embedded PostgreSQL and the search server ran from data directories under tmp_path.
    leftovers = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in leftovers, leftovers


def test_search_reindex_reconcile_and_edges_commands(
    env: str, monkeypatch: pytest.MonkeyPatch, elasticsearch_url: str
) -> None:
    monkeypatch.setenv("ELASTICSEARCH_URL", elasticsearch_url)
    monkeypatch.setenv("ENRICHMENT_INDEX_ALIAS", f"cli-{env.rsplit('/', 1)[-1].lower()[:20]}-{id(env)}")
    runner = CliRunner()
    line = "\n".join(
        json.dumps({"entity_type": "thing", "entity_id": f"lamp-{i}", "event_type": "created"}) for i in range(3)
    )
    assert runner.invoke(main, ["ingest", "-"], input=line).exit_code == 0
    reindexed = runner.invoke(main, ["reindex"])
    assert reindexed.exit_code == 0 and "indexed 3" in reindexed.output, reindexed.output
    found = runner.invoke(main, ["search", "lamp-1"])
    assert "lamp-1" in found.output and "pending" in found.output and "never enriched" in found.output
    checked = runner.invoke(main, ["reconcile", "--exact"])
    assert checked.exit_code == 0 and "in sync" in checked.output, checked.output
    rebuilt = runner.invoke(main, ["reindex", "--full"])
    assert rebuilt.exit_code == 0 and "swapped atomically" in rebuilt.output, rebuilt.output
    edges = runner.invoke(main, ["edges", "thing", "lamp-0"])
    assert edges.exit_code == 0 and "never enriched" in edges.output and "no derived edges" in edges.output
    assert runner.invoke(main, ["edges", "thing", "absent"]).exit_code != 0


def test_search_without_elasticsearch_says_what_to_set(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ELASTICSEARCH_URL", raising=False)
    result = CliRunner().invoke(main, ["search", "x"])
    assert result.exit_code != 0 and "set ELASTICSEARCH_URL" in result.output


def test_edges_command_shows_incoming_edges_with_a_limit(env: str) -> None:
    from datetime import timedelta

    from enrichment_assets.factstore import DerivedEdge, Outcome, RetryPolicy

    store = FactStore.from_url(env)
    store.migrate()
    store.ingest_events(
        [Event(entity_type="thing", entity_id=f"s{i}", event_type="created") for i in range(3)]
        + [Event(entity_type="other", entity_id="hub", event_type="created")]
    )
    claims = store.claim("thing", limit=10, owner="w", lease=timedelta(minutes=1))
    store.finish(
        "w",
        [
            Outcome.of(
                c, "enriched", attributes={}, edges=(DerivedEdge("near", "other", "hub", (c.key, ("other", "hub"))),)
            )
            for c in claims
        ],
        RetryPolicy(),
    )
    result = CliRunner().invoke(main, ["edges", "other", "hub", "--incoming", "--limit", "2"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "thing s0" in result.output and "thing s1" in result.output and "thing s2" not in result.output
    assert "2 of 3 shown; --limit for more" in result.output
    outgoing = CliRunner().invoke(main, ["edges", "thing", "s2"], env={"COLUMNS": "160"})
    assert "other hub" in outgoing.output and "directly" in outgoing.output
