"""FID, KID, precision and recall (torch-fidelity) of the samples against every held-out image of the study's two
classes, with their standard errors (``models.fidelity.fidelity_from_features`` says how each is estimated). FID
and KID weight the reference to the training class mix (R_I : 1), so a perfect model of dataset 0 scores near 0;
precision and recall compare supports and use every reference image."""

from __future__ import annotations

from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


@IMAGE_METRICS.register("fidelity")
class Fidelity(ImageMetric):
    """torch-fidelity's FID, KID (mean and std), precision and recall."""

    order = 10
    columns = (Column("fid", headline=True, summary=True, rank=True, better="lower", scale="log"),
               Column("kid", headline=True, better="lower", scale="log"),
               Column("precision", headline=True, summary=True, better="higher", scale="unit"),
               Column("recall", headline=True, summary=True, rank=True, better="higher", scale="unit"),
               Column("fid_se", scale="log"), Column("precision_se", scale="log"), Column("recall_se", scale="log"),
               Column("kid_std", scale="log"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        # imported when used: validating params imports every plug-in module, and a 1-D study needs no torch-fidelity
        from models.fidelity import fidelity_from_features

        return fidelity_from_features(scorer.features_of(samples), scorer.reference_features,
                                      kid_subset_size=scorer.kid_subset_size, prc_neighborhood=scorer.prc_neighborhood,
                                      seed=seed, bootstrap=scorer.bootstrap, reference_weights=scorer.reference_weights)
