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


def weighted_mean(per_sample: torch.Tensor, sample_weight: torch.Tensor | None) -> torch.Tensor:
    """Mean loss; with weights, a weighted mean normalized per batch (weights sum to 1 in the batch)."""
    if sample_weight is None:
        return per_sample.mean()
    return (per_sample * sample_weight).sum() / sample_weight.sum()


@ESTIMATORS.register("mle")
def fit_mle(family: TorchFamily, x: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
            device: torch.device | str = "cpu", sample_weight: np.ndarray | None = None,
            **_: object) -> FittedTorchModel:
    """Maximum likelihood: Adam on the family's own parameters over ``epochs`` passes through x."""
    torch.manual_seed(seed)  # module initialization and the VAE's reparameterization noise
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    module = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)

    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    module.train()
    for _ in range(epochs):
        for idx in minibatches(len(data), batch_size, generator):
            idx = idx.to(device)
            loss = weighted_mean(family.nll(module, data[idx]), None if weight is None else weight[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    module.eval()
    info = {"train_loss": float(loss.detach()), "fit_seconds": time.perf_counter() - started}
    return FittedTorchModel(family, module, info=info)
