"""Fresh data (Alemohammad et al. 2023's fresh-data loop): a new draw of real data each generation."""

import numpy as np

from tasks.datasets import Dataset
from tasks.modes import MODES, LoopMode, RealFractionSettings
from tasks.seeds import FRESH, derive_seed


def fresh_real_rows(real: Dataset, rows: int, seed: int, truth=None) -> Dataset:
    """A new draw of real data: from the true distribution for 1-D families, otherwise a new random subset of the
    real training pool (with replacement only when more rows are asked for than the pool holds)."""
    if truth is not None:
        return Dataset.real(truth.true_sample(rows, seed), np.full(rows, -1), real.source)
    rng = np.random.default_rng(seed)
    return real.take(rng.choice(len(real), rows, replace=rows > len(real)))


@MODES.register("fresh", settings={"loop": RealFractionSettings})
class Fresh(LoopMode):
    """A new draw of real data plus model k's samples; real rows are ``loop.real_fraction`` of dataset k+1."""

    def next_dataset(self, k, current, synthetic):
        lin = self.lineage
        fraction = lin.params.loop.real_fraction
        truth = lin.family if lin.family.kind == "scalar" else None
        fresh = fresh_real_rows(lin.real.train, round(len(synthetic) * fraction / (1 - fraction)),
                                derive_seed(lin.seed, k, FRESH), truth)
        return Dataset.concat([fresh, synthetic])
