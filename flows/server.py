"""The Prefect API a ``madloop run`` (or ``madloop study``) talks to.

With ``PREFECT_API_URL`` set, that server (``prefect server start``: one shared server, with a UI that keeps every
run's history; docs/scale-out.md). Without it, a temporary server of this process's own, as Prefect itself would
start, except that it dies with this process however the process ends: Prefect's own temporary server is stopped
by an ``atexit`` hook, so a ``kill -9`` (or an OOM kill) of its parent left it running, orphaned, holding its port
and about 200 MB. Here the server is started with ``PR_SET_PDEATHSIG`` (Linux): the kernel kills it when its
parent dies. Elsewhere (macOS) it is stopped at exit as Prefect does; run one shared server there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from typing import Any, Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with(parent: int):
    """A ``preexec_fn`` for a child that must not outlive ``parent``."""
    libc_name = ctypes.util.find_library("c")

    def preexec() -> None:
        if sys.platform.startswith("linux") and libc_name:
            ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above: it would never be told
            os._exit(1)

    return preexec


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parent_bound_server(port: int):
    """Prefect's temporary server (``SubprocessASGIServer``), started so that it dies with this process."""
    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ParentBoundServer(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # prefect 3.8's command (SubprocessASGIServer._run_uvicorn_command), plus the preexec_fn
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
                      "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env, **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=die_with(os.getpid()),
                # its own session: a Ctrl-C at the terminal interrupts the run, which then reports its flow runs
                # to this server before stopping it, rather than killing the server under it
                start_new_session=True)

    return ParentBoundServer(port)


@contextmanager
def prefect_api() -> Iterator[str]:
    """``PREFECT_API_URL`` for the block: the configured server's, or a temporary one's that dies with us."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = parent_bound_server(free_port())
    server.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                drain_to(server)
    finally:
        server.stop()


def drain_to(server) -> None:
    """Send the logs and events still queued to the server before it stops (else Prefect's workers try at exit,
    when it is gone, and print connection errors)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # nothing was queued, or a worker already stopped: nothing to send
            pass
