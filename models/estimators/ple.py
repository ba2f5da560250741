"""PLE: the paper's permutation-invariant hypernetwork (Eq. 6) trained with the self-consistency penalty (Eq. 5);
the same hypernetwork with lambda = 0, the control that isolates the penalty (App. J); and MLE through the same
factorised head with a fixed, data-independent embedding, the control that isolates H's reading of its input.

Every fit reports three diagnostics of the penalty (:func:`diagnostics`, in ``info``, so in every manifest and
MLflow run as ``train.<name>``): its share of the objective's value, its share of the gradient, and how much H's
output depends on its input."""

from __future__ import annotations

import math
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from models.estimators import (ESTIMATORS, FamilyOptimizer, Progress, TrainSettings, batches_per_epoch, compiled,
                               finish_batchnorm, held_out_nll, hold_out, minibatches, mixed_precision, weighted_mean)
from models.families import FittedTorchModel, TorchFamily
from models.hypernet import FixedInputHyperNetwork, HyperNetwork
from models.penalty import penalized
from models.penalty import penalty as eq5_penalty
from models.registry import Settings


class PLESettings(Settings):
    """The hypernetwork estimators (ple, hyper_nopenalty, mle_factorised): paper Eq. 5 and 6."""

    lam: float = Field(0.1, ge=0.0)  # penalty weight lambda (paper: 0.1, App. J)
    m: PositiveInt = 1  # synthetic sets per step (paper: 100 for the 1-D families)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [32, 64, 96], min_length=1)  # h1 (paper)
    rank: PositiveInt | None = 4  # rank of the factorized h2 heads; null = the paper's full linear heads
    penalty_entries: PositiveInt | None = 4096  # weight entries sampled per step for the penalty; null = all
    penalty_every: PositiveInt = 4  # lazy penalty: every k-th step, weighted k * lam (1 = every step, Eq. 5)
    # The units lambda is in (models/penalty.py, docs/ple.md). The defaults, per data dimension and per emitted
    # weight, are what every study so far used; sum + sum is the paper's literal reading (the NLL of the whole set,
    # the L1 norm over the weights): lambda_code = lambda_literal * P / (batch_size * D).
    nll_reduction: Literal["mean", "sum"] = "mean"  # mean: NLL per point and data dimension; sum: of the batch
    penalty_reduction: Literal["mean", "sum"] = "mean"  # mean: mean |dW| per emitted weight; sum: L1 norm over W


HYPER_SETTINGS = {"train": TrainSettings, "ple": PLESettings}


@ESTIMATORS.register("ple", settings=HYPER_SETTINGS)
def fit_ple(family: TorchFamily, x: np.ndarray, *, train: TrainSettings, ple: PLESettings, seed: int,
            device: torch.device, sample_weight: np.ndarray | None = None, progress: Progress | None = None,
            groups: np.ndarray | None = None) -> FittedTorchModel:
    """Penalized autophagy estimation (paper Eq. 5) with the hypernetwork H of Eq. 6.

    Each step, on a minibatch X (paper footnote 8: a synthetic set shares the batch size of X)::

        loss = NLL(X; H(X)) / D  +  lam/m * sum_j mean|H(Y_j) - H(X)|,   Y_j ~ model(H(X))

    Norms, our reading of Eq. 5's |.| and the default units of lam (``ple.nll_reduction`` and
    ``ple.penalty_reduction``: mean): the NLL is averaged over samples and the D data dimensions (a family's
    ``nll_units``: 1 for a GAN, whose generator loss is per image already), the penalty
    is the L1 distance between the emitted weight vectors divided by their count (mean absolute difference).
    Both are per-unit quantities, so lam means the same for a 6-parameter GMM and a 50k-weight VAE. ``sum`` and
    ``sum`` is the paper's literal reading (the batch's NLL in nats, the L1 norm over the P emitted weights):
    lam_code = lam_literal * P / (B * D) (models/penalty.py, docs/ple.md). With
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
    "hypernetwork without penalty" ablation (App. J), registered as ``hyper_nopenalty``. ``info`` also holds the
    penalty's diagnostics (:func:`diagnostics`); ``groups`` (a class label per row, -1 unknown) lets the input
    dependence compare H over the two largest classes (the majority and the minority).

    H emits the weights the family trains through its NLL (``family.trained_parameters``: all of them, a GAN's
    generator's); a family's ``auxiliary_step`` (a GAN's discriminator update) runs before every step, against
    the model H(X) defines. The family's ``training_recipe`` applies to H's parameters as MLE applies it to the
    family's (Adam's betas, learning-rate decay, their moving average, early stopping on the held-out NLL of H over
    the rows it fits; those rows are then the "whole training set" the fitted weights are H of).
    """
    return train_hypernetwork(HyperNetwork, family, x, train=train, ple=ple, seed=seed, device=device,
                              sample_weight=sample_weight, progress=progress, groups=groups)


@ESTIMATORS.register("mle_factorised", settings=HYPER_SETTINGS, fixed={"ple.lam": 0.0})
def fit_mle_factorised(family: TorchFamily, x: np.ndarray, *, train: TrainSettings, ple: PLESettings, seed: int,
                       device: torch.device, sample_weight: np.ndarray | None = None,
                       progress: Progress | None = None, groups: np.ndarray | None = None) -> FittedTorchModel:
    """MLE through PLE's factorised head, W = b + U (V e), with e fixed and independent of the data
    (:class:`models.hypernet.FixedInputHyperNetwork`): the NLL alone, trained exactly as ``hyper_nopenalty`` is
    (same settings, batches, optimizer), but H cannot read its input. Where the lambda = 0 hypernetwork differs
    from MLE and this does not, the difference is H reading its input; where this differs from MLE too, it is the
    parameterisation (how Adam moves b, U and V rather than W)."""
    return train_hypernetwork(FixedInputHyperNetwork, family, x, train=train, ple=ple, seed=seed, device=device,
                              sample_weight=sample_weight, progress=progress, groups=groups)


def train_hypernetwork(network: type[HyperNetwork], family: TorchFamily, x: np.ndarray, *, train: TrainSettings,
                       ple: PLESettings, seed: int, device: torch.device, sample_weight: np.ndarray | None = None,
                       progress: Progress | None = None, groups: np.ndarray | None = None) -> FittedTorchModel:
    """The training loop of :func:`fit_ple` for a hypernetwork class ``network``."""
    torch.manual_seed(seed)  # the target's initialization (H's biases start there) and h1's
    order_generator = torch.Generator().manual_seed(seed)  # minibatch order: the same for every lambda
    # The penalty's randomness (synthetic sets, sampled weight entries) has streams of its own, so switching the
    # penalty on changes nothing else: at lambda -> 0 PLE is the lambda = 0 control, step for step.
    sample_generator = torch.Generator(device=device).manual_seed(seed + 1)
    entry_generator = torch.Generator(device=device).manual_seed(seed + 2)  # on the device: no copy per step
    target = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    features = family.hyper_features(data[:2])
    hyper = network(target, features.flatten(1).shape[1], list(ple.hidden), ple.rank,
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
    model = finish(family, target, hyper, data, train, ple, history, started, seed, groups)
    model.info.update(recipe_info)
    return model


def finish(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, data: torch.Tensor,
           train: TrainSettings, ple: PLESettings, history: dict[str, list[float]], started: float, seed: int,
           groups: np.ndarray | None = None) -> FittedTorchModel:
    """The fitted model: H over the whole training set, batchnorm statistics under it, the training summary and
    the penalty's diagnostics."""
    final = final_weights(family, hyper, data)
    finish_batchnorm(family, target, final, data, train)
    target.eval()
    info = summary(ple, history, started, hyper)
    info.update(diagnostics(family, target, hyper, data, ple, train.batch_size, seed, groups))
    return FittedTorchModel(family, target, final, info=info, hyper=hyper)


@torch.no_grad()
def final_weights(family: TorchFamily, hyper: HyperNetwork, data: torch.Tensor) -> dict[str, torch.Tensor]:
    """H over the whole training set (a streamed mean of h1: exact for any batch size or order)."""
    return {k: v.detach() for k, v in hyper.emit(hyper.streamed_embedding(family.hyper_features(data))).items()}


def summary(ple: PLESettings, history: dict[str, list[float]], started: float, hyper: HyperNetwork) -> dict:
    """The fit's info: last epoch's NLL and penalty, the penalty's share of the objective, seconds, history."""
    last_penalty = next((v for v in reversed(history["penalty"]) if math.isfinite(v)), math.nan)
    return {"train_loss": history["nll"][-1] if history["nll"] else math.nan, "train_penalty": last_penalty,
            # how much of the objective's value the penalty is, in the last epoch: lam * penalty / (|nll| + lam *
            # penalty) (|nll|: a density's NLL can be negative)
            "penalty_share": (ple.lam * last_penalty / (abs(history["nll"][-1]) + ple.lam * last_penalty)
                              if math.isfinite(last_penalty) and history["nll"] and ple.lam > 0 else 0.0),
            "fit_seconds": time.perf_counter() - started, "hyper_weights": sum(p.numel() for p in hyper.parameters()),
            "history": history}


def objective(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, batch: torch.Tensor,
              weight: torch.Tensor | None, ple: PLESettings, dims: float, generator: torch.Generator,
              entries: torch.Tensor | None, penalize: bool, auxiliary=None,
              allow_sparse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One step's (loss, NLL, penalty or None) on ``batch``, in the units ``ple`` names: Eq. 5, the penalty on lazy
    steps only (``penalize``, weighted penalty_every * lam). ``auxiliary``: the family's own step (a GAN's
    discriminator), run first, against the model H(X) defines now. The stacked estimator (``stacked.py``) runs the
    same function for S members at once."""
    e_x = hyper.embed(family.hyper_features(batch))
    weights = hyper.emit(e_x)
    if auxiliary is not None:
        auxiliary(batch, weights, weight)
    nll = batch_nll(family.nll(target, batch, weights), weight, ple.nll_reduction, dims)
    if not penalize:
        return nll, nll, None
    value = penalty(family, target, hyper, e_x, weights, len(batch), ple.m, generator, entries, allow_sparse,
                    ple.penalty_reduction)
    return penalized(nll, value, ple.lam * ple.penalty_every), nll, value  # lazy: every k-th step, k times lam


def batch_nll(per_sample: torch.Tensor, weight: torch.Tensor | None, reduction: str, dims: float) -> torch.Tensor:
    """The objective's NLL term: ``mean``, per point and data dimension (the default units); ``sum``, the NLL of
    the whole batch in nats, as Eq. 3 writes the likelihood of the set X (with weights: normalized to sum to the
    batch size, so the weighted sum is the batch's size times the weighted mean)."""
    mean = weighted_mean(per_sample, weight)
    return mean / dims if reduction == "mean" else mean * len(per_sample)


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
            entries: torch.Tensor | None = None, allow_sparse: bool = False, reduction: str = "mean") -> torch.Tensor:
    """(1/m) sum_j |H(Y_j) - H(X)| with Y_j ~ model(H(X)), ``size`` points each: Eq. 5's penalty as printed
    (``models.penalty.penalty``, form per_set), |.| the mean over the emitted weights or (``reduction`` sum) their
    L1 norm.

    ``e_x`` is mean_i h1(x_i) of the batch X and ``weights`` = H(X). Y_j is drawn through the family's
    reparameterized sampler, so the penalty's gradient reaches H through H(X) (``e_x``), through Y_j (a function
    of ``weights``) and through H(Y_j). The heads' biases cancel in H(Y_j) - H(X): only the linear part is
    evaluated, over every emitted weight or the sampled ``entries`` (an unbiased estimate of the same mean)."""
    differences = []
    for _ in range(m):
        y = family.sample(target, size, generator, weights=weights, penalty=True)
        differences.append(hyper.difference(hyper.embed(family.hyper_features(y)), e_x, entries, allow_sparse))
    return eq5_penalty(torch.stack(differences), "per_set", reduction, hyper.num_emitted)


# --- the penalty's diagnostics -------------------------------------------------------------------------------------


def diagnostics(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, data: torch.Tensor,
                ple: PLESettings, batch_size: int, seed: int, groups: np.ndarray | None = None,
                batches: int = 4) -> dict[str, float]:
    """How much the penalty acts on a fitted H, beside the share of the objective's value ``summary`` gives:

    - ``gradient_share``: ||grad of lam * penalty|| / ||grad of the NLL||, both over H's weights, at the fitted H
      on ``batches`` minibatches of the training batch size (mean norm of each over the batches; every emitted
      weight, the objective's units). These are the per-step pulls Adam sees, not the full-data gradients, which at
      a stationary point of the objective balance exactly whatever lambda is. ``penalty_gradient_ratio`` is the
      same without lam (what it would be at lam = 1: defined for the lambda = 0 control too).
    - ``penalty_at_fit``: the penalty itself at the fitted H on those batches (every emitted weight, the
      objective's units): comparable across lambdas, the lambda = 0 control included.
    - ``input_dependence``: ||H(A) - H(B)|| / ||H(all)|| (L2 over the emitted weights) for two halves of the
      training set: the two largest classes in ``groups`` (the majority and the minority; ``input_split`` 1), or,
      without two labelled classes, the rows below and above the median of the data's first principal component
      (``input_split`` 0). A hypernetwork that ignores its input scores 0.

    Runs on its own random streams (global ones forked and restored): the fit and whatever runs after it draw the
    same numbers with or without it. The target is in eval mode (batchnorm: the recalibrated statistics)."""
    with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
        torch.manual_seed(seed + 3)
        out = {**gradient_shares(family, target, hyper, data, ple, batch_size, seed, batches),
               **input_dependence(family, hyper, data, groups)}
    return out


def gradient_shares(family: TorchFamily, target: torch.nn.Module, hyper: HyperNetwork, data: torch.Tensor,
                    ple: PLESettings, batch_size: int, seed: int, batches: int) -> dict[str, float]:
    params = [p for p in hyper.parameters() if p.requires_grad]
    order = torch.Generator().manual_seed(seed + 3)
    sample_generator = torch.Generator(device=data.device).manual_seed(seed + 4)
    size = min(batch_size, len(data))
    dims = family.nll_units()
    nll_norms, penalty_norms, values = [], [], []
    for _ in range(batches):
        batch = data[torch.randperm(len(data), generator=order)[:size].to(data.device)]
        e_x = hyper.embed(family.hyper_features(batch))
        weights = hyper.emit(e_x)
        nll = batch_nll(family.nll(target, batch, weights), None, ple.nll_reduction, dims)
        value = penalty(family, target, hyper, e_x, weights, size, ple.m, sample_generator, None, False,
                        ple.penalty_reduction)
        nll_norms.append(grad_norm(nll, params))
        penalty_norms.append(grad_norm(value, params))
        values.append(float(value.detach()))
    nll_norm, penalty_norm = float(np.mean(nll_norms)), float(np.mean(penalty_norms))
    ratio = penalty_norm / nll_norm if nll_norm > 0 else math.nan
    return {"gradient_share": ple.lam * ratio, "penalty_gradient_ratio": ratio,
            "penalty_at_fit": float(np.mean(values))}


def grad_norm(value: torch.Tensor, params: list[torch.Tensor]) -> float:
    """||d value / d params||, over every parameter together (unreached ones count 0)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))


@torch.no_grad()
def input_dependence(family: TorchFamily, hyper: HyperNetwork, data: torch.Tensor,
                     groups: np.ndarray | None) -> dict[str, float]:
    halves, split = labelled_halves(groups, len(data)), 1.0
    if halves is None:
        halves, split = principal_halves(family.hyper_features(data).flatten(1).double()), 0.0

    def emitted(rows: torch.Tensor | None) -> torch.Tensor:
        part = data if rows is None else data[rows.to(data.device)]
        weights = hyper.emit(hyper.streamed_embedding(family.hyper_features(part)))
        return torch.cat([w.reshape(-1) for w in weights.values()]).double()

    a, b, whole = emitted(halves[0]), emitted(halves[1]), emitted(None)
    norm = float(whole.norm())
    return {"input_dependence": float((a - b).norm()) / norm if norm > 0 else math.nan, "input_split": split}


def labelled_halves(groups: np.ndarray | None, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of the two largest classes (labels >= 0, at least 2 rows each), largest first; None without two."""
    if groups is None or len(groups) != n:
        return None
    labels, counts = np.unique(np.asarray(groups)[np.asarray(groups) >= 0], return_counts=True)
    order = np.argsort(-counts, kind="stable")
    if len(order) < 2 or counts[order[1]] < 2:
        return None
    return tuple(torch.as_tensor(np.flatnonzero(np.asarray(groups) == labels[i])) for i in order[:2])


def principal_halves(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows below and above the median of the projection on the first principal component (a 1-D family:
    the lower and the upper half of the data)."""
    centred = features - features.mean(dim=0)
    if centred.shape[1] == 1:
        projection = centred[:, 0]
    else:
        generator = torch.Generator().manual_seed(0)  # power iteration from a fixed start: deterministic
        direction = torch.randn(centred.shape[1], generator=generator, dtype=centred.dtype).to(centred.device)
        for _ in range(50):
            direction = centred.T @ (centred @ direction)
            direction = direction / direction.norm().clamp_min(1e-300)
        projection = centred @ direction
    order = torch.argsort(projection.cpu(), stable=True)
    half = len(order) // 2
    return order[:half], order[half:]


# The hypernetwork trained by likelihood alone (PLE with lam = 0; paper App. J): the control that differs from
# ple by the penalty only. ``fixed`` makes lam 0 in its settings, so its resume hash ignores params' ple.lam.
ESTIMATORS.register("hyper_nopenalty", settings=HYPER_SETTINGS, fixed={"ple.lam": 0.0})(fit_ple)
