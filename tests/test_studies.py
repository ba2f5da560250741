"""The paper studies: the direction of every claim theory fixes, and each study's outputs at small sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from flows.studies import paper_study, run_time
from flows.studies.fig4 import run_lineages
from models.families.analytic import Gaussian, Uniform
from tasks.stats import summarize
from tests.conftest import tiny


def test_mle_uniform_shrinks_by_n_over_n_plus_1_per_generation_and_ple_does_not():
    family = Uniform.of(a=1.0)
    n, seeds, generations = 20, 4000, 6
    mle = run_lineages(family, lambda x: family.closed_mle(x, 0), n, seeds, generations, seed=0)["a"]
    ple = run_lineages(family, lambda x: family.closed_ple(x, 0), n, seeds, generations, seed=0)["a"]
    for g in range(generations):
        expected = (n / (n + 1)) ** (g + 1)  # E[max of n uniforms on [0, a]] = a n/(n+1), compounded
        assert mle[g].mean() == pytest.approx(expected, abs=4 * mle[g].std() / np.sqrt(seeds))
        assert abs(ple[g].mean() - 1.0) < 4 * ple[g].std() / np.sqrt(seeds)  # unbiased: no drift in expectation
    assert mle[-1].mean() < 0.8 < 0.95 < ple[-1].mean()


def test_mle_gaussian_variance_shrinks_by_n_minus_1_over_n_per_generation():
    family = Gaussian.of(mean=0.0, std=1.0)
    n, seeds, generations = 10, 6000, 5
    var = run_lineages(family, lambda x: family.closed_mle(x, 0), n, seeds, generations, seed=1)["std"] ** 2
    for g in range(generations):
        expected = ((n - 1) / n) ** (g + 1)
        assert var[g].mean() == pytest.approx(expected, abs=4 * var[g].std() / np.sqrt(seeds))
    closed = run_lineages(family, lambda x: family.closed_ple(x, 0), n, seeds, generations, seed=1)["std"] ** 2
    assert abs(closed[-1].mean() - 1.0) < 4 * closed[-1].std() / np.sqrt(seeds)


def test_summarize_counts_undefined_values():
    rows = [{"k": 1, "v": 1.0}, {"k": 1, "v": 3.0}, {"k": 1, "v": float("nan")}, {"k": 2, "v": 5.0}]
    out = {s["k"]: s for s in summarize(rows, ["k"], ["v"])}
    assert out[1]["v"] == 2.0 and out[1]["v_defined"] == 2 and out[1]["runs"] == 3
    assert out[1]["v_sd"] == pytest.approx(np.sqrt(2)) and np.isnan(out[2]["v_sd"])


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))




@pytest.mark.slow
def test_fig4_and_fig3_write_their_csv_png_and_mlflow_runs(project, prefect_server):
    params = tiny(studies={"fig4": {"distributions": ["uniform", "exponential"], "seeds": 60, "generations": 4,
                                    "steps": 30, "m": 10, "batch": 16},
                           "fig3": {"minority_weights": [0.2], "sizes": [30], "seeds": 4, "steps": 20, "m": 2,
                                    "kl_samples": 2000, "em_max_iter": 500}})
    paper_study("fig4", params=params, root=str(project))
    rows = read(project / "reports" / "fig4" / "fig4.csv")
    assert {"distribution", "parameter", "estimator", "generation", "mean", "sem", "median", "truth"} <= set(rows[0])
    assert {(r["distribution"], r["estimator"]) for r in rows} == {
        ("uniform", "mle"), ("uniform", "ple_closed"), ("exponential", "mle"), ("exponential", "ple"),
        ("exponential", "hyper_nopenalty")}
    assert len([r for r in rows if r["distribution"] == "uniform" and r["estimator"] == "mle"]) == 4
    assert (project / "reports" / "fig4" / "fig4.png").stat().st_size > 10_000
    assert read(project / "reports" / "fig4" / "fig4_calibration.csv")

    paper_study("fig3", params=params, root=str(project))
    cells = read(project / "reports" / "fig3" / "fig3.csv")
    assert len(cells) == 1 and float(cells[0]["kl_mle"]) >= 0 and float(cells[0]["kl_ple"]) >= 0
    assert float(cells[0]["kl_diff"]) == pytest.approx(float(cells[0]["kl_mle"]) - float(cells[0]["kl_ple"]))
    assert (project / "reports" / "fig3" / "fig3.png").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fig4").experiment_id])
    run = next(r for r in runs if r.info.run_name == "uniform/mle")
    assert len(client.get_metric_history(run.info.run_id, "mean.a")) == 4


@pytest.mark.slow
def test_table1_and_fig2_run_the_loop_and_summarize(project, prefect_server):
    params = tiny(studies={"table1": {"ratios": [1, 4], "seeds": [0], "estimators": ["mle", "ple"]},
                           "fig2": {"generations": 2, "seeds": [0, 1], "estimators": ["mle"]}})
    paper_study("table1", params=params, root=str(project))
    summary = read(project / "reports" / "table1" / "table1.csv")
    assert {(float(s["ratio"]), s["estimator"]) for s in summary} == {(1, "mle"), (1, "ple"), (4, "mle"), (4, "ple")}
    shares = {float(s["ratio"]): float(s["minority_share_train"]) for s in summary}
    assert shares[1] == pytest.approx(0.5, abs=0.02) and shares[4] == pytest.approx(0.2, abs=0.02)
    assert "| R_I |" in (project / "reports" / "table1" / "table1.md").read_text()
    assert (project / "data" / "studies" / "table1-ri4" / "ple-s0.dvc").is_file()  # the loop's datasets, in DVC

    paper_study("fig2", params=params, root=str(project))
    fig2 = read(project / "reports" / "fig2" / "fig2.csv")
    assert sorted((s["estimator"], s["generation"], s["runs"]) for s in fig2) == [("mle", "0", "2"), ("mle", "1", "2")]
    assert (project / "reports" / "fig2" / "fig2.png").is_file()
    timing = json.loads((project / "reports" / "fig2" / "timing.json").read_text())
    assert (timing["generations"], timing["generations_reused"]) == (4, 0)
    assert "resumed" not in run_time(timing)

    paper_study("fig2", params=params, root=str(project))  # again: every generation is already finished
    timing = json.loads((project / "reports" / "fig2" / "timing.json").read_text())
    assert (timing["generations"], timing["generations_reused"]) == (4, 4)
    assert "a resumed run: 4 of its 4 generations were finished by an earlier run" in run_time(timing)


def test_paired_comparison_finds_a_real_shift_and_not_noise():
    from tasks.stats import interval, paired

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 12)
    shifted = paired(base + 0.5 + rng.normal(0, 0.1, 12), base)
    assert shifted.p < 1e-6 and shifted.low < 0.5 < shifted.high
    noise = paired(base + rng.normal(0, 0.1, 12), base)
    assert noise.p > 0.01 and noise.low < 0 < noise.high
    assert paired([1.0, np.nan], [0.0, 2.0]).n == 1
    mean, low, high = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and low < 2.0 < high and high - 2.0 == pytest.approx(2.0 - low)
