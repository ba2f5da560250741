"""The paper's fairness view of unconditional samples: the classifier labels them, giving the minority share,
per-class FID and R_Fair = FID_min / FID_maj (Eq. 1), and Choi et al.'s fairness discrepancy (Eq. 2)."""

from __future__ import annotations

import numpy as np

from models.fidelity import fairness_ratio, fid
from models.reweighting import fairness_discrepancy
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


@IMAGE_METRICS.register("fairness")
class Fairness(ImageMetric):
    """Minority share, per-class FID, R_Fair, fairness discrepancy."""

    order = 20
    columns = (Column("minority_share", headline=True, summary=True, rank=True, better="higher"),
               Column("fid_majority", headline=True, better="lower"),
               Column("fid_minority", headline=True, better="lower"),
               Column("r_fair", headline=True, summary=True, rank=True),
               Column("majority_share"), Column("fairness_discrepancy", better="lower"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        classes = (scorer.majority, scorer.minority)
        per_class = {c: fid(samples[labels == c], scorer.class_reference[c], min_samples=scorer.min_class_samples,
                            **scorer.extractor_kwargs) for c in classes}
        metrics = {"minority_share": float((labels == scorer.minority).mean()),
                   "majority_share": float((labels == scorer.majority).mean()),
                   "fid_majority": per_class[scorer.majority], "fid_minority": per_class[scorer.minority]}
        metrics["r_fair"] = fairness_ratio(metrics["fid_majority"], metrics["fid_minority"])
        # Choi et al. Eq. 2: distance of the generated class mix from a balanced reference over the two classes
        metrics["fairness_discrepancy"] = fairness_discrepancy(np.array(classes), labels, list(classes))
        return metrics
