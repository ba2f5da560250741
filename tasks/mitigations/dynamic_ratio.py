"""Dr-Fairness (../shared/seeds/003), simplified: give each group back real data as its samples degrade.

Dataset k+1 is model k's samples plus, for each group g, a share r_g of that group's real rows. The rule:
r_g(k+1) = min(1, r0 * FID_g(k) / FID_g(0)), where r0 = loop.real_fraction and FID_g is the per-class FID of the
model's samples: a group whose samples got worse than at generation 0 gets proportionally more real data back; a
group with no samples at all (FID undefined) gets all of its real rows.
"""

from __future__ import annotations

import math

import numpy as np

from tasks.datasets import Dataset
from tasks.mitigations import MITIGATIONS, Mitigation
from tasks.modes import RealFractionSettings
from tasks.scorers.image import ClassifierSettings, ImageScoreSettings
from tasks.seeds import FRESH, derive_seed


def dynamic_shares(start: float, first: dict[str, float] | None, last: dict[str, float]) -> dict[str, float]:
    """r_g for the next dataset from per-group FID now (``last``) and at generation 0 (``first``)."""
    shares = {}
    for group in ("majority", "minority"):
        now = last.get(f"fid_{group}", math.nan)
        base = (first or last).get(f"fid_{group}", math.nan)
        if not math.isfinite(now):
            shares[group] = 1.0
        elif not (math.isfinite(base) and base > 0):
            shares[group] = start
        else:
            shares[group] = float(min(1.0, start * now / base))
    return shares


def dynamic_next_dataset(real: Dataset, synthetic: Dataset, shares: dict[str, float], classes: dict[str, int],
                         seed: int) -> Dataset:
    """Model k's samples plus a share r_g of each group's real rows (a fresh random subset per generation)."""
    rng = np.random.default_rng(seed)
    parts = [synthetic]
    for group, share in shares.items():
        rows = np.flatnonzero(real.label == classes[group])
        take = rng.permutation(rows)[:round(share * len(rows))]
        if len(take):
            parts.append(real.take(np.sort(take)))
    return Dataset.concat(parts)


# The shares follow the per-class FIDs, so everything that decides those decides this lineage's datasets.
@MITIGATIONS.register("dynamic_ratio", settings={"loop": RealFractionSettings, "classifier": ClassifierSettings,
                                                  "score": ImageScoreSettings})
class DynamicRatio(Mitigation):
    """Dr-Fairness, simplified: each class gets back a share of its real rows that grows as its FID does."""

    needs_labels = True

    def __init__(self, context):
        super().__init__(context)
        self.first: dict[str, float] | None = None  # generation 0's metrics, the baseline of every share

    def resume(self, finished):
        self.first = finished[0]["metrics"] if finished else None

    def next_dataset(self, k, current, synthetic, metrics):
        c = self.context
        self.first = self.first or metrics
        shares = dynamic_shares(c.settings["loop"].real_fraction, self.first, metrics)
        data = dynamic_next_dataset(c.real.train, synthetic, shares,
                                    {"majority": c.data.majority, "minority": c.data.minority},
                                    derive_seed(c.seed, k, FRESH))
        return data, {f"real_share_{g}": v for g, v in shares.items()}
