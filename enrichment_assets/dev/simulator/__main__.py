"""``python -m enrichment_assets.dev.simulator``: the ``simulate`` command on its own."""

from __future__ import annotations

from enrichment_assets.dev.simulator.cli import simulate

if __name__ == "__main__":
    simulate(prog_name="python -m enrichment_assets.dev.simulator")
