"""Maximum likelihood: the ordinary way to train, and the baseline every other estimator is compared with."""

from __future__ import annotations

import time

import numpy as np
import torch

from models.estimators import (ESTIMATORS, FamilyOptimizer, Progress, TrainSettings, batches_per_epoch, compiled,
                               finish_batchnorm, held_out_nll, hold_out, minibatches, mixed_precision, timed,
                               weighted_mean)
from models.families import FittedTorchModel, TorchFamily


@ESTIMATORS.register("mle", settings={"train": TrainSettings})
def fit_mle(family: TorchFamily, x: np.ndarray, *, train: TrainSettings, seed: int, device: torch.device,
            sample_weight: np.ndarray | None = None, progress: Progress | None = None,
            init: dict[str, torch.Tensor] | None = None) -> FittedTorchModel:
    """Maximum likelihood: the family's own closed form or EM when it has one (1-D families), otherwise Adam on
    the family's parameters over ``train.epochs`` passes through x (the VAE: the negative ELBO), as the family's
    ``training_recipe`` asks (Adam's betas, learning-rate decay, weight average, early stopping). ``init``: start
    from these tensors (a state dict of the family's module) instead of a fresh initialization: fine-tuning. A
    family may train part of its module otherwise (``trained_parameters``, ``auxiliary_step``: a GAN's
    discriminator)."""
    if hasattr(family, "fit_mle"):
        if sample_weight is not None:  # a closed form or EM that would drop them: never silently
            raise ValueError(f"the {family.name} family's closed-form MLE takes no per-row weights")
        return timed(family.fit_mle, x, seed=seed, device=device)
    torch.manual_seed(seed)  # module initialization and the VAE's reparameterization noise
    generator = torch.Generator().manual_seed(seed)
    module = family.build().to(device)
    if init is not None:
        module.load_state_dict(init)
    data = torch.as_tensor(x, dtype=torch.float32, device=device)
    weight = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float32, device=device)
    recipe = family.training_recipe()  # the family's betas, learning-rate decay, weight average, early stopping
    data, weight, held, held_weight = hold_out(recipe, data, weight, seed)
    optimizer = FamilyOptimizer(recipe, family.trained_parameters(module).values(), train.lr, device,
                                train.epochs * batches_per_epoch(len(data), train.batch_size))
    auxiliary = family.auxiliary_step(module, train.lr, device)  # a GAN's discriminator step; None for the others
    loss_of = compiled(lambda batch, w: weighted_mean(family.nll(module, batch), w), train.compile)

    started, loss = time.perf_counter(), torch.tensor(float("nan"))
    module.train()
    for epoch in range(train.epochs):
        for idx in minibatches(len(data), train.batch_size, generator, device):
            with mixed_precision(device, train.precision):
                if auxiliary is not None:
                    auxiliary(data[idx], None, None if weight is None else weight[idx])
                loss = loss_of(data[idx], None if weight is None else weight[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if progress is not None:
            progress(epoch + 1, train.epochs)
        if optimizer.stop(lambda: held_out_nll(family, module, None, held, held_weight)):
            break
    recipe_info = optimizer.finish()  # the fitted weights: the best held-out check's, the average or the last
    finish_batchnorm(family, module, None, data, train)
    module.eval()
    info = {"train_loss": float(loss.detach()), "fit_seconds": time.perf_counter() - started, **recipe_info}
    return FittedTorchModel(family, module, info=info)
