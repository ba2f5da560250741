"""Fit, sample, and make the next generation's dataset."""

from __future__ import annotations

import numpy as np
import torch

from models.estimators import ESTIMATORS
from models.families import FAMILIES, FittedTorchModel, TorchFamily
from tasks import as_task
from tasks.datasets import Dataset
from tasks.params import Params

FIT, SAMPLE, SCORE, FRESH = 0, 1, 2, 3  # independent random streams per generation


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
              device: torch.device, sample_weight: np.ndarray | None = None) -> FittedTorchModel:
    """Train ``family`` on ``data`` with the named estimator (``mle``, ``ple``, ...), optionally weighting rows."""
    return ESTIMATORS.get(estimator)(family, data.pixels, **p.train.model_dump(), **p.ple.model_dump(), seed=seed,
                                     device=device, sample_weight=sample_weight)


def load_model(family: TorchFamily, tensors: dict[str, torch.Tensor], device: torch.device) -> FittedTorchModel:
    return FittedTorchModel(family, family.build().to(device)).load_tensors(
        {k: v.to(device) for k, v in tensors.items()})


def sample_synthetic(model: FittedTorchModel, n: int, seed: int, lineage: str, generation: int, source: str,
                     temperature: float = 1.0) -> Dataset:
    """n samples of ``model`` as a synthetic dataset; ``generation`` is the index of the dataset they enter."""
    return Dataset.synthetic(model.sample(n, seed, temperature), lineage, generation, source)


def synthetic_rows(mode: str, real_rows: int, synthetic_size: int | None, real_fraction: float) -> int:
    """How many samples model k contributes to dataset k+1. ``augment`` keeps every real row and adds as many
    samples as make the real share ``real_fraction``; the other modes add ``loop.synthetic_size`` (default: as
    many as there are real training rows)."""
    if mode == "augment":
        return max(1, round(real_rows * (1 - real_fraction) / real_fraction))
    return synthetic_size or real_rows


def make_next_dataset(mode: str, real: Dataset, current: Dataset, synthetic: Dataset,
                      fresh_real: Dataset | None = None) -> Dataset:
    """Dataset k+1 from the real data (dataset 0), dataset k and model k's samples:

    - ``replace``: the samples alone (the fully synthetic loop; Alemohammad et al. 2023);
    - ``accumulate``: dataset k plus the samples, i.e. the real data and every generation's samples so far
      (Gerstgrasser et al. 2024);
    - ``augment``: the fixed real data plus the newest samples (Bertrand et al. 2024; the sample count sets the
      real fraction, see :func:`synthetic_rows`);
    - ``fresh``: ``fresh_real``, a new draw of real data, plus the newest samples (Alemohammad's fresh-data loop).
    """
    if mode == "replace":
        return synthetic
    if mode == "accumulate":
        return Dataset.concat([current, synthetic])
    if mode == "augment":
        return Dataset.concat([real, synthetic])
    if mode == "fresh":
        if fresh_real is None:
            raise ValueError("mode fresh needs a fresh draw of real data")
        return Dataset.concat([fresh_real, synthetic])
    raise ValueError(f"unknown loop mode {mode!r}")


def fresh_real_rows(real: Dataset, rows: int, seed: int, truth=None) -> Dataset:
    """A new draw of real data: from the true distribution for 1-D families, otherwise a new random subset of the
    real training pool (with replacement only when more rows are asked for than the pool holds)."""
    if truth is not None:
        return Dataset.real(truth.true_sample(rows, seed), np.full(rows, -1), real.source)
    rng = np.random.default_rng(seed)
    return real.take(rng.choice(len(real), rows, replace=rows > len(real)))


fit_model_task = as_task(fit_model)
sample_synthetic_task = as_task(sample_synthetic)
make_next_dataset_task = as_task(make_next_dataset)
