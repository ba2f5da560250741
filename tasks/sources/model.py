"""The 1-D families' real data: draws from the family's known true distribution."""

from __future__ import annotations

import numpy as np
from pydantic import PositiveInt

from models.registry import Settings
from tasks.datasets import Dataset
from tasks.sources import SOURCES, Source, SourceSplit


class ModelSourceSettings(Settings):
    size: PositiveInt = 20  # source model: real rows drawn from the family's true distribution (n)


@SOURCES.register("model", settings={"data": ModelSourceSettings})
class TrueDistribution(Source):
    """``data.size`` draws from the 1-D family's truth for training, as many independent ones for the test split;
    no labels."""

    kind = "scalar"

    @classmethod
    def load(cls, data, seed, project_root, family) -> SourceSplit:
        if family is None:
            raise ValueError("data.source model needs the family whose true distribution to draw from")
        none = np.full(data.size, -1)
        return SourceSplit(family.true_sample(data.size, seed), none, family.true_sample(data.size, seed + 1_000_003),
                           none, 0)

    @classmethod
    def draw(cls, data, seed, family) -> Dataset:
        """``data.size`` draws from the truth with the lineage's ``seed``: each seed its own real data."""
        return Dataset.real(family.true_sample(data.size, seed), np.full(data.size, -1), data.source)

    @classmethod
    def size_bound(cls, data):
        return 2 * data.size, (1,), "data.size"
