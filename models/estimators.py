"""Estimators turn (family, dataset, settings) into a fitted model.

``mle`` trains the family's own parameters by minimizing its negative log-likelihood (for the VAE: the
negative ELBO). Estimators are registered by name; a lineage in params.yaml names one.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from models.families import FittedTorchModel, TorchFamily
from models.hypernet import HyperNetwork, recalibrate_batchnorm
from models.registry import Registry

Estimator = Callable[..., FittedTorchModel]
ESTIMATORS: Registry[Estimator] = Registry("estimator")


def minibatches(n: int, batch_size: int, generator: torch.Generator):
    """Shuffled index batches covering 0..n-1 once; the last short batch is dropped unless it is the only one.

    BatchNorm needs more than one row per batch, and a ragged last batch of 1 would crash it.
    """
    order = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if n > batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def adam(parameters, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over all parameters; 6x faster than the default step on CPU here)."""
    return torch.optim.Adam(parameters, lr=lr, fused=device.type in ("cpu", "cuda"))


def mixed_precision(device: torch.device, precision: str):
    """bf16 autocast of forward passes and losses (weights, gradients and Adam state stay fp32; bf16 needs no
    loss scaling). ``fp32``: a no-op context."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r} (fp32 or bf16)")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss; with weights, a weighted mean normalized per batch (weights sum to 1 in the batch)."""
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


@ESTIMATORS.register("mle")
def fit_mle(family: TorchFamily, x: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
            device: torch.device | str = "cpu", sample_weight: np.ndarray | None = None, precision: str = "fp32",
            **_: object) -> FittedTorchModel:
    """Maximum likelihood: the family's own closed form or EM when it has one (1-D families), otherwise Adam on
    the family's parameters over ``epochs`` passes through x (the VAE: the negative ELBO)."""
    if hasattr(family, "fit_mle"):
        return timed(family.fit_mle, x, seed=seed, device=device)
    torch.manual_seed(seed)  # module initialization and the VAE's reparameterization noise
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    module = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    optimizer = adam(module.parameters(), lr, device)

    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    module.train()
    for _ in range(epochs):
        for idx in minibatches(len(data), batch_size, generator):
            idx = idx.to(device)
            with mixed_precision(device, precision):
                loss = weighted_mean(family.nll(module, data[idx]), None if weight is None else weight[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    module.eval()
    info = {"train_loss": float(loss.detach()), "fit_seconds": time.perf_counter() - started}
    return FittedTorchModel(family, module, info=info)


def timed(fit, x, **kwargs) -> FittedTorchModel:
    started = time.perf_counter()
    model = fit(x, **kwargs)
    model.info.setdefault("fit_seconds", time.perf_counter() - started)
    return model


@ESTIMATORS.register("ple_closed")
def fit_ple_closed(family: TorchFamily, x: np.ndarray, *, seed: int, device="cpu", **_: object) -> FittedTorchModel:
    """PLE in closed form, for the families where the paper derives it (uniform: (n+1)/n max; Gaussian: the
    unbiased variance)."""
    if not getattr(family, "has_closed_ple", False):
        raise ValueError(f"no closed-form PLE is derived for the {family.name} family")
    return timed(family.fit_ple_closed, x, seed=seed, device=device)


@ESTIMATORS.register("ple")
def fit_ple(family: TorchFamily, x: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
            device: torch.device | str = "cpu", lam: float = 0.1, m: int = 1, hidden=(32, 64, 96),
            rank: int | None = 4, penalty_entries: int | None = 4096, penalty_every: int = 4,
            sample_weight: np.ndarray | None = None, precision: str = "fp32", **_: object) -> FittedTorchModel:
    """Penalized autophagy estimation (paper Eq. 5) with the hypernetwork H of Eq. 6.

    Each step, on a minibatch X (paper footnote 8: a synthetic set shares the batch size of X)::

        loss = NLL(X; H(X)) / D  +  lam/m * sum_j mean|H(Y_j) - H(X)|,   Y_j ~ model(H(X))

    Norms, our reading of Eq. 5's |.|: the NLL is averaged over samples and the D data dimensions, the penalty
    is the L1 distance between the emitted weight vectors divided by their count (mean absolute difference).
    Both are per-unit quantities, so lam means the same for a 6-parameter GMM and a 50k-weight VAE. With
    ``penalty_entries`` the mean runs over that many weight entries drawn at random each step: an unbiased
    estimate of the same penalty at a fraction of its cost for big targets (null: every entry).

    Gradients flow through sampling wherever the family reparameterizes: Y_j is a differentiable function of
    H(X)'s weights (VAE: decoder of fixed noise; Gaussian: mu + sigma * eps; ...), so the penalty reaches H
    through H(X), through Y_j, and through H(Y_j). Discrete choices (a GMM component, a geometric count) carry
    no gradient; there the penalty reaches H through H(X) and H(Y_j) only.

    The fitted weights are H over the whole training set (a streamed mean of h1, exact for any batch size or
    order); batchnorm statistics are then recomputed under those weights. ``penalty_every = k`` is lazy
    regularization (Karras et al. 2020, StyleGAN2 §3.1): the penalty runs on every k-th step only, weighted
    k * lam, the same objective in expectation at about 1/k of the penalty's cost. lam = 0 is the paper's
    "hypernetwork without penalty" ablation (App. J), also registered as ``hyper_nopenalty``.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    sample_generator = torch.Generator(device=device).manual_seed(seed + 1)
    target = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    features = family.hyper_features(data[:2])
    hyper = HyperNetwork(target, features.flatten(1).shape[1], list(hidden), rank).to(device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    optimizer = adam(hyper.parameters(), lr, device)
    dims = float(np.prod(data.shape[1:]))

    started = time.perf_counter()
    nll = penalty = torch.tensor(float("nan"))
    target.train()
    step = 0
    for _ in range(epochs):
        for idx in minibatches(len(data), batch_size, generator):
            step += 1
            idx = idx.to(device)
            batch = data[idx]
            with mixed_precision(device, precision):
                e_x = hyper.embed(family.hyper_features(batch))
                weights = hyper.emit(e_x)
                nll = weighted_mean(family.nll(target, batch, weights), None if weight is None else weight[idx]) / dims
                loss = nll
                if lam > 0 and step % penalty_every == 0:
                    entries = None
                    if penalty_entries is not None and penalty_entries < hyper.num_emitted:
                        entries = torch.randint(hyper.num_emitted, (penalty_entries,), generator=generator).to(device)
                    penalty = sum(
                        hyper.distance(hyper.embed(family.hyper_features(
                            family.sample(target, len(batch), sample_generator, weights=weights))), e_x, entries)
                        for _ in range(m)) / m
                    loss = nll + lam * penalty_every * penalty
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    with torch.no_grad():
        final = {k: v.detach() for k, v in hyper.emit(hyper.streamed_embedding(family.hyper_features(data))).items()}
    recalibrate_batchnorm(target, final, data, lambda module, w, batch: family.nll(module, batch, w))
    target.eval()
    info = {"train_loss": float(nll.detach()), "train_penalty": float(penalty.detach()),
            "fit_seconds": time.perf_counter() - started, "hyper_weights": sum(p.numel() for p in hyper.parameters())}
    return FittedTorchModel(family, target, final, info=info, hyper=hyper)


@ESTIMATORS.register("hyper_nopenalty")
def fit_hyper_nopenalty(family: TorchFamily, x: np.ndarray, **options) -> FittedTorchModel:
    """The hypernetwork trained by likelihood alone (PLE with lam = 0; paper App. J)."""
    return fit_ple(family, x, **{**options, "lam": 0.0})
