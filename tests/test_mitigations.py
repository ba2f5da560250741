"""The field's mitigations since 2024 as lineage recipes (accumulate-subsample, verification, curation, entropy
selection, Neon), the neighbour metrics (density, coverage, memorisation, k-NN entropy) and the ranking with
confidence intervals and tests against a baseline."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from scipy import stats

from flows.loop import self_consuming_loop
from models.neighbors import greedy_entropy_subset, knn_entropy, memorisation_rate
from tasks.datasets import Dataset, read_parquet
from tasks.generation import fit_model
from tasks.metrics.density_coverage import DensityCoverage
from tasks.metrics.memorisation import Memorisation
from tasks.mitigations.curation import k_choice
from tasks.mitigations.verify import confidence
from tasks.params import digest, lineage_recipe, validate
from tasks.reports import rank_recipes, ranking_markdown
from tasks.storage import read_json
from tasks.study import Study
from tests.conftest import tiny
from tests.kit import dataset_zero

NEW_RECIPES = [
    {"name": "mle-subsample", "estimator": "mle", "mode": "accumulate_subsample", "set": {"loop.subsample_size": 100}},
    {"name": "mle-verify", "estimator": "mle", "mitigation": "verify"},
    {"name": "ple-verify-confidence", "estimator": "ple", "mitigation": "verify",
     "set": {"mitigation.verify.verifier": "classifier", "mitigation.verify.keep": 0.25}},
    {"name": "mle-curation", "estimator": "mle", "mitigation": "curation"},
    {"name": "mle-entropy", "estimator": "mle", "mitigation": "entropy"},
    {"name": "mle-neon", "estimator": "mle", "mitigation": "neon", "set": {"mitigation.neon.epochs": 2}},
    {"name": "ple-neon", "estimator": "ple", "mitigation": "neon", "set": {"mitigation.neon.epochs": 2}},
]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Real data, a real (briefly trained) domain classifier and scorer, and a function opening a lineage."""
    p = validate(tiny(lineages=NEW_RECIPES + [{"name": "mle-neon-w0", "estimator": "mle", "mitigation": "neon",
                                                "set": {"mitigation.neon.w": 0.0}}], device="cpu"))
    return Study.open(p, tmp_path_factory.mktemp("study"), check=False).lineage


def noise(n, shape=(1, 8, 8), seed=0):
    return Dataset.synthetic(np.random.default_rng(seed).random((n, *shape), dtype=np.float32), "x", 1, "digits")


# --- properties of each recipe -------------------------------------------------------------------------------------


def test_the_verification_filter_keeps_the_stated_quantile(study):
    lin = study("ple-verify-confidence")  # keep 0.25 by the classifier's confidence
    n = 30
    drawn = lin.mitigation.candidates(n)
    assert drawn == 120
    candidates = noise(drawn)
    kept, info = lin.mitigation.select(0, candidates, n)
    scores = confidence(lin.scorer.classifier, candidates.pixels)
    chosen = np.isin(np.arange(drawn), [np.flatnonzero((candidates.pixels == row).all(axis=(1, 2, 3)))[0]
                                        for row in kept.pixels])
    assert len(kept) == n and chosen.sum() == n and info["acceptance_rate"] == 0.25
    assert scores[chosen].min() >= scores[~chosen].max()  # the top quarter, nothing below it
    assert info["verifier_score_kept"] == pytest.approx(scores[chosen].mean())
    assert info["verifier_accuracy"] > 0.5  # the classifier's held-out accuracy

    discriminated = study("mle-verify")  # keep 0.5 by a real-vs-synthetic discriminator
    kept, info = discriminated.mitigation.select(0, noise(discriminated.mitigation.candidates(n)), n)
    assert len(kept) == n and info["acceptance_rate"] == 0.5
    assert info["verifier_accuracy"] > 0.9  # uniform noise is easy to tell from digits


def test_the_subsample_has_the_stated_size_and_is_redrawn_each_generation(study):
    lin = study("mle-subsample")
    pool = Dataset.concat([lin.real.train, noise(300)])
    first, second = lin.mode.training_rows(1, pool), lin.mode.training_rows(2, pool)
    assert len(first) == len(second) == 100
    rows = [pool.pixels.reshape(len(pool), -1).tolist().index(r) for r in first.pixels.reshape(100, -1).tolist()]
    assert len(set(rows)) == 100 and rows == sorted(rows)  # without replacement, in the pool's order
    assert not np.array_equal(first.pixels, second.pixels)
    small = noise(60)
    assert lin.mode.training_rows(0, small) is small  # a pool no larger than the subsample is used whole
    assert len(lin.mode.next_dataset(1, pool, noise(7))) == len(pool) + 7  # the pool accumulates


def test_neon_with_w_zero_is_the_real_trained_model_and_w_moves_it(study):
    plain, neon = study("mle-neon-w0"), study("mle-neon")
    rows = plain.real.train
    fitted = fit_model(plain, rows, seed=3)
    model, info = plain.mitigation.after_fit(0, fitted, rows)
    assert info["neon_w"] == 0.0 and info["neon_step"] > 0  # it did self-train ...
    before, after = fitted.tensors(), model.tensors()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)  # ... and w = 0 gave model k back exactly
    moved, info = neon.mitigation.after_fit(0, fitted, rows)
    assert info["neon_w"] == 0.5
    changed = [name for name, t in moved.tensors().items() if not torch.equal(t, before[name])]
    assert any(name.endswith("weight") for name in changed)


def test_curation_picks_by_bradley_terry_choice():
    rewards = np.r_[np.zeros(300), np.ones(100)]
    greedy = k_choice(rewards, k=4, beta=50.0, seed=0)
    assert len(greedy) == 100 and len(set(greedy.tolist())) == 100
    assert rewards[greedy].mean() > 0.6  # most groups of 4 hold a reward-1 sample (1 - 0.75^4 = 0.68), and it wins
    uniform = k_choice(rewards, k=4, beta=0.0, seed=0)
    assert abs(rewards[uniform].mean() - 0.25) < 0.12  # no preference: a random member of each group


def test_entropy_selection_keeps_a_more_spread_out_set_than_chance():
    x = np.random.default_rng(0).normal(size=(200, 3))
    x[:100] *= 0.05  # half the candidates crowd one spot
    keep = greedy_entropy_subset(x, 50)
    assert len(keep) == 50 and len(set(keep.tolist())) == 50
    random = np.random.default_rng(1).permutation(200)[:50]
    assert knn_entropy(x[keep], 1) > knn_entropy(x[random], 1) + 1.0
    assert (keep >= 100).mean() > 0.8  # it keeps mostly the spread-out half


# --- the metrics ---------------------------------------------------------------------------------------------------


def test_the_memorisation_rate_of_the_training_set_against_itself_is_1(study):
    scorer = study("mle-verify").scorer
    train = scorer.train
    labels = scorer.label(train)
    assert Memorisation.compute(scorer, train, labels, 0)["memorisation_rate"] == 1.0
    assert Memorisation.compute(scorer, noise(200).pixels, labels, 0)["memorisation_rate"] < 0.05
    features = np.random.default_rng(0).normal(size=(300, 4))
    assert memorisation_rate(features, features) == 1.0
    assert memorisation_rate(features + 0.01 * np.random.default_rng(1).normal(size=(300, 4)), features) > 0.9


def test_the_reference_covers_itself_and_the_knn_entropy_of_a_gaussian_is_its_entropy(study):
    scorer = study("mle-verify").scorer
    values = DensityCoverage.compute(scorer, scorer.reference, scorer.label(scorer.reference), 0)
    assert values["coverage"] == 1.0 and values["density"] > 0.8
    sigma, d = 2.0, 3
    x = np.random.default_rng(0).normal(0, sigma, size=(4000, d))
    truth = d / 2 * math.log(2 * math.pi * math.e * sigma ** 2)
    assert knn_entropy(x, 3) == pytest.approx(truth, abs=0.1)


# --- settings and the resume hash --------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe, key, value", [
    ({"mode": "accumulate_subsample"}, "loop.subsample_size", 50),
    ({"mitigation": "verify"}, "mitigation.verify.keep", 0.25),
    ({"mitigation": "verify"}, "mitigation.verify.verifier", "classifier"),
    ({"mitigation": "curation"}, "mitigation.curation.k", 8),
    ({"mitigation": "curation"}, "mitigation.curation.beta", 1.0),
    ({"mitigation": "curation"}, "mitigation.curation.reward", "minority"),
    ({"mitigation": "entropy"}, "mitigation.entropy.pool", 3.0),
    ({"mitigation": "neon"}, "mitigation.neon.w", 1.0),
    ({"mitigation": "neon"}, "mitigation.neon.epochs", 5),
    ({"mitigation": "neon"}, "mitigation.neon.samples", 100),
])
def test_each_recipes_settings_enter_its_lineages_resume_hash(recipe, key, value):
    def recipe_hash(lineage, override=None):
        p = validate({"lineages": [{"name": "x", "estimator": "mle", **lineage, "set": override or {}}]})
        return digest(lineage_recipe(p, p.lineages[0]))

    assert recipe_hash(recipe, {key: value}) != recipe_hash(recipe)
    assert recipe_hash({}, {key: value}) == recipe_hash({})  # a lineage that does not read it ignores it


def test_selecting_mitigations_refuse_families_without_a_classifier():
    from tasks.params import ParamsError

    for mitigation in ("verify", "curation", "entropy"):
        with pytest.raises(ParamsError, match=f"mitigation '{mitigation}'.*no domain classifier"):
            validate({"model": {"family": "uniform"}, "data": {"source": "model"},
                      "lineages": [{"name": "x", "estimator": "mle", "mitigation": mitigation}]})
    with pytest.raises(ParamsError, match="mitigation 'neon'.*Neon fine-tunes by gradient steps"):
        validate({"model": {"family": "gaussian"}, "data": {"source": "model"},
                  "lineages": [{"name": "x", "estimator": "mle", "mitigation": "neon"}]})


# --- the ranking -------------------------------------------------------------------------------------------------


def test_the_ranking_gives_intervals_by_scale_and_paired_tests_against_the_first_recipe():
    p = validate({"lineages": [{"name": "base", "estimator": "mle", "seeds": [0, 1, 2, 3]},
                               {"name": "better", "estimator": "mle", "seeds": [0, 1, 2, 3]},
                               {"name": "same", "estimator": "mle", "seeds": [0, 1, 2, 3]},
                               {"name": "elsewhere", "estimator": "mle", "seeds": [7, 8]}]})
    base_fid = [20.0, 25.0, 30.0, 22.0]
    fid = {"base": dict(enumerate(base_fid)), "better": {s: f - 5 + 0.1 * s for s, f in enumerate(base_fid)},
           "same": {s: f + (-1) ** s for s, f in enumerate(base_fid)}, "elsewhere": {7: 10.0, 8: 30.0}}
    rows = [{"lineage": lineage.name, "estimator": "mle", "generation": 1, "fid": fid[lineage.group][lineage.seed],
             "recall": 0.5, "minority_share": 0.1, "r_fair": 1.0} for lineage in p.lineages]
    rows += [{**row, "generation": 0, "fid": 99.0} for row in rows]  # earlier generations are not ranked
    ranking = {r["recipe"]: r for r in rank_recipes(p, rows, p.lineages)}
    assert [r["rank"] for r in sorted(ranking.values(), key=lambda r: r["fid"])] == [1, 2, 3, 4]
    base = ranking["base"]
    logs = np.log(base_fid)  # FID is positive and skewed: geometric mean, t-interval on the log scale
    half = stats.t.ppf(0.975, 3) * np.std(logs, ddof=1) / 2
    assert (base["fid"], base["fid_low"], base["fid_high"]) == pytest.approx(
        (stats.gmean(base_fid), math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    recall = (base["recall"], base["recall_low"], base["recall_high"])  # a share: the plain t-interval in [0, 1]
    assert recall == pytest.approx((0.5, 0.5, 0.5))
    assert base["baseline"] == "yes" and math.isnan(base["fid_diff"])
    better = ranking["better"]
    assert better["fid_test"] == "paired t-test, 4 seeds" and better["fid_diff"] == pytest.approx(-5 + 0.15)
    assert better["fid_p"] < 1e-4 and better["fid_significant"] == "yes"  # consistent over seeds
    assert ranking["same"]["fid_significant"] == "no"
    assert ranking["elsewhere"]["fid_test"] == "Welch t-test, 2 vs 4 seeds"  # no shared seeds: unpaired
    text = ranking_markdown(p, list(ranking.values()))
    assert text.index("Rule, stated before the numbers") < text.index("\n| better | ")
    assert "geometric mean" in text and "**" in text


# --- every new recipe through the real flow ----------------------------------------------------------------------


@pytest.mark.slow
def test_every_new_recipe_runs_two_generations_through_the_flow(project, prefect_server):
    # dvc add after each generation is tested elsewhere (test_loop, test_dvc_pipeline); here it would only add time
    self_consuming_loop(params=tiny(lineages=NEW_RECIPES, dvc={"track": False}), root=str(project))
    study = project / "data" / "studies" / "tiny"
    n_real = len(dataset_zero(study, NEW_RECIPES[0]["name"]))
    for recipe in NEW_RECIPES:
        for k in (0, 1):
            manifest = read_json(study / recipe["name"] / f"gen-{k:03d}.json")
            for metric in ("fid", "density", "coverage", "memorisation_rate", "knn_entropy"):
                assert metric in manifest["metrics"], (recipe["name"], metric)
    gen = {r["name"]: [read_json(study / r["name"] / f"gen-{k:03d}.json") for k in (0, 1)] for r in NEW_RECIPES}
    # accumulate-subsample: the pool grows by n each generation, each model trains on 100 rows of it
    assert [m["rows"] for m in gen["mle-subsample"]] == [{"trained_on": 100, "produced": 2 * n_real},
                                                         {"trained_on": 100, "produced": 3 * n_real}]
    for name, rate in (("mle-verify", 0.5), ("ple-verify-confidence", 0.25), ("mle-curation", 0.25),
                       ("mle-entropy", 0.5)):
        metrics = gen[name][1]["metrics"]
        assert metrics["acceptance_rate"] == rate and 0 <= metrics["minority_share_kept"] <= 1, name
        assert len(read_parquet(study / name / "dataset-002.parquet")) == n_real  # n kept of the candidates
    assert 0.5 <= gen["mle-verify"][1]["metrics"]["verifier_accuracy"] <= 1
    assert gen["mle-entropy"][1]["metrics"]["entropy_kept"] > gen["mle-entropy"][1]["metrics"]["entropy_unselected"]
    assert gen["mle-curation"][0]["metrics"]["curation_reward_kept"] >= gen["mle-curation"][0]["metrics"][
        "curation_reward_all"]
    assert all(m["metrics"]["neon_w"] == 0.5 and m["metrics"]["neon_step"] > 0 for m in gen["ple-neon"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("madloop/tiny")
    parents = {r.data.tags["lineage"]: r for r in client.search_runs([experiment.experiment_id], max_results=100)
               if "mlflow.parentRunId" not in r.data.tags}
    assert len(client.get_metric_history(parents["mle-verify"].info.run_id, "verifier_accuracy")) == 2
    assert len(client.get_metric_history(parents["mle-neon"].info.run_id, "memorisation_rate")) == 2

    reports = project / "reports" / "tiny"
    with open(reports / "lineages.csv") as f:
        ranking = list(csv.DictReader(f))
    assert {r["recipe"] for r in ranking} == {r["name"] for r in NEW_RECIPES}
    assert {"fid_low", "fid_high", "recall_diff", "r_fair_p_holm"} <= set(ranking[0])
    assert (reports / "recipes.png").stat().st_size > 10_000


def test_the_comparison_study_covers_every_mode_and_mitigation_at_ten_paired_seeds_and_is_a_locked_stage():
    from pathlib import Path

    import yaml

    from tasks.modes import MODES
    from tasks.mitigations import MITIGATIONS
    from tasks.params import load

    repo = Path(__file__).resolve().parents[1]
    p = load(repo / "examples" / "mitigations.yaml")
    recipes = {(lin.estimator, lin.mode or p.loop.mode, lin.mitigation) for lin in p.lineages}
    assert {mode for e, mode, m in recipes if e == "mle" and m == "none"} == set(MODES.names())
    assert {m for e, _, m in recipes if e == "mle"} == set(MITIGATIONS.names())
    assert ("ple", "replace", "none") in recipes  # PLE on the baseline loop (its mitigation twins are dropped)
    seeds = {}
    for lin in p.lineages:
        seeds.setdefault(lin.group, set()).add(lin.seed)
    assert set(map(frozenset, seeds.values())) == {frozenset(range(10))} and p.loop.generations == 5
    fresh = next(lin for lin in p.lineages if lin.mode == "fresh")
    twin = next(lin for lin in p.lineages if lin.group == "mle-augment-pool")
    assert fresh.set == twin.set and fresh.real_fraction == twin.real_fraction  # a like-for-like comparison
    assert p.lineages[0].group == "mle-replace"  # the baseline every recipe is tested against
    stage = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["mitigations"]
    # not frozen: dvc.lock records it as run for the committed reports (test_dvc_pipeline checks the lock is current)
    assert not stage.get("frozen") and "examples/mitigations.yaml" in stage["cmd"]
    assert "examples/mitigations.yaml" in stage["deps"]
    written = {"metrics.json", "generations.csv", "summary.md", "lineages.csv", "lineages.md", "recipes.png",
               "recipes.csv", "labeller.json"}  # everything an image study's reports folder holds
    assert {Path(next(iter(out))).name for out in stage["outs"]} == written
    assert written <= {f.name for f in (repo / "reports" / "mitigations").iterdir()}
