"""The paper's VAE (§5.1): fully connected encoder and decoder, each layer Linear -> BatchNorm -> LeakyReLU.

Pixels are intensities in [0, 1] and the decoder is Bernoulli (binary cross-entropy on logits), as in the
usual MNIST VAE. A sample decodes z ~ N(0, temperature^2 I) to the pixels' Bernoulli means p = sigmoid(logits);
``sampling`` says what the sample then is, and so what the next generation trains on:

- ``mean``: the image p itself (the usual picture of a VAE's sample; no pixel noise, so each generation's data
  are smoother than the model's own likelihood says: a modelling choice that shrinks variance by construction);
- ``bernoulli``: a draw of the decoder's likelihood, each pixel 1 with probability p, else 0 (binary images,
  whose per-pixel variance p(1 - p) is what the model was fitted to say). Inside PLE's penalty the draw passes
  the gradient straight through (its value is the draw, its gradient that of p), so Y_j stay differentiable in
  the emitted weights, as the flow's rounding does.

docs/families.md measures what each does to the MAD curve and says why the default is what it is.
"""

from __future__ import annotations

from math import prod
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import nn

from models.families import FAMILIES, TorchFamily, run, sub_weights
from models.registry import Settings


class VAESettings(Settings):
    hidden: list[PositiveInt] = Field(default_factory=lambda: [128, 128], min_length=1)  # encoder; decoder mirrors
    latent_dim: PositiveInt = 8
    negative_slope: float = Field(0.2, ge=0.0)
    sampling: Literal["mean", "bernoulli"] = "mean"  # a sample: the decoder's mean image, or a Bernoulli draw of it


def mlp_stack(sizes: list[int], negative_slope: float) -> nn.Sequential:
    """Linear -> BatchNorm1d -> LeakyReLU for each consecutive pair of sizes."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.BatchNorm1d(n_out), nn.LeakyReLU(negative_slope)]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    def __init__(self, data_dim: int, hidden: list[int], latent_dim: int, negative_slope: float):
        super().__init__()
        self.data_dim, self.latent_dim = data_dim, latent_dim
        self.encoder = nn.Sequential(
            mlp_stack([data_dim, *hidden], negative_slope), nn.Linear(hidden[-1], 2 * latent_dim)
        )
        self.decoder = nn.Sequential(
            mlp_stack([latent_dim, *reversed(hidden)], negative_slope), nn.Linear(hidden[0], data_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample negative ELBO (nats) of flattened images x in [0, 1], shape [B, data_dim]."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decoder(z)
        reconstruction = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(dim=1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
        return reconstruction + kl


@FAMILIES.register("vae", settings={"model.vae": VAESettings})
class VAEFamily(TorchFamily):
    """The paper's fully connected VAE with batchnorm and leaky ReLU (§5.1)."""

    name = "vae"
    kind = "image"

    def __init__(self, data_shape, settings: VAESettings):
        super().__init__(data_shape, settings)

    def build(self) -> VAE:
        s = self.settings
        return VAE(prod(self.data_shape), list(s.hidden), s.latent_dim, s.negative_slope)

    def nll(self, module, x, weights=None):
        return run(module, weights, x.flatten(1))

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        device = next(module.parameters()).device
        # The latent prior's temperature is the sampling-bias knob: < 1 cherry-picks typical samples.
        z = torch.randn(n, self.settings.latent_dim, generator=generator, device=device) * temperature
        p = torch.sigmoid(run(module.decoder, sub_weights(weights, "decoder"), z))
        if self.settings.sampling == "bernoulli":
            draw = torch.bernoulli(p.detach(), generator=generator)
            p = p + (draw - p).detach()  # the draw's value, p's gradient (straight through)
        return p.reshape(n, *self.data_shape)
