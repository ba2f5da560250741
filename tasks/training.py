"""Fit, sample, and make the next generation's dataset."""

from __future__ import annotations

import numpy as np
import torch

from models.estimators import ESTIMATORS
from models.families import FAMILIES, FittedTorchModel, TorchFamily
from tasks import as_task
from tasks.datasets import Dataset
from tasks.params import Params

FIT, SAMPLE, SCORE = 0, 1, 2  # independent random streams per generation


def derive_seed(seed: int, generation: int, stream: int) -> int:
    """A 31-bit seed per (lineage seed, generation, purpose): reproducible, and the streams never collide."""
    return int(np.random.SeedSequence([seed, generation, stream]).generate_state(1)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_family(p: Params, data_shape: tuple[int, ...]) -> TorchFamily:
    return FAMILIES.get(p.model.family)(data_shape, **p.model.family_options())


def fit_model(family: TorchFamily, estimator: str, data: Dataset, p: Params, seed: int,
              device: torch.device) -> FittedTorchModel:
    """Train ``family`` on ``data`` with the named estimator (``mle``, ``ple``, ...)."""
    return ESTIMATORS.get(estimator)(family, data.pixels, **p.train.model_dump(), **p.ple.model_dump(), seed=seed,
                                     device=device)


def load_model(family: TorchFamily, tensors: dict[str, torch.Tensor], device: torch.device) -> FittedTorchModel:
    return FittedTorchModel(family, family.build().to(device)).load_tensors(
        {k: v.to(device) for k, v in tensors.items()})


def sample_synthetic(model: FittedTorchModel, n: int, seed: int, lineage: str, generation: int, source: str,
                     temperature: float = 1.0) -> Dataset:
    """n samples of ``model`` as a synthetic dataset; ``generation`` is the index of the dataset they enter."""
    return Dataset.synthetic(model.sample(n, seed, temperature), lineage, generation, source)


def make_next_dataset(mode: str, real: Dataset, current: Dataset, synthetic: Dataset) -> Dataset:
    """Dataset k+1 from the real data, dataset k and model k's samples. ``replace``: the samples alone (the fully
    synthetic loop of Alemohammad et al. 2023)."""
    if mode == "replace":
        return synthetic
    raise ValueError(f"unknown loop mode {mode!r}")


fit_model_task = as_task(fit_model)
sample_synthetic_task = as_task(sample_synthetic)
make_next_dataset_task = as_task(make_next_dataset)
