"""Run the simulator on a free local port in a background thread, for tests and the demo."""

from __future__ import annotations

from typing import Any

from enrichment_assets.api.server import BackgroundServer
from enrichment_assets.dev.simulator.app import Simulator
from enrichment_assets.dev.simulator.catalog import SOURCES
from enrichment_assets.dev.simulator.graph import generate_graph


class SimulatorServer(BackgroundServer):
    """``with SimulatorServer(Simulator(generate_graph(7, 0.05))) as sim: httpx.get(sim.base_url(...))``.

    ``simulator`` is the live state behind the port: tests may read it, but turn knobs through the
    admin API so every change goes through the server's event loop.
    """

    def __init__(self, simulator: Simulator, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        super().__init__(simulator.app, host=host, port=port)
        self.simulator = simulator

    def __enter__(self) -> SimulatorServer:
        super().__enter__()
        return self

    def base_url(self, source: str) -> str:
        """Where one source lives on this server, e.g. ``http://127.0.0.1:54321/model-registry``."""
        return self.url + SOURCES[source].prefix

    def environ(self) -> dict[str, str]:
        """The policy's ``base_url_env`` variables pointing every source at this server."""
        return {spec.base_url_env: self.base_url(name) for name, spec in SOURCES.items()}


def simulator_server(seed: int = 7, scale: float = 0.05, **simulator_options: Any) -> SimulatorServer:
    """A not-yet-started server over ``generate_graph(seed, scale)``; use it as a context manager.
    ``simulator_options`` go to ``Simulator`` (``knobs``, ``late_fraction``, ``clock``, ...)."""
    return SimulatorServer(Simulator(generate_graph(seed, scale), **simulator_options))
