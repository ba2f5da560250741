"""Model families: what a generative model *is*, independent of how it is fitted.

A family builds its torch module, gives the per-sample negative log-likelihood (or its bound) of data, and
samples. Every method takes an optional ``weights`` dict: when given, the module runs with those tensors
through ``torch.func.functional_call`` instead of its own parameters. That is the seam the PLE hypernetwork
uses (it emits weights, the family runs them); MLE simply passes ``None``.

Families are registered by name (``model.family`` in params.yaml). A new family never touches a flow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from models.registry import Registry
from models.vae import VAE

FAMILIES: Registry[type["TorchFamily"]] = Registry("model family")


def sub_weights(weights: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of a module-level weight dict that belong to submodule ``prefix``, renamed for it."""
    if weights is None:
        return None
    cut = len(prefix) + 1
    return {name[cut:]: w for name, w in weights.items() if name.startswith(prefix + ".")}


def run(module: nn.Module, weights: dict[str, torch.Tensor] | None, *args: torch.Tensor) -> torch.Tensor:
    """Call ``module`` with its own parameters, or functionally with ``weights`` (buffers stay the module's)."""
    if weights is None:
        return module(*args)
    return functional_call(module, weights, args, strict=False, tie_weights=False)  # no tied weights here


class TorchFamily:
    """Base of families whose model is a torch.nn.Module trained by gradient descent."""

    name: str = ""
    kind: str = "image"  # which scorer applies: "image" (torch-fidelity) or "scalar" (parameter error)

    def __init__(self, data_shape: tuple[int, ...]):
        self.data_shape = tuple(data_shape)

    def build(self) -> nn.Module:
        raise NotImplementedError

    def nll(self, module: nn.Module, x: torch.Tensor, weights=None) -> torch.Tensor:
        """Per-sample negative log-likelihood (or its upper bound) of x, shape [B]."""
        raise NotImplementedError

    def sample(self, module: nn.Module, n: int, generator: torch.Generator | None = None,
               temperature: float = 1.0, weights=None) -> torch.Tensor:
        """n samples, shape [n, *data_shape]; differentiable in ``weights`` where the family allows."""
        raise NotImplementedError

    def hyper_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the hypernetwork's h1 sees of each data point (default: the point, flattened)."""
        return x.flatten(1)


@FAMILIES.register("vae")
class VAEFamily(TorchFamily):
    """The paper's fully connected VAE with batchnorm and leaky ReLU (§5.1)."""

    name = "vae"
    kind = "image"

    def __init__(self, data_shape, hidden=(128, 128), latent_dim=8, negative_slope=0.2):
        super().__init__(data_shape)
        self.hidden, self.latent_dim, self.negative_slope = list(hidden), int(latent_dim), float(negative_slope)

    def build(self) -> VAE:
        return VAE(prod(self.data_shape), self.hidden, self.latent_dim, self.negative_slope)

    def nll(self, module, x, weights=None):
        return run(module, weights, x.flatten(1))

    def sample(self, module, n, generator=None, temperature=1.0, weights=None):
        device = next(module.parameters()).device
        # The latent prior's temperature is the sampling-bias knob: < 1 cherry-picks typical samples.
        z = torch.randn(n, self.latent_dim, generator=generator, device=device) * temperature
        logits = run(module.decoder, sub_weights(weights, "decoder"), z)
        return torch.sigmoid(logits).reshape(n, *self.data_shape)


@dataclass
class FittedTorchModel:
    """A fitted torch family: the module (and its buffers), plus generated weights when a hypernetwork made them."""

    family: TorchFamily
    module: nn.Module
    weights: dict[str, torch.Tensor] | None = None
    info: dict[str, float] = field(default_factory=dict)  # training summary (final loss, seconds, ...)
    hyper: nn.Module | None = None  # the hypernetwork that emitted ``weights`` (PLE), kept for inspection

    @torch.no_grad()
    def sample(self, n: int, seed: int, temperature: float = 1.0, batch_size: int = 4096) -> np.ndarray:
        self.module.eval()
        device = next(self.module.parameters()).device
        generator = torch.Generator(device=device).manual_seed(seed)
        chunks = [
            self.family.sample(self.module, min(batch_size, n - start), generator, temperature, self.weights)
            for start in range(0, n, batch_size)
        ]
        return torch.cat(chunks).float().cpu().numpy()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to rebuild the model (safetensors-ready: contiguous CPU tensors)."""
        state = dict(self.module.state_dict())
        if self.weights is not None:
            state.update(self.weights)
        return {name: t.detach().cpu().contiguous() for name, t in state.items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> "FittedTorchModel":
        """Restore from :meth:`tensors` (weights go into the module: sampling is then identical)."""
        self.module.load_state_dict(tensors)
        self.weights = None
        return self


import models.scalar  # noqa: E402,F401  (registers the 1-D families: gmm, uniform, gaussian, ...)
