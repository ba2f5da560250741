"""A normalizing flow: a RealNVP-style stack of affine coupling layers (Dinh et al. 2017) on the flattened image,
with uniform dequantization and a logit transform, so its NLL is exact and PLE's first term is the paper's
literally.

Data. Images hold ``levels`` gray levels k/(levels-1) (scikit-learn's digits: 17; MNIST: 256). Training adds
uniform noise inside each level's cell, y = (k + u)/levels with u ~ U[0, 1) (uniform dequantization, Theis et
al. 2016; not the variational kind), maps y to logit space, v = logit(a + (1 - 2a) y), and runs the couplings
to a standard normal z. ``nll`` is the discrete NLL bound in nats per image:
-log p(y) + D log(levels) >= -log P(k) (exact change of variables: every layer's log-determinant is summed);
``held_out_scores`` reports it on held-out real images in bits per dimension (``bpd``), the image scorer's extra
column for this family.

Sampling inverts the stack from z ~ N(0, temperature^2 I) and puts each pixel back on its level: the next
generation trains on images of the same kind as the real ones. Rounding to a level passes the gradient
straight through (its value is the level, its gradient that of the continuous sample), so samples stay
differentiable in ``weights`` for the PLE penalty.

Training can stop early on held-out bits per dimension (off by default: at the families study's budget it gives
the best held-out bits per dimension and worse samples, docs/families.md): ``holdout`` of the training rows
(drawn with the fit's seed) are kept out of training, their NLL (the bound above, one fixed dequantization draw)
is checked every ``check_every`` epochs with the weights of that moment, training stops once ``patience`` epochs
pass without a better one, and the best weights are restored (``models.estimators.FamilyOptimizer``, for every
estimator alike); ``train.epochs`` is the cap. The NLL in nats per image and bits per dimension order weights
alike.

Layers. A coupling keeps the pixels of a checkerboard mask and transforms the others,
x' = x * exp(s) + t with (s, t) = MLP(kept pixels) and s = scale * tanh(.), starting at the identity (the MLP's
last layer is zero); consecutive couplings swap the mask. No batchnorm or data-dependent initialization, so the
hypernetwork's emitted weights run the flow as they are. Shapes follow the data: 8x8 digits and 28x28 alike.
"""

from __future__ import annotations

import math
from math import prod

import torch
from pydantic import Field, PositiveInt
from torch import nn

from models.families import FAMILIES, TorchFamily, TrainingRecipe, run
from models.registry import Settings


class FlowSettings(Settings):
    couplings: PositiveInt = 4  # affine coupling layers (checkerboard masks, alternating)
    hidden: list[PositiveInt] = Field(default_factory=lambda: [32, 32], min_length=1)  # each coupling's MLP
    levels: int = Field(17, ge=2)  # gray levels of the data (digits: 17; MNIST, CIFAR-10: 256)
    alpha: float = Field(0.01, gt=0.0, lt=0.5)  # logit transform margin: v = logit(a + (1 - 2a) y)
    # Early stopping on held-out bits per dimension (the cap: train.epochs); holdout 0 (the default) turns it off:
    # it gives the best held-out bits/dim but worse samples at the families study's budget (docs/families.md)
    holdout: float = Field(0.0, ge=0.0, lt=0.5)  # share of the training rows held out (0.1: 16 of digits' 164)
    patience: PositiveInt = 50  # epochs without a better held-out NLL before stopping (the best weights restored)
    check_every: PositiveInt = 5  # epochs between held-out checks


def checkerboard(shape: tuple[int, ...], parity: int) -> torch.Tensor:
    """1 where (row + column) % 2 == parity, over the image's last two axes (every channel alike), flattened."""
    rows, cols = torch.meshgrid(torch.arange(shape[-2]), torch.arange(shape[-1]), indexing="ij")
    mask = ((rows + cols) % 2 == parity).float().expand(*shape)
    return mask.reshape(-1)


class Coupling(nn.Module):
    """x' = kept + (1 - mask) * (x * exp(s) + t), (s, t) from the kept pixels; log|det| = sum(s)."""

    def __init__(self, mask: torch.Tensor, hidden: list[int]):
        super().__init__()
        dim = len(mask)
        self.register_buffer("mask", mask)
        layers: list[nn.Module] = []
        for n_in, n_out in zip([dim, *hidden[:-1]], hidden):
            layers += [nn.Linear(n_in, n_out), nn.SiLU()]
        last = nn.Linear(hidden[-1], 2 * dim)
        nn.init.zeros_(last.weight)  # every coupling starts as the identity
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(torch.ones(dim))

    def shift_and_log_scale(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(kept).chunk(2, dim=1)
        free = 1.0 - self.mask
        return t * free, self.scale * torch.tanh(s) * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept = x * self.mask
        t, s = self.shift_and_log_scale(kept)
        return kept + (1.0 - self.mask) * (x * s.exp() + t), s.sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        kept = y * self.mask
        t, s = self.shift_and_log_scale(kept)
        return kept + (1.0 - self.mask) * ((y - t) * (-s).exp())


class CouplingFlow(nn.Module):
    """The stack: ``forward`` gives the per-sample NLL of dequantized images, ``generate`` inverts it."""

    def __init__(self, data_shape: tuple[int, ...], couplings: int, hidden: list[int], levels: int, alpha: float):
        super().__init__()
        self.dim, self.levels, self.alpha = prod(data_shape), levels, alpha
        self.layers = nn.ModuleList(Coupling(checkerboard(data_shape, i % 2), hidden) for i in range(couplings))

    def to_logit(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """v = logit(a + (1 - 2a) y) and its log|dv/dy| summed per sample."""
        p = self.alpha + (1.0 - 2.0 * self.alpha) * y
        log_p, log_q = torch.log(p), torch.log(1.0 - p)  # p stays in [a, 1 - a]: log(1 - p) is exact enough
        return log_p - log_q, (math.log(1.0 - 2.0 * self.alpha) - log_p - log_q).sum(dim=1)

    def forward(self, x: torch.Tensor, generate: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The per-sample NLL of images x, or (``generate``) images from latents x: one entry point, so that both
        run functionally with emitted weights."""
        return self.generate(x) if generate else self.nll(x, noise)

    def nll(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample NLL bound (nats) of flattened images x on the level grid k / (levels - 1); ``noise``: the
        dequantization's uniform draws (default: fresh ones)."""
        k = torch.round(x * (self.levels - 1))
        y = (k + (torch.rand_like(x) if noise is None else noise)) / self.levels  # uniform dequantization
        v, logdet = self.to_logit(y)
        for layer in self.layers:
            v, layer_logdet = layer(v)
            logdet = logdet + layer_logdet
        log_prior = -0.5 * (v.pow(2).sum(dim=1) + self.dim * math.log(2.0 * math.pi))
        return -(log_prior + logdet) + self.dim * math.log(self.levels)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Flattened images on the level grid from latents z (straight-through rounding: differentiable)."""
        v = z
        for layer in reversed(self.layers):
            v = layer.inverse(v)
        y = ((torch.sigmoid(v) - self.alpha) / (1.0 - 2.0 * self.alpha)).clamp(0.0, 1.0)
        level = torch.clamp(torch.floor(y * self.levels), max=self.levels - 1) / (self.levels - 1)
        return y + (level - y).detach()


@FAMILIES.register("flow", settings={"model.flow": FlowSettings})
class FlowFamily(TorchFamily):
    """A RealNVP-style affine coupling flow with uniform dequantization: exact NLL, bits per dimension."""

    name = "flow"
    kind = "image"
    held_out_columns = {"bpd": "lower"}

    def __init__(self, data_shape, settings: FlowSettings):
        super().__init__(data_shape, settings)

    def build(self) -> CouplingFlow:
        s = self.settings
        return CouplingFlow(self.data_shape, s.couplings, list(s.hidden), s.levels, s.alpha)

    def training_recipe(self) -> TrainingRecipe:
        s = self.settings
        return TrainingRecipe(holdout=s.holdout, patience=s.patience, check_every=s.check_every)

    def nll(self, module, x, weights=None):
        return run(module, weights, x.flatten(1))

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        device = module.layers[0].mask.device
        z = torch.randn(n, module.dim, generator=generator, device=device) * temperature
        return run(module, weights, z, generate=True).reshape(n, *self.data_shape)

    @torch.no_grad()
    def held_out_scores(self, module, weights, x, seed):
        """Bits per dimension of held-out real images (dequantization noise from ``seed``)."""
        x = x.flatten(1)
        noise = torch.rand(x.shape, generator=torch.Generator(device=x.device).manual_seed(seed), device=x.device)
        nll = torch.cat([run(module, weights, part, noise=u) for part, u in zip(x.split(1024), noise.split(1024))])
        return {"bpd": float(nll.mean()) / (module.dim * math.log(2.0))}

