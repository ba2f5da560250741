"""Maximum likelihood: the ordinary way to train, and the baseline every other estimator is compared with."""

from __future__ import annotations

import time

import numpy as np
import torch

from models.estimators import (ESTIMATORS, TrainSettings, adam, compiled, finish_batchnorm, minibatches,
                               mixed_precision, timed, weighted_mean)
from models.families import FittedTorchModel, TorchFamily


@ESTIMATORS.register("mle", settings={"train": TrainSettings})
def fit_mle(family: TorchFamily, x: np.ndarray, *, train: TrainSettings, seed: int, device: torch.device,
            sample_weight: np.ndarray | None = None) -> FittedTorchModel:
    """Maximum likelihood: the family's own closed form or EM when it has one (1-D families), otherwise Adam on
    the family's parameters over ``train.epochs`` passes through x (the VAE: the negative ELBO)."""
    if hasattr(family, "fit_mle"):
        return timed(family.fit_mle, x, seed=seed, device=device)
    torch.manual_seed(seed)  # module initialization and the VAE's reparameterization noise
    generator = torch.Generator().manual_seed(seed)
    module = family.build().to(device)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    optimizer = adam(module.parameters(), train.lr, device)
    loss_of = compiled(lambda batch, w: weighted_mean(family.nll(module, batch), w), train.compile)

    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    module.train()
    for _ in range(train.epochs):
        for idx in minibatches(len(data), train.batch_size, generator, device):
            with mixed_precision(device, train.precision):
                loss = loss_of(data[idx], None if weight is None else weight[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    finish_batchnorm(family, module, None, data, train)
    module.eval()
    info = {"train_loss": float(loss.detach()), "fit_seconds": time.perf_counter() - started}
    return FittedTorchModel(family, module, info=info)
