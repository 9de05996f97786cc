"""The demo source systems: a seeded, MDS-shaped graph served as six HTTP APIs with fault knobs.

This package is the one place allowed to name domain types: it plays the sources that
``policies/mds.yaml`` describes. ``generate_graph`` builds the graph, ``Simulator`` holds it with its
knobs and stats, ``SimulatorServer`` serves it on a free local port for tests, and ``simulate`` is
the CLI command.
"""

from __future__ import annotations

from enrichment_assets.dev.simulator.app import Simulator, create_app
from enrichment_assets.dev.simulator.catalog import DERIVED_EDGES, ENTITY_TYPES, REFERENCES, SOURCES
from enrichment_assets.dev.simulator.events import thin_events
from enrichment_assets.dev.simulator.graph import MdsGraph, field_values, generate_graph
from enrichment_assets.dev.simulator.server import SimulatorServer, simulator_server

__all__ = [
    "DERIVED_EDGES",
    "ENTITY_TYPES",
    "REFERENCES",
    "SOURCES",
    "MdsGraph",
    "Simulator",
    "SimulatorServer",
    "create_app",
    "field_values",
    "generate_graph",
    "simulator_server",
    "thin_events",
]
