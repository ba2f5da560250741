"""Group reweighing (Kamiran & Calders 2012): every class carries the same total weight in training."""

from __future__ import annotations

import numpy as np

from models.reweighting import group_weights
from tasks.datasets import Dataset
from tasks.mitigations import MITIGATIONS, Mitigation
from tasks.scorers.image import ClassifierSettings


def groups_of(scorer, data: Dataset) -> np.ndarray:
    """Each row's class: its label where known, the domain classifier's prediction otherwise."""
    labels = data.label.copy()
    unknown = labels < 0
    if unknown.any():
        labels[unknown] = scorer.label(data.pixels[unknown])
    return labels


@MITIGATIONS.register("group", settings={"classifier": ClassifierSettings})
class GroupReweighing(Mitigation):
    """Kamiran & Calders reweighing over the study's classes: true labels for real rows, the domain classifier's
    call for synthetic rows."""

    needs_labels = True

    def training_weights(self, k, dataset):
        weights = group_weights(groups_of(self.context.scorer, dataset))
        return weights, {"weight_max": float(weights.max() / weights.mean())}
