"""The k-NN (Kozachenko-Leonenko) entropy estimate of the samples in the domain classifier's feature space, in
nats: the diversity measure Shi et al. (NeurIPS 2025) track as self-consuming loops collapse. It depends on the
number of samples (``score.samples``), so compare it at equal sample counts."""

from __future__ import annotations

from pydantic import PositiveInt

from models.neighbors import knn_entropy
from models.registry import Settings
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


class KnnEntropySettings(Settings):
    k: PositiveInt = 3  # the k-th nearest neighbour's distance enters the estimate


@IMAGE_METRICS.register("knn_entropy", settings={"score.knn_entropy": KnnEntropySettings})
class KnnEntropy(ImageMetric):
    """Kozachenko-Leonenko entropy of the samples' classifier features."""

    order = 50
    columns = (Column("knn_entropy", better="higher"),)

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        return {"knn_entropy": knn_entropy(scorer.classifier_features(samples), scorer.score_settings.knn_entropy.k)}
