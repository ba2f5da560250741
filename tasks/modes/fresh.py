"""Fresh data (Alemohammad et al. 2023's fresh-data loop): each generation adds real data no model of the lineage
has seen.

Dataset k+1 is model k's samples plus ``round(n_synthetic * f / (1 - f))`` fresh real rows (``f`` =
``loop.real_fraction``). For the 1-D families the fresh rows are new draws from the truth. For image sources they
are the next unused rows of the lineage's fresh-data pool (``data.fresh_pool``: a share of each class of the
training split kept out of dataset 0 when it is drawn), in dataset 0's class mix: generation k takes the k-th
slice of a fixed permutation of each class's pool, so no row is ever drawn twice and a resumed run draws the same
rows. A study whose pool cannot supply ``loop.generations`` slices is refused before any work
(docs/data.md, "Fresh data", tabulates what a pool supports: :func:`generations_supported`).
"""

from __future__ import annotations

import numpy as np

from tasks.datasets import Dataset
from tasks.modes import MODES, LoopMode, RealFractionSettings
from tasks.seeds import FRESH, derive_seed


def fresh_counts(fraction: float, synthetic_size: int | None, data, real) -> tuple[int, dict[int, int]]:
    """(fresh rows per generation, of them per class) for a lineage with ``loop.real_fraction`` ``fraction``,
    ``loop.synthetic_size`` ``synthetic_size``, params section ``data`` and real data ``real``."""
    synthetic = synthetic_size or len(real.train)
    total = round(synthetic * fraction / (1 - fraction))
    if real.num_classes == 0:
        return total, {}
    majority = round(total * float((real.train.label == data.majority).mean()))
    return total, {data.majority: majority, data.minority: total - majority}


def generations_supported(p, real) -> int:
    """How many generations the lineage's fresh-data pool can supply (no limit for the 1-D families' truth)."""
    if real.num_classes == 0:
        return 10 ** 9
    _, per_class = fresh_counts(p.loop.real_fraction, p.loop.synthetic_size, p.data, real)
    pool = real.train_full.label[real.pool_index]
    return min(int((pool == label).sum()) // need if need else 10 ** 9 for label, need in per_class.items())


def pool_slice(real, label: int, per_generation: int, k: int, seed: int) -> np.ndarray:
    """Rows of ``real.train_full`` that generation ``k`` takes from class ``label``'s pool."""
    rows = real.pool_index[real.train_full.label[real.pool_index] == label]
    order = np.random.default_rng([seed, label]).permutation(rows)
    return order[k * per_generation:(k + 1) * per_generation]


@MODES.register("fresh", settings={"loop": RealFractionSettings})
class Fresh(LoopMode):
    """Model k's samples plus real rows no model of the lineage has trained on (``loop.real_fraction`` of dataset
    k+1): new draws from the truth, or the next unused rows of the fresh-data pool (``data.fresh_pool``)."""

    @classmethod
    def data_problem(cls, p, real):
        if real.num_classes == 0:
            return None  # the truth never runs out
        total, per_class = fresh_counts(p.loop.real_fraction, p.loop.synthetic_size, p.data, real)
        if p.data.fresh_pool <= 0:
            return ("data.fresh_pool: the fresh loop needs real images kept out of dataset 0 for its new draws; "
                    f"set data.fresh_pool (a share of each class; {total} fresh rows per generation here)")
        pool = real.train_full.label[real.pool_index]
        for label, need in per_class.items():
            have = int((pool == label).sum())
            if need * p.loop.generations > have:  # generations_supported(p, real) < p.loop.generations
                return (f"data.fresh_pool: {p.loop.generations} generations take {need} fresh images of class {label} "
                        f"each ({need * p.loop.generations} in all), the pool holds {have}: raise data.fresh_pool "
                        f"(now {p.data.fresh_pool:g}), or lower loop.real_fraction or loop.generations")
        return None

    def next_dataset(self, k, current, synthetic):
        c = self.context
        total, per_class = fresh_counts(c.settings["loop"].real_fraction, c.loop.synthetic_size, c.data, c.real)
        if c.family.kind == "scalar":
            rows = Dataset.real(c.family.true_sample(total, derive_seed(c.seed, k, FRESH)), np.full(total, -1),
                                c.real.train.source)
            return Dataset.concat([rows, synthetic])
        seed = derive_seed(c.seed, 0, FRESH)  # one permutation for the whole lineage: slices never overlap
        index = np.concatenate([pool_slice(c.real, label, need, k, seed) for label, need in per_class.items()])
        return Dataset.concat([c.real.train_full.take(np.sort(index)), synthetic])
