"""FID, KID, precision and recall (torch-fidelity) of the samples against the held-out reference."""

from __future__ import annotations

from models.fidelity import image_metrics
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


@IMAGE_METRICS.register("fidelity")
class Fidelity(ImageMetric):
    """torch-fidelity's FID, KID (mean and std), precision and recall."""

    order = 10
    columns = (Column("fid", headline=True, summary=True, rank=True, better="lower"),
               Column("kid", headline=True, better="lower"),
               Column("precision", headline=True, summary=True, better="higher"),
               Column("recall", headline=True, summary=True, rank=True, better="higher"),
               Column("kid_std"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        return image_metrics(samples, scorer.reference, kid_subset_size=scorer.kid_subset_size,
                             prc_neighborhood=scorer.prc_neighborhood, seed=seed, **scorer.extractor_kwargs)
