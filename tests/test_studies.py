"""The paper studies: the direction of every claim theory fixes, and each study's outputs at small sizes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import pandas as pd

from flows.studies import paper_study, run_time, write_results
from flows.studies.fig4 import run_lineages
from models.families.analytic import Gaussian, Uniform
from tasks.stats import summarize
from tests.conftest import tiny


def test_mle_uniform_shrinks_by_n_over_n_plus_1_per_generation_and_ple_does_not():
    family = Uniform.of(a=1.0)
    n, seeds, generations = 20, 4000, 6
    truth = {"a": np.full(seeds, 1.0)}
    mle = run_lineages(family, lambda x: family.closed_mle(x, 0), n, truth, generations, seed=0)["a"]
    ple = run_lineages(family, lambda x: family.closed_ple(x, 0), n, truth, generations, seed=0)["a"]
    for g in range(generations):
        expected = (n / (n + 1)) ** (g + 1)  # E[max of n uniforms on [0, a]] = a n/(n+1), compounded
        assert mle[g].mean() == pytest.approx(expected, abs=4 * mle[g].std() / np.sqrt(seeds))
        assert abs(ple[g].mean() - 1.0) < 4 * ple[g].std() / np.sqrt(seeds)  # unbiased: no drift in expectation
    assert mle[-1].mean() < 0.8 < 0.95 < ple[-1].mean()


def test_mle_gaussian_variance_shrinks_by_n_minus_1_over_n_per_generation():
    family = Gaussian.of(mean=0.0, std=1.0)
    n, seeds, generations = 10, 6000, 5
    truth = {"mean": np.zeros(seeds), "std": np.ones(seeds)}
    var = run_lineages(family, lambda x: family.closed_mle(x, 0), n, truth, generations, seed=1)["std"] ** 2
    for g in range(generations):
        expected = ((n - 1) / n) ** (g + 1)
        assert var[g].mean() == pytest.approx(expected, abs=4 * var[g].std() / np.sqrt(seeds))
    closed = run_lineages(family, lambda x: family.closed_ple(x, 0), n, truth, generations, seed=1)["std"] ** 2
    assert abs(closed[-1].mean() - 1.0) < 4 * closed[-1].std() / np.sqrt(seeds)


def test_summarize_counts_undefined_values():
    rows = [{"k": 1, "v": 1.0}, {"k": 1, "v": 3.0}, {"k": 1, "v": float("nan")}, {"k": 2, "v": 5.0}]
    out = {s["k"]: s for s in summarize(rows, ["k"], ["v"])}
    assert out[1]["v"] == 2.0 and out[1]["v_defined"] == 2 and out[1]["runs"] == 3
    assert out[1]["v_sd"] == pytest.approx(np.sqrt(2)) and np.isnan(out[2]["v_sd"])


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))




TINY_LOOP = {"train": {"epochs": 3}, "classifier": {"epochs": 2}, "score": {"samples": 80, "kid_subset_size": 40,
                                                                            "bootstrap": 10},
             "model": {"vae": {"hidden": [32, 16], "latent_dim": 4}}}


@pytest.mark.slow
def test_fig4_and_fig3_write_their_csv_png_and_mlflow_runs(project, prefect_server):
    params = tiny(studies={"fig4": {"distributions": ["uniform", "exponential"], "seeds": 60, "generations": 4,
                                    "steps": 30, "m": 10, "batch": 16},
                           "fig3": {"minority_weights": [0.2], "sizes": [30], "seeds": 4, "steps": 20, "m": 2,
                                    "finish_steps": 10, "kl_samples": 2000, "em_max_iter": 500,
                                    "sweep_weights": [0.2], "sweep_sizes": [30], "lams": [0.0, 1.0]}})
    paper_study("fig4", params=params, root=str(project))
    folder = project / "reports" / "fig4"
    rows = read(folder / "fig4.csv")
    assert {"distribution", "parameter", "estimator", "generation", "mean", "sem", "median", "normalized",
            "target"} <= set(rows[0])
    assert {(r["distribution"], r["estimator"]) for r in rows} == {
        ("uniform", "mle"), ("uniform", "ple_closed"), ("exponential", "mle"), ("exponential", "ple"),
        ("exponential", "hyper_nopenalty"), ("exponential", "ple_lam1_mean")}
    assert len([r for r in rows if r["distribution"] == "uniform" and r["estimator"] == "mle"]) == 4
    assert (folder / "fig4.png").stat().st_size > 10_000
    seeds = pd.read_parquet(folder / "fig4_seeds.parquet")
    assert len(seeds) == 60 * (2 + 4) and seeds.truth.nunique() > 100  # a truth per seed (and per distribution)
    mle = seeds[(seeds.distribution == "uniform") & (seeds.estimator == "mle")]
    assert (mle["last"] <= mle["truth"]).all()  # max(X) never exceeds its (shrinking) truth

    paper_study("fig3", params=params, root=str(project))
    cells = read(project / "reports" / "fig3" / "fig3.csv")
    assert len(cells) == 1 and float(cells[0]["kl_mle"]) >= 0 and float(cells[0]["kl_ple"]) >= 0
    assert float(cells[0]["kl_control"]) >= 0 and 0 <= float(cells[0]["ple_converged_share"]) <= 1
    assert float(cells[0]["kl_diff"]) == pytest.approx(float(cells[0]["kl_mle"]) - float(cells[0]["kl_ple"]))
    assert {float(r["lam"]) for r in read(project / "reports" / "fig3" / "fig3_lambda.csv")} == {0.0, 0.1, 1.0}
    assert (project / "reports" / "fig3" / "fig3.png").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("fig4").experiment_id])
    run = next(r for r in runs if r.info.run_name == "uniform/mle")
    assert len(client.get_metric_history(run.info.run_id, "mean.a")) == 4
    results = write_results(project).read_text()
    assert "## Fig. 4" in results and "## Fig. 3" in results and "verdict: **" in results


@pytest.mark.slow
def test_table1_and_fig2_run_the_loop_with_controls_and_verdicts(project, prefect_server):
    params = tiny(studies={
        "table1": {"ratios": [1, 4], "seeds": [0, 1], "estimators": ["mle", "ple", "hyper_nopenalty"],
                   "confirm_ratios": [4], "confirm_seeds": [2, 3], "lam_ratio": 4, "lams": [0.0, 1.0],
                   "params": TINY_LOOP},
        "fig2": {"generations": 2, "seeds": [0, 1], "estimators": ["mle", "ple", "hyper_nopenalty"],
                 "params": TINY_LOOP}},
        train__epochs=999)  # the loop studies read their own params, not the top-level sections
    paper_study("table1", params=params, root=str(project))
    folder = project / "reports" / "table1"
    summary = read(folder / "table1.csv")
    assert {(float(s["ratio"]), s["estimator"]) for s in summary} == {
        (r, e) for r in (1, 4) for e in ("mle", "ple", "hyper_nopenalty")} | {(4, "ple-lam1")}
    shares = {float(s["ratio"]): float(s["minority_share_train"]) for s in summary}
    assert shares[1] == pytest.approx(0.5, abs=0.02) and shares[4] == pytest.approx(0.2, abs=0.02)
    assert "| R_I |" in (folder / "table1.md").read_text()
    assert (project / "data" / "studies" / "table1-ri4" / "ple-s0.dvc").is_file()  # the loop's datasets, in DVC
    manifest = json.loads((project / "data" / "studies" / "table1-ri4" / "ple-lam1-s1" / "gen-000.json").read_text())
    assert manifest["recipe"]["ple.lam"] == 1.0 and manifest["recipe"]["train.epochs"] == 3
    uses = read(folder / "uses_input.csv")[0]
    assert float(uses["relative_weight_distance"]) > 0  # H emits other weights for other inputs
    runs = read(folder / "table1_runs.csv")
    confirmation = {(float(r["ratio"]), r["estimator"], r["seed"]) for r in runs if r["phase"] == "confirmation"}
    assert confirmation == {(4.0, e, s) for e in ("mle", "ple", "hyper_nopenalty") for s in ("2", "3")}
    assert all(r["seed"] in ("0", "1") for r in summary_runs(runs))  # the table summarises the screening seeds
    labeller = json.loads((folder / "labeller.json").read_text())
    assert 0.5 < labeller["accuracy"] <= 1 and 0 <= labeller["recall_minority"] <= 1
    paper_study("fig2", params=params, root=str(project))
    fig2 = read(project / "reports" / "fig2" / "fig2.csv")
    assert sorted((s["estimator"], s["generation"], s["runs"]) for s in fig2) == [
        (e, g, "2") for e in ("hyper_nopenalty", "mle", "ple") for g in ("0", "1")]
    assert (project / "reports" / "fig2" / "fig2.png").is_file()
    assert (project / "reports" / "fig2" / "samples.png").is_file()
    timing = json.loads((project / "reports" / "fig2" / "timing.json").read_text())
    assert (timing["generations"], timing["generations_reused"]) == (12, 0)
    assert "resumed" not in run_time(timing)

    paper_study("fig2", params=params, root=str(project))  # again: every generation is already finished
    timing = json.loads((project / "reports" / "fig2" / "timing.json").read_text())
    assert (timing["generations"], timing["generations_reused"]) == (12, 12)
    assert "a resumed run: 12 of its 12 generations were finished by an earlier run" in run_time(timing)
    results = write_results(project).read_text()
    for heading in ("## Table 1", "## Fig. 2", "PLE degrades more slowly than MLE", "Lambda sweep",
                    "Does H use its input?", "the premise", "Pre-registered confirmation", "tests in all",
                    "Labeller", "KID-based"):
        assert heading in results
    assert "partly" not in results


def summary_runs(runs: list[dict]) -> list[dict]:
    return [r for r in runs if r["phase"] == "screening"]

def test_vectorized_em_reaches_scikit_learns_likelihood():
    from models.families.gmm import GaussianMixture1D, em_batch

    family = GaussianMixture1D.of(minority_weight=0.2, em_tol=1e-10, em_max_iter=20000)
    rng = np.random.default_rng(3)
    x = np.stack([family.draw(family.true_estimates(), 200, rng) for _ in range(6)])
    ours = em_batch(x, tol=1e-10, max_iter=20000)

    def loglik(means, variances, weights, points):
        means, variances, weights = (np.asarray(a, dtype=np.float64) for a in (means, variances, weights))
        comp = np.log(weights) - 0.5 * np.log(2 * np.pi * variances) - 0.5 * (points[:, None] - means) ** 2 / variances
        return np.logaddexp.reduce(comp, axis=1).mean()

    for s in range(6):
        reference = family.closed_mle(x[s], s)
        assert loglik(ours["means"][s], ours["variances"][s], ours["weights"][s], x[s]) == pytest.approx(
            loglik(reference["means"], reference["variances"], reference["weights"], x[s]), abs=1e-6)


def test_fig4_theory_matches_the_closed_forms_it_describes():
    from flows.studies.fig4 import draw_truths, normalize, theory

    n, generations, seeds = 20, 10, 4000
    family = Uniform.of()
    truths = draw_truths(family, seeds, 3.0, np.random.default_rng(0))
    for name, estimate in (("mle", lambda x: family.closed_mle(x, 0)),
                           ("ple_closed", lambda x: family.closed_ple(x, 0))):
        history = normalize(family, "a", run_lineages(family, estimate, n, truths, generations, seed=1)["a"], truths)
        predicted = {r["generation"]: r for r in theory(n, n, generations)
                     if r["distribution"] == "uniform" and r["estimator"] == name}
        for g in (0, generations - 1):
            se = history[g].std() / np.sqrt(seeds)
            assert history[g].mean() == pytest.approx(predicted[g]["mean"], abs=4 * se)
            assert np.median(history[g]) == pytest.approx(predicted[g]["median"], rel=0.02)


def test_studies_decide_claims_by_the_one_verdict_rule():
    from flows.studies import verdict_from
    from tasks.stats import paired, verdict

    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 8)
    mixed = [paired(base + d + rng.normal(0, 0.1, 8), base) for d in (1.0, 1.0, -1.0, 0.0)]
    assert verdict_from(mixed) == verdict(mixed) == "inconclusive"
