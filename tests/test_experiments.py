"""DVC experiments and MLflow runs together: a sweep queued with `dvc exp run --queue` runs in DVC's temporary
copies of the repository, yet logs to the repository's one mlflow.db, each run tagged with its experiment; a later
plain run adds its own runs and erases none. A real git + DVC repo, real `dvc` and `madloop` commands."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import BIN, REPO, tiny
from tests.test_dvc_pipeline import dvc, git


def study_project(project, env) -> str:
    """The repository's study stage and code in ``project``, a tiny study in params.yaml, committed; its commit."""
    for name in ("flows", "tasks", "models"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"study": stages["study"]}}, sort_keys=False))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny(loop__generations=1).items():
        params[section] = {**params[section], **values} if isinstance(values, dict) else values
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("mlflow.db\nmlruns/\n")
    git(project, env, "add", "-A")
    git(project, env, "commit", "-qm", "study")
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.slow
def test_a_queued_sweep_and_a_plain_run_leave_their_runs_side_by_side_in_the_one_store(project, subprocess_env):
    env = {**subprocess_env, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x"}
    commit = study_project(project, env)
    for epochs in (2, 4):
        dvc(project, env, "exp", "run", "--queue", "study", "-S", f"train.epochs={epochs}")
    dvc(project, env, "exp", "run", "--run-all")  # each in a copy of the repository under .dvc/tmp/exps/
    experiments = set(dvc(project, env, "exp", "list", "--name-only").stdout.split())
    assert len(experiments) == 2
    done = subprocess.run([str(BIN / "madloop"), "run", "--quiet"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    assert list(project.rglob("mlflow.db")) == [project / "mlflow.db"]
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("madloop/tiny")
    assert experiment.artifact_location == (project / "mlruns").as_uri()  # not the deleted temporary copy's
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert all(r.info.lifecycle_stage == "active" and r.info.status == "FINISHED" for r in runs)
    parents = [r for r in runs if "madloop.lineage" in r.data.tags and "mlflow.parentRunId" not in r.data.tags]
    by_epochs = {r.data.params["train.epochs"]: r for r in parents}
    assert sorted(by_epochs) == ["2", "3", "4"] and len(parents) == 3  # three sets of lineage runs, none erased
    for parent in parents:
        tags = parent.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert [c.data.tags["madloop.generation"] for c in children] == ["0"]
        assert all(c.data.tags.get("dvc.exp_name") == tags.get("dvc.exp_name") for c in children)
    assert {by_epochs[e].data.tags["dvc.exp_name"] for e in ("2", "4")} == experiments
    assert {by_epochs[e].data.tags["dvc.exp_baseline_rev"] for e in ("2", "4")} == {commit}
    assert "dvc.exp_name" not in by_epochs["3"].data.tags and by_epochs["3"].info.run_name == "mle"
    assert by_epochs["2"].info.run_name == f"mle [{by_epochs['2'].data.tags['dvc.exp_name']}]"
    # the datasets' DVC paths are the repository's, as `dvc exp apply` + `dvc checkout` bring them back
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == by_epochs["4"].info.run_id)
    assert child.data.tags["dvc.produced.path"] == "data/studies/tiny/mle/dataset-001.parquet"
    assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"model-000.safetensors", "samples-000.png"}


def test_a_relative_store_is_the_repositorys_from_a_dvc_experiments_temporary_copy(tmp_path, monkeypatch):
    """DVC runs a queued experiment in <repo>/.dvc/tmp/exps/tmpXXXX/, a copy of the repository it deletes after,
    and names the repository in DVC_ROOT; the folder of the copy maps to the same folder of the repository."""
    from tasks.tracking import tracking_uri

    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (copy / ".dvc").mkdir(parents=True)
    (copy / "sub").mkdir()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking_uri("sqlite:///mlflow.db", copy) == f"sqlite:///{copy / 'mlflow.db'}"  # outside DVC: as given
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking_uri("sqlite:///mlflow.db", copy) == f"sqlite:///{repo / 'mlflow.db'}"
    assert tracking_uri("sqlite:///mlflow.db", copy / "sub") == f"sqlite:///{repo / 'sub' / 'mlflow.db'}"
    assert tracking_uri("sqlite:///mlflow.db", repo) == f"sqlite:///{repo / 'mlflow.db'}"  # dvc repro, dvc exp run
    assert tracking_uri("sqlite:////srv/mlflow.db", copy) == "sqlite:////srv/mlflow.db"  # absolute: as given
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    assert tracking_uri("sqlite:///mlflow.db", elsewhere) == f"sqlite:///{elsewhere / 'mlflow.db'}"
