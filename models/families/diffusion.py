"""A denoising diffusion model (DDPM, Ho et al. 2020) with a small residual-MLP denoiser on the flattened image.

Training. Pixels in [0, 1] are scaled to [-1, 1]; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps over ``timesteps``
steps of the ``schedule`` (the cosine one of Nichol & Dhariwal 2021, or Ho et al.'s linear betas). The denoiser
predicts ``prediction``: x_0 (the default), eps or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022),
each a reparameterization of the others given x_t. ``nll`` is the per-sample denoising loss, squared error summed
over pixels, with t ~ Uniform{0..T-1} and weight ``weighting``: ``simple``, the plain squared error of what the
denoiser predicts (for eps: Ho et al.'s L_simple), or ``min_snr``, Min-SNR-gamma (Hang et al. 2023), which in
eps-space weighs every t by min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t) (for x_0:
min(SNR_t, gamma) |x_0 - x0_theta|^2). Both are the ELBO's terms re-weighted by a weight that does not grow with
the SNR (a weighted ELBO in Kingma & Gao's sense, 2023), which stands in for the NLL in MLE and in PLE's first
term. It is averaged over ``draws`` independent (t, eps) per image: the same loss in expectation, with less
variance per step. docs/families.md has the measurements behind the defaults (x_0 with Min-SNR-5 against eps and v,
simple and Min-SNR; the learning rate, its cosine decay and the moving average of the weights, which
``training_recipe`` hands to every estimator).

Denoiser. x_t -> Linear -> ``blocks`` residual blocks h + Linear(SiLU(Linear(SiLU(h + W_b emb(t))))) -> SiLU ->
Linear, with emb(t) a fixed sinusoidal embedding; no normalization layers, so emitted weights run it as they are.
Shapes follow the data (8x8 digits, 28x28 MNIST alike: the image is flattened).

Sampling. ``sample_steps`` steps over evenly spaced timesteps, each the DDIM update (Song et al. 2021) with
``eta``: 1 (the default) adds the DDPM posterior's noise (DDPM's ancestral sampler on the strided timesteps; with
``sample_steps = timesteps`` exactly DDPM's), 0 is deterministic DDIM. x_0 is predicted and clipped to [-1, 1]
at every step. Every step is an ordinary differentiable function of the denoiser's weights, so samples are
differentiable in ``weights``.

PLE's penalty samples its synthetic sets with ``sample(..., penalty=True)``: ``penalty_steps`` deterministic DDIM
steps (eta 0), the gradient flowing through the last ``penalty_grad_steps`` of them only (the earlier steps run
without autograd), so the penalty reaches H through H(X), through H(Y_j) and through the last steps' use of
H(X)'s weights (on inputs the earlier steps made, detached). That keeps a PLE step affordable on a CPU; the
samples Y_j are then coarser than the model's samples, which is the price. Everything else (scores, the next
dataset) samples with the family's own sampler; the autograd mode chooses nothing.
"""

from __future__ import annotations

import math
from math import prod
from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from models.families import FAMILIES, TorchFamily, TrainingRecipe, run
from models.registry import Settings


class DiffusionSettings(Settings):
    timesteps: PositiveInt = 1000  # T of the forward process
    schedule: Literal["cosine", "linear"] = "cosine"  # abar_t: Nichol & Dhariwal's cosine, or Ho et al.'s linear betas
    width: PositiveInt = 128  # the denoiser's residual MLP
    blocks: PositiveInt = 2  # residual blocks (two Linear layers each)
    time_dim: PositiveInt = 32  # sinusoidal embedding of t
    prediction: Literal["x0", "eps", "v"] = "x0"  # what the denoiser predicts (the others follow from it and x_t)
    weighting: Literal["min_snr", "simple"] = "min_snr"  # the loss's weight of each t (module docstring)
    snr_gamma: PositiveFloat = 5.0  # gamma of Min-SNR-gamma (Hang et al. 2023)
    draws: PositiveInt = 2  # (t, eps) draws per image in the loss, averaged (lowers its variance)
    lr: PositiveFloat | None = 0.008  # Adam's learning rate for this family; null: the estimator's (train.lr)
    lr_decay: Literal["cosine", "constant"] = "cosine"  # the learning rate over the fit: a cosine to 0, or constant
    ema_decay: float | None = Field(0.999, gt=0.0, lt=1.0)  # fitted weights: their moving average; null: the last
    sample_steps: PositiveInt = 100  # sampling steps over evenly spaced timesteps
    eta: float = Field(1.0, ge=0.0, le=1.0)  # 1: DDPM's posterior noise (ancestral), 0: deterministic DDIM
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


def alpha_bar(schedule: str, timesteps: int) -> torch.Tensor:
    """abar_t for t = 0..T-1: ``cosine`` (Nichol & Dhariwal 2021, s = 0.008; betas capped at 0.999) or ``linear``
    (Ho et al. 2020: betas from 1e-4 to 0.02 at T = 1000, scaled by 1000 / T for other T as Nichol & Dhariwal do)."""
    if schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64).clamp(max=0.999)
    else:
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
    """The denoiser (x_t, t) -> x_0, eps or v: a residual MLP, the timestep's sinusoidal embedding added in every
    block; the forward process's schedule is a buffer."""

    def __init__(self, data_dim: int, width: int, blocks: int, time_dim: int, timesteps: int,
                 schedule: str = "cosine"):
        super().__init__()
        self.data_dim, self.time_dim, self.timesteps = data_dim, time_dim, timesteps
        self.register_buffer("alpha_bar", alpha_bar(schedule, timesteps))
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
    """A DDPM with an MLP denoiser: a weighted denoising loss, DDPM/DDIM sampling."""

    name = "diffusion"
    kind = "image"

    def __init__(self, data_shape, settings: DiffusionSettings):
        super().__init__(data_shape, settings)

    def build(self) -> Denoiser:
        s = self.settings
        return Denoiser(prod(self.data_shape), s.width, s.blocks, s.time_dim, s.timesteps, s.schedule)

    def training_recipe(self) -> TrainingRecipe:
        s = self.settings
        return TrainingRecipe(lr=s.lr, lr_decay=s.lr_decay, ema_decay=s.ema_decay)

    def nll(self, module, x, weights=None):
        n, draws = len(x), self.settings.draws
        x0 = (x.flatten(1) * 2.0 - 1.0).repeat(draws, 1)
        t = torch.randint(0, module.timesteps, (len(x0),), device=x0.device)
        eps = torch.randn_like(x0)
        abar = module.alpha_bar[t][:, None]
        x_t = abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps
        target = {"x0": x0, "eps": eps, "v": abar.sqrt() * eps - (1.0 - abar).sqrt() * x0}[self.settings.prediction]
        error = (run(module, weights, x_t, t) - target).pow(2).sum(dim=1)
        return (self.loss_weight(abar[:, 0]) * error).view(draws, n).mean(dim=0)

    def loss_weight(self, abar: torch.Tensor) -> torch.Tensor:
        """The weight of each t on the squared error of the prediction: 1 (``simple``), or Min-SNR-gamma, which is
        min(SNR, gamma) / SNR in eps-space, so min(SNR, gamma) for x_0 and min(SNR, gamma) / (SNR + 1) for v."""
        s = self.settings
        if s.weighting == "simple":
            return torch.ones_like(abar)
        snr = abar / (1.0 - abar)
        capped = snr.clamp(max=s.snr_gamma)
        return {"x0": capped, "eps": capped / snr, "v": capped / (snr + 1.0)}[s.prediction]

    def predict(self, module, weights, x: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) at timestep t from the denoiser's prediction, x_0 clipped to [-1, 1] and eps consistent
        with the clipped x_0."""
        abar = module.alpha_bar[t]
        out = run(module, weights, x, torch.full((len(x),), t, device=x.device, dtype=torch.long))
        prediction = self.settings.prediction
        if prediction == "x0":
            x0 = out
        elif prediction == "eps":
            x0 = (x - (1 - abar).sqrt() * out) / abar.sqrt()
        else:  # v
            x0 = abar.sqrt() * x - (1 - abar).sqrt() * out
        x0 = x0.clamp(-1.0, 1.0)
        return x0, (x - abar.sqrt() * x0) / (1 - abar).sqrt()

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
        """``sample_steps`` steps with ``eta``; ``penalty`` (PLE's synthetic sets): ``penalty_steps`` deterministic
        steps, autograd (where it is on) recording the last ``penalty_grad_steps`` only."""
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
                x = self.step(module, weights, x, t, t_prev, eta, generator)
        return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).reshape(n, *self.data_shape)

    def step(self, module, weights, x, t: int, t_prev: int, eta: float, generator) -> torch.Tensor:
        """x_t -> x_{t_prev} (t_prev = -1: the final x_0) by the DDIM update with noise ``eta``."""
        abar = module.alpha_bar[t]
        abar_prev = module.alpha_bar[t_prev] if t_prev >= 0 else torch.ones((), device=x.device)
        x0, eps = self.predict(module, weights, x, t)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).clamp(min=0).sqrt()
        x_prev = abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0 and t_prev >= 0:
            x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x_prev
