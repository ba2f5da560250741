"""Loop modes, mitigations, and a many-lineage study compared in one MLflow experiment."""

from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from flows.loop import self_consuming_loop
from models.reweighting import fairness_discrepancy, fit_density_ratio, group_weights
from tasks.datasets import Dataset, RealData, read_parquet
from tasks.mitigations.dynamic_ratio import dynamic_next_dataset, dynamic_shares
from tasks.modes import MODES, ModeContext
from tasks.params import validate
from tests.conftest import tiny
from tests.kit import dataset_zero


def images(n, value):
    return np.full((n, 1, 2, 2), value, dtype=np.float32)


def counts(data: Dataset) -> dict:
    out = {}
    for origin, generation in zip(data.origin, data.generation):
        out[(origin, int(generation))] = out.get((origin, int(generation)), 0) + 1
    return out


def mode(name, real, synthetic_size=None, real_fraction=0.5):
    """A loop mode given what a lineage gives it (its ModeContext), with stand-ins for the sections and family."""
    loop = SimpleNamespace(synthetic_size=synthetic_size, generations=2)
    data = SimpleNamespace(majority=3, minority=6, fresh_pool=0.5)
    own = real if isinstance(real, RealData) else SimpleNamespace(train=real)
    return MODES.get(name)(ModeContext(seed=0, real=own, family=SimpleNamespace(kind="image"), loop=loop, data=data,
                                       settings={"loop": SimpleNamespace(real_fraction=real_fraction)}))


def test_each_mode_builds_the_documented_dataset():
    real = Dataset.real(images(40, 0.1), np.r_[np.full(30, 3), np.full(10, 6)], "digits")
    gen1 = Dataset.synthetic(images(40, 0.5), "x", 1, "digits")
    accumulated = mode("accumulate", real).next_dataset(0, real, gen1)
    gen2 = Dataset.synthetic(images(40, 0.6), "x", 2, "digits")
    assert counts(mode("replace", real).next_dataset(1, accumulated, gen2)) == {("synthetic", 2): 40}
    assert counts(mode("accumulate", real).next_dataset(1, accumulated, gen2)) == {
        ("real", 0): 40, ("synthetic", 1): 40, ("synthetic", 2): 40}
    # augment: every real row, and as many samples as make the real share real_fraction
    augment = mode("augment", real, real_fraction=0.8)
    n = augment.synthetic_rows()
    assert n == 10
    gen2_small = Dataset.synthetic(images(n, 0.6), "x", 2, "digits")
    assert counts(augment.next_dataset(1, accumulated, gen2_small)) == {("real", 0): 40, ("synthetic", 2): 10}
    # fresh: real rows no model has seen (the pool) in dataset 0's class mix, real_fraction of the whole
    pool = Dataset.real(images(40, 0.2), np.r_[np.full(30, 3), np.full(10, 6)], "digits")
    own = RealData(train=real, test=real, train_full=Dataset.concat([real, pool]), num_classes=10,
                   train_index=np.arange(40), pool_index=np.arange(40, 80))
    fresh = mode("fresh", own, real_fraction=1 / 3)
    mixed, later = fresh.next_dataset(0, real, gen2), fresh.next_dataset(1, accumulated, gen2)
    assert counts(mixed) == counts(later) == {("real", 0): 20, ("synthetic", 2): 40}
    for data in (mixed, later):
        assert (data.pixels[data.origin == "real"] == 0.2).all()  # from the pool, never dataset 0
        assert np.bincount(data.label[data.origin == "real"], minlength=7)[[3, 6]].tolist() == [15, 5]
    assert fresh.data_problem(SimpleNamespace(loop=SimpleNamespace(real_fraction=1 / 3, synthetic_size=None,
                                                                   generations=3), data=fresh.context.data),
                              own) is not None  # 3 x 15 threes from a pool of 30
    assert mode("replace", real).synthetic_rows() == 40 and mode("fresh", real, 25).synthetic_rows() == 25


def test_dynamic_ratio_gives_degraded_groups_more_real_data():
    first = {"fid_majority": 10.0, "fid_minority": 10.0}
    shares = dynamic_shares(0.2, first, {"fid_majority": 12.0, "fid_minority": 30.0})
    assert shares == {"majority": pytest.approx(0.24), "minority": pytest.approx(0.6)}
    assert dynamic_shares(0.2, first, {"fid_majority": 5.0, "fid_minority": math.nan})["minority"] == 1.0
    real = Dataset.real(images(40, 0.1), np.r_[np.full(30, 3), np.full(10, 6)], "digits")
    synth = Dataset.synthetic(images(15, 0.5), "x", 1, "digits")
    data = dynamic_next_dataset(real, synth, shares, {"majority": 3, "minority": 6}, seed=0)
    assert (data.label == 3).sum() == round(0.24 * 30) and (data.label == 6).sum() == 6
    assert (data.origin == "synthetic").sum() == 15


def test_importance_weights_recover_a_known_density_ratio():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 1.0, (600, 1))  # what the population looks like
    train = rng.normal(1.0, 1.0, (3000, 1))  # a biased training set
    ratio = fit_density_ratio(reference, train, seed=0)
    x = np.linspace(-1.0, 2.0, 13)[:, None]
    truth = stats.norm.pdf(x[:, 0], 0, 1) / stats.norm.pdf(x[:, 0], 1, 1)
    assert np.allclose(np.log(ratio.weights(x)), np.log(truth), atol=0.2)
    assert ratio.ece < 0.1  # calibration was checked on held-out rows


def test_group_weights_and_fairness_discrepancy():
    weights = group_weights(np.array([3] * 8 + [6] * 2))
    assert weights[:8].sum() == pytest.approx(weights[8:].sum())  # equal total weight per group
    assert fairness_discrepancy(np.array([3, 6]), np.array([3, 3, 3, 6]), [3, 6]) == pytest.approx(
        math.sqrt(2) * 0.25)


def test_lineage_recipes_expand_seeds_and_validate():
    p = validate({"lineages": [{"name": "mle-aug", "estimator": "mle", "mode": "augment", "real_fraction": 0.5,
                                "seeds": [0, 1]}, "ple"]})
    assert [(lin.name, lin.group, lin.seed, lin.mode) for lin in p.lineages] == [
        ("mle-aug-s0", "mle-aug", 0, "augment"), ("mle-aug-s1", "mle-aug", 1, "augment"), ("ple", None, None, None)]
    from tasks.params import ParamsError

    with pytest.raises(ParamsError, match="lineages.0.mode"):
        validate({"lineages": [{"name": "x", "estimator": "mle", "mode": "shuffle"}]})
    with pytest.raises(ParamsError, match="mitigation 'importance'.*no labelled groups"):
        validate({"model": {"family": "uniform"}, "data": {"source": "model"},
                  "lineages": [{"name": "x", "estimator": "mle", "mitigation": "importance"}]})


@pytest.mark.slow
def test_many_lineages_in_one_study_land_in_one_experiment_and_rank(project, prefect_server):
    lineages = [
        {"name": "mle-replace", "estimator": "mle", "seeds": [0, 1]},
        {"name": "mle-accumulate", "estimator": "mle", "mode": "accumulate"},
        {"name": "mle-augment", "estimator": "mle", "mode": "augment", "real_fraction": 0.5},
        {"name": "mle-fresh", "estimator": "mle", "mode": "fresh", "real_fraction": 0.2},
        {"name": "mle-importance", "estimator": "mle", "mitigation": "importance"},
        {"name": "ple-importance", "estimator": "ple", "mitigation": "importance"},
        {"name": "mle-group", "estimator": "mle", "mitigation": "group"},
        {"name": "mle-dynamic", "estimator": "mle", "mitigation": "dynamic_ratio", "real_fraction": 0.3},
    ]
    self_consuming_loop(params=tiny(lineages=lineages, mitigation={"importance": {"reference_per_class": 20}},
                                    data__fresh_pool=0.6), root=str(project))
    study = project / "data" / "studies" / "tiny"
    n_real = len(dataset_zero(study, "mle-accumulate"))
    assert counts(read_parquet(study / "mle-accumulate" / "dataset-002.parquet")) == {
        ("real", 0): n_real, ("synthetic", 1): n_real, ("synthetic", 2): n_real}
    assert counts(read_parquet(study / "mle-augment" / "dataset-002.parquet")) == {("real", 0): n_real,
                                                                                  ("synthetic", 2): n_real}
    assert counts(read_parquet(study / "mle-fresh" / "dataset-001.parquet")) == {
        ("real", 0): round(n_real / 4), ("synthetic", 1): n_real}
    assert counts(read_parquet(study / "mle-replace-s1" / "dataset-002.parquet")) == {("synthetic", 2): n_real}
    dynamic = read_parquet(study / "mle-dynamic" / "dataset-001.parquet")
    assert (dynamic.origin == "real").sum() > 0 and (dynamic.origin == "synthetic").sum() == n_real

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("madloop/tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.data.tags["lineage"]: r for r in runs  # lineage runs (not the recipes' means over seeds)
               if "madloop.lineage" in r.data.tags and "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == 9 and all((study.parent / "tiny" / f"{name}.dvc").is_file() for name in parents)
    importance = client.get_metric_history(parents["mle-importance"].info.run_id, "importance_ece")
    assert len(importance) == 2 and all(0 <= m.value <= 1 for m in importance)

    with open(project / "reports" / "tiny" / "lineages.csv") as f:
        ranking = list(csv.DictReader(f))
    assert len(ranking) == 8 and [int(r["rank"]) for r in ranking] == list(range(1, 9))
    fids = [float(r["fid"]) for r in ranking]
    assert fids == sorted(fids)
    seeds = next(r for r in ranking if r["recipe"] == "mle-replace")
    assert seeds["seeds"] == "2"
    from_mlflow = [parents[name].data.metrics["fid"] for name in ("mle-replace-s0", "mle-replace-s1")]
    assert float(seeds["fid"]) == pytest.approx(np.mean(from_mlflow), rel=1e-3)  # the table is what MLflow holds
