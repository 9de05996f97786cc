"""Run the code location under a real Dagster instance: webserver and daemon as child processes.

``LocalDagster`` is what ``make demo``, the Dagster end-to-end tests and ``bench/staleness.py`` use. It
writes ``$DAGSTER_HOME/dagster.yaml`` (SQLite storage there unless PostgreSQL settings are given, one
telemetry off), starts the code location as a gRPC code server of its
own, then ``dagster-webserver`` and ``dagster-daemon`` pointed at it, each in its own process group with
default signal handling (a shell's ignored SIGINT is not inherited), and stops every group when done.

Why a code server of its own: given a ``python_module`` workspace, the daemon starts a code server
process and replaces it every 60 seconds (Dagster's workspace refresh), each one importing the code
location again: seconds of CPU a minute on a machine that also runs the ingest API. One long-lived
server, which the daemon only asks for a fresh snapshot, is also how production deploys code.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml

from enrichment_assets.dev.devservers import die_with_parent, free_port

ROOT = Path(__file__).resolve().parents[2]
LOCATION = "enrichment_assets"


# Launching a run worker takes seconds (a process that imports the code location); threads let the
# daemon launch the sensor's runs side by side instead of one after another, and it looks at the queue
# every 2 s instead of 5. (Run limits stay in `concurrency`, which Dagster checks against this block.)
RUN_COORDINATOR: dict[str, Any] = {
    "module": "dagster",
    "class": "QueuedRunCoordinator",
    "config": {"dequeue_use_threads": True, "dequeue_num_workers": 4, "dequeue_interval_seconds": 2},
}


def instance_config(*, max_concurrent_runs: int = 4, postgres_url: str | None = None) -> dict[str, Any]:
    """``dagster.yaml`` for a local instance. No pools: the sources' limits live in the fact store and
    hold for every run together."""
    config: dict[str, Any] = {
        "telemetry": {"enabled": False},
        "concurrency": {
            "runs": {"max_concurrent_runs": max_concurrent_runs},
        },
        "run_coordinator": RUN_COORDINATOR,
        # Dagster's own code-server heartbeat is slow to notice a run worker killed with its group.
        # Checked every 15 s (Dagster: 120), so a killed run worker is marked failed, and its leases released
        # by the lease release sensors, within a minute.
        "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "poll_interval_seconds": 15},
    }
    if postgres_url:
        # storage: postgres, with its connections pooled (see dagster_storage.py).
        config["storage"] = {
            "custom": {
                "module": "enrichment_assets.dev.dagster_storage",
                "class": "PooledPostgresStorage",
                "config": {"postgres_url": postgres_url},
            }
        }
    return config


def write_instance_yaml(home: Path | str, **kwargs: Any) -> Path:
    """Write ``dagster.yaml`` for a local instance into ``home`` unless one is there already."""
    path = Path(home) / "dagster.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(instance_config(**kwargs)))
    return path


class LocalDagster:
    """``with LocalDagster(home, env) as dagster: dagster.graphql(query)``."""

    def __init__(
        self,
        home: Path,
        env: Mapping[str, str],
        *,
        port: int | None = None,
        max_concurrent_runs: int = 4,
        postgres_url: str | None = None,
        workspace: Path = ROOT / "workspace.yaml",
    ) -> None:
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.env = {**os.environ, **env, "DAGSTER_HOME": str(self.home)}
        self.max_concurrent_runs = max_concurrent_runs
        self.postgres_url = postgres_url
        self.workspace = workspace
        self.code_server_port = free_port()
        self._processes: list[subprocess.Popen[bytes]] = []
        self._names: list[str] = []
        self._commands: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 120) -> LocalDagster:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "dagster.yaml").write_text(
            yaml.safe_dump(
                instance_config(max_concurrent_runs=self.max_concurrent_runs, postgres_url=self.postgres_url)
            )
        )
        # Create the instance's storage here, once: Dagster creates and stamps a fresh SQLite database
        # without a lock, so webserver, code server and daemon starting together on an empty home can
        # stamp it twice, after which none of them opens it ("more than one head").
        import dagster as dg

        with dg.DagsterInstance.from_config(str(self.home)):
            pass
        bin_dir = Path(sys.executable).parent
        # `dagster api grpc` whose run workers fork from a warm process (see codeserver.py).
        self._spawn(
            "code-server",
            [
                sys.executable,
                "-m",
                "enrichment_assets.dev.codeserver",
                *self._code_location_args(),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.code_server_port),
            ],
        )
        try:
            self._wait_code_server(timeout=timeout)
            workspace = self.home / "workspace.yaml"
            workspace.write_text(
                yaml.safe_dump(
                    {
                        "load_from": [
                            {
                                "grpc_server": {
                                    "host": "127.0.0.1",
                                    "port": self.code_server_port,
                                    "location_name": LOCATION,
                                }
                            }
                        ]
                    }
                )
            )
            self._spawn(
                "webserver",
                [str(bin_dir / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(self.port)],
            )
            self._spawn("daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)])
            self.wait_loaded(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _code_location_args(self) -> list[str]:
        """The workspace file's one ``python_module`` entry, as ``dagster api grpc`` arguments."""
        [entry] = yaml.safe_load(self.workspace.read_text())["load_from"]
        module = entry["python_module"]
        return ["--module-name", module["module_name"], "--location-name", module.get("location_name", LOCATION)]

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.home / f"{name}.log").open("ab")
        self._processes.append(
            subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=partial(die_with_parent, os.getpid()),
            )
        )
        self._names.append(name)
        self._commands[name] = command

    def pid(self, name: str) -> int:
        """The pid of one of the processes this started: ``code-server``, ``webserver`` or ``daemon``."""
        return self._processes[self._names.index(name)].pid

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal one process's group (the fault tests kill the daemon mid-tick) and wait for it to end.
        Run workers are the code server's children: killing the daemon or the webserver leaves them be."""
        process = self._processes[self._names.index(name)]
        _signal_group(process, sig)
        process.wait(timeout=30)

    def restart(self, name: str, *, timeout: float = 120) -> None:
        """Start a process again, with the command it was first started with, after ``kill``."""
        index = self._names.index(name)
        if self._processes[index].poll() is None:
            raise RuntimeError(f"dagster {name} is still running (pid {self._processes[index].pid}); kill it first")
        del self._processes[index], self._names[index]
        self._spawn(name, self._commands[name])
        if name == "code-server":
            self._wait_code_server(timeout=timeout)
        self.wait_loaded(timeout=timeout)

    def _wait_code_server(self, *, timeout: float) -> None:
        """Until the code server accepts connections: it listens once the code location is imported."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running()
            try:
                socket.create_connection(("127.0.0.1", self.code_server_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.25)
        raise TimeoutError(f"the code server did not start within {timeout:.0f}s; see {self.home / 'code-server.log'}")

    def _check_running(self) -> None:
        for process, name in zip(self._processes, self._names, strict=True):
            if process.poll() is not None:
                raise RuntimeError(f"dagster {name} exited ({process.returncode}); see {self.home / (name + '.log')}")

    def wait_loaded(self, *, timeout: float) -> None:
        """Until the webserver answers and the code location is loaded (not an error)."""
        deadline = time.monotonic() + timeout
        query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
        query += "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
        last = "not answering"
        while time.monotonic() < deadline:
            self._check_running()
            try:
                entries = self.graphql(query)["workspaceOrError"]["locationEntries"]
                entry = next(e for e in entries if e["name"] == LOCATION)
                if entry["loadStatus"] == "LOADED":
                    if entry["locationOrLoadError"]["__typename"] == "PythonError":
                        raise RuntimeError(
                            f"the code location failed to load: {entry['locationOrLoadError']['message']}"
                        )
                    return
                last = entry["loadStatus"]
            except (httpx.HTTPError, StopIteration, KeyError, TypeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"Dagster did not load {LOCATION} within {timeout:.0f}s ({last}); see {self.home}/*.log")

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None, *, timeout: float = 60) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/graphql", json={"query": query, "variables": dict(variables or {})}, timeout=timeout
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise RuntimeError(f"GraphQL errors: {json.dumps(body['errors'])[:2000]}")
        return body["data"]

    def stop(self) -> None:
        """SIGINT to each group (Dagster shuts its children down), then SIGKILL what is left."""
        for process in self._processes:
            if process.poll() is None:
                _signal_group(process, signal.SIGINT)
        deadline = time.monotonic() + 20
        for process in self._processes:
            try:
                process.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process, signal.SIGKILL)  # run workers it launched live in the same group
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self._processes, self._names = [], []
        self._commands = {}

    def __enter__(self) -> LocalDagster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
