"""Crash consistency, in the spirit of SQLite's crash tests: a `madloop run` is killed (SIGKILL, by itself, exactly
at a write point: tests/crash_hooks/sitecustomize.py) and resumed; the result must equal an uninterrupted run's.
Each kind of file is corrupted and must be detected and redone; two runs of one study race; the temporary Prefect
server dies with its parent. Real Prefect, DVC and MLflow throughout."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

import flows.loop
import tasks.observers
from flows.cli import main as cli
from flows.loop import lineage_loop, run_study, self_consuming_loop
from tasks import as_task
from tasks.layout import StudyPaths
from tasks.params import validate
from tasks.recovery import clean_up_dead_runs
from tasks.resume import StaleOutputsError
from tasks.storage import json_safe, read_manifest, write_manifest
from tasks.versioning import dvc_add, tracked_md5s
from tests.conftest import REPO, git_dvc_repo, tiny

pytestmark = pytest.mark.slow

HOOKS = Path(__file__).parent / "crash_hooks"
PARAMS = tiny(study__name="crash")  # one lineage (mle), two generations
GENERATIONS = PARAMS["loop"]["generations"]
FLOWS = [self_consuming_loop.name, lineage_loop.name]


def folder(root: Path) -> Path:
    return StudyPaths(root, "crash").lineage("mle")


def snapshot(root: Path) -> dict:
    """Everything a run produces that must not depend on whether it was interrupted (not: timings)."""
    out = {}
    for k in range(GENERATIONS):
        m = read_manifest(folder(root) / f"gen-{k:03d}.json")
        out[k] = {key: json_safe(m[key]) for key in ("outputs", "metrics", "data", "md5", "recipe_hash",
                                                    "score_hash")}
        out[k]["trained_on"] = m["trained_on"]
    reports = root / "reports" / "crash"
    rows = list(csv.DictReader(io.StringIO((reports / "generations.csv").read_text())))
    out["generations.csv"] = [{k: v for k, v in row.items() if k != "fit_seconds"} for row in rows]
    out["metrics.json"] = {name: {k: v for k, v in last.items() if k != "fit_seconds"}
                           for name, last in json.loads((reports / "metrics.json").read_text()).items()}
    out["summary.md"] = (reports / "summary.md").read_text()
    return out


def write_params(root: Path, params: dict = PARAMS, cache_from: Path | None = None) -> Path:
    """The study's params.yaml in ``root``; with ``cache_from``, that project's classifier cache too (verified on
    load like any cache entry), so a child run does not train it again."""
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    if cache_from is not None:
        shutil.copytree(cache_from / "data" / "cache", root / "data" / "cache", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.lock"))
    return path


def child_env(env: dict, hook: dict | None) -> dict:
    out = {**env, "PYTHONPATH": os.pathsep.join([str(HOOKS), str(REPO), env.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2"}  # the same arithmetic as this process (conftest: torch.set_num_threads(2))
    if hook:
        out["MADLOOP_TEST_HOOK"] = json.dumps(hook)
    return out


def default_sigint() -> None:
    """In the child before exec: Ctrl-C as in a terminal. A suite started in the background (``cmd &`` from a
    script) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the Ctrl-C test's
    child slept through its SIGINT until the test timed out (seen in two CI runs started that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def madloop(root: Path, env: dict, *args: str, hook: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--quiet", *args], cwd=root,
                            env=child_env(env, hook), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint, **kwargs)


def temp_files(root: Path) -> list[Path]:
    return [p for base in ("data", "reports") for p in (root / base).rglob(".*.tmp")]


def mlflow_runs(root: Path) -> tuple[list, list]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("madloop/crash")
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000) if r.info.lifecycle_stage == "active"]
    return ([r for r in runs if "mlflow.parentRunId" not in r.data.tags],
            [r for r in runs if "mlflow.parentRunId" in r.data.tags])


def flow_runs(root: Path, states: list[str]) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=FLOWS)), limit=200)
    return [r for r in runs if r.state_type.value in states and Path(r.parameters.get("root", ".")).resolve() == root]


def assert_consistent(root: Path, reference: dict) -> None:
    """The state a finished run must leave, whatever happened before."""
    assert snapshot(root) == reference
    assert temp_files(root) == []
    parents, children = mlflow_runs(root)
    assert [p.info.status for p in parents] == ["FINISHED"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(parents[0].info.run_id, "fid")) == list(range(GENERATIONS))
    assert sorted((int(c.data.tags["madloop.generation"]), c.info.status) for c in children) == [
        (k, "FINISHED") for k in range(GENERATIONS)]
    for child in children:
        k = int(child.data.tags["madloop.generation"])
        assert child.data.metrics["fid"] == pytest.approx(reference[k]["metrics"]["fid"])
    assert flow_runs(root, ["RUNNING"]) == []
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        assert repo.status() == {}
    tracked = tracked_md5s(root, folder(root))
    for k in range(GENERATIONS):
        assert {n: tracked[n] for n in reference[k]["md5"]} == reference[k]["md5"]


# --- the uninterrupted run, with `dvc add` checked after each generation --------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect_server) -> dict:
    root = git_dvc_repo(tmp_path_factory.mktemp("reference") / "project")
    adds = []

    def checked_dvc_add(root: Path, targets: list[Path]) -> None:
        dvc_add(root, targets)
        adds.append({t.name: tracked_md5s(root, t) for t in targets})

    with pytest.MonkeyPatch.context() as patch:
        checked = as_task(checked_dvc_add, retries=2)
        patch.setattr(flows.loop, "dvc_add_task", checked)  # the study's adds
        patch.setattr(tasks.observers, "dvc_add_task", checked)  # each lineage's (tasks.observers.DvcAdder)
        run_study(validate(PARAMS), root)
    return {"root": root, "snapshot": snapshot(root), "adds": adds}


def test_dvc_add_records_each_generation_as_it_finishes(reference):
    lineage_adds = [add["mle"] for add in reference["adds"] if "mle" in add]
    # once per generation, right after it (and the study's one add of all its lineages at the end, unchanged)
    assert len(lineage_adds) == GENERATIONS + 1 and lineage_adds[-1] == lineage_adds[-2]
    for k, tracked in enumerate(lineage_adds[:GENERATIONS]):
        md5 = reference["snapshot"][k]["md5"]
        assert {name: tracked.get(name) for name in md5} == md5, k  # generation k's files, as its manifest says
        assert f"gen-{k + 1:03d}.json" not in tracked


KILL_POINTS = {
    # the manifest of generation 1 is written to its temporary file, not renamed: its other files have no manifest
    "between-temp-write-and-rename": {"point": "replace", "match": "gen-001.json"},
    "inside-dvc-add": {"point": "dvc_dump", "match": "mle.dvc", "nth": 2},  # generation 1's add
    "inside-mlflow-upload": {"point": "artifact", "match": "model-001"},  # generation 1's picture is up, not its model
    "inside-report-write": {"point": "replace", "match": "summary.md"},  # generations.csv and metrics.json written
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_run_killed_at_a_write_point_resumes_to_what_an_uninterrupted_run_makes(point, reference, project,
                                                                                  subprocess_env, tmp_path):
    write_params(project, cache_from=reference["root"])
    marker = tmp_path / "marker"
    proc = madloop(project, subprocess_env, hook={**KILL_POINTS[point], "marker": str(marker)})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert marker.is_file(), out[-3000:]
    if point == "between-temp-write-and-rename":
        assert [p.name.split(".")[1] for p in temp_files(project)] == ["gen-001"]
    assert flow_runs(project, ["RUNNING"])  # what the killed process left behind

    p = validate(PARAMS)
    if point == "inside-dvc-add":  # what the next run of the study cleans up first, said line by line
        done = clean_up_dead_runs(p, StudyPaths(project, "crash"), FLOWS, project)
        assert any("marked KILLED 1 MLflow run" in line for line in done), done
        assert any("marked Crashed 2 Prefect flow run" in line for line in done), done
        assert len(flow_runs(project, ["CRASHED"])) == 2
        parents, _ = mlflow_runs(project)
        assert [r.info.status for r in parents] == ["KILLED"]
    run_study(p, project)
    assert_consistent(project, reference["snapshot"])
    if point == "between-temp-write-and-rename":  # generation 1's unvouched files were kept aside, then redone
        assert list((project / ".madloop" / "trash").rglob("model-001.safetensors"))


# --- corrupt each kind of file ----------------------------------------------------------------------------------

def flip(path: Path, offset: int = -200) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01  # a low bit, as bit rot does
    path.write_bytes(bytes(data))


def test_every_kind_of_corrupt_file_is_detected_kept_aside_and_redone(reference, project, prefect_server, caplog):
    p = validate(PARAMS)
    run_study(p, project)
    paths, lin = StudyPaths(project, "crash"), folder(project)
    classifier = next(paths.cache.glob("classifier-*.safetensors"))

    def rerun(*warnings_expected: str) -> str:
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_study(p, project)
        said = caplog.text + "\n".join(str(w.message) for w in caught)
        for text in warnings_expected:
            assert text in said, (text, said[-3000:])
        assert_consistent(project, reference["snapshot"])
        return said

    # the real data, the classifier cache and a dataset at once: each found on its own
    flip(next(paths.real.glob("train-*.parquet")))
    flip(classifier)
    flip(lin / "dataset-002.parquet")
    rerun("writing the real data again", "cached domain classifier cannot be used", "is corrupt: its sha256",
          "dataset-002.parquet is corrupt")
    assert len(list((project / ".madloop" / "trash").rglob("dataset-002.parquet"))) == 1

    flip(lin / "model-000.safetensors", offset=-20)  # low mantissa bits of a weight
    rerun("model-000.safetensors is corrupt")

    flip(lin / "samples-001.png", offset=-30)
    rerun("samples-001.png is corrupt")

    manifest = lin / "gen-001.json"
    fid = read_manifest(manifest)["metrics"]["fid"]
    manifest.write_text(manifest.read_text().replace(json.dumps(fid), "1.0"))  # FID 215 -> 1.0, by hand
    with pytest.warns(UserWarning, match="gen-001.json was edited or is corrupt"):
        assert cli(["show", "--params", str(write_params(project)), "--root", str(project)]) == 0
    rerun("gen-001.json was edited or is corrupt")

    (lin / "gen-000.json").unlink()
    rerun("gen-000.json is missing, but files of generations 0-1 are on disk")

    real_manifest = paths.real_manifest
    real_manifest.write_text(real_manifest.read_text().replace('"rows"', '"rowz"'))
    sidecar = classifier.with_suffix(".json")  # a recorded accuracy that the classifier does not reach
    write_manifest(sidecar, {**read_manifest(sidecar), "accuracy": read_manifest(sidecar)["accuracy"] - 0.3})
    rerun("manifest.json was edited or is corrupt", "when it was trained")


def test_rescoring_updates_mlflow_too(reference, project, prefect_server):
    run_study(validate(PARAMS), project)
    rescored = tiny(study__name="crash", score__samples=120)
    run_study(validate(rescored), project)
    parents, children = mlflow_runs(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    for k in range(GENERATIONS):
        manifest = read_manifest(folder(project) / f"gen-{k:03d}.json")
        kept = {name: sha for name, sha in manifest["outputs"].items() if not name.endswith(".png")}
        assert kept == {n: s for n, s in reference["snapshot"][k]["outputs"].items() if n in kept}  # not retrained
        assert manifest["metrics"]["fid"] != reference["snapshot"][k]["metrics"]["fid"]  # re-scored
        child = next(c for c in children if c.data.tags["madloop.generation"] == str(k))
        assert child.data.metrics["fid"] == pytest.approx(manifest["metrics"]["fid"])
        history = [m for m in client.get_metric_history(parents[0].info.run_id, "fid") if m.step == k]
        assert max(history, key=lambda m: m.timestamp).value == pytest.approx(manifest["metrics"]["fid"])
    assert len(children) == GENERATIONS  # the old scores' runs were replaced, not kept beside


# --- what a person sees when it fails ----------------------------------------------------------------------------

def test_a_failure_is_one_line_and_exit_1_and_ctrl_c_is_exit_130(project, subprocess_env, tmp_path):
    write_params(project, tiny(study__name="crash", train__lr=1e12))
    failed = madloop(project, subprocess_env)
    out, _ = failed.communicate(timeout=600)
    assert failed.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("madloop: lineage 'mle', generation 0: training diverged") and "--debug" in last, last

    write_params(project)
    proc = madloop(project, subprocess_env, hook={"point": "replace", "match": "gen-000.json", "action": "pause",
                                                  "marker": str(tmp_path / "paused"), "go": str(tmp_path / "never")})
    deadline = time.time() + 600
    while not (tmp_path / "paused").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("madloop: interrupted"), out[-3000:]


# --- two runs of one study ---------------------------------------------------------------------------------------

def test_a_second_run_of_a_study_is_refused_or_waits_and_never_mixes(reference, project, subprocess_env, tmp_path,
                                                                     capsys):
    write_params(project, cache_from=reference["root"])
    go = tmp_path / "go"
    first = madloop(project, subprocess_env, hook={"point": "replace", "match": "gen-000.json", "action": "pause",
                                                   "marker": str(tmp_path / "paused"), "go": str(go)})
    try:
        deadline = time.time() + 600
        while not (tmp_path / "paused").exists():
            assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
            time.sleep(0.2)
        # the same study with other params (the review's epochs 60 vs 100): refused at once, naming the holder
        assert cli(["run", "--quiet", "--set", "train.epochs=4", "--root", str(project)]) == 2
        err = capsys.readouterr().err
        assert f"study 'crash' is already being run by pid {first.pid}" in err and "--wait" in err, err

        told, outcome = threading.Event(), {}

        def second():
            try:
                run_study(validate(tiny(study__name="crash", train__epochs=4)), project, wait=True,
                          on_wait=lambda line: told.set())
            except StaleOutputsError as err:
                outcome["error"] = str(err)

        waiter = threading.Thread(target=second)
        waiter.start()
        assert told.wait(60) and waiter.is_alive()  # waiting, not working
        go.touch()
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
        waiter.join(timeout=120)
        # it then found the first run's outputs, made under other params: it stops, and nothing is mixed
        assert "train.epochs: 3 -> 4" in outcome.get("error", ""), outcome
    finally:
        go.touch()
        first.kill()
        first.wait()
    for k in range(GENERATIONS):
        assert read_manifest(folder(project) / f"gen-{k:03d}.json")["recipe"]["train.epochs"] == 3
    rows = list(csv.DictReader(io.StringIO((project / "reports" / "crash" / "generations.csv").read_text())))
    assert [(r["lineage"], r["generation"]) for r in rows] == [("mle", "0"), ("mle", "1")]


# --- the temporary Prefect server dies with its parent -----------------------------------------------------------

def test_the_temporary_prefect_server_dies_with_a_killed_run(project, subprocess_env, tmp_path):
    write_params(project)
    env = {**subprocess_env, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}
    env.pop("PREFECT_API_URL")  # no server configured: the run starts its own
    proc = madloop(project, env, hook={"point": "replace", "match": "real/manifest.json", "action": "pause",
                                       "marker": str(tmp_path / "paused"), "go": str(tmp_path / "never")})
    try:
        deadline = time.time() + 600
        while not (tmp_path / "paused").exists():  # the flow is running on its own server
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        servers = [c for c in psutil.Process(proc.pid).children() if "prefect server start" in " ".join(c.cmdline())]
        assert len(servers) == 1
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        gone, alive = psutil.wait_procs(servers, timeout=30)
        assert not alive, [s.cmdline() for s in alive]
    finally:
        proc.kill()
        proc.wait()
