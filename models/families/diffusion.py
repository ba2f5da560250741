"""A denoising diffusion model (DDPM, Ho et al. 2020) with a small residual-MLP denoiser on the flattened image.

Training. Pixels in [0, 1] are scaled to [-1, 1]; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps over ``timesteps``
steps of the cosine schedule (Nichol & Dhariwal 2021). ``nll`` is the per-sample epsilon-prediction loss
|eps - eps_theta(x_t, t)|^2 summed over pixels with t ~ Uniform{0..T-1}: Ho et al.'s L_simple, the ELBO's terms
re-weighted to the same weight for every t (a weighted ELBO in Kingma & Gao's sense, 2023), which stands in for
the NLL in MLE and in PLE's first term. It is averaged over ``draws`` independent (t, eps) per image: the same
loss in expectation, with less variance per step.

Denoiser. x_t -> Linear -> ``blocks`` residual blocks h + Linear(SiLU(Linear(SiLU(h + W_b emb(t))))) -> SiLU ->
Linear, with emb(t) a fixed sinusoidal embedding; no normalization layers, so emitted weights run it as they are.
Shapes follow the data (8x8 digits, 28x28 MNIST alike: the image is flattened).

Sampling. ``sample_steps`` steps of DDIM (Song et al. 2021) over evenly spaced timesteps, with ``eta`` (0:
deterministic DDIM, the default; 1: the DDPM posterior's noise, so ``sample_steps = timesteps`` with eta 1 is
DDPM's full ancestral sampler). x_0 is predicted and clipped to [-1, 1] at every step. Every step is an
ordinary differentiable function of the denoiser's weights, so samples are differentiable in ``weights``.
docs/families.md compares the default sampler's FID with full sampling's.

Inside the PLE penalty (``sample(..., penalty=True)``, the argument PLE's penalty passes; scoring and the next
dataset sample with ``penalty=False``, whatever the autograd mode), the sampler runs ``penalty_steps``
deterministic DDIM steps (eta 0) instead, and the gradient flows through the last ``penalty_grad_steps`` of them only: the earlier
steps run without autograd, so the penalty reaches H through H(X), through H(Y_j) and through the last steps'
use of H(X)'s weights (on inputs the earlier steps made, detached). That keeps a PLE step affordable on a CPU
(PLE per generation at most about 2x MLE: docs/performance.md); the samples Y_j are then coarser than the
model's real samples, which is the price.
"""

from __future__ import annotations

import math
from math import prod

import torch
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from models.families import FAMILIES, TorchFamily, run
from models.registry import Settings


class DiffusionSettings(Settings):
    timesteps: PositiveInt = 1000  # T of the forward process (cosine schedule)
    width: PositiveInt = 128  # the denoiser's residual MLP
    blocks: PositiveInt = 2  # residual blocks (two Linear layers each)
    time_dim: PositiveInt = 32  # sinusoidal embedding of t
    draws: PositiveInt = 2  # (t, eps) draws per image in the loss, averaged (lowers its variance)
    sample_steps: PositiveInt = 100  # DDIM steps when sampling (timesteps with eta 1: full DDPM)
    eta: float = Field(0.0, ge=0.0, le=1.0)  # DDIM noise: 1 = DDPM's posterior variance, 0 = deterministic
    penalty_steps: PositiveInt = 4  # deterministic DDIM steps when sampling inside the PLE penalty
    penalty_grad_steps: PositiveInt = 1  # of those, how many (the last) the penalty's gradient flows through

    @model_validator(mode="after")
    def steps_fit(self) -> "DiffusionSettings":
        for key in ("sample_steps", "penalty_steps"):
            if getattr(self, key) > self.timesteps:
                raise ValueError(f"{key}: at most timesteps ({self.timesteps}), got {getattr(self, key)}")
        if self.penalty_grad_steps > self.penalty_steps:
            raise ValueError(f"penalty_grad_steps: at most penalty_steps ({self.penalty_steps})")
        return self


def cosine_alpha_bar(timesteps: int) -> torch.Tensor:
    """abar_t for t = 0..T-1 (Nichol & Dhariwal 2021, s = 0.008; betas capped at 0.999)."""
    s = 0.008
    f = torch.cos((torch.arange(timesteps + 1, dtype=torch.float64) / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def time_embedding(t: torch.Tensor, timesteps: int, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps t (no parameters)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = (t.float() / timesteps * 1000.0)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class Block(nn.Module):
    """h + Linear(SiLU(Linear(SiLU(h + time)))): a residual MLP block told the timestep."""

    def __init__(self, width: int, time_dim: int):
        super().__init__()
        self.time = nn.Linear(time_dim, width)
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return h + self.net(h + self.time(embedding))


class Denoiser(nn.Module):
    """eps_theta(x_t, t): a residual MLP, the timestep's sinusoidal embedding added in every block; the forward
    process's schedule is a buffer."""

    def __init__(self, data_dim: int, width: int, blocks: int, time_dim: int, timesteps: int):
        super().__init__()
        self.data_dim, self.time_dim, self.timesteps = data_dim, time_dim, timesteps
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps))
        self.input = nn.Linear(data_dim, width)
        self.blocks = nn.ModuleList(Block(width, time_dim) for _ in range(blocks))
        self.output = nn.Sequential(nn.SiLU(), nn.Linear(width, data_dim))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        embedding = time_embedding(t, self.timesteps, self.time_dim)
        h = self.input(x_t)
        for block in self.blocks:
            h = block(h, embedding)
        return self.output(h)


@FAMILIES.register("diffusion", settings={"model.diffusion": DiffusionSettings})
class DiffusionFamily(TorchFamily):
    """A DDPM with an MLP denoiser: epsilon-prediction loss (L_simple), DDIM/DDPM sampling."""

    name = "diffusion"
    kind = "image"

    def __init__(self, data_shape, settings: DiffusionSettings):
        super().__init__(data_shape, settings)

    def build(self) -> Denoiser:
        s = self.settings
        return Denoiser(prod(self.data_shape), s.width, s.blocks, s.time_dim, s.timesteps)

    def nll(self, module, x, weights=None):
        n, draws = len(x), self.settings.draws
        x0 = (x.flatten(1) * 2.0 - 1.0).repeat(draws, 1)
        t = torch.randint(0, module.timesteps, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        abar = module.alpha_bar[t][:, None]
        x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
        return (run(module, weights, x_t, t) - eps).pow(2).sum(dim=1).view(draws, n).mean(dim=0)

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        """``sample_steps`` DDIM steps with ``eta``; ``penalty`` (PLE's synthetic sets): ``penalty_steps``
        deterministic steps, autograd (where it is on) recording the last ``penalty_grad_steps`` only."""
        s = self.settings
        device = module.alpha_bar.device
        steps, eta = (s.penalty_steps, 0.0) if penalty else (s.sample_steps, s.eta)
        grad_from = steps - s.penalty_grad_steps if penalty else 0
        times = torch.linspace(module.timesteps - 1, 0, steps, device=device).round().long()
        x = torch.randn(n, module.data_dim, generator=generator, device=device) * temperature
        recording = torch.is_grad_enabled()
        for i, t in enumerate(times.tolist()):
            with torch.set_grad_enabled(recording and i >= grad_from):
                t_prev = int(times[i + 1]) if i + 1 < steps else -1
                x = self.ddim_step(module, weights, x, t, t_prev, eta, generator)
        return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).reshape(n, *self.data_shape)

    @staticmethod
    def ddim_step(module, weights, x, t: int, t_prev: int, eta: float, generator) -> torch.Tensor:
        """x_t -> x_{t_prev} (t_prev = -1: the final x_0), predicting x_0 and clipping it to [-1, 1]."""
        abar = module.alpha_bar[t]
        abar_prev = module.alpha_bar[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
        eps = run(module, weights, x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1.0, 1.0)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()  # consistent with the clipped x0
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev
