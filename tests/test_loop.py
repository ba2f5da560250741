"""End to end: real Prefect flow runs, a real DVC repo, a real MLflow sqlite store."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main as cli
from flows.loop import run_study, self_consuming_loop
from tasks.datasets import read_parquet
from tasks.params import validate
from tasks.resume import StaleOutputsError
from tasks.storage import file_digest, read_json, read_manifest
from tasks.versioning import tracked_md5s
from tests.conftest import tiny
from tests.kit import dataset_zero

METRICS = ["fid", "kid", "precision", "recall", "minority_share", "fid_majority", "fid_minority", "r_fair"]
pytestmark = pytest.mark.slow


def mlflow_client(project):
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def lineage_runs(client, study):
    exp = client.get_experiment_by_name(f"madloop/{study}")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "madloop.lineage" in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_two_generation_loop_end_to_end(project, prefect_server):
    rows = self_consuming_loop(params=tiny(), root=str(project))
    assert [(r["lineage"], r["generation"]) for r in rows] == [("mle", 0), ("mle", 1)]

    folder = project / "data" / "studies" / "tiny" / "mle"
    real_train = dataset_zero(project / "data" / "studies" / "tiny", "mle")
    assert set(real_train.origin) == {"real"} and set(real_train.generation) == {0}
    for k in (1, 2):  # dataset k was made by generation k-1's model
        data = read_parquet(folder / f"dataset-{k:03d}.parquet")
        assert len(data) == len(real_train)
        assert set(data.origin) == {"synthetic"} and set(data.generation) == {k} and set(data.lineage) == {"mle"}
        assert (data.label == -1).all()

    # DVC: the lineage folder is tracked, file by file, and the workspace matches what DVC recorded
    md5s = tracked_md5s(project, folder)
    for name in ("dataset-001.parquet", "dataset-002.parquet", "model-000.safetensors", "gen-001.json"):
        assert md5s[name] == file_digest(folder / name, "md5")
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        assert repo.status() == {}

    # MLflow: one parent run for the lineage, metrics at steps 0 and 1, a nested run per generation
    client = mlflow_client(project)
    parents, children = lineage_runs(client, "tiny")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    for tag, value in {"lineage": "mle", "estimator": "mle", "loop_mode": "replace", "data_source": "digits",
                       "seed": "0"}.items():
        assert parent.data.tags[tag] == value
    manifests = [read_manifest(folder / f"gen-{k:03d}.json")["metrics"] for k in (0, 1)]
    for name in METRICS:  # every defined value at its step; an undefined one (NaN) is left out, not logged as NaN
        steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, name))
        defined = [k for k in (0, 1) if manifests[k][name] is not None and math.isfinite(manifests[k][name])]
        assert steps == defined, name
    assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "fid")) == [0, 1]
    for child in children:
        k = int(child.data.tags["madloop.generation"])
        produced = folder / f"dataset-{k + 1:03d}.parquet"
        assert child.data.tags["dvc.produced.md5"] == file_digest(produced, "md5") == md5s[produced.name]
        trained_on = project / child.data.tags["dvc.trained_on.path"]
        assert child.data.tags["dvc.trained_on.md5"] == file_digest(trained_on, "md5")
        assert child.data.params["train.epochs"] == "3" and child.data.params["generation"] == str(k)
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {f"samples-{k:03d}.png", f"model-{k:03d}.safetensors"} <= artifacts
    assert (project / "reports" / "tiny" / "generations.csv").read_text().count("\nmle,") == 2


def test_kill_and_resume_does_not_redo_finished_generations(project, subprocess_env):
    args = [sys.executable, "-m", "flows.cli", "run", "--quiet", "--set", "study.name=killed",
            "--set", "loop.generations=4", "--set", "train.epochs=150", "--set", "classifier.epochs=2",
            "--set", "score.samples=120", "--set", "lineages=[mle]",
            "--set", "tracking.batch_records=never"]  # a nested run per generation
    folder = project / "data" / "studies" / "killed" / "mle"
    proc = subprocess.Popen(args, cwd=project, env=subprocess_env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not (folder / "gen-000.json").exists():
        assert proc.poll() is None, "the run ended before its first generation"
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in folder.glob("gen-*.json"))
    assert finished and len(finished) < 4, finished
    before = {name: (folder / name).stat().st_mtime_ns for name in finished}
    model_before = file_digest(folder / "model-000.safetensors")

    done = subprocess.run(args, cwd=project, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: generations 0-{len(finished) - 1} are finished" in done.stdout + done.stderr
    assert sorted(p.name for p in folder.glob("gen-*.json")) == [f"gen-{k:03d}.json" for k in range(4)]
    assert {name: (folder / name).stat().st_mtime_ns for name in finished} == before  # not redone
    assert file_digest(folder / "model-000.safetensors") == model_before

    client = mlflow_client(project)
    parents, children = lineage_runs(client, "killed")
    live = [c for c in children if c.info.lifecycle_stage == "active"]
    assert sorted(int(c.data.tags["madloop.generation"]) for c in live) == [0, 1, 2, 3]
    assert len(parents) == 1
    steps = [m.step for m in client.get_metric_history(parents[0].info.run_id, "fid")]
    assert sorted(steps) == [0, 1, 2, 3]  # each generation once, despite the kill


def test_more_generations_extend_a_lineage_and_a_corrupt_file_is_never_used(project, prefect_server, caplog):
    folder = project / "data" / "studies" / "tiny" / "mle"
    self_consuming_loop(params=tiny(loop__generations=1), root=str(project))
    gen0 = (folder / "gen-000.json").stat().st_mtime_ns
    rows = self_consuming_loop(params=tiny(), root=str(project))  # 2 generations: extends, gen 0 is reused
    assert [r["generation"] for r in rows] == [0, 1]
    assert (folder / "gen-000.json").stat().st_mtime_ns == gen0

    victim = folder / "dataset-002.parquet"  # produced by generation 1
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    self_consuming_loop(params=tiny(), root=str(project))
    assert "dataset-002.parquet is corrupt" in caplog.text
    assert (folder / "gen-000.json").stat().st_mtime_ns == gen0  # generation 0 kept
    assert len(read_parquet(victim)) > 0  # generation 1 redone: a valid file again
    manifest = read_json(folder / "gen-001.json")
    assert manifest["outputs"]["dataset-002.parquet"] == file_digest(victim)
    trashed = list((project / ".madloop" / "trash").rglob("dataset-002.parquet"))
    assert len(trashed) == 1 and trashed[0].stat().st_size == 100  # kept, not lost


def test_outputs_of_other_params_are_refused_then_replaced_with_overwrite(project, prefect_server):
    self_consuming_loop(params=tiny(), root=str(project))
    folder = project / "data" / "studies" / "tiny" / "mle"
    snapshot = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    changed = validate(tiny(train__epochs=4))
    with pytest.raises(StaleOutputsError) as err:
        run_study(changed, project)
    assert "train.epochs: 3 -> 4" in str(err.value) and "--overwrite" in str(err.value)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == snapshot  # nothing touched

    run_study(changed, project, overwrite=True)
    assert read_json(folder / "gen-000.json")["recipe"]["train.epochs"] == 4
    assert list((project / ".madloop" / "trash").rglob("gen-000.json"))  # the old lineage kept aside
    # the replaced lineage's MLflow runs stay as they were, beside the new ones: MLflow compares the two
    parents, children = lineage_runs(mlflow_client(project), "tiny")
    assert all(r.info.lifecycle_stage == "active" for r in [*parents, *children])
    assert sorted(r.data.params["train.epochs"] for r in parents) == ["3", "4"]
    assert len({r.data.tags["madloop.recipe"] for r in parents}) == 2
    assert {r.info.status for r in parents} == {"FINISHED"} and len(children) == 4


def test_cli_rejects_bad_params_before_any_work(project, capsys):
    code = cli(["run", "--set", "data.imbalance_ratio=0.5", "--set", "loop.generations=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ["madloop: invalid params: data.imbalance_ratio: Input should be greater "
                                        "than or equal to 1 (got 0.5)"]
    assert not (project / "data").exists() and not (project / "mlflow.db").exists()


def test_cli_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        cli(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "show", "params"):
        assert command in out
    with pytest.raises(SystemExit):
        cli(["run", "--help"])
    out = capsys.readouterr().out
    assert "--set" in out and "--params" in out and "--overwrite" in out


def test_mle_and_ple_lineages_land_side_by_side(project, prefect_server):
    rows = self_consuming_loop(params=tiny(lineages=["mle", "ple", "hyper_nopenalty"]), root=str(project))
    assert sorted({r["lineage"] for r in rows}) == ["hyper_nopenalty", "mle", "ple"]
    client = mlflow_client(project)
    parents, children = lineage_runs(client, "tiny")
    assert sorted(r.data.tags["lineage"] for r in parents) == ["hyper_nopenalty", "mle", "ple"]
    assert len(children) == 6
    for parent in parents:
        steps = sorted(m.step for m in client.get_metric_history(parent.info.run_id, "fid"))
        assert steps == [0, 1]
        folder = project / "data" / "studies" / "tiny" / parent.data.tags["lineage"]
        assert (folder / "dataset-002.parquet").is_file() and (folder.parent / f"{folder.name}.dvc").is_file()
    ple = read_json(project / "data" / "studies" / "tiny" / "ple" / "gen-000.json")
    assert ple["recipe"]["ple.lam"] == 0.1 and ple["info"]["hyper_weights"] > 0
    control = read_json(project / "data" / "studies" / "tiny" / "hyper_nopenalty" / "gen-000.json")
    assert control["recipe"]["ple.lam"] == 0.0  # fixed by the estimator, whatever params say
    mle = read_json(project / "data" / "studies" / "tiny" / "mle" / "gen-000.json")
    assert not any(key.startswith("ple.") for key in mle["recipe"])  # mle reads no ple.* setting


@pytest.mark.parametrize("family", ["gmm", "uniform"])
def test_1d_families_run_through_the_same_flow_by_params_alone(project, prefect_server, family):
    params = tiny(model__family=family, data__source="model", data__size=50,
                  lineages=["mle", "ple"] + (["ple_closed"] if family == "uniform" else []),
                  train__epochs=20, train__batch_size=50, ple__m=4, score__mc_samples=2000)
    rows = self_consuming_loop(params=params, root=str(project))
    lineages = {r["lineage"] for r in rows}
    assert lineages == ({"mle", "ple", "ple_closed"} if family == "uniform" else {"mle", "ple"})
    for row in rows:
        assert row["kl"] >= 0 or row["kl"] == float("inf")
        assert row["wasserstein"] >= 0
        assert any(key.startswith("bias.") for key in row)
    data = read_parquet(project / "data" / "studies" / "tiny" / "mle" / "dataset-001.parquet")
    assert data.pixels.shape == (50, 1) and set(data.origin) == {"synthetic"}
    client = mlflow_client(project)
    parents, _ = lineage_runs(client, "tiny")
    assert {m.step for m in client.get_metric_history(parents[0].info.run_id, "kl")} == {0, 1}


def test_a_1d_study_over_five_seeds_draws_five_real_datasets_and_its_interval_is_not_zero_wide(project,
                                                                                               prefect_server):
    import csv

    params = tiny(model__family="gaussian", data__source="model", data__size=20, loop__generations=1,
                  lineages=[{"name": "mle", "seeds": [0, 1, 2, 3, 4]}])
    rows = self_consuming_loop(params=params, root=str(project))
    stds = [row["param.std"] for row in rows if row["generation"] == 0]
    assert len(stds) == 5 and len(set(stds)) == 5  # each seed its own real draw, not the study's one
    with open(project / "reports" / "tiny" / "recipes.csv") as f:
        (recipe,) = [r for r in csv.DictReader(f) if r["generation"] == "0"]
    low, high = float(recipe["param.std_low"]), float(recipe["param.std_high"])
    assert 0 < low < float(recipe["param.std"]) < high  # a std: positive bounds, and a real width
