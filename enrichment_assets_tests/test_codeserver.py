"""The demo's code server hands Dagster a forkserver for run workers, preloaded with the code location,
on the pinned Dagster release (if Dagster stopped reading that attribute, this would fail rather than
the demo silently paying a fresh interpreter per run)."""

from __future__ import annotations

import logging
import threading

import pytest
from dagster._core.utils import FuturesAwareThreadPoolExecutor
from dagster._grpc.server import DagsterApiServer

from enrichment_assets.dev import codeserver


def test_run_workers_fork_from_a_preloaded_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DagsterApiServer, "__init__", DagsterApiServer.__init__)  # undone after the test
    codeserver._patch_run_launch("enrichment_assets.defs.definitions")
    with FuturesAwareThreadPoolExecutor(max_workers=1) as executor:
        server = DagsterApiServer(threading.Event(), logging.getLogger(__name__), executor, lazy_load_user_code=True)
        assert server._mp_ctx.get_start_method() == "forkserver"


def test_it_needs_the_module_to_preload() -> None:
    with pytest.raises(SystemExit, match="--module-name"):
        codeserver.main(["--host", "127.0.0.1"])
