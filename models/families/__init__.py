"""Model families: what a generative model *is*, independent of how it is fitted.

A family builds its torch module, gives the per-sample negative log-likelihood (or the loss that stands in for
it) of data, and samples. Every method takes an optional ``weights`` dict: when given, the module runs with those
tensors through ``torch.func.functional_call`` instead of its own parameters. That is the seam the PLE
hypernetwork uses (it emits weights, the family runs them); MLE simply passes ``None``.

Hooks with defaults that every family but one or two leaves alone: ``trained_parameters`` (what the estimators'
objective trains and the hypernetwork emits; a GAN: its generator's), ``auxiliary_step`` (a step before each
training step; a GAN: its discriminator's), ``nll_units`` (what PLE divides the NLL by), ``held_out_scores``
(extra per-family metrics of held-out real images the image scorer records; a flow: bits per dimension) and
``training_recipe`` (what the gradient estimators add to plain Adam for this family: a learning-rate decay, a
weight average to sample with, early stopping on held-out rows, Adam's betas; :class:`TrainingRecipe`).

``sample(..., penalty=True)`` is how PLE's penalty asks for its synthetic sets: a family may sample more cheaply
there (the diffusion model: a few DDIM steps); everything else (scoring, the next dataset) samples with
``penalty=False``, the family's own sampler. Nothing depends on the autograd mode.

A family is registered by name (``model.family`` in params.yaml) with its settings, which live at
``model.<name>`` in params::

    @FAMILIES.register("vae", settings={"model.vae": VAESettings})
    class VAEFamily(TorchFamily):
        def __init__(self, data_shape, settings: VAESettings): ...

Each module of this package is one family (or a group of closely related ones) and is found on first lookup;
a new family is one new file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from models.registry import Registry, Settings

FAMILIES: Registry[type["TorchFamily"]] = Registry("model family", package="models.families")


def sub_weights(weights: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    """The entries of a module-level weight dict that belong to submodule ``prefix``, renamed for it."""
    if weights is None:
        return None
    cut = len(prefix) + 1
    return {name[cut:]: w for name, w in weights.items() if name.startswith(prefix + ".")}


def run(module: nn.Module, weights: dict[str, torch.Tensor] | None, *args: torch.Tensor, **kwargs) -> torch.Tensor:
    """Call ``module`` with its own parameters, or functionally with ``weights`` (buffers, and parameters
    ``weights`` does not name, stay the module's)."""
    if weights is None:
        return module(*args, **kwargs)
    return functional_call(module, weights, args, kwargs, strict=False, tie_weights=False)  # no tied weights here


@dataclass(frozen=True)
class TrainingRecipe:
    """What the gradient estimators (``mle``, ``ple``, ``hyper_nopenalty``) add to Adam at ``train.lr`` over
    ``train.epochs`` for one family; every estimator applies it alike, so estimators are compared under one recipe.
    Its values come from the family's settings (their one home, so they are in the resume hash); the default adds
    nothing. ``models.estimators.FamilyOptimizer`` applies it."""

    lr: float | None = None  # Adam's learning rate for this family; None: the estimator's (train.lr)
    betas: tuple[float, float] = (0.9, 0.999)  # Adam's (beta1, beta2) for the trained parameters
    lr_decay: str = "constant"  # constant | cosine: from the learning rate to 0 over the fit's steps (Loshchilov &
    # Hutter 2017)
    ema_decay: float | None = None  # fitted weights: an exponential moving average of the trained ones; None: the last
    holdout: float = 0.0  # share of the training rows held out to stop early on their NLL; 0: no early stopping
    patience: int = 0  # epochs without a better held-out NLL before stopping (the best weights are restored)
    check_every: int = 1  # epochs between held-out checks

    def __post_init__(self):
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay: constant or cosine, got {self.lr_decay!r}")

    @property
    def plain(self) -> bool:
        """Nothing added: Adam at the estimator's learning rate with its default betas, the last weights."""
        return (self.lr is None and tuple(self.betas) == (0.9, 0.999) and self.lr_decay == "constant"
                and self.ema_decay is None and self.holdout <= 0)


AuxiliaryStep = Callable[[torch.Tensor, "dict[str, torch.Tensor] | None", "torch.Tensor | None"], None]


class TorchFamily:
    """Base of families whose model is a torch.nn.Module trained by gradient descent."""

    name: str = ""
    kind: str = "image"  # which scorer applies: "image" (torch-fidelity) or "scalar" (parameter error)
    has_closed_ple = False  # a closed-form PLE exists (estimator ple_closed)

    def __init__(self, data_shape: tuple[int, ...], settings: Settings | None = None):
        self.data_shape = tuple(data_shape)
        self.settings = settings

    def build(self) -> nn.Module:
        raise NotImplementedError

    def nll(self, module: nn.Module, x: torch.Tensor, weights=None) -> torch.Tensor:
        """Per-sample negative log-likelihood (or its upper bound) of x, shape [B]."""
        raise NotImplementedError

    def sample(self, module: nn.Module, n: int, generator: torch.Generator | None = None,
               temperature: float = 1.0, weights=None, penalty: bool = False) -> torch.Tensor:
        """n samples, shape [n, *data_shape]; differentiable in ``weights`` where the family allows. ``penalty``:
        the synthetic sets of PLE's penalty, which a family may draw with a cheaper sampler (module docstring)."""
        raise NotImplementedError

    def hyper_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the hypernetwork's h1 sees of each data point (default: the point, flattened)."""
        return x.flatten(1)

    # --- hooks with defaults (see the module docstring) ---

    held_out_columns: dict[str, str] = {}  # extra metrics of held_out_scores: name -> "lower" / "higher" is better

    def trained_parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the estimators train through :meth:`nll` (MLE's optimizer, the weights PLE's hypernetwork
        emits), by their names in ``module``: all of them, unless part of the model trains otherwise."""
        return dict(module.named_parameters())

    def auxiliary_step(self, module: nn.Module, lr: float, device: torch.device) -> AuxiliaryStep | None:
        """A step each estimator runs before every training step, or None (the default): a GAN's discriminator
        update. Called as ``step(batch, weights, batch_weight)`` with the weights the model runs with now (None
        for MLE, H(X) for the hypernetwork estimators) and the batch's sample weights (or None)."""
        return None

    def nll_units(self) -> float:
        """What PLE divides the per-sample NLL by, so its first term is per unit like the penalty: the data
        dimensions (a loss that is per image already, a GAN's generator loss, returns 1)."""
        return float(prod(self.data_shape))

    def held_out_scores(self, module: nn.Module, weights, x: torch.Tensor, seed: int) -> dict[str, float]:
        """Extra metrics of held-out real images x (columns :attr:`held_out_columns`); none by default."""
        return {}

    def training_recipe(self) -> TrainingRecipe:
        """What the gradient estimators add to plain Adam for this family (:class:`TrainingRecipe`); nothing by
        default."""
        return TrainingRecipe()


def build_family(name: str, data_shape: tuple[int, ...], model_section) -> TorchFamily:
    """The named family for data of ``data_shape``, with its settings read from params' ``model`` section."""
    entry = FAMILIES.entry(name)
    (path, cls), = entry.settings.items() or [(None, None)]
    settings = None if cls is None else getattr(model_section, path.split(".", 1)[1])
    return entry.obj(data_shape, settings)


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
