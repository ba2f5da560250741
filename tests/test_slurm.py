"""Lineages as Slurm jobs, against a real Slurm: `make slurm` (tools/slurm.sh) brings up a single-node Slurm on this
machine (slurm-wlm and munge from apt-get, as root) or finds one up; the tests that need it stop the daemons they
started, and skip, saying why, only where Slurm cannot start. A study is fanned out as Slurm jobs, one job is
cancelled with scancel mid-run, the study is submitted again and must equal a plain `madloop run`. Real Prefect,
DVC, MLflow and Slurm throughout; the plain functions of tasks/slurm.py are checked without Slurm."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments import run_deployment

from flows.cli import main as cli
from flows.fanout import lineage_settings
from flows.slurm import (WORKER_TYPE, SlurmVariables, SlurmWorker, ensure_lineage_deployment, ensure_pool,
                         worker_while)
from tasks.layout import StudyPaths
from tasks.params import lineage_recipe, load, validate
from tasks.slurm import (Partition, SlurmParams, gpu_count, job_state, minutes, partition_problem, resource_args,
                         wait_ended)
from tasks.storage import json_safe, read_manifest
from tests.conftest import REPO, git_dvc_repo, tiny

slow = pytest.mark.slow


# --- Slurm on this machine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_up():
    """`make slurm`: a Slurm that answers (started here, then stopped at the end, or found up and left so)."""
    try:
        done = subprocess.run(["make", "-s", "-C", str(REPO), "slurm"], capture_output=True, text=True, timeout=900)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"Slurm cannot start here: make slurm: {err}")
    lines = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
    if done.returncode != 0:
        pytest.skip(f"Slurm cannot start here: {lines[-1]}")
    started = lines[-1] == "slurm: started"
    yield
    if started:
        subprocess.run(["make", "-s", "-C", str(REPO), "slurm-down"], capture_output=True, text=True, timeout=120)


def squeue(name: str, states: str = "") -> list[str]:
    """The ids of the Slurm jobs named ``name``: pending or running, or with ``states="all"`` also those that ended
    in the last few minutes (the controller keeps them for MinJobAge)."""
    out = subprocess.run(["squeue", "--noheader", f"--name={name}", "--format=%i",
                          *([f"--states={states}"] if states else [])], capture_output=True, text=True)
    return out.stdout.split()


def job_field(job: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job], capture_output=True, text=True).stdout
    return dict(part.split("=", 1) for part in out.split() if "=" in part).get(field, "")


def wait_for(what: str, predicate, seconds: float, step: float = 0.2):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")


# --- a study as Slurm jobs ---------------------------------------------------------------------------------------

PARAMS = tiny(lineages=[{"name": "mle", "seeds": [0, 1]}])  # two lineages (mle-s0, mle-s1): two jobs at once
LINEAGES = ["mle-s0", "mle-s1"]


def madloop(root: Path, env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--quiet", *args], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, seconds: float = 400) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=seconds)
    return proc.returncode, out


def result(root: Path) -> dict:
    """What a study makes, whatever ran it: each generation's files (sha256), metrics and data, and the reports
    (not timings)."""
    out = {}
    for lineage in LINEAGES:
        for path in sorted(StudyPaths(root, "tiny").lineage(lineage).glob("gen-*.json")):
            m = read_manifest(path)
            out[f"{lineage}/{path.name}"] = {key: json_safe(m[key]) for key in ("outputs", "metrics", "data",
                                                                                  "recipe_hash", "score_hash")}
    rows = list(csv.DictReader(io.StringIO((root / "reports" / "tiny" / "generations.csv").read_text())))
    out["generations.csv"] = [{k: v for k, v in row.items() if k != "fit_seconds"} for row in rows]
    return out


@slow
def test_a_study_as_slurm_jobs_survives_a_scancel_and_equals_a_plain_run(slurm_up, project, subprocess_env,
                                                                          tmp_path):
    env = {**subprocess_env, "OMP_NUM_THREADS": "1",  # the same arithmetic in the plain run and in the jobs
           "PYTHONPATH": os.pathsep.join([str(REPO), subprocess_env.get("PYTHONPATH", "")])}
    plain = git_dvc_repo(tmp_path / "plain")
    for root in (plain, project):
        (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    code, out = finished(madloop(plain, env))
    assert code == 0, out[-3000:]
    reference = result(plain)
    assert len(reference) == 2 * 2 + 1
    # The plain run's domain classifier (verified on load like any cache entry): the study does not train it again.
    shutil.copytree(plain / "data" / "cache", project / "data" / "cache", ignore=shutil.ignore_patterns("*.lock"))

    # Each lineage a Slurm job; mle-s0's job is cancelled once its generation 0 is on disk (generation 1 runs).
    run = madloop(project, env, "--fan-out", "slurm")
    first = StudyPaths(project, "tiny").lineage("mle-s0") / "gen-000.json"
    wait_for("mle-s0's generation 0", first.is_file, 300)
    job = wait_for("mle-s0's Slurm job", lambda: squeue("tiny/mle-s0"), 10)[0]
    # mle-s1's job was submitted beside mle-s0's (on a loaded machine it may already have finished: states=all)
    assert squeue("tiny/mle-s1", states="all"), "mle-s1 was not submitted as a Slurm job beside mle-s0's"
    subprocess.run(["scancel", job], check=True)
    code, out = finished(run)
    assert code == 1, out[-3000:]
    failure = out.strip().splitlines()[-1]
    assert failure.startswith("madloop: 1 of 2 lineages failed: lineage 'mle-s0'") and f"Slurm job {job}" in failure
    assert job_field(job, "JobState") == "CANCELLED"
    assert not (StudyPaths(project, "tiny").lineage("mle-s0") / "gen-001.json").exists(), "cancelled too late"

    # Submitted again: the cancelled lineage resumes at generation 1, the finished one is kept.
    code, out = finished(madloop(project, env, "--fan-out", "slurm"))
    assert code == 0, out[-3000:]
    assert result(project) == reference
    logs = {path.name: path.read_text() for path in (project / ".madloop" / "slurm").glob("*.out")}
    assert len(logs) == 4  # two jobs, then two again
    assert any("[mle-s0] resuming: generations 0-0 are finished" in text for text in logs.values())
    assert any("[mle-s1] resuming: generations 0-1 are finished" in text for text in logs.values())
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("madloop/tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert runs and all(r.info.status == "FINISHED" for r in runs)
    assert squeue("tiny/mle-s0") == squeue("tiny/mle-s1") == []


@slow
def test_a_job_cancelled_while_queued_crashes_its_flow_run_at_once(slurm_up, prefect_server, tmp_path):
    """A job that never started cannot report: the worker sees it end and marks its flow run Crashed with the
    job's state, so a study waiting on it fails (and resumes next time) instead of waiting forever."""
    ensure_pool("slurm-queued")
    deployment = ensure_lineage_deployment("slurm-queued", "lineage")
    cpus = str(os.cpu_count())
    blocker = subprocess.run(["sbatch", "--parsable", f"--cpus-per-task={cpus}", "--output=/dev/null", "--time=2",
                              "--wrap=sleep 120"], capture_output=True, text=True, check=True).stdout.strip()
    try:
        with worker_while("slurm-queued"):
            run = run_deployment(deployment, parameters={"params": {}, "lineage": "x", "root": str(tmp_path)},
                                 job_variables={"cpus": int(cpus), "working_dir": str(tmp_path)}, timeout=0)

            def queued_job() -> str | None:
                with get_client(sync_client=True) as client:
                    return client.read_flow_run(run.id).infrastructure_pid

            job = wait_for("the flow run's Slurm job", queued_job, 60)
            assert job_field(job, "JobState") == "PENDING"
            subprocess.run(["scancel", job], check=True)

            def crashed():
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(run.id).state
                return state if state.is_crashed() else None

            state = wait_for("the flow run to be Crashed", crashed, 30)
    finally:
        subprocess.run(["scancel", blocker])
    assert state.message.startswith(f"Slurm job {job} ended CANCELLED"), state.message


@slow
def test_waiting_for_jobs_to_end_returns_those_still_queued_or_running(slurm_up):
    """What a study does before it returns: wait for its jobs to leave the queue (the study's final squeue above
    relies on it), and name the ones that have not when the time is up."""
    job = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--time=2", "--wrap=sleep 3"],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        assert wait_ended([job], 0) == [job]
        assert wait_ended([job], 120) == []
        assert job_state(job).state == "COMPLETED"  # not COMPLETING: out of the queue
    finally:
        subprocess.run(["scancel", job])


# --- bad input: exit 2 before any work, one line naming the setting ---------------------------------------------


@slow
@pytest.mark.parametrize("overrides, named", [
    (["slurm.cpus=4096"], "slurm.cpus: 4096 CPUs asked"),
    (["slurm.memory_gb=100000"], "slurm.memory_gb: 100000 GB asked"),
    (["slurm.partition=no-such-partition"], "slurm.partition: no partition 'no-such-partition'"),
    (["slurm.time_minutes=10000000"], "slurm.time_minutes: 10000000 minutes asked"),
    (["lineages=[mle, {name: ple, set: {slurm.gpus: 64}}]"], "slurm.gpus: 64 GPU(s) asked"),
    (["slurm.extra_args=[--constraint=no-such-feature]"], "slurm: the controller would not accept the job"),
])
def test_a_job_slurm_cannot_grant_stops_the_run_before_any_work(slurm_up, project, capsys, overrides, named):
    (project / "params.yaml").write_text(yaml.safe_dump(tiny(lineages=["mle"])))
    args = ["run", "--fan-out", "slurm"] + [x for o in overrides for x in ("--set", o)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"madloop: {named}"), err
    assert not (project / "data").exists()  # not even the study's lock file


@slow
def test_no_controller_and_a_pool_of_another_type_are_refused(slurm_up, prefect_server, project, capsys, tmp_path,
                                                               monkeypatch):
    (project / "params.yaml").write_text(yaml.safe_dump(tiny(lineages=["mle"])))
    unreachable = tmp_path / "slurm.conf"  # this cluster's configuration, with a controller port nobody listens on
    unreachable.write_text(Path("/etc/slurm/slurm.conf").read_text() + "SlurmctldPort=9\n")
    monkeypatch.setenv("SLURM_CONF", str(unreachable))
    assert cli(["run", "--fan-out", "slurm"]) == 2
    assert "madloop: --fan-out slurm: no Slurm controller answers here (sinfo:" in capsys.readouterr().err
    monkeypatch.delenv("SLURM_CONF")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="plain-processes", type="process"))
    assert cli(["run", "--fan-out", "plain-processes"]) == 2
    assert "work pool 'plain-processes' is a 'process' pool, not a Slurm pool" in capsys.readouterr().err
    # (known only once the Prefect server answers, inside the study's lock: its lock file is all that was written)
    assert [p.name for p in (project / "data").rglob("*")] == ["studies", "tiny", ".madloop.lock"]
    assert not (project / "reports").exists()


# --- without Slurm ------------------------------------------------------------------------------------------------


def test_slurm_time_and_gres_formats():
    assert [minutes(t) for t in ("infinite", "1-00:00:00", "2:00:00", "30:00", "45", "1-2")] == \
        [math.inf, 1440, 120, 30, 45, 1440 + 2 * 60]
    assert gpu_count("gpu:a100:4(S:0-1),gpu:2") == 6 and gpu_count("(null)") == 0 and gpu_count("gpu:1") == 1


def test_each_lineage_asks_for_its_own_slurm_params():
    p = load(None, ["slurm.memory_gb=2.5", "slurm.partition=short", "slurm.extra_args=[--account=lab]",
                    "lineages=[mle, {name: ple, set: {slurm.gpus: 1, slurm.cpus: 4}}]"])
    settings = lineage_settings(p, ["mle", "ple"])
    assert resource_args(settings["mle"]) == ["--ntasks=1", "--cpus-per-task=1", "--mem=2560M", "--time=240",
                                              "--partition=short", "--account=lab"]
    assert resource_args(settings["ple"]) == ["--ntasks=1", "--cpus-per-task=4", "--mem=2560M", "--time=240",
                                              "--partition=short", "--gres=gpu:1", "--account=lab"]
    # Where a lineage runs never changes what it makes: no resume hash holds a slurm key.
    plain = validate(tiny(lineages=["mle"]))
    moved = validate({**tiny(lineages=["mle"]), "slurm": {"cpus": 8, "gpus": 2, "partition": "gpu"}})
    assert lineage_recipe(plain, plain.lineages[0]) == lineage_recipe(moved, moved.lineages[0])


def test_the_worker_takes_its_defaults_from_the_slurm_params():
    defaults = SlurmParams().model_dump()
    variables = SlurmVariables().model_dump()
    assert {key: variables[key] for key in defaults} == defaults
    template = SlurmWorker.get_default_base_job_template()
    assert {key: template["variables"]["properties"][key].get("default", []) for key in defaults} == defaults
    assert all(template["job_configuration"][key] == f"{{{{ {key} }}}}" for key in defaults)


@pytest.mark.parametrize("settings, problem", [
    ({}, None),
    ({"partition": "gpu"}, None),
    ({"partition": "nope"}, "slurm.partition: no partition 'nope' on this cluster (cpu, gpu)"),
    ({"cpus": 65}, "slurm.cpus: 65 CPUs asked, the default partition 'cpu' has at most 64 on a node"),
    ({"memory_gb": 300}, "slurm.memory_gb: 300 GB asked, the default partition 'cpu' has at most 250 GB on a node"),
    ({"gpus": 1}, "slurm.gpus: 1 GPU(s) asked, the default partition 'cpu' has none on a node"),
    ({"gpus": 8, "partition": "gpu"}, "slurm.gpus: 8 GPU(s) asked, partition 'gpu' has at most 4 on a node"),
    ({"time_minutes": 2881}, "slurm.time_minutes: 2881 minutes asked, the default partition 'cpu' allows at most 2880"),
])
def test_what_a_partition_cannot_grant_is_named(settings, problem):
    known = {"cpu": Partition("cpu", True, True, 64, 256000, 0, 2880),
             "gpu": Partition("gpu", False, True, 32, 512000, 4, math.inf)}
    assert partition_problem(SlurmParams(**settings), known) == problem


def test_prefect_finds_the_worker_type_through_the_entry_point_without_torch():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '[project.entry-points."prefect.collections"]\nmadloop = "flows.slurm"' in pyproject
    # Prefect's server imports every collection when it starts: this one must stay light.
    probe = ("import sys, flows.slurm; from prefect.workers.base import BaseWorker; "
             f"assert BaseWorker.get_worker_class_from_type({WORKER_TYPE!r}) is flows.slurm.SlurmWorker; "
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models'))))")
    out = subprocess.run([sys.executable, "-c", "import json; " + probe], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["models", "models.registry"]
