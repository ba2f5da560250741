"""The Prefect API a ``madloop run`` (or ``madloop study``) talks to.

With ``PREFECT_API_URL`` set, that server (``prefect server start``: one shared server, with a UI that keeps every
run's history; docs/scale-out.md). Without it, a temporary server of this process's own, started with Prefect's
own command (``prefect server start``, no UI, no scheduler) and stopped when the run ends. Two things differ from
the temporary server Prefect itself would start:

- It dies with this process however the process ends: Prefect stops its own with an ``atexit`` hook, so a
  ``kill -9`` (or an OOM kill) of its parent left it running, orphaned, holding its port and about 200 MB. Here the
  server is started with ``PR_SET_PDEATHSIG`` (Linux): the kernel kills it when its parent dies. Elsewhere (macOS)
  it is stopped at exit; run one shared server there.
- Its start-up wait scales with the machine's load. The server needs about 7 s of CPU to start (more on a fresh
  database, which it migrates first); Prefect waits 20 s, which a busy machine does not always give it. Here the
  wait is ``STARTUP_SECONDS``, multiplied by the load per core when that is above 1, and a server that still does
  not answer fails with one line that says what to do instead (:class:`TemporaryServerError`).

The temporary server has no UI and is gone when the run ends, so its runs get no "View at" link in the log
(``PREFECT_UI_URL`` is blanked); the study logs its MLflow link instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STARTUP_SECONDS = 60.0  # the wait on an idle machine (the server answers within ~10 s there), times the load
POLL_SECONDS = 0.2
# Services the temporary server does without, as Prefect's own temporary server does: schedules, late runs and
# the upkeep of workers, leases, pauses and cancellations belong to a long-lived server (`make server`).
IDLE_SERVICES = ("FOREMAN", "CANCELLATION_CLEANUP", "PAUSE_EXPIRATIONS", "REPOSSESSOR", "CLEANUP_RECONCILER")
SHARED_SERVER = ("start one in another terminal with `make server` (or `prefect server start`), then "
                 "`export PREFECT_API_URL=http://127.0.0.1:4200/api` and run again")


class TemporaryServerError(RuntimeError):
    """The temporary Prefect server did not start."""


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


def load_per_core() -> float:
    """The 1-minute load average per core (0 where the platform has none)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def startup_budget(load: float, configured: float = 0.0) -> float:
    """Seconds to wait for the server: ``STARTUP_SECONDS`` (or Prefect's own setting, when set higher), times the
    load per core when it is above 1: a machine twice as busy as it has cores gives the server half the CPU."""
    return max(STARTUP_SECONDS, configured) * max(1.0, load)


class TemporaryServer:
    """``prefect server start`` on a free local port, bound to this process (see the module docstring)."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = tempfile.TemporaryFile(mode="w+")  # what the server says, for the error when it does not start
        self.process: subprocess.Popen | None = None

    def start(self) -> "TemporaryServer":
        """Launch the server and wait until it answers."""
        return self.launch().wait()

    def launch(self) -> "TemporaryServer":
        """Start the server's process without waiting for it: it starts up while this process does other work
        (:func:`launch_temporary_server`)."""
        from prefect.settings import get_current_settings

        self.settings = settings = get_current_settings()
        env = {**os.environ, **settings.to_environment_variables(exclude_unset=True),
               **{f"PREFECT_SERVER_SERVICES_{name}_ENABLED": "false" for name in IDLE_SERVICES}}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-ui", "--no-scheduler", "--no-late-runs", "--analytics-off", "--log-level", "ERROR"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
            preexec_fn=die_with(os.getpid()),
            # its own session: a Ctrl-C at the terminal interrupts the run, which then reports its flow runs to this
            # server before stopping it, rather than killing the server under it
            start_new_session=True)
        return self

    def wait(self) -> "TemporaryServer":
        """Wait until the launched server answers (or fail, stopping it)."""
        try:
            self.wait_until_healthy(float(self.settings.server.ephemeral.startup_timeout_seconds or 0))
        except BaseException:  # it did not start, or Ctrl-C while waiting: not left behind
            self.stop()
            raise
        return self

    def wait_until_healthy(self, configured: float = 0.0) -> None:
        import httpx

        started, load = time.monotonic(), load_per_core()
        while True:
            try:
                if httpx.get(f"{self.api_url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            waited = time.monotonic() - started
            if self.process.poll() is not None:
                self.fail(f"it exited (code {self.process.returncode}) after {waited:.0f} s{self.said()}")
            load = max(load, load_per_core())
            if waited > startup_budget(load, configured):
                self.fail(f"it did not answer within {waited:.0f} s (load {load * (os.cpu_count() or 1):.1f} on "
                          f"{os.cpu_count()} cores){self.said()}")
            time.sleep(POLL_SECONDS)

    def said(self) -> str:
        """The server's last words, on one line (its console wraps them at 80 columns)."""
        self.log.seek(0)
        lines = [line.strip() for line in self.log.read().splitlines() if line.strip()]
        return f': "{" ".join(lines[-3:])[-300:]}"' if lines else ""

    def fail(self, what: str) -> None:
        raise TemporaryServerError(f"the temporary Prefect server did not start: {what}. Instead, {SHARED_SERVER}")

    def stop(self) -> None:
        """Stop the server (a no-op when it is not running)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()


def launch_temporary_server() -> TemporaryServer | None:
    """A temporary server launched now, to start up while the caller checks its input and loads its data (on 2
    cores its ~7 s of start-up CPU then overlaps the caller's): pass it to :func:`prefect_api`, and stop it if the
    block is never reached (``stop`` is safe to repeat). None when ``PREFECT_API_URL`` names a server."""
    from prefect.settings import PREFECT_API_URL

    return None if PREFECT_API_URL.value() else TemporaryServer().launch()


@contextmanager
def prefect_api(launched: TemporaryServer | None = None) -> Iterator[str]:
    """``PREFECT_API_URL`` for the block: the configured server's, or a temporary one's that dies with us
    (``launched``, from :func:`launch_temporary_server`, else one started now)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    configured = PREFECT_API_URL.value()
    if configured:
        yield configured
        return
    server = (launched or TemporaryServer().launch()).wait()
    try:
        # no flow-run heartbeats: they let a persistent server mark a crashed run (docs/prefect/zombie-runs.yaml),
        # but this one dies with the run, and joining the heartbeat thread (it sleeps in 1 s steps) held up the
        # study's end by up to 1 s
        with temporary_settings(updates={PREFECT_API_URL: server.api_url, PREFECT_UI_URL: "",
                                         PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
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
