"""The PLE hypernetwork and the 1-D families: invariances, shapes, closed forms, GMM recovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from models.estimators import fit
from models.families import FAMILIES
from models.families.analytic import Gaussian, Uniform
from models.families.gmm import GaussianMixture1D
from models.families.vae import VAESettings
from models.hypernet import HyperNetwork


def make_hyper(rank=8):
    torch.manual_seed(0)
    target = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32, 16], latent_dim=4)).build()
    hyper = HyperNetwork(target, 64, [16, 24], rank)
    with torch.no_grad():  # move off the initialization so the embedding matters
        for p in hyper.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return target, hyper


@pytest.mark.parametrize("rank", [8, None])
def test_hypernetwork_is_permutation_invariant_and_batch_size_independent(rank):
    _, hyper = make_hyper(rank)
    data = torch.rand(301, 64)
    reference = hyper.emit(hyper.streamed_embedding(data, batch_size=301))
    shuffled = hyper.emit(hyper.streamed_embedding(data[torch.randperm(301)], batch_size=301))
    for batch_size in (1, 7, 64, 1000):
        streamed = hyper.emit(hyper.streamed_embedding(data, batch_size=batch_size))
        for name in reference:
            assert torch.allclose(streamed[name], reference[name], atol=1e-5), (batch_size, name)
            assert torch.allclose(shuffled[name], reference[name], atol=1e-5), name
    one_pass = hyper(data)  # the differentiable path agrees with the streamed one
    for name in reference:
        assert torch.allclose(one_pass[name], reference[name], atol=1e-5)
    other = hyper.emit(hyper.streamed_embedding(torch.rand(301, 64)))
    assert any(not torch.allclose(other[n], reference[n], atol=1e-5) for n in reference)  # it does see data


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


@pytest.mark.parametrize("target", [nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2)), SmallConvNet()])
def test_emitted_weights_match_every_parameter_and_run_functionally(target):
    hyper = HyperNetwork(target, 64, [8, 12], rank=4)
    weights = hyper(torch.rand(20, 64))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(p.shape) for k, p in target.named_parameters()}
    x = torch.rand(3, 1, 8, 8) if isinstance(target, SmallConvNet) else torch.rand(3, 6)
    out = functional_call(target, weights, (x,))
    out.sum().backward()  # gradients reach the hypernetwork through the functional call
    assert hyper.basis.grad is not None and hyper.h1[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.parameters())  # the target's own weights are never used


def test_distance_on_sampled_entries_is_unbiased():
    _, hyper = make_hyper()
    a, b = torch.randn(24), torch.randn(24)
    full = hyper.distance(a, b).item()
    generator = torch.Generator().manual_seed(0)
    estimates = [hyper.distance(a, b, torch.randint(hyper.num_emitted, (512,), generator=generator)).item()
                 for _ in range(400)]
    assert np.mean(estimates) == pytest.approx(full, rel=0.03)


def test_sampled_distance_with_sparse_gradient_is_the_dense_one():
    """distance(..., allow_sparse=True) on a big enough target computes only the sampled entries and gives the
    basis a sparse gradient: the same value and the same gradients (code, basis, h1) as the dense path, duplicate
    entries included, and autograd adds it into the emission's dense gradient of the same step."""
    grads = {}
    for sparse in (False, True):
        _, hyper = make_hyper(rank=4)
        hyper.sparse_min_ratio = 0  # this small target would take the dense path, which is cheaper for it
        x, y = torch.rand(16, 64), torch.rand(16, 64)
        entries = torch.cat([torch.randint(hyper.num_emitted, (300,), generator=torch.Generator().manual_seed(3)),
                             torch.tensor([7, 7, 7])])  # duplicates: their gradients must add up
        e_x = hyper.embed(x)
        value = hyper.distance(hyper.embed(y), e_x, entries, allow_sparse=sparse)
        nodes, node = [], value.grad_fn
        while node is not None:  # the chain mean <- abs <- product: which product ran
            nodes.append(type(node).__name__)
            node = node.next_functions[0][0] if node.next_functions else None
        assert any("SampledLowRankDelta" in n for n in nodes) == sparse, nodes
        (value + hyper.emit(e_x)["encoder.0.0.weight"].square().sum()).backward()  # the emission's dense gradient too
        assert hyper.basis.grad.layout == torch.strided  # dense after accumulation: what fused Adam takes
        grads[sparse] = (value.detach(), {k: p.grad.clone() for k, p in hyper.named_parameters()})
    assert torch.allclose(grads[True][0], grads[False][0], rtol=1e-6)
    for name, dense in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], dense, rtol=1e-5, atol=1e-9), name


def test_uniform_closed_forms_bias_over_many_seeds():
    family = Uniform.of(a=1.0)
    n, seeds = 20, 4000
    rng = np.random.default_rng(0)
    mle = np.array([family.closed_mle(rng.uniform(0, 1, n), 0)["a"] for _ in range(seeds)])
    ple = np.array([family.closed_ple(rng.uniform(0, 1, n), 0)["a"] for _ in range(seeds)])
    se = ple.std() / np.sqrt(seeds)
    assert abs(ple.mean() - 1.0) < 4 * se  # PLE unbiased
    assert mle.mean() == pytest.approx(n / (n + 1), abs=4 * mle.std() / np.sqrt(seeds))  # MLE: a n/(n+1)


def test_gaussian_mle_variance_is_biased_by_sigma2_over_n():
    family = Gaussian.of(mean=0.0, std=2.0)
    n, seeds = 10, 6000
    rng = np.random.default_rng(1)
    mle_var = np.array([family.closed_mle(rng.normal(0, 2, n), 0)["std"] ** 2 for _ in range(seeds)])
    ple_var = np.array([family.closed_ple(rng.normal(0, 2, n), 0)["std"] ** 2 for _ in range(seeds)])
    assert mle_var.mean() - 4.0 == pytest.approx(-4.0 / n, abs=4 * mle_var.std() / np.sqrt(seeds))
    assert abs(ple_var.mean() - 4.0) < 4 * ple_var.std() / np.sqrt(seeds)


@pytest.mark.parametrize("estimator", ["mle", "ple"])
def test_gmm_em_and_ple_recover_a_well_separated_balanced_mixture(estimator):
    family = GaussianMixture1D.of(means=[-3.0, 3.0], variances=[1.0, 1.0], minority_weight=0.5)
    x = family.true_sample(600, seed=0)
    model = fit(estimator, family, x, seed=0, train={"epochs": 300, "batch_size": 600, "lr": 0.02},
                **({"ple": {"lam": 0.1, "m": 4, "hidden": [16, 16], "rank": None}} if estimator == "ple" else {}))
    est = family.estimates(model)
    assert est["mean_0"] == pytest.approx(-3.0, abs=0.3) and est["mean_1"] == pytest.approx(3.0, abs=0.3)
    assert est["var_0"] == pytest.approx(1.0, abs=0.35) and est["var_1"] == pytest.approx(1.0, abs=0.35)
    assert est["weight_1"] == pytest.approx(0.5, abs=0.08)


@pytest.mark.parametrize("name", ["uniform", "gaussian", "laplace", "geometric", "exponential", "pareto"])
def test_analytic_families_mle_recovers_truth_and_samples_match(name):
    family = FAMILIES.get(name).of()
    x = family.true_sample(20000, seed=3)
    model = fit("mle", family, x, seed=0)
    est, truth = family.estimates(model), family.true_estimates()
    for key, value in truth.items():
        assert est[key] == pytest.approx(value, rel=0.05, abs=0.03), key
    drawn = model.sample(20000, seed=4)  # the torch sampler and scipy's agree in distribution
    from scipy import stats

    reference = family.draw(truth, 20000, np.random.default_rng(5))
    assert stats.ks_2samp(drawn.reshape(-1), reference).pvalue > 1e-3 or name == "geometric"
    assert abs(np.median(drawn) - np.median(reference)) < 0.1 * (np.std(reference) + 1e-9) + 0.05
    nll = family.nll(model.module, torch.as_tensor(x[:100]))
    assert nll.shape == (100,) and torch.isfinite(nll).all()


@pytest.mark.parametrize("estimator", ["mle", "ple"])
def test_bf16_autocast_trains(estimator):
    """train.precision: bf16 runs (autocast on the CPU here, the GPU path's option) and still learns."""
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32], latent_dim=4))
    x = torch.rand(128, 1, 8, 8).round().numpy()
    train = dict(epochs=30, batch_size=64, lr=3e-3)
    options = dict(seed=0, **({"ple": dict(hidden=[16, 16], rank=4)} if estimator == "ple" else {}))
    full = fit(estimator, family, x, train={**train, "precision": "fp32"}, **options)
    half = fit(estimator, family, x, train={**train, "precision": "bf16"}, **options)
    assert np.isfinite(half.info["train_loss"])
    assert half.info["train_loss"] == pytest.approx(full.info["train_loss"], rel=0.15)
    with pytest.raises(ValueError, match="precision"):
        fit(estimator, family, x, train={**train, "precision": "fp8"}, **options)


def test_lazy_penalty_runs_on_every_kth_step_only():
    """ple.penalty_every = k: the penalty enters on steps k, 2k, ...; with k beyond the last step PLE is exactly
    the lambda = 0 hypernetwork, with k = 4 it is not."""
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32], latent_dim=4))
    x = torch.rand(128, 1, 8, 8).round().numpy()
    train = dict(epochs=10, batch_size=64, lr=3e-3)  # 20 steps
    ple = dict(hidden=[16, 16], rank=4, lam=0.5)
    never = fit("ple", family, x, seed=0, train=train, ple={**ple, "penalty_every": 21})
    control = fit("hyper_nopenalty", family, x, seed=0, train=train, ple=ple)  # lam fixed at 0
    lazy = fit("ple", family, x, seed=0, train=train, ple={**ple, "penalty_every": 4})
    assert all(torch.equal(never.tensors()[k], control.tensors()[k]) for k in control.tensors())
    assert np.isfinite(lazy.info["train_penalty"])
    assert any(not torch.allclose(lazy.tensors()[k], control.tensors()[k]) for k in control.tensors())


def penalty_case():
    """A VAE target, a hypernetwork moved off its initialization, a batch X and H(X)."""
    target, hyper = make_hyper(rank=8)
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32, 16], latent_dim=4))
    target.train()
    x = torch.rand(16, 1, 8, 8)
    e_x = hyper.embed(family.hyper_features(x))
    return family, target, hyper, e_x, hyper.emit(e_x)


def test_penalty_is_the_mean_absolute_difference_of_emitted_weights():
    """Eq. 5's penalty, per unit: (1/m) sum_j mean|H(Y_j) - H(X)|, computed here from the full emitted weight
    dicts (biases included) and compared with the estimator's (which evaluates only the linear part)."""
    from models.estimators.ple import penalty

    family, target, hyper, e_x, weights = penalty_case()
    value = penalty(family, target, hyper, e_x, weights, 16, 3, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    flat = lambda w: torch.cat([t.reshape(-1) for t in w.values()])  # noqa: E731
    manual = sum((flat(hyper(family.hyper_features(family.sample(target, 16, generator, weights=weights))))
                  - flat(weights)).abs().mean() for _ in range(3)) / 3
    assert value.item() == pytest.approx(manual.item(), rel=1e-5) and value.item() > 0


def test_penalty_gradient_flows_through_the_synthetic_samples():
    """The heads' biases b cancel in H(Y_j) - H(X), so the penalty reaches b only through Y_j = f(H(X)) (Y_j
    depend on the emitted weights, which contain b). Detaching Y_j must cut exactly that path."""
    from models.estimators.ple import penalty

    family, target, hyper, e_x, weights = penalty_case()
    penalty(family, target, hyper, e_x, weights, 16, 2, torch.Generator().manual_seed(1)).backward()
    through_samples = hyper.bias.grad.abs().sum().item()
    assert through_samples > 0

    class Detached:  # the same family, with the samples cut off from the weights
        def sample(self, *args, **kwargs):
            return family.sample(*args, **kwargs).detach()

        def hyper_features(self, y):
            return family.hyper_features(y)

    family, target, hyper, e_x, weights = penalty_case()
    penalty(Detached(), target, hyper, e_x, weights, 16, 2, torch.Generator().manual_seed(1)).backward()
    assert hyper.bias.grad is None or hyper.bias.grad.abs().sum().item() == 0
    assert hyper.h1[0].weight.grad.abs().sum().item() > 0  # the other paths (H(X), H(Y_j)) still carry it


def test_switching_the_penalty_on_changes_nothing_but_the_penalty():
    """The penalty draws from random streams of its own: at lambda = 1e-30 training is the lambda = 0 control step
    for step (same data order, same noise); lambda = 0.5 moves the weights."""
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32], latent_dim=4))
    x = torch.rand(128, 1, 8, 8).round().numpy()
    train = dict(epochs=10, batch_size=64, lr=3e-3)
    ple = dict(hidden=[16, 16], rank=4, penalty_every=1, penalty_entries=256)
    fits = {lam: fit("ple", family, x, seed=0, train=train, ple={**ple, "lam": lam}).tensors()
            for lam in (0.0, 1e-30, 0.5)}
    tiny_gap = max((fits[0.0][k] - fits[1e-30][k]).abs().max().item() for k in fits[0.0])
    real_gap = max((fits[0.0][k] - fits[0.5][k]).abs().max().item() for k in fits[0.0])
    assert tiny_gap < 1e-6 < 1e-3 < real_gap, (tiny_gap, real_gap)


def test_hypernetwork_fits_report_the_penalty_share_per_epoch():
    family = FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[32], latent_dim=4))
    x = torch.rand(128, 1, 8, 8).round().numpy()
    model = fit("ple", family, x, seed=0, train=dict(epochs=4), ple=dict(hidden=[16], rank=2, penalty_every=1))
    history = model.info["history"]
    assert len(history["nll"]) == len(history["penalty"]) == 4 and all(v > 0 for v in history["penalty"])
    lam = 0.1
    assert model.info["penalty_share"] == pytest.approx(
        lam * history["penalty"][-1] / (history["nll"][-1] + lam * history["penalty"][-1]))
    control = fit("hyper_nopenalty", family, x, seed=0, train=dict(epochs=4), ple=dict(hidden=[16], rank=2))
    assert control.info["penalty_share"] == 0.0 and all(np.isnan(control.info["history"]["penalty"]))
