"""The paper's fairness view of unconditional samples: the classifier labels them, giving the minority share,
per-class FID and R_Fair = FID_min / FID_maj (Eq. 1), and Choi et al.'s fairness discrepancy (Eq. 2)."""

from __future__ import annotations

import math

import numpy as np
import torch

from models.fidelity import fairness_ratio, fid_from_features, kid_from_features
from models.reweighting import fairness_discrepancy
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


@IMAGE_METRICS.register("fairness")
class Fairness(ImageMetric):
    """Minority share, per-class FID, R_Fair, fairness discrepancy."""

    order = 20
    columns = (Column("minority_share", headline=True, summary=True, rank=True, better="higher", scale="unit"),
               Column("fid_majority", headline=True, better="lower", scale="log"),
               Column("fid_minority", headline=True, better="lower", scale="log"),
               Column("r_fair", headline=True, summary=True, rank=True, scale="log"),
               Column("kid_majority", better="lower", scale="log"), Column("kid_minority", better="lower", scale="log"),
               Column("majority_share", scale="unit"), Column("fairness_discrepancy", better="lower", scale="log"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        """Per-class FID is strongly biased upward when a class has few samples (its covariance is estimated from
        them), so each class also gets KID, an unbiased estimate of the squared MMD, on the same images; both are
        NaN below ``score.min_class_samples`` generated images of the class."""
        classes = (scorer.majority, scorer.minority)
        features = scorer.features_of(samples)
        enough = {c: (labels == c).sum() >= scorer.min_class_samples for c in classes}
        per_class = {c: fid_from_features(features[torch.as_tensor(labels == c)], scorer.class_reference_features[c])
                     if enough[c] else math.nan for c in classes}
        kid = {c: kid_from_features(features[torch.as_tensor(labels == c)], scorer.class_reference_features[c],
                                    scorer.kid_subset_size, seed)[0] if enough[c] else math.nan for c in classes}
        metrics = {"minority_share": float((labels == scorer.minority).mean()),
                   "majority_share": float((labels == scorer.majority).mean()),
                   "fid_majority": per_class[scorer.majority], "fid_minority": per_class[scorer.minority],
                   "kid_majority": kid[scorer.majority], "kid_minority": kid[scorer.minority]}
        metrics["r_fair"] = fairness_ratio(metrics["fid_majority"], metrics["fid_minority"])
        # Choi et al. Eq. 2: distance of the generated class mix from a balanced reference over the two classes
        metrics["fairness_discrepancy"] = fairness_discrepancy(np.array(classes), labels, list(classes))
        return metrics
