"""PLE in closed form, for the 1-D families where the paper derives it."""

from __future__ import annotations

import numpy as np
import torch

from models.estimators import ESTIMATORS, timed
from models.families import FittedTorchModel, TorchFamily


def supports_closed_form(family: type[TorchFamily]) -> str | None:
    return None if family.has_closed_ple else "has no closed-form PLE (only the uniform and Gaussian families do)"


@ESTIMATORS.register("ple_closed")
def fit_ple_closed(family: TorchFamily, x: np.ndarray, *, seed: int, device: torch.device,
                   sample_weight: np.ndarray | None = None) -> FittedTorchModel:
    """PLE in closed form (uniform: (n+1)/n max, App. E.4; Gaussian: the unbiased variance, App. F.3)."""
    if not family.has_closed_ple:
        raise ValueError(f"no closed-form PLE is derived for the {family.name} family")
    if sample_weight is not None:  # the closed forms would drop them: never silently
        raise ValueError(f"the {family.name} family's closed-form PLE takes no per-row weights")
    return timed(family.fit_ple_closed, x, seed=seed, device=device)


fit_ple_closed.supports = supports_closed_form
