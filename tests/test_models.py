import math

import numpy as np
import pytest
import torch

from models.classifier import load_classifier, predict
from models.estimators import fit
from models.families import FAMILIES
from models.families.vae import VAESettings
from models.fidelity import CLASSIFIER_EXTRACTOR, fairness_ratio, fid, image_metrics
from tasks.datasets import load_real
from tasks.params import validate
from tasks.scorers.image import ImageScorer, ensure_classifier

pytestmark = pytest.mark.fit  # every test here trains models (make test-fast leaves them out)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    p = validate({"classifier": {"epochs": 15}})
    real = load_real(p.data, 0, root)
    path, accuracy = ensure_classifier(real, p.classifier, p.seed, root / "cache", CPU)
    return p, real, path, accuracy


def test_vae_shapes_and_likelihood():
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32, 16], latent_dim=4))
    vae = family.build()
    x = torch.rand(10, 1, 8, 8)
    nll = family.nll(vae, x)
    assert nll.shape == (10,) and torch.isfinite(nll).all() and (nll > 0).all()
    vae.eval()
    samples = family.sample(vae, 7, torch.Generator().manual_seed(0))
    assert samples.shape == (7, 1, 8, 8) and 0 <= samples.min() and samples.max() <= 1
    # functional weights: the same weights through functional_call give the same samples
    weights = {k: v.clone() for k, v in vae.named_parameters()}
    again = family.sample(vae, 7, torch.Generator().manual_seed(0), weights=weights)
    assert torch.allclose(samples, again)


def test_mle_training_lowers_the_negative_elbo(digits):
    _, real, _, _ = digits
    family = FAMILIES.get("vae")(real.train.shape, VAESettings(hidden=[64], latent_dim=4))
    untrained = fit("mle", family, real.train.pixels, seed=0, train={"epochs": 1})
    trained = fit("mle", family, real.train.pixels, seed=0, train={"epochs": 60})
    x = torch.as_tensor(real.train.pixels)
    with torch.no_grad():
        assert family.nll(trained.module, x).mean() < 0.8 * family.nll(untrained.module, x).mean()
    a, b = trained.sample(50, seed=1), trained.sample(50, seed=1)
    assert np.array_equal(a, b) and a.shape == (50, 1, 8, 8)


def test_classifier_is_far_above_chance_and_cached(digits, tmp_path):
    p, real, path, accuracy = digits
    assert accuracy > 0.9  # chance is 0.1 on ten balanced classes
    again, accuracy_again = ensure_classifier(real, p.classifier, p.seed, path.parent, CPU)
    assert again == path and accuracy_again == accuracy  # cache hit: same file, same model
    assert (predict(load_classifier(path), real.test.pixels) == real.test.label).mean() == accuracy


def test_fid_of_a_set_against_itself_is_near_zero_and_noise_is_far(digits):
    _, real, path, _ = digits
    images = real.test.pixels
    kwargs = dict(extractor=CLASSIFIER_EXTRACTOR, weights_path=str(path), device=CPU)
    same = fid(images, images, **kwargs)
    noise = fid(np.random.default_rng(0).random(images.shape, dtype=np.float32), images, **kwargs)
    assert abs(same) < 1e-3
    assert noise > 100 * max(same, 1e-3) and noise > 1.0
    assert math.isnan(fid(images[:3], images, min_samples=10, **kwargs))


def test_image_metrics_are_in_range(digits):
    _, real, path, _ = digits
    rng = np.random.default_rng(0)
    half = rng.permutation(len(real.test))
    metrics = image_metrics(real.test.pixels[half[:200]], real.test.pixels[half[200:]],
                            extractor=CLASSIFIER_EXTRACTOR, weights_path=str(path), device=CPU, kid_subset_size=100)
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert metrics["precision"] > 0.5 and metrics["recall"] > 0.5  # two halves of one distribution
    noise = image_metrics(rng.random((200, 1, 8, 8), dtype=np.float32), real.test.pixels,
                          extractor=CLASSIFIER_EXTRACTOR, weights_path=str(path), device=CPU, kid_subset_size=100)
    assert noise["precision"] < metrics["precision"] and noise["fid"] > metrics["fid"]
    assert noise["kid"] > metrics["kid"]


def test_scorer_fairness_view(digits):
    p, real, path, _ = digits
    scorer = ImageScorer.from_classifier(p, real, path, CPU)
    train = real.train_full  # disjoint from the test split the scorer compares against
    only_majority = train.pixels[train.label == 3]
    metrics = scorer.score(only_majority, seed=0)
    assert metrics["minority_share"] < 0.05 and metrics["majority_share"] > 0.9
    assert math.isnan(metrics["fid_minority"]) and math.isnan(metrics["r_fair"])
    both = train.pixels[np.isin(train.label, [3, 6])]
    metrics = scorer.score(both, seed=0)
    assert 0.4 < metrics["minority_share"] < 0.6
    assert metrics["r_fair"] == pytest.approx(metrics["fid_minority"] / metrics["fid_majority"])
    assert fairness_ratio(2.0, 6.0) == 3.0


def test_scores_use_every_held_out_image_with_standard_errors(digits):
    """The reference is every held-out image of the two classes; FID weights it to the training mix, so images
    drawn at that mix score lower than the same number drawn balanced; every fidelity score has its noise."""
    p, real, path, _ = digits
    scorer = ImageScorer.from_classifier(p, real, path, CPU)
    held_out = np.isin(real.test.label, [3, 6])
    assert len(scorer.reference) == held_out.sum() > 80 and scorer.reference_weights.sum() == pytest.approx(1.0)
    train = real.train_full
    at_mix = np.concatenate([train.pixels[train.label == 3][:100], train.pixels[train.label == 6][:20]])
    balanced = np.concatenate([train.pixels[train.label == 3][:60], train.pixels[train.label == 6][:60]])
    mix, even = scorer.score(at_mix, seed=0), scorer.score(balanced, seed=0)
    assert mix["fid"] < even["fid"]  # R_I = 5: the 5:1 set is what a perfect model of dataset 0 generates
    for metrics in (mix, even):
        assert metrics["fid_se"] > 0 and 0 <= metrics["precision"] <= 1  # one 91-image subset: no precision_se
        assert np.isfinite(metrics["kid_majority"]) and np.isfinite(metrics["kid_minority"])
    few = scorer.score(train.pixels[train.label == 3][:100], seed=0)
    assert math.isnan(few["kid_minority"]) and math.isnan(few["fid_minority"])


def test_a_lineage_is_scored_against_its_own_class_references_at_matched_counts(digits):
    """Each class's reference is its held-out images plus the training images the lineage never trains on; the
    matched-count FIDs of dataset 0 itself sit on their floors; a second labeller checks the first."""
    p, real, path, _ = digits
    check, _ = ensure_classifier(real, p.classifier.for_check(), p.seed + 1, path.parent, CPU)
    base = ImageScorer.from_classifier(p, real, path, CPU, check)
    assert base.labeller["accuracy"] > 0.9 and base.labeller["check_accuracy"] > 0.9
    assert 0.9 < base.labeller["recall_minority"] <= 1 and 0.9 < base.labeller["precision_minority"] <= 1
    scorer = base.for_lineage(real)
    held_out = {c: int((real.test.label == c).sum()) for c in (3, 6)}
    assert len(scorer.class_reference_features[6]) == held_out[6] + len(real.unused_index(6)) > 2 * held_out[6]
    assert len(scorer.class_reference_features[3]) == held_out[3]  # dataset 0 holds every training 3
    assert len(scorer.train_class_features[6]) == int((real.train.label == 6).sum())

    metrics = scorer.score(real.train.pixels, seed=0)  # a perfect memoriser of dataset 0
    labels = scorer.label(real.train.pixels)
    assert metrics["minority_count"] == (labels == 6).sum() and metrics["reference_size_minority"] == len(
        scorer.class_reference_features[6])
    assert metrics["match_count"] == min((labels == 3).sum(), (labels == 6).sum(), (real.train.label == 6).sum())
    if (labels == real.train.label).all():  # every 6 of dataset 0 is called a 6: the same images as the floor's
        assert metrics["fid_minority_matched"] == pytest.approx(metrics["fid_floor_minority"], rel=1e-6)
    assert metrics["r_fair_matched"] == pytest.approx(metrics["fid_minority_matched"] / metrics["fid_majority_matched"])
    assert 0.9 < metrics["label_agreement"] <= 1
    assert metrics["minority_share_check"] == pytest.approx(metrics["minority_share"], abs=0.05)


def test_the_papers_r_fair_grows_as_minority_samples_shrink_and_the_kid_ratio_does_not(digits):
    """Same generator quality (noisy copies of the same images), fewer minority samples: FID's small-sample bias
    inflates FID_min and so R_Fair; KID is unbiased, so its ratio stays where it was (on average)."""
    p, real, path, _ = digits
    scorer = ImageScorer.from_classifier(p, real, path, CPU).for_lineage(real)
    rng = np.random.default_rng(0)
    threes, sixes = (real.train.pixels[real.train.label == c] for c in (3, 6))

    def blurred(images, n):  # a model's samples: dataset 0's images with noise, n of them
        pick = images[rng.integers(0, len(images), n)]
        return np.clip(pick + rng.normal(0, 0.2, pick.shape).astype(np.float32), 0, 1)

    few, many = [], []
    for seed in range(8):
        for out, n in ((few, 10), (many, 200)):
            metrics = scorer.score(np.concatenate([blurred(threes, 300), blurred(sixes, n)]), seed)
            out.append((metrics["r_fair"], metrics["r_fair_kid"]))
    few, many = np.nanmean(few, axis=0), np.nanmean(many, axis=0)
    assert few[0] > 1.3 * many[0]  # the paper's R_Fair: a sample-size effect (1.49x here)
    assert 0.75 < few[1] / many[1] < 1.33  # KID's ratio: none beyond its noise (1.17x here)


def test_the_1d_wasserstein_distance_is_scipys_to_the_last_bit():
    """models.scalar.wasserstein_distance re-orders scipy's steps for speed; it must not move a reported number."""
    from scipy import stats

    from models.scalar import wasserstein_distance

    rng = np.random.default_rng(7)
    for case in range(60):
        u = rng.normal(rng.normal(), rng.uniform(0.1, 3.0), size=int(rng.integers(1, 3000)))
        v = rng.standard_t(3, size=int(rng.integers(1, 3000)))
        if case % 5 == 0:  # ties within and across the samples
            u, v = np.round(u, 1), np.round(v, 1)
        assert wasserstein_distance(u, v) == stats.wasserstein_distance(u, v)
    assert wasserstein_distance([0, 1, 3], [5, 6, 8]) == 5.0  # scipy's documented example
