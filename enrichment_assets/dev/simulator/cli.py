"""The ``simulate`` command: serve the six MDS source systems, or print the graph's thin events."""

from __future__ import annotations

from pathlib import Path

import click
import uvicorn

from enrichment_assets.dev.simulator.app import Simulator
from enrichment_assets.dev.simulator.catalog import SOURCES
from enrichment_assets.dev.simulator.events import thin_events, write_ndjson
from enrichment_assets.dev.simulator.graph import generate_graph

_RATE = click.FloatRange(0.0, 1.0)
_NON_NEGATIVE = click.FloatRange(min=0.0)


@click.command("simulate", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8700, show_default=True, type=click.IntRange(0, 65535))
@click.option("--seed", default=7, show_default=True, type=int, help="Seed of the graph and of every knob.")
@click.option(
    "--scale",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0.0, min_open=True),
    help="1.0 is about 15,000 entities; counts scale linearly.",
)
@click.option("--latency-ms", default=0.0, show_default=True, type=_NON_NEGATIVE, help="Added to every answer.")
@click.option(
    "--jitter-ms",
    default=0.0,
    show_default=True,
    type=_NON_NEGATIVE,
    help="Uniform extra latency on top of --latency-ms.",
)
@click.option("--error-rate", default=0.0, show_default=True, type=_RATE, help="Fraction answered 500/503.")
@click.option(
    "--malformed-rate",
    default=0.0,
    show_default=True,
    type=_RATE,
    help="Fraction answered 200 with a body that is not the expected JSON.",
)
@click.option(
    "--rate-limit-rps",
    default=None,
    type=click.FloatRange(min=0.0, min_open=True),
    help="Requests per second per source above which the answer is 429.  [default: no limit]",
)
@click.option(
    "--late-fraction",
    default=0.0,
    show_default=True,
    type=_RATE,
    help="Fraction of pipeline runs (seeded) that answer 404 until --late-seconds after start.",
)
@click.option("--late-seconds", default=30.0, show_default=True, type=_NON_NEGATIVE)
@click.option(
    "--emit-events",
    is_flag=True,
    help="Instead of serving, write NDJSON thin 'created' events for every entity, then exit.",
)
@click.option(
    "--output",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="File for --emit-events.  [default: standard output]",
)
def simulate(
    host: str,
    port: int,
    seed: int,
    scale: float,
    latency_ms: float,
    jitter_ms: float,
    error_rate: float,
    malformed_rate: float,
    rate_limit_rps: float | None,
    late_fraction: float,
    late_seconds: float,
    emit_events: bool,
    output: Path | None,
) -> None:
    """Serve the six MDS source systems from a seeded graph on one port.

    Sources live under /model-registry, /pipeline-orchestration, /experimentation, /feature-store,
    /datasets and /identity; knobs can be turned while it runs through /admin (see
    enrichment_assets/simulator/admin.py). With --emit-events it prints the graph's events instead,
    shuffled so that some entities arrive before the entities they reference.
    """
    graph = generate_graph(seed, scale)
    if output is not None and not emit_events:
        raise click.UsageError("--output only applies with --emit-events")
    if emit_events:
        with click.open_file(str(output) if output else "-", "w", encoding="utf-8") as stream:
            written = write_ndjson(thin_events(graph), stream)
        if output is not None:
            click.echo(f"wrote {written:,} events to {output}", err=True)
        return
    knobs = {
        "latency_ms": latency_ms,
        "jitter_ms": jitter_ms,
        "error_rate": error_rate,
        "malformed_rate": malformed_rate,
        "rate_limit_rps": rate_limit_rps,
    }
    simulator = Simulator(graph, knobs=knobs, late_fraction=late_fraction, late_seconds=late_seconds)
    total = sum(graph.counts().values())
    click.echo(
        f"simulating {len(SOURCES)} sources with {total:,} entities (seed {seed}, scale {scale}) "
        f"at http://{host}:{port}; admin API under /admin",
        err=True,
    )
    for name, spec in SOURCES.items():
        click.echo(f"  {spec.base_url_env}=http://{host}:{port}{spec.prefix}  ({name})", err=True)
    uvicorn.run(simulator.app, host=host, port=port, log_level="warning", lifespan="off")
