"""What MLflow, Prefect and DVC users expect to see: recipe params, datasets as inputs, no NaN last values, images per
step; readable Prefect run names, tags and artifacts; recipes summarised over seeds; ``madloop show`` of what is on
disk; offline plots. Real Prefect server, real DVC repos, real MLflow stores."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from flows.cli import main as cli
from flows.loop import self_consuming_loop
from tasks.params import validate
from tasks.progress import watch
from tasks.reports import recipe_summary, summary_markdown
from tasks.storage import FILE_MODE, file_digest, read_json, write_json_atomic
from tests.conftest import REPO, tiny


def mlflow_client(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def runs_of(client: MlflowClient, study: str):
    experiment = client.get_experiment_by_name(f"madloop/{study}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.data.tags["lineage"]: r for r in runs
               if "madloop.lineage" in r.data.tags and "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return experiment, parents, children, runs


def context(dataset_input) -> str:
    return next(t.value for t in dataset_input.tags if t.key == "mlflow.data.context")


def commit_all(project: Path) -> str:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=project, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, check=True, capture_output=True,
                          text=True).stdout.strip()


def prefect_query(fn, until, timeout: float = 30.0):
    """Prefect records task runs from events, a moment after they ran: ask until ``until(answer)`` holds."""
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    while True:
        with get_client(sync_client=True) as client:
            answer = fn(client)
        if until(answer) or time.time() > deadline:
            return answer
        time.sleep(0.5)


@pytest.mark.slow
def test_mlflow_and_prefect_show_a_study_as_their_users_expect(project, prefect_server):
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey,
                                                FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId)

    commit = commit_all(project)
    # min_class_samples above the samples drawn: the minority FID, hence R_Fair, is undefined at every generation
    params = tiny(lineages=["mle", "ple"], score__min_class_samples=1000)
    reports = []
    with watch(reports.append):
        state = self_consuming_loop(params=params, root=str(project), return_state=True)
    assert state.is_completed()
    finished = {(r.lineage, r.generation) for r in reports if r.finished}
    assert finished == {(n, k) for n in ("mle", "ple") for k in (0, 1)}
    assert any(r.epochs == 3 and r.epoch == 3 for r in reports)  # the estimators' per-epoch progress reached us

    client = mlflow_client(project)
    experiment, parents, children, _ = runs_of(client, "tiny")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert set(parents) == {"mle", "ple"} and len(children) == 4
    recipe = read_json(project / "data" / "studies" / "tiny" / "ple" / "gen-000.json")["recipe"]
    for name, parent in parents.items():
        data = parent.data
        assert data.params["train.epochs"] == "3" and data.params["lineage.estimator"] == name
        assert data.tags["mlflow.source.git.commit"] == commit and data.tags["mlflow.user"]
        assert data.tags["madloop.undefined.r_fair"] == "0, 1"  # where it is left out
        for key in [*data.metrics, "fid_minority", "r_fair"]:
            history = client.get_metric_history(parent.info.run_id, key)
            assert all(math.isfinite(m.value) for m in history), key  # never NaN, so never a NaN last value
        assert "r_fair" not in data.metrics and "fid_minority" not in data.metrics
        assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "fit_seconds")) == [0, 1]
        images = [a.path for a in client.list_artifacts(parent.info.run_id, "images")]
        assert {int(re.search(r"[+%]step[+%](\d+)[+%]", p).group(1)) for p in images if p.endswith(".png")} == {0, 1}
    assert {k: parents["ple"].data.params[k] for k in recipe} == {k: str(v) for k, v in recipe.items()}
    for child in children:
        lineage, k = child.data.tags["madloop.lineage"], int(child.data.tags["madloop.generation"])
        folder = project / "data" / "studies" / "tiny" / lineage
        inputs = {context(i): i.dataset for i in client.get_run(child.info.run_id).inputs.dataset_inputs}
        produced = folder / f"dataset-{k + 1:03d}.parquet"
        assert inputs["produced"].digest == file_digest(produced, "md5")
        assert str(project / inputs["produced"].source.split('"')[3]) == str(produced)
        trained_on = project / child.data.tags["dvc.trained_on.path"]
        assert inputs["training"].digest == file_digest(trained_on, "md5")
    models = client.search_logged_models([experiment.experiment_id])
    assert sorted(m.name for m in models) == ["mle-gen000", "mle-gen001", "ple-gen000", "ple-gen001"]

    study_run = state.state_details.flow_run_id
    lineage_runs = prefect_query(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(
        parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[study_run]))), lambda runs: len(runs) == 2)
    study = prefect_query(lambda c: c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
        any_=[study_run]))), lambda runs: bool(runs))[0]
    assert study.name == "study tiny" and {"madloop", "study:tiny"} <= set(study.tags)
    by_name = {run.name: run for run in lineage_runs}
    assert set(by_name) == {"tiny/mle", "tiny/ple"}
    assert {"lineage:ple", "study:tiny", "estimator:ple", "recipe:ple"} <= set(by_name["tiny/ple"].tags)
    ple = by_name["tiny/ple"].id
    tasks = prefect_query(lambda c: c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[ple]))),
                          lambda runs: "fit-model [ple gen 1]" in {t.name for t in runs})
    assert {"fit-model [ple gen 0]", "fit-model [ple gen 1]", "score-model [ple gen 1]"} <= {t.name for t in tasks}
    artifacts = prefect_query(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[ple]))), lambda found: len(found) >= 2)
    kinds = {a.type: a for a in artifacts}
    assert kinds["progress"].data == 100.0
    tables = [a for a in artifacts if a.type == "table"]  # a version per generation, the same key
    assert {a.key for a in tables} == {"tiny-ple"} and len(tables) == 2
    assert any('"generation": 1' in str(a.data).replace("'", '"') for a in tables)
    # this study run's summary (the server is shared: other tests' studies named tiny have one too)
    summary = prefect_query(lambda c: c.read_artifacts(artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["tiny-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[study_run]))), bool)
    assert len(summary) == 1 and summary[0].type == "markdown" and "| ple | 1 |" in summary[0].data


@pytest.mark.slow
def test_cheap_generations_are_batched_summarised_over_seeds_and_recorded_again_after_a_loss(project, prefect_server):
    params = tiny(model__family="gaussian", data__source="model", data__size=30, loop__generations=3,
                  tracking__batch_records="auto", lineages=[{"name": "mle", "seeds": [0, 1, 2]}])
    rows = self_consuming_loop(params=params, root=str(project))
    assert len(rows) == 9

    client = mlflow_client(project)
    _, parents, children, runs = runs_of(client, "tiny")
    assert set(parents) == {"mle-s0", "mle-s1", "mle-s2"} and children == []  # fits of milliseconds: no nested runs
    for parent in parents.values():
        assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, "kl")) == [0, 1, 2]
        contexts = [context(i) for i in parent.inputs.dataset_inputs]
        assert contexts.count("produced") == 3 and contexts.count("training") == 1  # datasets 1-3; the real data
    # the recipe: a KL is positive and skewed, so its centre and 95% interval over seeds are the geometric mean and a
    # t-interval on the log scale (tasks.stats), in recipes.csv, summary.md and MLflow
    log_kl = np.log(np.array([[r["kl"] for r in rows if r["generation"] == k] for k in range(3)]))
    half = stats.t.ppf(0.975, 2) * log_kl.std(axis=1, ddof=1) / math.sqrt(3)
    recipes = (project / "reports" / "tiny" / "recipes.csv").read_text().splitlines()
    assert recipes[0].startswith("recipe,generation,seeds,param.mean,param.mean_low,param.mean_high")
    assert len(recipes) == 4 and all(line.startswith(f"mle,{k},3,") for k, line in enumerate(recipes[1:]))
    assert "## Recipes: centre [95% interval] over seeds" in (project / "reports" / "tiny" / "summary.md").read_text()
    mean_run = next(r for r in runs if r.data.tags.get("madloop.kind") == "recipe")
    assert mean_run.info.run_name == "mle (mean of 3 seeds)"
    history = {m.step: m.value for m in client.get_metric_history(mean_run.info.run_id, "kl_ci_high")}
    assert [history[k] for k in range(3)] == pytest.approx(np.exp(log_kl.mean(axis=1) + half), rel=1e-9)

    # records lost (as by a kill before a batch was sent; here a fresh store): the next run, which has nothing left
    # to compute, records them again from the manifests, once each
    again = {**params, "tracking": {**params["tracking"], "uri": "sqlite:///fresh.db"}}
    self_consuming_loop(params=again, root=str(project))
    fresh = MlflowClient(tracking_uri=f"sqlite:///{project / 'fresh.db'}")
    _, parents, _, _ = runs_of(fresh, "tiny")
    assert set(parents) == {"mle-s0", "mle-s1", "mle-s2"}
    for parent in parents.values():
        assert sorted(m.step for m in fresh.get_metric_history(parent.info.run_id, "kl")) == [0, 1, 2]
    self_consuming_loop(params=again, root=str(project))  # and a third run adds nothing
    for parent in parents.values():
        assert sorted(m.step for m in fresh.get_metric_history(parent.info.run_id, "kl")) == [0, 1, 2]


@pytest.mark.slow
def test_show_reads_a_study_run_with_overrides_from_disk(project, prefect_server, capsys):
    overrides = ["--set", "study.name=ui", "--set", "model.family=gaussian", "--set", "data.source=model",
                 "--set", "data.size=30", "--set", "loop.generations=2", "--set", "lineages=[mle]"]
    assert cli(["run", "--quiet", *overrides]) == 0
    capsys.readouterr()
    assert cli(["show", "ui"]) == 0  # no override repeated
    out = capsys.readouterr().out
    assert re.search(r"mle\s+│\s+0 ", out) and re.search(r"mle\s+│\s+1 ", out) and "param.mean" in out
    assert "note: mle: made under other params than these:" in out
    assert "model.family = 'gaussian' (these params: 'vae')" in out
    assert "settings only one of them has: data.size," in out
    assert cli(["show", "nothing-here"]) == 1


def test_recipe_summary_gives_each_quantity_its_interval_over_seeds_for_every_family():
    p = validate(tiny(lineages=[{"name": "mle", "seeds": [0, 1, 2]}, "ple"]))
    fids = {"mle-s0": [10.0, 20.0], "mle-s1": [12.0, 26.0], "mle-s2": [14.0, math.nan], "ple": [9.0, 11.0]}
    rows = [{"lineage": name, "estimator": name.split("-")[0], "generation": k, "fid": fid, "recall": 0.5,
             "minority_share": 0.2, "r_fair": 1.5, "precision": 0.9}
            for name, values in fids.items() for k, fid in enumerate(values)]
    recipes = recipe_summary(p, rows, p.lineages)
    assert [(e["recipe"], e["generation"], e["seeds"]) for e in recipes] == [
        ("mle", 0, 3), ("mle", 1, 3), ("ple", 0, 1), ("ple", 1, 1)]
    first = recipes[0]
    logs = np.log([10.0, 12.0, 14.0])  # FID: geometric mean and the t-interval of the logs
    half = stats.t.ppf(0.975, 2) * logs.std(ddof=1) / math.sqrt(3)
    assert (first["fid"], first["fid_low"], first["fid_high"]) == pytest.approx(
        (stats.gmean([10.0, 12.0, 14.0]), math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert recipes[1]["fid"] == pytest.approx(stats.gmean([20.0, 26.0]))  # an undefined seed is left out ...
    assert recipes[1]["fid_defined"] == 2  # ... and counted
    assert math.isnan(recipes[2]["fid_low"])  # one seed: no interval
    text = summary_markdown(p, rows, recipes)
    assert "| mle | 0 | 3 | 11.89 [7.82, 18.1] |" in text and "(1 of 3 seeds n/a)" in text

    one_d = validate(tiny(model__family="uniform", data__source="model", lineages=[{"name": "mle", "seeds": [0, 1]}]))
    rows = [{"lineage": f"mle-s{s}", "estimator": "mle", "generation": 0, "param.a": a, "kl": 0.1, "wasserstein": 0.2}
            for s, a in enumerate([0.9, 1.1])]
    assert recipe_summary(one_d, rows, one_d.lineages)[0]["param.a"] == pytest.approx(math.sqrt(0.99))  # a scale


def test_offline_plots_page_loads_no_script_from_the_network(tmp_path):
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    sys.path.insert(0, str(REPO / "tools"))  # scripts, not a package
    from offline_plots import remote_scripts

    template = REPO / ".dvc" / "plots" / "offline.html"
    page = template.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page and remote_scripts(page) == []
    assert "plots/offline.html" in (REPO / ".dvc" / "config").read_text()
    renderer = VegaRenderer([{"generation": "0", "recipe": "mle", "fid": "3.0", "fid_low": "", "fid_high": "",
                              "rev": "workspace"}], "fid", template="recipes", template_dir=str(REPO / ".dvc/plots"),
                            x="generation", y="fid")
    out = Path(render_html([renderer], tmp_path / "index.html", html_template=str(template))).read_text()
    assert remote_scripts(out) == [] and "vegaEmbed(" in out and "cdn.jsdelivr" not in out
    assert remote_scripts('<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>')  # the check can fail


def test_outputs_are_readable_by_others_and_the_cli_has_a_version(tmp_path, capsys):
    write_json_atomic(tmp_path / "x.json", {"a": 1})
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == FILE_MODE == 0o666 & ~_umask()
    with pytest.raises(SystemExit):
        cli(["--version"])
    assert re.fullmatch(r"madloop \S+\n", capsys.readouterr().out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow  # the session's Prefect server
def test_an_empty_work_pool_is_seen_as_one_with_no_worker(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from flows.fanout import workers_online

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="empty-ux", type="process"))
    assert workers_online("empty-ux") == 0  # fan_out then logs that the lineages wait for a worker


def test_the_documented_zombie_run_automation_is_a_valid_prefect_automation():
    import yaml
    from prefect.events.schemas.automations import AutomationCore

    text = (REPO / "docs" / "prefect" / "zombie-runs.yaml").read_text()
    automation = AutomationCore.model_validate(yaml.safe_load(text))
    assert automation.trigger.within.total_seconds() == 90 and automation.actions[0].state.value == "CRASHED"


def test_logged_model_names_are_what_mlflow_accepts_for_any_lineage_name():
    """The lambda sweep's lineages are named ple-lam0.01-s0: MLflow refuses '.' in a logged model's name."""
    from tasks.tracking import logged_model_name

    assert logged_model_name("mle", 3) == "mle-gen003"
    assert logged_model_name("ple-lam0.01-s0", 0) == "ple-lam0_01-s0-gen000"
    assert not set("/:.%\"'") & set(logged_model_name("a/b:c.d%e\"f'g", 12))


def test_log_lines_are_routed_through_the_bars_console_and_back():
    """In a terminal, the progress bars' console writes every log line above the bars: the handlers that wrote to
    the terminal (a rich console of their own, as Prefect's, or a plain stream) write through it meanwhile."""
    import io
    import logging

    from rich.console import Console

    from tasks.progress import logs_to, terminal_handlers

    terminal, above, bars = io.StringIO(), io.StringIO(), io.StringIO()
    logger = logging.getLogger("madloop-test-terminal")
    plain, styled = logging.StreamHandler(terminal), logging.StreamHandler(terminal)
    styled.console = Console(file=terminal)
    styled.emit = lambda record: styled.console.print(record.getMessage())  # as Prefect's console handler does
    logger.addHandler(plain)
    logger.addHandler(styled)
    try:
        assert {id(h) for h in terminal_handlers((terminal,))} >= {id(plain), id(styled)}
        with logs_to([plain, styled], Console(file=bars, markup=False), above):
            logger.warning("[mle] generation 3")
        logger.warning("after")
    finally:
        logger.removeHandler(plain)
        logger.removeHandler(styled)
    assert above.getvalue() == "[mle] generation 3\n" and bars.getvalue() == "[mle] generation 3\n"
    assert terminal.getvalue() == "after\nafter\n"


def test_log_lines_say_times_and_batches_as_a_person_reads_them():
    from tasks.progress import duration, generation_line

    assert [duration(s) for s in (280.4, 12.0, 2.06, 0.652, 0.0123, 0.00033)] == [
        "280 s", "12 s", "2.1 s", "652 ms", "12 ms", "0.33 ms"]
    assert generation_line("mle", 3, 3, 5, "FID 4.5", 2.06) == "[mle] generation 3 (of 0-4): FID 4.5  fit 2.1 s"
    assert generation_line("mle", 0, 2, 5, "kl 0.1", 0.00033) == (
        "[mle] generations 0-2 (of 0-4; recorded as one batch), the last: kl 0.1  fit 0.33 ms")


def test_metrics_json_holds_each_lineages_summary_scores_fid_first():
    """`dvc metrics show` and `dvc exp show` draw one column per value of metrics.json: the terminal table's scores
    of each lineage's last generation, not every score (generations.csv has those)."""
    from tasks.reports import final_metrics

    p = validate(tiny(lineages=["mle", "ple"]))
    rows = [{"lineage": name, "estimator": name, "generation": k, "fid": 10.0 + k, "precision": 0.5, "recall": 0.2,
             "minority_share": 0.1, "r_fair": math.nan, "kid": 1.0, "density": 0.9, "fit_seconds": 1.0}
            for name in ("mle", "ple") for k in (0, 1)]
    final = final_metrics(p, rows)
    assert list(final) == ["mle", "ple"]
    assert list(final["mle"]) == ["fid", "precision", "recall", "minority_share", "r_fair", "generation"]
    assert final["mle"]["fid"] == 11.0 and final["mle"]["generation"] == 1 and final["mle"]["r_fair"] is None


def test_the_command_ends_with_its_exit_code_and_all_it_printed(tmp_path):
    """`madloop` skips the interpreter's teardown after main (flows.cli.console, 2 s after a study): its exit code
    and every line it printed must still arrive, through a pipe too (block-buffered: lost without the flush)."""
    command = [sys.executable, "-m", "flows.cli", "params", "--params", str(REPO / "params.yaml")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's stdout is then block-buffered
    good = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    import yaml

    printed = yaml.safe_load(good.stdout)
    assert printed["loop"] == yaml.safe_load((REPO / "params.yaml").read_text())["loop"] and good.stdout.endswith("\n")
    bad = subprocess.run([*command, "--set", "loop.generations=-1"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "loop.generations" in bad.stderr and bad.stdout == ""
