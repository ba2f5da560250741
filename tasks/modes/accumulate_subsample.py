"""Accumulate-subsample (Kazdan et al., ICML 2025, "Collapse or Thrive? Perils and Promises of Synthetic Data in
a Self-Generating World"): the data accumulate (the real rows plus every generation's samples), but each model
trains on a fixed-size random subsample of them, so every generation costs the same compute.

Our reading: dataset k is the accumulated pool (what ``accumulate`` would train on whole) and model k trains on
``loop.subsample_size`` rows of it drawn without replacement, a new draw each generation (seeded per lineage and
generation, so a resumed run draws the same rows). A pool no larger than the subsample is used whole, in order:
generation 0, on the real data alone, is the same as in every other mode.
"""

from __future__ import annotations

import numpy as np
from pydantic import PositiveInt

from models.registry import Settings
from tasks.datasets import Dataset
from tasks.modes import MODES, LoopMode
from tasks.seeds import SUBSAMPLE, derive_seed


class SubsampleSettings(Settings):
    subsample_size: PositiveInt | None = None  # accumulate_subsample: rows each model trains on; null = real rows


def subsample(data: Dataset, size: int, seed: int) -> Dataset:
    """``size`` rows of ``data`` drawn without replacement, in their order; all of them when there are no more."""
    if size >= len(data):
        return data
    return data.take(np.sort(np.random.default_rng(seed).choice(len(data), size, replace=False)))


@MODES.register("accumulate_subsample", settings={"loop": SubsampleSettings})
class AccumulateSubsample(LoopMode):
    """Dataset k plus model k's samples; each model trains on a fixed-size random subsample of its dataset."""

    accumulates = True

    def next_dataset(self, k, current, synthetic):
        return Dataset.concat([current, synthetic])

    def training_rows(self, k, dataset):
        c = self.context
        size = c.settings["loop"].subsample_size or len(c.real.train)
        return subsample(dataset, size, derive_seed(c.seed, k, SUBSAMPLE))
