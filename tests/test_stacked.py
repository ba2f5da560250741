"""Stacked fits (models/estimators/stacked.py): S lineages' models trained as one batched computation must each be
the fit its own single run gives (exactly where the random streams are made equal, in distribution otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from models.estimators import fit
from models.estimators.stacked import fit_stacked, stackable
from models.families import FAMILIES, TorchFamily, run
from models.families.vae import VAEFamily, VAESettings

pytestmark = pytest.mark.fit  # every test here trains models (make test-fast leaves them out)

TRAIN = {"epochs": 4, "batch_size": 32}
PLE = {"rank": 4, "penalty_every": 2, "penalty_entries": 512}  # the penalty runs, on sampled entries


def data(seed: int, n: int = 96, d: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).random((n, d)).astype(np.float32)


def vae() -> VAEFamily:
    return VAEFamily((64,), VAESettings(hidden=[32, 32], latent_dim=4))


def sections(estimator: str) -> dict:
    return {"train": TRAIN, **({"ple": PLE} if estimator != "mle" else {})}


def same_function(a, b, atol: float = 1e-4) -> None:
    """Two fitted models compute the same thing: equal samples and equal NLL of data in eval mode. (Tensors may
    differ in the biases of layers that feed a batchnorm: their gradient is zero up to rounding, which Adam scales
    up to steps of size lr; the batchnorm's mean absorbs them, so the function does not change.)"""
    np.testing.assert_allclose(a.sample(64, seed=1), b.sample(64, seed=1), atol=atol)
    x = torch.as_tensor(data(9))
    nll = []
    for model in (a, b):
        torch.manual_seed(0)
        with torch.no_grad():
            nll.append(model.family.nll(model.module, x, model.weights).numpy())
    np.testing.assert_allclose(nll[0], nll[1], rtol=1e-4)


@pytest.mark.parametrize("estimator, weighted", [("mle", False), ("mle", True), ("ple", False), ("ple", True),
                                                 ("hyper_nopenalty", False)])
def test_one_member_is_the_single_run(estimator, weighted):
    family, x = vae(), data(0)
    weights = np.random.default_rng(1).random(len(x)) if weighted else None
    single = fit(estimator, family, x, seed=3, sample_weight=weights, **sections(estimator))
    [member] = fit_stacked(estimator, family, [x], seeds=[3], sample_weights=None if weights is None else [weights],
                           **sections(estimator))
    assert member.info["train_loss"] == pytest.approx(single.info["train_loss"], rel=1e-6)
    if estimator != "mle":
        np.testing.assert_allclose(member.info["history"]["nll"], single.info["history"]["nll"], rtol=1e-6)
        np.testing.assert_allclose(member.info["history"]["penalty"], single.info["history"]["penalty"], rtol=1e-4)
    same_function(member, single)
    assert member.info["stacked_members"] == 1


@pytest.mark.parametrize("estimator", ["mle", "ple"])
def test_members_given_equal_streams_each_reproduce_the_single_run(estimator):
    """S copies of one seed with randomness="same" (every member draws member 0's noise): each is the single run,
    so batching itself (stacked weights, stacked Adam, stacked batchnorm buffers, recalibration) changes nothing."""
    family, x = vae(), data(0)
    single = fit(estimator, family, x, seed=5, **sections(estimator))
    members = fit_stacked(estimator, family, [x] * 3, seeds=[5] * 3, randomness="same", **sections(estimator))
    for member in members:
        same_function(member, single)


class Autoencoder(TorchFamily):
    """A family without noise in its loss (squared reconstruction error through a batchnorm layer), so that
    every member of a stacked fit must equal its single run exactly, whatever its seed and data."""

    name = "autoencoder"

    def build(self) -> nn.Module:
        d = self.data_shape[0]
        return nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Linear(16, d))

    def nll(self, module, x, weights=None):
        return (run(module, weights, x.flatten(1)) - x.flatten(1)).pow(2).sum(dim=1)

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        device = next(module.parameters()).device
        return run(module, weights, torch.rand(n, self.data_shape[0], generator=generator, device=device))


@pytest.mark.parametrize("estimator", ["mle", "hyper_nopenalty"])
def test_each_member_keeps_its_own_seed_data_and_weights(estimator):
    family = Autoencoder((64,))
    seeds, xs = [3, 11, 7], [data(0), data(1), data(2)]
    weights = [np.random.default_rng(s).random(96) for s in seeds]
    members = fit_stacked(estimator, family, xs, seeds=seeds, sample_weights=weights, **sections(estimator))
    for member, seed, x, w in zip(members, seeds, xs, weights):
        same_function(member, fit(estimator, family, x, seed=seed, sample_weight=w, **sections(estimator)))
    np.testing.assert_raises(AssertionError, same_function, members[0], members[1])  # they did differ


def test_members_draw_their_own_noise_and_match_single_runs_in_distribution():
    """randomness="different": identical data and seed still give different members (independent noise), and the
    final losses of 8 stacked members and 8 single runs come from one distribution (Welch's t-test)."""
    family, x = vae(), data(0)
    seeds = list(range(8))
    twins = fit_stacked("mle", family, [x] * 2, seeds=[0, 0], **sections("mle"))
    assert not np.allclose(twins[0].sample(64, seed=1), twins[1].sample(64, seed=1), atol=1e-3)
    stacked = [m.info["train_loss"] for m in fit_stacked("mle", family, [x] * 8, seeds=seeds, **sections("mle"))]
    single = [fit("mle", family, x, seed=s, **sections("mle")).info["train_loss"] for s in seeds]
    assert stats.ttest_ind(stacked, single, equal_var=False).pvalue > 0.001, (stacked, single)


def test_bad_input_is_refused_before_any_work():
    family, x = vae(), data(0)
    with pytest.raises(ValueError, match="one shape"):
        fit_stacked("mle", family, [x, x[:50]], seeds=[0, 1], **sections("mle"))
    with pytest.raises(ValueError, match="2 datasets for 1 seeds"):
        fit_stacked("mle", family, [x, x], seeds=[0], **sections("mle"))
    with pytest.raises(ValueError, match="randomness"):
        fit_stacked("mle", family, [x], seeds=[0], randomness="shared", **sections("mle"))
    assert stackable("mle", family) and stackable("ple", family) and stackable("hyper_nopenalty", family)
    entry = FAMILIES.entry("gaussian")
    (_, settings), = entry.settings.items()
    gaussian = entry.obj((1,), settings())
    assert not stackable("mle", gaussian) and not stackable("ple_closed", gaussian)  # closed forms, not minibatches

    class Adversarial(Autoencoder):  # trains more than its NLL (a GAN's discriminator step)
        def auxiliary_step(self, module, lr, device):
            return None

    assert stackable("mle", Autoencoder((64,))) and not stackable("mle", Adversarial((64,)))
    with pytest.raises(ValueError, match="cannot fit the gaussian family stacked"):
        fit_stacked("mle", gaussian, [np.zeros((20, 1))], seeds=[0])


# --- lineages in lockstep (tasks/lockstep.py) ----------------------------------------------------------------------


def open_lineages(tmp_path, lineages):
    from tasks.params import validate
    from tasks.study import Study
    from tests.conftest import tiny

    study = Study.open(validate(tiny(lineages=lineages, device="cpu")), tmp_path, check=False)
    return [study.lineage(spec.name) for spec in study.lineages]


def test_lineages_of_one_recipe_run_in_lockstep_and_a_group_of_one_is_the_lineage_alone(tmp_path):
    from tasks.generation import run_generation
    from tasks.layout import generation_files
    from tasks.lockstep import lockstep_groups, run_lockstep_generation

    lineages = open_lineages(tmp_path, [{"name": "mle", "seeds": [0, 1]}, {"name": "ple", "seeds": [0]},
                                           {"name": "iw", "estimator": "mle", "mitigation": "importance",
                                            "seeds": [0, 1]}])
    names = [[lin.name for lin in group] for group in lockstep_groups(lineages)]
    assert names == [["mle-s0", "mle-s1"], ["ple-s0"], ["iw-s0"], ["iw-s1"]]  # importance weights the fit itself

    alone = run_generation(lineages[0], 0, lineages[0].real.train)
    [together] = run_lockstep_generation(lineages[:1], 0, [lineages[0].real.train])
    np.testing.assert_allclose(together.next_dataset.pixels, alone.next_dataset.pixels, atol=1e-4)
    assert together.manifest["metrics"]["fid"] == pytest.approx(alone.manifest["metrics"]["fid"], rel=1e-3)

    pair = run_lockstep_generation(lineages[:2], 0, [lin.real.train for lin in lineages[:2]])
    for lineage, generation in zip(lineages[:2], pair):
        assert (lineage.folder / generation_files(0)["manifest"]).is_file()
        assert generation.manifest["info"]["stacked_members"] == 2
    assert not np.allclose(pair[0].next_dataset.pixels, pair[1].next_dataset.pixels, atol=1e-3)  # own seeds
    with pytest.raises(ValueError, match="cannot share a stacked fit"):
        run_lockstep_generation([lineages[0], lineages[2]], 0, [lineages[0].real.train] * 2)
