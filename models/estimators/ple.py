"""PLE: the paper's permutation-invariant hypernetwork (Eq. 6) trained with the self-consistency penalty (Eq. 5),
and the same hypernetwork with lambda = 0, the control that isolates the penalty (App. J)."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from pydantic import Field, PositiveInt

from models.estimators import (ESTIMATORS, FamilyOptimizer, Progress, TrainSettings, batches_per_epoch, compiled,
                               finish_batchnorm, held_out_nll, hold_out, minibatches, mixed_precision, weighted_mean)
from models.families import FittedTorchModel, TorchFamily
from models.hypernet import HyperNetwork
from models.registry import Settings


class PLESettings(Settings):
    """The hypernetwork estimators (ple, hyper_nopenalty): paper Eq. 5 and 6."""

    lam: float = Field(0.1, ge=0.0)  # penalty weight lambda (paper: 0.1, App. J)
    m: PositiveInt = 1  # synthetic sets per step (paper: 100 for the 1-D families)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 96], min_length=1)  # h1 (paper)
    rank: PositiveInt | None = 4  # rank of the factorized h2 heads; null = the paper's full linear heads
    penalty_entries: PositiveInt | None = 4096  # weight entries sampled per step for the penalty; null = all
    penalty_every: PositiveInt = 4  # lazy penalty: every k-th step, weighted k * lam (1 = every step, Eq. 5)


HYPER_SETTINGS = {"train": TrainSettings, "ple": PLESettings}


@ESTIMATORS.register("ple", settings=HYPER_SETTINGS)
def fit_ple(family: TorchFamily, x: np.ndarray, *, train: TrainSettings, ple: PLESettings, seed: int,
            device: torch.device, sample_weight: np.ndarray | None = None,
            progress: Progress | None = None) -> FittedTorchModel:
    """Penalized autophagy estimation (paper Eq. 5) with the hypernetwork H of Eq. 6.

    Each step, on a minibatch X (paper footnote 8: a synthetic set shares the batch size of X)::

        loss = NLL(X; H(X)) / D  +  lam/m * sum_j mean|H(Y_j) - H(X)|,   Y_j ~ model(H(X))

    Norms, our reading of Eq. 5's |.|: the NLL is averaged over samples and the D data dimensions (a family's
    ``nll_units``: 1 for a GAN, whose generator loss is per image already), the penalty
    is the L1 distance between the emitted weight vectors divided by their count (mean absolute difference).
    Both are per-unit quantities, so lam means the same for a 6-parameter GMM and a 50k-weight VAE. With
    ``penalty_entries`` the mean runs over that many weight entries drawn at random each step: an unbiased
    estimate of the same penalty at a fraction of its cost for big targets (null: every entry).

    Gradients flow through sampling wherever the family reparameterizes: Y_j is a differentiable function of
    H(X)'s weights (VAE: decoder of fixed noise; Gaussian: mu + sigma * eps; ...), so the penalty reaches H
    through H(X), through Y_j, and through H(Y_j). Discrete choices (a GMM component, a geometric count) carry
    no gradient; there the penalty reaches H through H(X) and H(Y_j) only.

    The fitted weights are H over the whole training set (a streamed mean of h1, exact for any batch size or
    order); batchnorm statistics are then recomputed under those weights (``train.recalibrate_batchnorm``, the
    same rule MLE follows). ``info["history"]`` holds the mean NLL and penalty of every epoch, and
    ``info["penalty_share"]`` the penalty's share of the last epoch's objective. ``penalty_every = k`` is lazy
    regularization (Karras et al. 2020, StyleGAN2 §3.1): the penalty runs on every k-th step only, weighted
    k * lam, the same objective in expectation at about 1/k of the penalty's cost. lam = 0 is the paper's
    "hypernetwork without penalty" ablation (App. J), registered as ``hyper_nopenalty``.

    H emits the weights the family trains through its NLL (``family.trained_parameters``: all of them, a GAN's
    generator's); a family's ``auxiliary_step`` (a GAN's discriminator update) runs before every step, against
    the model H(X) defines. The family's ``training_recipe`` applies to H's parameters as MLE applies it to the
    family's (Adam's betas, learning-rate decay, their moving average, early stopping on the held-out NLL of H over
    the rows it fits; those rows are then the "whole training set" the fitted weights are H of).
    """
    torch.manual_seed(seed)  # the target's initialization (H's biases start there) and h1's
    order_generator = torch.Generator().manual_seed(seed)  # minibatch order: the same for every lambda
    # The penalty's randomness (synthetic sets, sampled weight entries) has streams of its own, so switching the
    # penalty on changes nothing else: at lambda -> 0 PLE is the lambda = 0 control, step for step.
    sample_generator = torch.Generator(device=device).manual_seed(seed + 1)
    entry_generator = torch.Generator(device=device).manual_seed(seed + 2)  # on the device: no copy per step
    target = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    features = family.hyper_features(data[:2])
    hyper = HyperNetwork(target, features.flatten(1).shape[1], list(ple.hidden), ple.rank,
                         family.trained_parameters(target)).to(device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    recipe = family.training_recipe()  # as MLE: the family's betas, learning-rate decay, average, early stopping
    data, weight, held, held_weight = hold_out(recipe, data, weight, seed)
    optimizer = FamilyOptimizer(recipe, hyper.parameters(), train.lr, device,
                                train.epochs * batches_per_epoch(len(data), train.batch_size))
    auxiliary = family.auxiliary_step(target, train.lr, device)  # a GAN's discriminator step; None for the others
    dims = family.nll_units()
    every = ple.penalty_every
    step_objective = compiled(objective, train.compile)

    started = time.perf_counter()
    history: dict[str, list[float]] = {"nll": [], "penalty": []}
    target.train()
    step = 0
    for epoch in range(train.epochs):
        # Sums stay on the device, read once per epoch: reading them every step would make the host wait each step.
        nll_sum, penalty_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        steps, penalty_steps = 0, 0
        for idx in minibatches(len(data), train.batch_size, order_generator, device):
            step += 1
            penalize = ple.lam > 0 and step % every == 0
            entries = penalty_entries(ple, hyper, entry_generator, device) if penalize else None
            w = None if weight is None else weight[idx]
            with mixed_precision(device, train.precision):
                loss, nll, value = step_objective(family, target, hyper, data[idx], w, ple, dims, sample_generator,
                                                  entries, penalize, auxiliary, allow_sparse=not train.compile)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if penalize:
                penalty_sum, penalty_steps = penalty_sum + value.detach().float(), penalty_steps + 1
            nll_sum, steps = nll_sum + nll.detach().float(), steps + 1
        history["nll"].append(float(nll_sum) / max(steps, 1))
        history["penalty"].append(float(penalty_sum) / penalty_steps if penalty_steps else math.nan)
        if progress is not None:
            progress(epoch + 1, train.epochs)
        if optimizer.stop(lambda: held_out_nll(family, target, final_weights(family, hyper, data), held, held_weight)):
            break

    recipe_info = optimizer.finish()  # H's fitted weights: the best held-out check's, the average or the last
    model = finish(family, target, hyper, data, train, ple, history, started)
    model.info.update(recipe_info)
    return model


def finish(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, data: torch.Tensor,
           train: TrainSettings, ple: PLESettings, history: dict[str, list[float]], started: float) -> FittedTorchModel:
    """The fitted model: H over the whole training set, batchnorm statistics under it, the training summary."""
    final = final_weights(family, hyper, data)
    finish_batchnorm(family, target, final, data, train)
    target.eval()
    return FittedTorchModel(family, target, final, info=summary(ple, history, started, hyper), hyper=hyper)


@torch.no_grad()
def final_weights(family: TorchFamily, hyper: HyperNetwork, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """H over the whole training set (a streamed mean of h1: exact for any batch size or order)."""
    return {k: v.detach() for k, v in hyper.emit(hyper.streamed_embedding(family.hyper_features(data))).items()}


def summary(ple: PLESettings, history: dict[str, list[float]], started: float, hyper: HyperNetwork) -> dict:
    """The fit's info: last epoch's NLL and penalty, the penalty's share of the objective, seconds, history."""
    last_penalty = next((v for v in reversed(history["penalty"]) if math.isfinite(v)), math.nan)
    return {"train_loss": history["nll"][-1] if history["nll"] else math.nan, "train_penalty": last_penalty,
            # how much of the objective the penalty is, in the last epoch: lam * penalty / (nll + lam * penalty)
            "penalty_share": (ple.lam * last_penalty / (history["nll"][-1] + ple.lam * last_penalty)
                              if math.isfinite(last_penalty) and history["nll"] else 0.0),
            "fit_seconds": time.perf_counter() - started, "hyper_weights": sum(p.numel() for p in hyper.parameters()),
            "history": history}


def objective(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, batch: torch.Tensor,
              weight: torch.Tensor | None, ple: PLESettings, dims: float, generator: torch.Generator,
              entries: torch.Tensor | None, penalize: bool, auxiliary=None,
              allow_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step's (loss, NLL per unit, penalty or None) on ``batch``: Eq. 5, the penalty on lazy steps only
    (``penalize``, weighted penalty_every * lam). ``auxiliary``: the family's own step (a GAN's discriminator),
    run first, against the model H(X) defines now. The stacked estimator (``stacked.py``) runs the same function
    for S members at once."""
    e_x = hyper.embed(family.hyper_features(batch))
    weights = hyper.emit(e_x)
    if auxiliary is not None:
        auxiliary(batch, weights, weight)
    nll = weighted_mean(family.nll(target, batch, weights), weight) / dims
    if not penalize:
        return nll, nll, None
    value = penalty(family, target, hyper, e_x, weights, len(batch), ple.m, generator, entries, allow_sparse)
    return nll + ple.lam * ple.penalty_every * value, nll, value  # lazy: every k-th step, k times the weight


def penalty_entries(ple: PLESettings, hyper: HyperNetwork, generator: torch.Generator, device: torch.device,
                    members: int | None = None) -> torch.Tensor | None:
    """The weight entries the penalty evaluates this step (``ple.penalty_entries`` of them; None: every entry),
    [members, k] for a stacked fit."""
    if ple.penalty_entries is None or ple.penalty_entries >= hyper.num_emitted:
        return None
    shape = (ple.penalty_entries,) if members is None else (members, ple.penalty_entries)
    return torch.randint(hyper.num_emitted, shape, generator=generator, device=device)


def penalty(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, e_x: torch.Tensor,
            weights: dict[str, torch.Tensor], size: int, m: int, generator: torch.Generator,
            entries: torch.Tensor | None = None, allow_sparse: bool = False) -> torch.Tensor:
    """(1/m) sum_j mean|H(Y_j) - H(X)| with Y_j ~ model(H(X)), ``size`` points each (Eq. 5's penalty, per unit).

    ``e_x`` is mean_i h1(x_i) of the batch X and ``weights`` = H(X). Y_j is drawn through the family's
    reparameterized sampler, so the penalty's gradient reaches H through H(X) (``e_x``), through Y_j (a function
    of ``weights``) and through H(Y_j). The heads' biases cancel in H(Y_j) - H(X): only the linear part is
    evaluated, over every emitted weight or the sampled ``entries`` (an unbiased estimate of the same mean)."""
    total = 0.0
    for _ in range(m):
        y = family.sample(target, size, generator, weights=weights, penalty=True)
        total = total + hyper.distance(hyper.embed(family.hyper_features(y)), e_x, entries, allow_sparse)
    return total / m


# The hypernetwork trained by likelihood alone (PLE with lam = 0; paper App. J): the control that differs from
# ple by the penalty only. ``fixed`` makes lam 0 in its settings, so its resume hash ignores params' ple.lam.
ESTIMATORS.register("hyper_nopenalty", settings=HYPER_SETTINGS, fixed={"ple.lam": 0.0})(fit_ple)
