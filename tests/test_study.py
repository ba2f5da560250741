"""The plain study runner (tasks/study.py) under the Prefect shell: a study is opened once, and what MLflow records
of a lineage is decided by params and its family before any fit, never by how long the fits took. Real Prefect
server, real DVC repo, real MLflow store."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from models.estimators import ESTIMATORS, TrainSettings
from models.estimators.mle import fit_mle
from tasks.params import lineage_params, validate
from tasks.storage import read_json
from tasks.study import OPENED, records_batched
from tests.conftest import tiny

ONE_D = {"model__family": "gaussian", "data__source": "model", "data__size": 30}
SLOW_FIT_SECONDS = 1.1  # over the 1 s under which a fit used to count as cheap (tracking.cheap_fit_seconds)


def test_how_a_lineage_is_recorded_is_decided_by_params_and_its_family_kind_alone():
    def batched(**overrides) -> list[bool]:
        p = validate(tiny(**overrides))
        return [records_batched(lineage_params(p, spec)) for spec in p.lineages]

    assert batched(**ONE_D, tracking__batch_records="auto") == [True]  # 1-D: fits of milliseconds
    assert batched(tracking__batch_records="auto") == [False]  # digits: a nested run per generation
    assert batched(**ONE_D, tracking__batch_records="never") == [False]
    assert batched(tracking__batch_records="always") == [True]


@pytest.fixture
def sleepy_estimator():
    """MLE whose fits take over a second: what a loaded machine does to a 1-D family's milliseconds."""

    def fit_sleepy(family, x, *, train: TrainSettings, seed, device, sample_weight=None):
        started = time.perf_counter()
        time.sleep(SLOW_FIT_SECONDS)
        model = fit_mle(family, x, train=train, seed=seed, device=device, sample_weight=sample_weight)
        model.info["fit_seconds"] = time.perf_counter() - started  # the whole call, as a loaded machine's would be
        return model

    ESTIMATORS.register("sleepy", settings={"train": TrainSettings})(fit_sleepy)
    yield "sleepy"
    ESTIMATORS.remove("sleepy")


def recorded(client: MlflowClient, study: str) -> dict[str, object]:
    """What MLflow holds of a study's lineages, less values and times: runs, metric steps, inputs, image steps."""
    experiment = client.get_experiment_by_name(f"madloop/{study}")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    out: dict[str, object] = {"nested": sorted(r.data.tags["madloop.lineage"] for r in runs
                                               if "mlflow.parentRunId" in r.data.tags)}
    for run in runs:
        if "mlflow.parentRunId" in run.data.tags or "madloop.lineage" not in run.data.tags:
            continue
        steps = {key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                 for key in run.data.metrics}
        inputs = sorted((i.dataset.name.split("/")[-1], [t.value for t in i.tags if t.key == "mlflow.data.context"][0])
                        for i in run.inputs.dataset_inputs)
        images = sorted(a.path.split("%")[2] if "%" in a.path else a.path
                        for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png"))
        out[run.data.tags["madloop.lineage"]] = {"steps": steps, "inputs": inputs, "images": len(images),
                                                 "status": run.info.status}
    return out


@pytest.mark.slow
def test_a_scalar_study_records_the_same_mlflow_runs_however_long_its_fits_take(project, prefect_server,
                                                                                 sleepy_estimator):
    from flows.loop import self_consuming_loop

    made = {}
    for study, estimator in (("quick", "mle"), ("loaded", sleepy_estimator)):
        params = tiny(**ONE_D, study__name=study, loop__generations=3, tracking__batch_records="auto",
                      lineages=[{"name": "a", "estimator": estimator, "seeds": [0, 1]}])
        self_consuming_loop(params=params, root=str(project))
        made[study] = recorded(MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}"), study)
    folder = project / "data" / "studies" / "loaded" / "a-s0"
    fit_seconds = [read_json(folder / f"gen-{k:03d}.json")["info"]["fit_seconds"] for k in range(3)]
    assert min(fit_seconds) >= 1.0, fit_seconds  # fits the old rule (under 1 s: batched) would have recorded one by one
    assert made["quick"] == made["loaded"]
    assert made["quick"]["nested"] == []  # batched: no nested run, whatever the fit time
    assert made["quick"]["a-s0"]["steps"]["kl"] == [0, 1, 2]


@pytest.mark.slow
def test_the_study_flow_opens_the_real_data_and_the_scorer_once_for_all_its_lineages(project, prefect_server):
    from flows.loop import self_consuming_loop

    before = dict(OPENED)
    rows = self_consuming_loop(params=tiny(**ONE_D, study__name="once", lineages=[
        {"name": "mle", "seeds": [0, 1]}, {"name": "ple_closed", "seeds": [0]}]), root=str(project))
    assert len(rows) == 3 * 2  # three lineages, two generations each
    assert {key: OPENED[key] - before[key] for key in OPENED} == {"checks": 1, "real data": 1, "scorer": 1}


@pytest.mark.slow
def test_a_study_run_from_the_command_line_is_checked_once_before_its_flow_run(project, prefect_server):
    """``run_study`` checks (bad input: no flow run), then its flow run does not check again."""
    from flows.loop import run_study

    before = dict(OPENED)
    rows = run_study(validate(tiny(**ONE_D, study__name="checked", lineages=[{"name": "mle", "seeds": [0]}])),
                     project)
    assert len(rows) == 2
    assert {key: OPENED[key] - before[key] for key in OPENED} == {"checks": 0, "real data": 1, "scorer": 1}
