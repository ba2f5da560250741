"""Shared fixtures: a real Prefect server (prefect_test_harness), real DVC repos and MLflow sqlite stores in
temp dirs. Nothing here reaches the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: E402

# First, so that no test and no child process it starts reaches the network: the package's offline defaults
# (no usage telemetry from Prefect's server, MLflow or the `dvc` commands tests run) go into os.environ.
import flows  # noqa: E402,F401

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# --- nothing a test starts outlives the session, however it ends -------------------------------------------------
# Every process a test starts (a Prefect server, workers and the flow runs they start, `madloop run` children)
# inherits this session's tag in its environment. A reaper outside the session's process tree waits for the
# session's process to end, then ends every process that carries the tag: a pytest killed by a CI timeout no
# longer leaves its Prefect server and workers running (they hold ports, memory and, in the workers' case, poll).
SESSION_TAG = "MADLOOP_TEST_SESSION"
REAPER = """
import os, signal, sys, time
import psutil
tag, pid = sys.argv[1], int(sys.argv[2])
session = psutil.Process(pid)
while session.is_running() and session.status() != psutil.STATUS_ZOMBIE:
    time.sleep(0.5)
def tagged():
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get("MADLOOP_TEST_SESSION") == tag:
                out.append(proc)
        except (psutil.Error, OSError):
            pass
    return out
for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
    procs = tagged()
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=grace)
"""


def pytest_configure(config) -> None:
    import uuid

    tag = uuid.uuid4().hex
    os.environ[SESSION_TAG] = tag  # a pytest inside a test gets a tag of its own (and is reaped with the outer's)
    env = {key: value for key, value in os.environ.items() if key != SESSION_TAG}
    config._madloop_reaper = subprocess.Popen(  # outlives this process by design: kept, never waited for
        [sys.executable, "-c", REAPER, tag, str(os.getpid())], env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tiny(**overrides) -> dict:
    """A study small enough to run in seconds: digits, 2 generations, a few epochs."""
    params = {
        "study": {"name": "tiny"},
        "data": {"imbalance_ratio": 4},
        "train": {"epochs": 3, "batch_size": 64},
        "loop": {"generations": 2},
        "classifier": {"epochs": 2},
        "score": {"samples": 80, "kid_subset_size": 40, "bootstrap": 10},
        "lineages": ["mle"],
        "tracking": {"batch_records": "never"},  # every generation gets its nested run (test_ux: the batched records)
    }
    for dotted, value in overrides.items():
        node = params
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return params


@pytest.fixture(scope="session")
def prefect_server():
    """One real, temporary Prefect server for the whole session (its start-up costs ~10 s)."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def git_dvc_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([str(BIN / "dvc"), "init", "-q"], cwd=path, check=True)
    return path


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A fresh git + DVC repository as the project root, with its own MLflow sqlite store."""
    root = git_dvc_repo(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture
def subprocess_env(prefect_server, monkeypatch) -> dict:
    """Environment for a `madloop` or `dvc repro` child process: the session's Prefect server, venv on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PREFECT_API_URL"] = prefect_server
    env.pop("MLFLOW_TRACKING_URI", None)
    return env
