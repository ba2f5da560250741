"""The memorisation rate: the share of samples that sit much closer to one real training image than the training
images sit to each other (``models.neighbors.memorisation_rate`` states the rule), on the domain classifier's
features. The training set measured against itself has rate 1."""

from __future__ import annotations

import math

from pydantic import Field

from models.neighbors import memorisation_rate
from models.registry import Settings
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


class MemorisationSettings(Settings):
    # a sample is memorised when d(x, t) <= ratio * d(t, t'): t its nearest training image, t' the training image
    # nearest to t (Carlini et al. 2023 call a generation memorised below 1/3 of the next neighbours' distance)
    ratio: float = Field(1 / 3, gt=0.0, le=1.0)


@IMAGE_METRICS.register("memorisation", settings={"score.memorisation": MemorisationSettings})
class Memorisation(ImageMetric):
    """Share of samples much closer to a real training image than training images are to each other."""

    order = 40
    columns = (Column("memorisation_rate", better="lower", scale="unit"),)

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        if scorer.train is None:
            return {"memorisation_rate": math.nan}
        rate = memorisation_rate(scorer.classifier_features(samples), scorer.classifier_features(scorer.train),
                                 scorer.score_settings.memorisation.ratio)
        return {"memorisation_rate": rate}
