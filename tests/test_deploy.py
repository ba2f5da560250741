"""Scheduled runs and scale-out, for real: a Prefect server with its scheduler (started here: the session's
temporary server has none), ``prefect deploy --all`` of the repository's prefect.yaml, a process work pool and
a worker started by the test, ``madloop serve`` on a short interval. Every child process is killed at the end."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import fastapi
import httpx
import psutil
import pytest
import sqlalchemy
import yaml
from dvc.repo import Repo
from mlflow.tracking import MlflowClient
from packaging.version import Version
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId, FlowRunFilterState,
                                            FlowRunFilterStateType)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import main as cli
from flows.deploy import scheduled_study
from flows.loop import lineage_loop
from flows.slurm import ensure_pool
from tasks.layout import StudyPaths
from tasks.params import lineage_recipe, validate
from tasks.realdata import real_train_file
from tasks.resume import inspect_lineage, real_train_data
from tests.conftest import BIN, REPO, tiny

slow = pytest.mark.slow  # the server tests; the checks at the end run in `pytest -m "not slow"` too


# --- processes -------------------------------------------------------------------------------------------------


def kill_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a child and everything it started (flow runs may sit in sessions of their own), then SIGKILL."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    proc.wait(timeout=5)


@contextlib.contextmanager
def child(args: list[str], env: dict, cwd: Path, log: Path, grace: float = 20.0) -> Iterator[subprocess.Popen]:
    """A background process for the duration of the block, its output in ``log``; always killed, tree and all."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            kill_tree(proc, grace)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, log: Path | None = None, interval: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail}")


# --- a Prefect server with its services, for this module ---------------------------------------------------------


def check_server_packages() -> None:
    """Fail in one line, not after a long timeout, on the versions known to break prefect 3.8's server."""
    broken = []
    if Version(sqlalchemy.__version__) >= Version("2.1"):
        broken.append(f"SQLAlchemy {sqlalchemy.__version__} (its scheduler cannot insert scheduled runs: "
                      "'Can't evaluate bulk DML statement'; needs <2.1)")
    if Version(fastapi.__version__) >= Version("0.151"):
        broken.append(f"fastapi {fastapi.__version__} (explicit null limits get 422, so `prefect deploy` and "
                      "`prefect flow-run ls` fail; needs <0.151)")
    if broken:
        pytest.fail("prefect 3.8's server breaks with " + " and ".join(broken) + ": pin them in pyproject.toml "
                    "and requirements.lock", pytrace=False)


@pytest.fixture(scope="module")
def scheduler_server(tmp_path_factory) -> Iterator[dict]:
    """``prefect server start`` on a free port with a throwaway database; yields the environment for children."""
    check_server_packages()
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    with child([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
               env, home, home / "server.log", grace=10) as server:
        def healthy() -> bool:
            assert server.poll() is None, (home / "server.log").read_text()[-4000:]
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            return False

        wait_for(healthy, 120, "the Prefect server", home / "server.log", interval=0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield {**env, "PREFECT_API_URL": url, "PREFECT_WORKER_QUERY_SECONDS": "1",
                   "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def prefect(env: dict, cwd: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def copy_code(project: Path) -> None:
    """What a worker's working directory holds: the code and prefect.yaml (test_dvc_pipeline does the same)."""
    for name in ("flows", "tasks", "models"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")


def completed_runs_of(deployment: str) -> list:
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        return client.read_flow_runs(limit=50, flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED]))))


def pending_time(flow_run_id) -> datetime:
    """When a worker claimed the flow run: its Pending state."""
    with get_client(sync_client=True) as client:
        return min(s.timestamp for s in client.read_flow_run_states(flow_run_id) if s.type == StateType.PENDING)


def assert_study_landed(project: Path, params: dict) -> None:
    """Every lineage verified on disk (sha256 of each output), tracked by DVC, and in one MLflow experiment."""
    p = validate(params)
    study, lineages, generations = p.study.name, [spec.name for spec in p.lineages], p.loop.generations
    paths = StudyPaths(project, study)
    for name in lineages:
        state = inspect_lineage(paths.lineage(name), lineage_recipe(p, p.lineage(name)), real_train_data(paths, real_train_file(p, p.lineage(name))))
        assert state.corrupt is None and not state.stale, (name, state)
        assert len(state.finished) == generations, name
        assert (paths.data / f"{name}.dvc").is_file()
    with Repo(str(project)) as repo:
        assert repo.status() == {}
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in experiments] == [p.experiment] == [f"madloop/{study}"]
    runs = client.search_runs([experiments[0].experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.data.tags["lineage"] for r in parents) == sorted(lineages)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(runs) == len(lineages) * (1 + generations)


# --- the tests ---------------------------------------------------------------------------------------------------


@slow
def test_study_deployment_fans_its_lineages_out_to_a_process_work_pool(project, scheduler_server):
    """`prefect deploy --all` of prefect.yaml; its nightly study, started now on a cpu worker, sends each lineage
    to the gpu pool, whose worker runs both at once, each its own flow run; and nothing clashes."""
    env = scheduler_server
    copy_code(project)
    params = tiny(lineages=["mle", "ple"])
    (project / "params.yaml").write_text(yaml.safe_dump(params))  # what the nightly deployment reads
    with get_client(sync_client=True) as client:  # `prefect work-pool create gpu --type process`, faster
        for pool in ("gpu", "cpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    ensure_pool("slurm")  # prefect.yaml's lineage/slurm needs its pool to exist (no Slurm needed to deploy it)
    workers = {pool: [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"test-{pool}"]
               for pool in ("cpu", "gpu")}
    workers["gpu"] += ["--limit", "2"]  # two lineages at once on this CPU machine; one per GPU in production
    with (child(workers["cpu"], env, project, project.parent / "worker-cpu.log"),
          child(workers["gpu"], env, project, project.parent / "worker-gpu.log")):
        prefect(env, project, "deploy", "--all")  # both deployments, as a user would
        study = run_deployment("scheduled-study/nightly", timeout=400, poll_interval=1)

    assert study.state.is_completed(), f"{study.state}\n{(project.parent / 'worker-cpu.log').read_text()[-4000:]}"
    assert study.name.startswith("study tiny (nightly, "), study.name  # not a random name
    lineages = completed_runs_of("lineage/gpu")
    assert sorted(r.name for r in lineages) == ["tiny/mle", "tiny/ple"]
    assert all({"madloop", "study:tiny", f"lineage:{r.name[5:]}"} <= set(r.tags) for r in lineages)
    assert all(r.work_pool_name == "gpu" and r.parent_task_run_id for r in lineages)
    # Both held a slot of the gpu worker at once: it claims a run (Pending) only with a free slot, and frees the
    # slot when the run's process exits. (Start times would also count the second process's torch import, which
    # on a loaded 2-core machine can outlast the whole of the first, tiny lineage.)
    claimed = [pending_time(r.id) for r in lineages]
    assert max(claimed) < min(r.end_time for r in lineages), "the gpu worker did not run both lineages at once"
    assert_study_landed(project, params)
    assert len((project / "reports" / "tiny" / "generations.csv").read_text().splitlines()) == 1 + 4


@slow
def test_madloop_serve_runs_the_study_on_its_schedule(project, scheduler_server):
    """`madloop serve --interval` registers a scheduled deployment; the scheduler fires it, the run completes and
    lands in DVC and MLflow like `madloop run`."""
    params = tiny(study__name="served")
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    serve = [str(BIN / "madloop"), "serve", "--interval", "10"]
    log = project.parent / "serve.log"
    with child(serve, scheduler_server, project, log):
        def completed() -> list:
            with contextlib.suppress(ObjectNotFound):  # not served yet
                return completed_runs_of("scheduled-study/served")

        runs = wait_for(completed, 240, "a completed scheduled run of scheduled-study/served", log)
    assert runs[0].auto_scheduled
    assert re.fullmatch(r"study served \(served, \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", runs[0].name), runs[0].name
    assert_study_landed(project, params)
    assert (project / "reports" / "served" / "generations.csv").is_file()


# --- fast checks, no server -----------------------------------------------------------------------------------


def test_prefect_yaml_is_read_by_prefects_own_loader():
    """The file `prefect deploy --all` reads: two deployments, their flows, pools, schedule and limit."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._models import PrefectYamlModel
    from rich.console import Console

    PrefectYamlModel.model_validate(yaml.safe_load((REPO / "prefect.yaml").read_text()))  # raises when invalid
    configs, actions = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=Console())
    by_name = {c["name"]: c for c in configs}
    assert set(by_name) == {"nightly", "gpu", "slurm"} and actions["pull"] is None
    nightly, gpu, slurm = by_name["nightly"], by_name["gpu"], by_name["slurm"]
    assert nightly["entrypoint"] == "flows/deploy.py:scheduled_study" and scheduled_study.name == "scheduled-study"
    assert gpu["entrypoint"] == "flows/loop.py:lineage_loop" and lineage_loop.name == "lineage"
    assert nightly["parameters"]["lineage_deployment"] == f"{lineage_loop.name}/gpu"
    assert nightly["schedules"][0]["cron"] == "0 3 * * *"
    assert nightly["concurrency_limit"]["limit"] == 1
    assert (nightly["work_pool"]["name"], gpu["work_pool"]["name"]) == ("cpu", "gpu")
    assert gpu["work_pool"]["job_variables"]["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert slurm["entrypoint"] == gpu["entrypoint"] and slurm["work_pool"]["name"] == "slurm"


def test_serve_fails_fast_without_a_server_or_with_a_bad_schedule(project, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert cli(["serve", "--interval", "60"]) == 2
    assert "prefect server start" in capsys.readouterr().err

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # never contacted: the cron fails first
    assert cli(["serve", "--cron", "every day at noon"]) == 2
    assert "schedule:" in capsys.readouterr().err
    assert cli(["serve", "--interval", "0"]) == 2
    assert "--interval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["serve", "--interval", "60", "--cron", "0 3 * * *"])  # one schedule, not two
