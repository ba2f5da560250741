"""Importance reweighting (Choi et al. 2020): weight each training row by an estimated density ratio between a
small balanced real reference set and dataset k (see ``models.reweighting``)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, PositiveInt

from models.registry import Settings
from models.reweighting import fit_density_ratio
from tasks.datasets import Dataset
from tasks.mitigations import MITIGATIONS, Mitigation
from tasks.scorers.image import ClassifierSettings


class ImportanceSettings(Settings):
    reference_per_class: PositiveInt = 30  # balanced real reference set: rows per study class
    max_ece: float = Field(0.05, gt=0.0)  # recalibrate the density-ratio classifier above this held-out ECE
    weight_clip: float = Field(20.0, gt=1.0)  # importance weights clipped to [1/clip, clip]


def features(scorer, data: Dataset, batch_size: int = 2048) -> np.ndarray:
    """The domain classifier's penultimate features of every row (what the density-ratio classifier sees)."""
    model = scorer.classifier
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = torch.as_tensor(data.pixels[start:start + batch_size], dtype=torch.float32, device=device)
            out.append(model.features(x).cpu().numpy())
    return np.concatenate(out)


def reference_set(real_pool: Dataset, classes: list[int], per_class: int, seed: int) -> Dataset:
    """A small balanced set of real rows: ``per_class`` of each study class (fewer if a class has fewer)."""
    rng = np.random.default_rng([seed, 3])
    idx = np.concatenate([rng.permutation(np.flatnonzero(real_pool.label == c))[:per_class] for c in classes])
    return real_pool.take(np.sort(idx))


@MITIGATIONS.register("importance", settings={"mitigation.importance": ImportanceSettings,
                                               "classifier": ClassifierSettings})
class Importance(Mitigation):
    """Choi et al. 2020: a logistic-regression classifier on the domain classifier's features tells a small
    balanced real reference set from dataset k; w(x) = c(x) / (1 - c(x)), recalibrated (isotonic) when its
    held-out calibration error exceeds ``max_ece``."""

    needs_labels = True

    def __init__(self, context):
        super().__init__(context)
        self.settings = context.settings["mitigation.importance"]
        # drawn from the study's split with the study's seed: every lineage of the study weighs against the same set
        self.reference = reference_set(context.real.train_full, [context.data.majority, context.data.minority],
                                       self.settings.reference_per_class, context.study_seed)

    def training_weights(self, k, dataset):
        scorer, s = self.context.scorer, self.settings
        ratio = fit_density_ratio(features(scorer, self.reference), features(scorer, dataset),
                                  seed=self.context.seed + k, max_ece=s.max_ece, clip=s.weight_clip)
        weights = ratio.weights(features(scorer, dataset))
        return weights, {"importance_ece": ratio.ece, "importance_ece_before": ratio.ece_before,
                         "importance_recalibrated": float(ratio.recalibrated),
                         "weight_max": float(weights.max() / weights.mean())}
