"""Serve the API under uvicorn: the one uvicorn configuration that ``enrichment serve`` and
``BackgroundServer`` (the demo and the tests, in a background thread) both use."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.types import ASGIApp

from enrichment_assets.settings import Settings

# Request line and headers together, at most (h11 answers 400 past it). An id is at most 512
# characters, so even percent-encoded a request needs a small fraction of this.
MAX_HEADER_BYTES = 64 * 1024
# An idle keep-alive connection is closed after this many seconds.
KEEP_ALIVE_SECONDS = 5


def uvicorn_config(
    app: ASGIApp,
    settings: Settings,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    access_log: bool = False,
) -> uvicorn.Config:
    """The uvicorn configuration for ``app``, with the limits ``settings`` set.

    h11 rather than httptools: uvicorn bounds the size of the request head only with h11 (httptools
    takes megabytes of headers). Past ``max_connections`` open connections, or as many requests at
    once, uvicorn answers 503 itself (plain text, no Retry-After); the app's ``InFlightLimit``, set
    lower, is the one a busy server reaches first.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=access_log,
        lifespan="off",
        http="h11",
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class BackgroundServer:
    """``with BackgroundServer(app) as server: httpx.get(server.url + "/healthz")``.

    ``settings`` gives the connection limits (the defaults when omitted); pass the app's own.
    """

    def __init__(
        self, app: ASGIApp, *, settings: Settings | None = None, host: str = "127.0.0.1", port: int | None = None
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        config = uvicorn_config(app, settings or Settings(), host=host, port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="enrichment-api", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
