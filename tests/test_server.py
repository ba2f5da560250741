"""The temporary Prefect server a run starts when no PREFECT_API_URL is set: started with Prefect's own command,
patient on a busy machine, and one line with what to do when it still does not start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flows.server import STARTUP_SECONDS, TemporaryServer, TemporaryServerError, startup_budget
from tests.conftest import BIN


def test_the_startup_wait_grows_with_the_load_per_core():
    assert startup_budget(0.0) == startup_budget(1.0) == STARTUP_SECONDS
    assert startup_budget(4.0) == 4 * STARTUP_SECONDS  # a quarter of a core each: four times as long
    assert startup_budget(0.5, configured=300) == 300  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, if higher


@pytest.mark.slow
def test_a_server_that_cannot_start_fails_with_one_line_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(TemporaryServerError) as err:
            TemporaryServer(taken.getsockname()[1]).start()
    message = str(err.value)
    assert "\n" not in message and "already in use" in message  # Prefect's own reason, then the way out
    assert "make server" in message and "export PREFECT_API_URL=http://127.0.0.1:4200/api" in message


@pytest.mark.slow
def test_a_run_on_a_busy_machine_starts_its_server_and_completes(tmp_path):
    """Twice as many CPU-bound processes as cores, and a fresh Prefect home (its database is migrated first: the
    server's slowest start): the run waits for its server as long as the load says, and finishes."""
    project = tmp_path / "project"
    project.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", PREFECT_HOME=str(tmp_path / "prefect-home"),
               OMP_NUM_THREADS="1")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        done = subprocess.run(
            [str(BIN / "madloop"), "run", "--set", "model.family=uniform", "--set", "data.source=model",
             "--set", "lineages=[mle]", "--set", "loop.generations=2", "--set", "dvc.track=false"],
            cwd=project, env=env, capture_output=True, text=True, timeout=900)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "finished in" in done.stdout and "View at http://127.0.0.1" not in done.stderr  # a dead server's link
    assert "MLflow experiment 'madloop/default': http://127.0.0.1:5000/#/experiments/" in done.stderr
