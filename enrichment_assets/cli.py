"""The ``enrichment`` command."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from enrichment_assets.console import console, status_table
from enrichment_assets.dev.simulator.cli import simulate
from enrichment_assets.events import EventBatchError, validate_lines
from enrichment_assets.factstore import FactStore
from enrichment_assets.settings import ConfigError, Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


def _open_search(settings: Settings, *, required: bool = True):  # type: ignore[no-untyped-def]
    from enrichment_assets.search import SearchIndex

    if not settings.elasticsearch_url:
        if required:
            raise click.ClickException("search is not configured: set ELASTICSEARCH_URL (e.g. http://127.0.0.1:9200)")
        return None
    index = SearchIndex.from_url(settings.elasticsearch_url, alias=settings.index_alias)
    index.ensure()
    return index


def _open_store(settings: Settings) -> FactStore:
    store = FactStore.from_url(settings.database_url)
    store.migrate()
    return store


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Async graph enrichment: ingest thin events, enrich them from their sources, serve the graph.

    Configuration comes from the environment: ENRICHMENT_DATABASE_URL (default
    sqlite:///.enrichment/facts.db), ENRICHMENT_POLICY, ELASTICSEARCH_URL (search; off when unset),
    ENRICHMENT_API_TOKEN and ENRICHMENT_READ_TOKEN; the README's configuration table lists the rest.
    """


@main.command()
@click.argument("source", default="-", type=click.Path(allow_dash=True, dir_okay=False, path_type=Path))
def ingest(source: Path) -> None:
    """Ingest thin events from an NDJSON FILE (or - for standard input).

    The whole file is validated before anything is written; a bad line rejects it all and every bad
    line is listed. Ingesting the same file twice is harmless.
    """
    settings = _settings()
    stream = sys.stdin if str(source) == "-" else source.open(encoding="utf-8")
    with stream:
        lines = [(n, line) for n, line in enumerate(stream, start=1) if line.strip()]
    if not lines:
        raise click.ClickException(f"no events in {source}")
    out = console(stderr=True)
    try:
        with Progress(
            TextColumn("validating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=out,
            transient=True,
            disable=len(lines) < 50_000,
        ) as progress:
            task = progress.add_task("validate", total=len(lines))
            events = validate_lines(progress.track(lines, task_id=task), entity_types=settings.entity_types)
    except EventBatchError as error:
        for problem in error.problems:
            out.print(f"[red]line {problem.line}[/red]: {problem.message}", soft_wrap=True)
        more = " (first 50 shown)" if error.truncated else ""
        raise click.ClickException(f"{source}: rejected{more}; nothing was written") from None
    store = _open_store(settings)
    with out.status(f"writing {len(events):,} events"):
        result = store.ingest_events(events)
    console().print(
        f"ingested {result.received:,} events for {result.entities:,} entities "
        + ", ".join(f"{k}={v:,}" for k, v in sorted(result.by_event_type.items()))
    )


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log a line per request (about a fifth of a small request's cost in the server).",
)
def serve(host: str, port: int, access_log: bool) -> None:
    """Serve the ingest and read API under uvicorn.

    Limits from the environment: ENRICHMENT_MAX_CONNECTIONS, ENRICHMENT_MAX_IN_FLIGHT,
    ENRICHMENT_BODY_TIMEOUT_SECONDS; reads need ENRICHMENT_READ_TOKEN when it is set.
    """
    import uvicorn

    from enrichment_assets.api import create_app
    from enrichment_assets.api.server import uvicorn_config

    settings = _settings()
    store = _open_store(settings)
    app = create_app(store, settings, _open_search(settings, required=False))
    uvicorn.Server(uvicorn_config(app, settings, host=host, port=port, access_log=access_log)).run()


@main.command()
def status() -> None:
    """Counts by entity type and state, and the longest-waiting entity of each type."""
    store = _open_store(_settings())
    console().print(status_table(store.status(), store.now()))


@main.command()
def migrate() -> None:
    """Create or upgrade the fact store schema to the newest revision."""
    store = _open_store(_settings())
    console().print(f"fact store schema at revision {store.revision()}")


@main.group()
def policy() -> None:
    """Inspect policy files."""


@policy.command("validate")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def policy_validate(path: Path) -> None:
    """Validate a policy FILE and summarize the domain it declares."""
    from enrichment_assets.console import policy_tables
    from enrichment_assets.policy import PolicyError, load_policy

    try:
        loaded = load_policy(path)
    except PolicyError as error:
        out = console(stderr=True)
        for problem in error.problems:
            out.print(f"[red]{path}[/red]: {problem}", soft_wrap=True)
        raise click.ClickException(f"{path} is not a valid policy ({len(error.problems)} problem(s))") from None
    out = console()
    for table in policy_tables(loaded):
        out.print(table)
    out.print(f"[green]{path} is valid[/green]")


@main.command("enrich-once")
@click.option("--type", "entity_types", multiple=True, help="Only these entity types (default: all).")
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 10_000))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Worker processes claiming side by side (PostgreSQL only: they share leases and source limits).",
)
def enrich_once_command(entity_types: tuple[str, ...], batch_size: int, workers: int) -> None:
    """Run one enrichment cycle over every type's due work: claim, walk, settle and index, the same steps
    the Dagster assets run (for scripts and benchmarks; Dagster runs are the production path)."""
    from enrichment_assets.console import cycle_table
    from enrichment_assets.steps.cycle import WorkersFailed, enrich_once, enrich_with_workers

    settings = _settings()
    assert settings.policy is not None
    unknown = set(entity_types) - settings.entity_types
    if unknown:
        raise click.ClickException(f"unknown entity types {sorted(unknown)}; declared: {sorted(settings.entity_types)}")
    store = _open_store(settings)
    if workers > 1 and store.engine.dialect.name != "postgresql":
        raise click.ClickException(
            "--workers needs a PostgreSQL fact store (ENRICHMENT_DATABASE_URL=postgresql://...): "
            "workers share their leases and the sources' limits through it"
        )
    index = _open_search(settings, required=False)
    options = {"entity_types": entity_types or None, "batch_size": batch_size}
    failed: WorkersFailed | None = None
    with console(stderr=True).status(f"enriching with {workers} worker{'s' if workers > 1 else ''}"):
        if workers > 1:
            try:
                result = enrich_with_workers(
                    settings.database_url,
                    settings.policy,
                    workers=workers,
                    elasticsearch_url=settings.elasticsearch_url,
                    index_alias=settings.index_alias,
                    **options,
                )
            except WorkersFailed as error:
                failed, result = error, error.partial
        else:
            result = enrich_once(store, settings.policy, index=index, **options)
    if result is not None:
        for table in cycle_table(result.reports, result.sources):
            console().print(table)
        if result.indexed is not None:
            indexed = result.indexed
            console().print(
                f"search: indexed {indexed.indexed:,}, deleted {indexed.deleted:,}, "
                f"failed {len(indexed.failures):,} (retried next time)"
            )
    if failed is not None:
        raise click.ClickException(
            f"{len(failed.failures)} of {workers} workers failed (their leases were given back; run again): "
            + "; ".join(failed.failures)[:2000]
        )


@main.command()
@click.argument("entity_type")
@click.argument("entity_id")
@click.option("--relation", default=None, help="Only this relation.")
@click.option("--incoming", is_flag=True, help="Edges into the entity instead of from it.")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100_000), help="Edges shown at most.")
def edges(entity_type: str, entity_id: str, relation: str | None, incoming: bool, limit: int) -> None:
    """The derived edges of one entity, with provenance and staleness (straight from the fact store)."""
    from enrichment_assets.console import edges_header, edges_table

    store = _open_store(_settings())
    record = store.get_entity(entity_type, entity_id)
    if record is None:
        raise click.ClickException(f"no entity {entity_type}/{entity_id} in the fact store")
    now = store.now()
    console().print(edges_header(record, now), soft_wrap=True)
    direction = "in" if incoming else "out"
    found = store.edges_of(entity_type, entity_id, relation=relation, direction=direction, limit=limit)
    table = edges_table(found, now, incoming=incoming)
    total = store.edge_total(entity_type, entity_id, relation=relation, direction=direction)
    if total > len(found):
        table.caption = f"{len(found):,} of {total:,} shown; --limit for more"
    console().print(table)


@main.command()
@click.argument("query", default="")
@click.option("--type", "entity_type", default=None, help="Only this entity type.")
@click.option("--size", default=20, show_default=True)
def search(query: str, entity_type: str | None, size: int) -> None:
    """Search entities (Elasticsearch); every hit shows its state and staleness."""
    from enrichment_assets.console import search_table

    settings = _settings()
    index = _open_search(settings)
    store = _open_store(settings)
    console().print(search_table(index.search(query, entity_type=entity_type, size=size), store.now()))


@main.command()
@click.option("--full", is_flag=True, help="Rebuild a new index from the whole fact store and swap the alias.")
def reindex(full: bool) -> None:
    """Write what the search index is behind on (or, with --full, rebuild it without downtime)."""
    from enrichment_assets.search import rebuild_index, sync_index

    settings = _settings()
    assert settings.policy is not None
    index = _open_search(settings)
    store = _open_store(settings)
    if full:
        total = sum(sum(s.counts.values()) - s.counts.get("deleted", 0) for s in store.status())
        with Progress(
            TextColumn("rebuilding"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console(stderr=True),
        ) as progress:
            task = progress.add_task("rebuild", total=total)
            name, report = rebuild_index(store, settings.policy, index, progress=lambda n: progress.advance(task, n))
        console().print(
            f"rebuilt {name}: {report.indexed:,} documents; alias {index.alias} swapped atomically", soft_wrap=True
        )
    else:
        report = sync_index(store, settings.policy, index)
        index.refresh()
        console().print(
            f"indexed {report.indexed:,}, deleted {report.deleted:,}, already newer {report.superseded:,}",
            soft_wrap=True,
        )
    for doc_id, reason in list(report.failures.items())[:20]:
        console(stderr=True).print(f"[red]{doc_id}[/red]: {reason}", soft_wrap=True)
    if report.failures:
        raise click.ClickException(f"{len(report.failures)} documents failed; they stay queued for the next reindex")


@main.command()
@click.option("--exact", is_flag=True, help="Compare every document, not counts and a sample.")
@click.option("--repair", is_flag=True, help="Re-index what differs.")
def reconcile(exact: bool, repair: bool) -> None:
    """Check that the search index agrees with the fact store (and repair it)."""
    from enrichment_assets.console import reconcile_table
    from enrichment_assets.search import reconcile as run_reconcile

    settings = _settings()
    assert settings.policy is not None
    report = run_reconcile(_open_store(settings), _open_search(settings), settings.policy, exact=exact, repair=repair)
    console().print(reconcile_table(report))
    if not report.in_sync and not repair:
        raise click.ClickException("the index differs from the fact store; run with --repair to fix it")


@main.command()
def demo() -> None:
    """The main job: simulated MDS sources, ingestion over HTTP, Dagster enriching, the graph, the UI.

    Starts every server it needs (an embedded PostgreSQL unless ENRICHMENT_DATABASE_URL is set, the
    Elasticsearch-compatible server unless ELASTICSEARCH_URL is set, Dagster with
    DAGSTER_HOME=.enrichment/dagster) and keeps the Dagster UI up until Ctrl-C; DEMO_EXIT=1 exits
    once the summary is printed.
    """
    from enrichment_assets.dev.demo import run_demo

    run_demo(_settings())


main.add_command(simulate)
