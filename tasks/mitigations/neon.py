"""Neon, negative extrapolation from self-training (Alemohammad et al. 2025, "Neon: Negative Extrapolation From
Self-Training Improves Image Generation"): fine-tune a model briefly on its own samples, which moves it the way
self-consuming loops degrade it, then step the other way: theta = (1 + w) theta_k - w theta_self.

Our reading, as a lineage recipe: after the estimator fits model k (any estimator: for PLE, the weights its
hypernetwork emits), model k draws ``samples`` images (null: as many as it trained on) the way the loop samples
(``loop.temperature``); a copy of it is fine-tuned on them by maximum likelihood for ``epochs`` passes from its own
weights (``models.estimators.mle.fit_mle`` with ``init``; ``train``'s batch size, learning rate and batchnorm
rule); then every parameter is extrapolated as above. Batchnorm statistics are data statistics, not trained
weights: model k's are kept. (Extrapolating them too, as a merge of whole checkpoints would, drove running
variances to 0 and the digits VAE's generation-0 FID from 13.3 to 80.6 at w = 0.5; keeping model k's gave 11.0,
recomputing them over the training rows under the new weights 10.4 but breaks the next property, since the VAE's
statistics depend on its reparameterization noise. One seed, this 2-core VM.) The result is model k: it is
scored, sampled and saved. w = 0 gives model k exactly, bit for bit.

Logged: ``neon_w``, ``neon_step`` (the relative size of the self-training step, |theta_self - theta_k| /
|theta_k|) as metrics; ``neon_seconds`` goes with ``fit_seconds`` into the manifest's info.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field, PositiveInt

from models.estimators import TrainSettings
from models.estimators.mle import fit_mle
from models.families import FittedTorchModel
from models.registry import Settings
from tasks.mitigations import MITIGATIONS, Mitigation
from tasks.seeds import NEON, derive_seed


class NeonSettings(Settings):
    w: float = Field(0.5, ge=0.0)  # extrapolation weight: theta = (1 + w) theta_k - w theta_self
    epochs: PositiveInt = 25  # self-training passes over the samples (brief: 5% of train.epochs by default)
    samples: PositiveInt | None = None  # self-generated training set size; null = as many rows as model k saw


def extrapolate(base: dict[str, torch.Tensor], other: dict[str, torch.Tensor], names: set[str],
                w: float) -> dict[str, torch.Tensor]:
    """(1 + w) base - w other for the tensors ``names``; every other tensor as in ``base``."""
    return {name: (1 + w) * t - w * other[name] if name in names else t for name, t in base.items()}


@MITIGATIONS.register("neon", settings={"mitigation.neon": NeonSettings, "train": TrainSettings})
class Neon(Mitigation):
    """Self-train model k briefly on its own samples, then extrapolate its weights away from the self-trained ones."""

    @classmethod
    def supports(cls, family):
        if hasattr(family, "fit_mle"):
            return "fits in closed form or by EM: Neon fine-tunes by gradient steps"
        return super().supports(family)

    def after_fit(self, k, model, dataset):
        c, s = self.context, self.context.settings["mitigation.neon"]
        started = time.perf_counter()
        train = c.settings["train"].model_copy(update={"epochs": s.epochs})
        seed = derive_seed(c.seed, k, NEON)
        own = model.sample(s.samples or len(dataset), seed, c.loop.temperature)
        base = {name: t.to(c.device) for name, t in model.tensors().items()}
        tuned = fit_mle(c.family, own, train=train, seed=seed, device=c.device, init=base)
        tuned_weights = {name: t.to(c.device) for name, t in tuned.tensors().items()}
        parameters = sorted(name for name, _ in tuned.module.named_parameters())
        module = c.family.build().to(c.device)
        module.load_state_dict(extrapolate(base, tuned_weights, set(parameters), s.w))
        module.eval()
        step = torch.cat([(tuned_weights[n] - base[n]).flatten() for n in parameters]).norm()
        size = torch.cat([base[n].flatten() for n in parameters]).norm()
        # The time goes with fit_seconds into the manifest's info, not its metrics: a resume compares metrics.
        timing = {**model.info, "neon_seconds": time.perf_counter() - started}
        return FittedTorchModel(c.family, module, info=timing), {"neon_w": s.w, "neon_step": float(step / size)}
