"""``python -m enrichment_assets.dev.codeserver ARGS``: ``dagster api grpc ARGS`` whose run workers fork from
a process that has already imported the code location.

Dagster's code server starts every run worker with multiprocessing's ``spawn``: a fresh interpreter
that imports Dagster, pandas, the clients and the code location again before the run's first step,
about 4 s of CPU per run here (the largest share of a run's cost on two cores, and of the time from a
sensor's request to the first claim). ``forkserver`` pays that once: its server process imports the
code location when the first run starts, and each run worker is a fork of it, with nothing but module
imports inherited (no connections, no threads). The run itself executes exactly as before.

``LocalDagster`` (the demo, the UI tests, the staleness benchmark) starts this module; ``dagster dev``
and production code servers are untouched. It sets one attribute of Dagster's gRPC server, the
multiprocessing context it launches runs with, so it is tied to the pinned Dagster release (1.13.27);
if that attribute is ever missing, the server keeps Dagster's own ``spawn`` and says so.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from typing import Any

log = logging.getLogger(__name__)


def _preloaded_context(module_name: str) -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dagster", module_name])
    return context


def _patch_run_launch(module_name: str) -> None:
    from dagster._grpc.server import DagsterApiServer

    original = DagsterApiServer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if not hasattr(self, "_mp_ctx"):
            log.warning("this Dagster's code server has no _mp_ctx: run workers start with spawn")
            return
        self._mp_ctx = _preloaded_context(module_name)

    DagsterApiServer.__init__ = __init__  # type: ignore[method-assign]


def main(argv: list[str]) -> int:
    module_name = argv[argv.index("--module-name") + 1] if "--module-name" in argv else None
    if module_name is None:
        raise SystemExit("enrichment_assets.dev.codeserver needs --module-name, as dagster api grpc takes it")
    _patch_run_launch(module_name)
    from dagster._cli import main as dagster_main

    sys.argv = ["dagster", "api", "grpc", *argv]
    dagster_main()  # click exits with the command's status
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
