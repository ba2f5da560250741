"""The flow, diffusion and GAN families: shapes, exact likelihood, MLE and PLE training, the GAN's discriminator,
the families study through the real flow."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from models.estimators import fit
from models.families import FAMILIES
from models.families.diffusion import DiffusionSettings
from models.families.flow import FlowSettings
from models.families.gan import GANSettings

from tests.conftest import tiny

TINY = {"flow": FlowSettings(couplings=2, hidden=[16]),
        "diffusion": DiffusionSettings(timesteps=50, width=32, blocks=1, sample_steps=10, penalty_steps=3,
                                       penalty_grad_steps=2),
        "gan": GANSettings(latent_dim=4, generator=[16], discriminator=[16], r1=1.0)}
TINY_PARAMS = {"flow": {"couplings": 2, "hidden": [16]},
               "diffusion": {"timesteps": 50, "width": 32, "blocks": 1, "sample_steps": 10, "penalty_steps": 3},
               "gan": {"latent_dim": 4, "generator": [16], "discriminator": [16]}}
PLE = {"hidden": [16, 16], "rank": 2, "penalty_every": 1}


def family(name: str, shape=(1, 8, 8)):
    return FAMILIES.get(name)(shape, TINY[name])


def digits_like(n: int = 96, shape=(1, 8, 8)) -> np.ndarray:
    """Images on the 17-level grid of scikit-learn's digits."""
    return (np.random.default_rng(0).integers(0, 17, (n, *shape)) / 16.0).astype(np.float32)


@pytest.mark.parametrize("name", ["flow", "diffusion", "gan"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_families_build_score_and_sample_any_image_shape(name, shape):
    fam = family(name, shape)
    module = fam.build()
    x = torch.as_tensor(digits_like(5, shape))
    nll = fam.nll(module, x)
    assert nll.shape == (5,) and torch.isfinite(nll).all()
    with torch.no_grad():
        samples = fam.sample(module, 7, torch.Generator().manual_seed(0))
    assert samples.shape == (7, *shape) and samples.min() >= 0 and samples.max() <= 1


@pytest.mark.parametrize("name", ["flow", "diffusion", "gan"])
@pytest.mark.parametrize("estimator", ["mle", "ple"])
def test_families_train_by_mle_and_ple(name, estimator):
    fam, x = family(name), digits_like()
    options = {"ple": PLE} if estimator == "ple" else {}
    model = fit(estimator, fam, x, seed=0, train={"epochs": 3, "batch_size": 32}, **options)
    assert math.isfinite(model.info["train_loss"])
    samples = model.sample(20, seed=1)
    assert samples.shape == (20, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 1
    if estimator == "ple":  # H emits exactly the trained parameters, and they run the module functionally
        assert set(model.weights) == set(fam.trained_parameters(model.module))
        assert all(model.weights[k].shape == p.shape for k, p in fam.trained_parameters(model.module).items())
        assert math.isfinite(model.info["train_penalty"]) and model.info["train_penalty"] > 0
        with torch.no_grad():
            assert torch.isfinite(fam.nll(model.module, torch.as_tensor(x[:8]), model.weights)).all()
        own = fam.sample(model.module, 20, torch.Generator().manual_seed(3)).detach()
        emitted = fam.sample(model.module, 20, torch.Generator().manual_seed(3), weights=model.weights).detach()
        assert not torch.allclose(own, emitted)  # the emitted weights, not the module's own, make the samples


def test_flow_log_determinant_is_exact_and_sampling_inverts_it():
    """The flow's NLL is an exact change of variables: the couplings' summed log-determinants match autograd's
    Jacobian of the whole stack, and generation runs the same couplings backwards."""
    fam = FAMILIES.get("flow")((1, 2, 2), FlowSettings(couplings=3, hidden=[8]))
    flow = fam.build().double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # off the identity start

    def stack(v):
        logdet = torch.zeros(1, dtype=torch.float64)
        for layer in flow.layers:
            v, part = layer(v)
            logdet = logdet + part
        return v, logdet

    v = torch.randn(1, 4, dtype=torch.float64)
    z, logdet = stack(v)
    jacobian = torch.autograd.functional.jacobian(lambda u: stack(u[None])[0][0], v[0])
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-9)
    for layer in reversed(flow.layers):
        z = layer.inverse(z)
    assert torch.allclose(z, v, atol=1e-9)


def test_flow_reports_bits_per_dimension_of_held_out_images():
    from tasks.scorers.image import ImageScorer

    fam = family("flow")
    module = fam.build()
    x = torch.as_tensor(digits_like(40))
    bpd = fam.held_out_scores(module, None, x, seed=0)["bpd"]
    nll = fam.nll(module, x).mean().item()  # fresh dequantization noise: close, not equal
    assert bpd == pytest.approx(nll / (64 * math.log(2)), rel=0.05) and 0 < bpd < 20
    assert fam.held_out_scores(module, None, x, seed=0)["bpd"] == bpd  # the seed fixes the noise
    assert "bpd" in [c.name for c in ImageScorer.columns(FAMILIES.get("flow"))]
    assert "bpd" not in [c.name for c in ImageScorer.columns(FAMILIES.get("vae"))]


def test_flow_samples_sit_on_the_data_levels_and_carry_gradients():
    fam = family("flow")
    module = fam.build()
    weights = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    samples = fam.sample(module, 16, torch.Generator().manual_seed(0), weights=weights)
    levels = samples * 16
    assert torch.allclose(levels, levels.round(), atol=1e-5)
    samples.sum().backward()
    assert all(w.grad is not None for w in weights.values())


def test_diffusion_penalty_sampling_is_short_and_differentiable_and_scoring_is_full():
    fam = family("diffusion")
    module = fam.build()
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(torch.is_grad_enabled()))
    with torch.no_grad():
        fam.sample(module, 4, torch.Generator().manual_seed(0))
    assert len(calls) == TINY["diffusion"].sample_steps
    calls.clear()
    weights = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    fam.sample(module, 4, torch.Generator().manual_seed(0), weights=weights, penalty=True).sum().backward()
    assert calls == [False, True, True]  # penalty_steps 3, the gradient through the last 2 (penalty_grad_steps)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights.values())


def test_diffusion_sampler_is_chosen_by_the_caller_never_by_the_autograd_mode():
    """The loop's sampler with autograd on is the loop's sampler (the same samples as without), and the penalty's
    sampler without autograd is still the penalty's: only the ``penalty`` argument chooses."""
    fam = family("diffusion")
    module = fam.build()
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(1))
    weights = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    drawn = {}
    for grad in (False, True):
        for penalty in (False, True):
            calls.clear()
            with torch.set_grad_enabled(grad):
                drawn[grad, penalty] = fam.sample(module, 4, torch.Generator().manual_seed(0), weights=weights,
                                                  penalty=penalty).detach()
            steps = TINY["diffusion"].penalty_steps if penalty else TINY["diffusion"].sample_steps
            assert len(calls) == steps, (grad, penalty)
    assert torch.equal(drawn[False, False], drawn[True, False])
    assert torch.equal(drawn[False, True], drawn[True, True])
    assert not torch.allclose(drawn[False, False], drawn[False, True])


def test_the_ple_penalty_asks_for_the_penalty_sampler():
    from models.estimators.ple import penalty
    from models.hypernet import HyperNetwork

    fam = family("diffusion")
    target = fam.build()
    hyper = HyperNetwork(target, 64, [8], 2)
    x = torch.as_tensor(digits_like(8))
    e_x = hyper.embed(fam.hyper_features(x))
    calls = []
    target.register_forward_hook(lambda m, args, out: calls.append(1))
    penalty(fam, target, hyper, e_x, hyper.emit(e_x), 8, 1, torch.Generator().manual_seed(0))
    assert len(calls) == TINY["diffusion"].penalty_steps


def recorded_fit(name: str, settings, x, **train):
    """An MLE fit of the family that records its trained parameters before every step (after the previous one)."""
    cls = FAMILIES.get(name)
    trajectory = []

    class Recording(cls):
        def auxiliary_step(self, module, lr, device):
            inner = super().auxiliary_step(module, lr, device)

            def step(batch, weights, batch_weight):
                trajectory.append([p.detach().clone() for p in self.trained_parameters(module).values()])
                if inner is not None:
                    inner(batch, weights, batch_weight)
            return step

    model = fit("mle", Recording((1, 8, 8), settings), x, seed=0, train={"batch_size": 32, **train})
    return model, trajectory


def test_diffusion_samples_with_the_moving_average_of_its_weights():
    """The fitted (and saved) denoiser is the EMA of the trajectory, with the decay's warm-up, not the last step's
    weights; the same fit without EMA (the same trajectory: the average draws no random numbers) is the last."""
    x = digits_like(64)
    averaged = TINY["diffusion"].model_copy(update={"ema_decay": 0.9})
    model, trajectory = recorded_fit("diffusion", averaged, x, epochs=4)
    last, again = recorded_fit("diffusion", TINY["diffusion"].model_copy(update={"ema_decay": None}), x, epochs=4)
    assert all(torch.equal(a, b) for a, b in zip(trajectory[-1], again[-1]))  # the same training
    steps = [*trajectory[1:], [p.detach() for p in last.family.trained_parameters(last.module).values()]]
    average = [p.clone() for p in trajectory[0]]
    for k, weights in enumerate(steps, start=1):
        decay = min(0.9, (1 + k) / (10 + k))
        average = [a * decay + w * (1 - decay) for a, w in zip(average, weights)]
    fitted = list(model.family.trained_parameters(model.module).values())
    assert all(torch.allclose(f, a, atol=1e-6) for f, a in zip(fitted, average))
    assert not all(torch.allclose(f, w, atol=1e-4) for f, w in zip(fitted, steps[-1]))
    assert not np.allclose(model.sample(16, seed=1), last.sample(16, seed=1))
    from tasks.generation import load_model  # what the next generation and the scores see after a resume
    reloaded = load_model(model.family, model.tensors(), torch.device("cpu"))
    assert np.array_equal(reloaded.sample(16, seed=1), model.sample(16, seed=1))


def test_learning_rate_decays_to_zero_over_the_fit_with_cosine():
    from models.estimators import FamilyOptimizer
    from models.families import TrainingRecipe

    w = torch.nn.Parameter(torch.zeros(3))
    rates = {}
    for decay in ("constant", "cosine"):
        opt = FamilyOptimizer(TrainingRecipe(lr=0.5, lr_decay=decay), [w], 1e-3, torch.device("cpu"), steps=10)
        seen = []
        for _ in range(10):
            seen.append(opt.optimizer.param_groups[0]["lr"])
            w.grad = torch.ones(3)
            opt.step()
        rates[decay] = seen
    assert rates["constant"] == [0.5] * 10  # the recipe's rate wins over the estimator's 1e-3
    assert rates["cosine"][0] == 0.5 and rates["cosine"][5] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(rates["cosine"], rates["cosine"][1:])) and rates["cosine"][-1] < 0.03


def test_gan_trains_generator_and_discriminator_with_the_same_documented_betas(monkeypatch):
    made = []
    real_init = torch.optim.Adam.__init__

    def spy(self, params, *args, **kwargs):
        made.append(tuple(kwargs.get("betas", (0.9, 0.999))))
        real_init(self, params, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", spy)
    fam = FAMILIES.get("gan")((1, 8, 8), GANSettings(latent_dim=4, generator=[16], discriminator=[16]))
    fit("mle", fam, digits_like(), seed=0, train={"epochs": 1, "batch_size": 32})
    assert made == [(0.0, 0.99), (0.0, 0.99)]  # generator (the estimator's), discriminator (the family's)
    made.clear()
    fam = FAMILIES.get("gan")((1, 8, 8), GANSettings(latent_dim=4, generator=[16], discriminator=[16],
                                                     betas=[0.5, 0.999]))
    fit("ple", fam, digits_like(), seed=0, train={"epochs": 1, "batch_size": 32}, ple=PLE)
    assert made == [(0.5, 0.999), (0.5, 0.999)]  # the hypernetwork's Adam, the discriminator's


def test_vae_sampling_mean_is_deterministic_given_z_and_bernoulli_has_pixel_noise():
    from models.families.vae import VAESettings

    fams = {mode: FAMILIES.get("vae")((1, 8, 8), VAESettings(hidden=[16], latent_dim=2, sampling=mode))
            for mode in ("mean", "bernoulli")}
    torch.manual_seed(0)
    module = fams["mean"].build().eval()
    with torch.no_grad():  # temperature 0: every sample decodes z = 0
        mean = fams["mean"].sample(module, 400, torch.Generator().manual_seed(0), temperature=0.0)
        draws = fams["bernoulli"].sample(module, 400, torch.Generator().manual_seed(0), temperature=0.0)
        again = fams["bernoulli"].sample(module, 400, torch.Generator().manual_seed(0), temperature=0.0)
    assert torch.equal(mean, mean[:1].expand_as(mean))  # mean: one image per z, no pixel noise
    assert ((mean > 0) & (mean < 1)).all()
    assert set(draws.unique().tolist()) == {0.0, 1.0} and not torch.equal(draws[0], draws[1])  # pixel noise
    assert torch.equal(draws, again)  # the sampling seed decides the noise
    p = mean[0]  # the draws' frequencies are the decoder's Bernoulli means: within 5 standard errors
    assert ((draws.mean(dim=0) - p).abs() <= 5 * (p * (1 - p) / 400).sqrt() + 1e-6).all()
    weights = {k: v.detach().clone().requires_grad_() for k, v in module.named_parameters()}
    fams["bernoulli"].sample(module, 8, torch.Generator().manual_seed(0), weights=weights,
                             penalty=True).sum().backward()
    assert weights["decoder.1.weight"].grad.abs().sum() > 0  # the penalty's gradient passes the draw


def test_flow_stops_early_and_restores_its_best_held_out_weights():
    """A flow that overfits 24 images: training stops once the held-out NLL stopped improving for ``patience``
    epochs, before the cap, and the fitted weights are the best check's (their held-out NLL is the best one seen,
    not the last one's)."""
    from models.estimators import held_out_nll, hold_out

    settings = FlowSettings(couplings=2, hidden=[64], holdout=0.25, patience=6, check_every=2)
    fam = FAMILIES.get("flow")((1, 8, 8), settings)
    x = digits_like(24)
    for estimator, options in (("mle", {}), ("ple", {"ple": PLE})):
        model = fit(estimator, fam, x, seed=0, train={"epochs": 300, "batch_size": 18, "lr": 0.01}, **options)
        info = model.info
        assert info["epochs_run"] < 300 and info["epochs_run"] - info["best_epoch"] >= settings.patience, info
        _, _, held, _ = hold_out(fam.training_recipe(), torch.as_tensor(x), None, seed=0)
        assert len(held) == 6
        assert held_out_nll(fam, model.module, model.weights, held, None) == pytest.approx(info["held_out_nll"])
    off = FAMILIES.get("flow")((1, 8, 8), settings.model_copy(update={"holdout": 0.0}))
    assert "epochs_run" not in fit("mle", off, x, seed=0, train={"epochs": 3, "batch_size": 18}).info


@pytest.mark.parametrize("key, value", [("model.diffusion.ema_decay", 0.99), ("model.diffusion.lr", 0.002),
                                        ("model.diffusion.lr_decay", "constant"),
                                        ("model.diffusion.schedule", "linear"), ("model.gan.betas", [0.5, 0.999]),
                                        ("model.vae.sampling", "bernoulli"), ("model.flow.holdout", 0.2),
                                        ("model.flow.patience", 10), ("model.flow.check_every", 1)])
def test_every_new_family_knob_is_in_the_resume_hash(key, value):
    from tasks.params import lineage_recipe, set_dotted, validate

    raw = tiny(model__family=key.split(".")[1])
    before = validate(raw)
    set_dotted(raw, key, value)
    after = validate(raw)
    lineage = before.lineages[0]
    assert lineage_recipe(before, lineage) != lineage_recipe(after, lineage)


@pytest.mark.parametrize("estimator", ["mle", "ple"])
def test_gan_discriminator_trains_and_the_hypernetwork_emits_the_generator_only(estimator):
    fam, x = family("gan"), digits_like()
    options = {"ple": PLE} if estimator == "ple" else {}
    torch.manual_seed(0)
    start = fam.build()  # the fit's initialization (estimators seed torch before building)
    model = fit(estimator, fam, x, seed=0, train={"epochs": 3, "batch_size": 32}, **options)
    for name, p in start.discriminator.named_parameters():
        assert not torch.allclose(p, model.module.discriminator.get_parameter(name)), name
    generator = {f"generator.{k}": p for k, p in start.generator.named_parameters()}
    fitted = model.tensors()
    assert any(not torch.allclose(p, fitted[k]) for k, p in generator.items())  # the generator trained as well
    if estimator == "ple":
        assert set(model.weights) == set(generator)
        assert model.hyper.num_emitted == sum(p.numel() for p in generator.values())


def test_verdicts_follow_the_stated_rule():
    from flows.studies.families import verdict
    from tasks.stats import paired

    lower = paired([1.0, 2.0, 3.0, 4.0], [3.0, 4.1, 5.0, 6.2])
    noisy = paired([1.0, 5.0, 2.0, 4.0], [3.0, 4.0, 3.0, 3.5])
    higher = paired([3.0, 4.1, 5.0, 6.2], [1.0, 2.0, 3.0, 4.0])
    assert verdict(lower, lower) == "reproduced"
    assert verdict(lower, noisy) == "inconclusive" and noisy.mean < 0  # a leaning mean decides nothing
    assert verdict(noisy, noisy) == "inconclusive"
    assert verdict(lower, higher) == "not reproduced"


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_families_study_runs_every_new_family_through_the_loop(project, prefect_server):
    from flows.studies import paper_study, write_results

    loop = {key: value for key, value in tiny(model=TINY_PARAMS, train__epochs=2, ple=PLE).items()
            if key in ("model", "train", "ple", "classifier", "score", "data")}  # the study's own params
    params = tiny(studies={"families": {"families": ["flow", "diffusion", "gan"], "estimators": ["mle", "ple"],
                                        "seeds": [0, 1], "generations": 2, "params": loop}})
    paper_study("families", params=params, root=str(project))
    folder = project / "reports" / "families"
    summary = read(folder / "families.csv")
    assert sorted((s["family"], s["estimator"], s["generation"], s["runs"]) for s in summary) == sorted(
        (f, e, g, "2") for f in ("flow", "diffusion", "gan") for e in ("mle", "ple") for g in ("0", "1"))
    runs = read(folder / "families_runs.csv")
    assert all(math.isfinite(float(r["fid"])) for r in runs)
    assert all(math.isfinite(float(r["bpd"])) for r in runs if r["family"] == "flow")
    assert (folder / "families.png").is_file()
    assert (project / "data" / "studies" / "families-gan" / "ple-s1.dvc").is_file()
    results = write_results(project).read_text()
    assert "## Families" in results and results.count("| 1. PLE slows collapse (vs mle) |") == 3
    assert any(v in results for v in ("**reproduced**", "**inconclusive**", "**not reproduced**"))


def test_a_family_with_its_own_training_recipe_is_fitted_alone_not_stacked():
    """A stacked fit runs plain Adam: a family whose recipe adds anything (the diffusion model's EMA and decay, the
    flow's early stopping) is fitted lineage by lineage; with the plain recipe it can be stacked again."""
    from models.estimators.stacked import stackable

    stopping = FAMILIES.get("flow")((1, 8, 8), TINY["flow"].model_copy(update={"holdout": 0.1}))
    assert not stackable("mle", family("diffusion")) and not stackable("ple", stopping)
    plain = TINY["diffusion"].model_copy(update={"lr": None, "lr_decay": "constant", "ema_decay": None})
    assert stackable("mle", FAMILIES.get("diffusion")((1, 8, 8), plain))
    assert stackable("ple", family("flow"))  # early stopping off (holdout 0, the default)
