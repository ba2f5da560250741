"""A GAN: a DCGAN-style generator and discriminator (fully connected for small images: Linear layers with leaky
ReLU, no batchnorm) and the non-saturating loss (Goodfellow et al. 2014).

The module holds both networks. The estimators train the **generator** through ``nll`` (its
``trained_parameters``), the family's own ``auxiliary_step`` trains the **discriminator** before every step:

- ``nll`` stands in for the NLL with the generator loss -log D(G(z)) = softplus(-D(G(z))), one fresh z per row
  of the batch (it is per image, so ``nll_units`` is 1: PLE uses it as it is, not divided by the pixels);
- the discriminator step: Adam (the family's ``betas``, the generator's too; lr ``d_lr`` or the estimator's) on
  softplus(-D(x)) + softplus(D(G(z))) + r1/2 |grad_x D(x)|^2 for the real batch x (weighted by the batch's
  sample weights when a mitigation gives some) and as many samples of the current generator, which it does not
  train. The R1 penalty (Mescheder et al. 2018) is what makes this GAN train on 164 digits at all: without it
  the discriminator wins and FID stays above 70 (measured, docs/families.md).

``mle`` is then ordinary alternating adversarial training. The paper does not say how PLE trained its BigGAN
(Fig. 2); our reading, for ``ple`` and ``hyper_nopenalty``: the hypernetwork H(X) emits the generator's weights
only, from the real minibatch X; the discriminator trains as usual against the generator H(X) defines now (its
weights detached); H minimizes the generator loss of G_{H(X)} plus lam/m sum_j mean|H(Y_j) - H(X)| with
Y_j = G_{H(X)}(z_j) (differentiable in the emitted weights). The discriminator is the module's own, never emitted.
"""

from __future__ import annotations

from math import prod

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, field_validator
from torch import nn

from models.families import FAMILIES, TorchFamily, TrainingRecipe, run, sub_weights
from models.registry import Settings


class GANSettings(Settings):
    latent_dim: PositiveInt = 16
    generator: list[PositiveInt] = Field(default_factory=lambda: [64, 128], min_length=1)  # hidden sizes
    discriminator: list[PositiveInt] = Field(default_factory=lambda: [128, 64], min_length=1)  # hidden sizes
    negative_slope: float = Field(0.2, ge=0.0)
    d_lr: PositiveFloat | None = None  # discriminator's Adam learning rate; null = the estimator's (train.lr)
    r1: float = Field(10.0, ge=0.0)  # R1 gradient penalty on real images (Mescheder et al. 2018); 0 = off
    # Adam's (beta1, beta2), the same for the generator and the discriminator: StyleGAN2's for this loss with R1
    # (Karras et al. 2020), and the best of three measured (docs/families.md, "GAN")
    betas: list[float] = Field(default_factory=lambda: [0.0, 0.99], min_length=2, max_length=2)

    @field_validator("betas")
    @classmethod
    def betas_in_range(cls, value: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each of Adam's betas must be in [0, 1), got {list(value)}")
        return value


def leaky_mlp(sizes: list[int], negative_slope: float) -> nn.Sequential:
    """Linear layers with leaky ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(negative_slope))
    return nn.Sequential(*layers)


class GAN(nn.Module):
    def __init__(self, data_dim: int, s: GANSettings):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, s.latent_dim
        self.generator = leaky_mlp([s.latent_dim, *s.generator, data_dim], s.negative_slope)  # logits of pixels
        self.discriminator = leaky_mlp([data_dim, *s.discriminator, 1], s.negative_slope)


@FAMILIES.register("gan", settings={"model.gan": GANSettings})
class GANFamily(TorchFamily):
    """A DCGAN-style GAN (MLP generator and discriminator), non-saturating loss; PLE emits the generator."""

    name = "gan"
    kind = "image"

    def __init__(self, data_shape, settings: GANSettings):
        super().__init__(data_shape, settings)

    def build(self) -> GAN:
        return GAN(prod(self.data_shape), self.settings)

    def generate(self, module: GAN, z: torch.Tensor, weights) -> torch.Tensor:
        """Flattened images in [0, 1] from latents z, with the module's generator or the emitted ``weights``."""
        return torch.sigmoid(run(module.generator, sub_weights(weights, "generator"), z))

    def nll(self, module, x, weights=None):
        z = torch.randn(len(x), module.latent_dim, device=x.device)
        return F.softplus(-module.discriminator(self.generate(module, z, weights))).squeeze(1)

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        z = torch.randn(n, module.latent_dim, generator=generator, device=next(module.parameters()).device)
        return self.generate(module, z * temperature, weights).reshape(n, *self.data_shape)

    def trained_parameters(self, module):
        return {f"generator.{name}": p for name, p in module.generator.named_parameters()}

    def nll_units(self) -> float:
        return 1.0

    def training_recipe(self) -> TrainingRecipe:
        return TrainingRecipe(betas=tuple(self.settings.betas))  # the generator's Adam: the discriminator's betas

    def auxiliary_step(self, module, lr, device):
        d = module.discriminator
        optimizer = torch.optim.Adam(d.parameters(), lr=self.settings.d_lr or lr, betas=tuple(self.settings.betas),
                                     fused=device.type in ("cpu", "cuda"))

        def discriminator_step(batch: torch.Tensor, weights, batch_weight: torch.Tensor | None) -> None:
            with torch.no_grad():
                z = torch.randn(len(batch), module.latent_dim, device=batch.device)
                fake = self.generate(module, z, None if weights is None else
                                     {k: v.detach() for k, v in weights.items()})
            x = batch.flatten(1).detach().requires_grad_(self.settings.r1 > 0)
            scores = d(x).squeeze(1)
            real_loss = F.softplus(-scores)
            if self.settings.r1 > 0:  # gamma/2 |grad_x D(x)|^2 on the real images
                grad, = torch.autograd.grad(scores.sum(), x, create_graph=True)
                real_loss = real_loss + 0.5 * self.settings.r1 * grad.pow(2).sum(dim=1)
            real = real_loss.mean() if batch_weight is None else (real_loss * batch_weight).sum() / batch_weight.sum()
            loss = real + F.softplus(d(fake)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return discriminator_step
