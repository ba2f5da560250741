"""The paper's fairness view of unconditional samples, and versions of it that do not confound fairness with
sample size.

The classifier labels the samples: the minority share and count, per-class FID and R_Fair = FID_min / FID_maj
(paper Eq. 1, S = 1/FID), Choi et al.'s fairness discrepancy (Eq. 2). Each class is compared with its reference:
its held-out images plus the training images of the class the lineage never trains on (``ImageScorer.
for_lineage``: at R_I = 10 on mnist5k about 460 minority images, not 100).

Per-class FID is biased upward when a class has few images, and the models generate few minority images, so the
paper's R_Fair measures sample size as much as fairness. Two measures that do not:

- ``r_fair_kid`` = KID_min / KID_maj. KID is an unbiased estimate of the squared MMD at any sample size (defined
  from 2 images of a class). Its standard error ``r_fair_kid_se`` is a half-sampling one: the ratio recomputed on
  ``score.fairness_resamples`` random halves of each class's images (each KID over 10 subsets, not 100: a tenth of
  the cost, and subset noise that can only widen the estimate), whose spread estimates the full sample's
  (Var at n ≈ Var at n/2 · (n/2) / (n - n/2), the subsampling bootstrap's rule for a smooth statistic). Reports
  divide it by its value at R_I = 1, where the classes differ only intrinsically.
- ``r_fair_matched`` = FID_min / FID_maj with both classes at one matched count, ``match_count`` = the smallest
  of the two generated counts and dataset 0's minority count; beside each, ``fid_floor_*``, the FID of as many of
  dataset 0's real images of the class against the same reference: what a perfect model of dataset 0 scores at
  that count, the sample-size floor.

A class with too few images is reported as such (``minority_count``), never silently dropped: a measure that
cannot be computed is NaN and the reports count the seeds where it is. ``label_agreement`` is the share of the
samples on which a second, independently trained labeller (another architecture and seed) agrees.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.classifier import predict
from models.reweighting import fairness_discrepancy
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


def kid_ratio(minority: torch.Tensor, majority: torch.Tensor, references: tuple[torch.Tensor, torch.Tensor],
              subset_size: int, seed: int, subsets: int = 100) -> float:
    """KID of the minority's images over KID of the majority's, each against its class reference; NaN when
    either class has fewer than 2 images or the majority's KID is not positive."""
    # models.fidelity (torch-fidelity, torchvision: 1.2 s) is imported when used: validating params imports every
    # plug-in module, and a 1-D study needs none of it
    from models.fidelity import kid_from_features

    kid_min = kid_from_features(minority, references[0], subset_size, seed, subsets)[0]
    kid_maj = kid_from_features(majority, references[1], subset_size, seed, subsets)[0]
    return kid_min / kid_maj if kid_maj > 0 and math.isfinite(kid_min) else math.nan


# KID subsets per half-sample (torch-fidelity's default is 100): the half-samples' spread is the standard error's
# estimate, and ten subsets keep a half-sample's own subset noise well below it at a tenth of the cost.
HALF_SAMPLE_SUBSETS = 10


def half_sample_se(minority: torch.Tensor, majority: torch.Tensor, references, subset_size: int, seed: int,
                   resamples: int) -> float:
    """The half-sampling standard error of :func:`kid_ratio` (module docstring)."""
    if resamples < 2 or min(len(minority), len(majority)) < 4:
        return math.nan
    rng = np.random.default_rng([seed, 7])
    values = []
    for i in range(resamples):
        pick_min = torch.as_tensor(rng.permutation(len(minority))[:len(minority) // 2])
        pick_maj = torch.as_tensor(rng.permutation(len(majority))[:len(majority) // 2])
        values.append(kid_ratio(minority[pick_min], majority[pick_maj], references, subset_size, seed + i + 1,
                                subsets=HALF_SAMPLE_SUBSETS))
    values = np.array(values)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return math.nan
    half = len(minority) // 2
    return float(values.std(ddof=1) * math.sqrt(half / (len(minority) - half)))


def matched_fid(features: torch.Tensor, reference: torch.Tensor, count: int, rng: np.random.Generator) -> float:
    """FID of ``count`` random rows of ``features`` against ``reference``."""
    from models.fidelity import fid_from_features

    pick = torch.as_tensor(rng.permutation(len(features))[:count])
    return fid_from_features(features[pick], reference)


@IMAGE_METRICS.register("fairness")
class Fairness(ImageMetric):
    """Minority share and count, per-class FID and KID against each class's reference, R_Fair (the paper's),
    the KID-based and the matched-count R_Fair with their floors, the fairness discrepancy, the labellers'
    agreement."""

    order = 20
    columns = (Column("minority_share", headline=True, summary=True, rank=True, better="higher", scale="unit"),
               Column("fid_majority", headline=True, better="lower", scale="log"),
               Column("fid_minority", headline=True, better="lower", scale="log"),
               Column("r_fair", headline=True, summary=True, rank=True, scale="log"),
               Column("r_fair_kid", headline=True, summary=True, scale="log"), Column("r_fair_kid_se", scale="log"),
               Column("r_fair_matched", headline=True, scale="log"),
               Column("kid_majority", better="lower", scale="log"), Column("kid_minority", better="lower", scale="log"),
               Column("fid_majority_matched", better="lower", scale="log"),
               Column("fid_minority_matched", better="lower", scale="log"),
               Column("fid_floor_majority", scale="log"), Column("fid_floor_minority", scale="log"),
               Column("minority_count"), Column("majority_count"), Column("match_count"),
               Column("reference_size_majority"), Column("reference_size_minority"),
               Column("majority_share", scale="unit"), Column("fairness_discrepancy", better="lower", scale="log"),
               Column("label_agreement", scale="unit"), Column("minority_share_check", scale="unit"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        from models.fidelity import fairness_ratio, fid_from_features, kid_from_features

        majority, minority = scorer.majority, scorer.minority
        features = scorer.features_of(samples)
        by_class = {c: features[torch.as_tensor(labels == c)] for c in (majority, minority)}
        counts = {c: len(by_class[c]) for c in by_class}
        reference = scorer.class_reference_features
        enough = {c: counts[c] >= scorer.min_class_samples for c in by_class}
        fid = {c: fid_from_features(by_class[c], reference[c]) if enough[c] else math.nan for c in by_class}
        kid = {c: kid_from_features(by_class[c], reference[c], scorer.kid_subset_size, seed)[0] for c in by_class}
        metrics = {"minority_share": float((labels == minority).mean()),
                   "majority_share": float((labels == majority).mean()),
                   "minority_count": float(counts[minority]), "majority_count": float(counts[majority]),
                   "reference_size_majority": float(len(reference[majority])),
                   "reference_size_minority": float(len(reference[minority])),
                   "fid_majority": fid[majority], "fid_minority": fid[minority],
                   "kid_majority": kid[majority], "kid_minority": kid[minority],
                   "r_fair": fairness_ratio(fid[majority], fid[minority])}
        refs = (reference[minority], reference[majority])
        metrics["r_fair_kid"] = kid[minority] / kid[majority] if kid[majority] > 0 and math.isfinite(
            kid[minority]) else math.nan  # kid_ratio, from the KIDs above
        metrics["r_fair_kid_se"] = half_sample_se(by_class[minority], by_class[majority], refs,
                                                  scorer.kid_subset_size, seed, scorer.fairness_resamples)
        metrics.update(cls.matched(scorer, by_class, seed))
        # Choi et al. Eq. 2: distance of the generated class mix from a balanced reference over the two classes
        metrics["fairness_discrepancy"] = fairness_discrepancy(np.array([majority, minority]), labels,
                                                               [majority, minority])
        if scorer.check_classifier is not None:
            check = predict(scorer.check_classifier, samples)
            metrics["label_agreement"] = float((check == labels).mean())
            metrics["minority_share_check"] = float((check == minority).mean())
        else:
            metrics["label_agreement"] = metrics["minority_share_check"] = math.nan
        return metrics

    @staticmethod
    def matched(scorer, by_class: dict[int, torch.Tensor], seed: int) -> dict[str, float]:
        """Both classes' FID at one count, with the real floor at that count (module docstring)."""
        from models.fidelity import fairness_ratio

        majority, minority = scorer.majority, scorer.minority
        own = scorer.train_class_features or {}
        count = min(len(by_class[majority]), len(by_class[minority]),
                    len(own.get(minority, ())) if own else len(by_class[minority]))
        out = {"match_count": float(count)}
        names = ("fid_majority_matched", "fid_minority_matched", "fid_floor_majority", "fid_floor_minority",
                 "r_fair_matched")
        if count < scorer.min_class_samples:
            return {**out, **{name: math.nan for name in names}}
        rng = np.random.default_rng([seed, 11])
        reference = scorer.class_reference_features
        for name, c in (("majority", majority), ("minority", minority)):
            out[f"fid_{name}_matched"] = matched_fid(by_class[c], reference[c], count, rng)
            out[f"fid_floor_{name}"] = matched_fid(own[c], reference[c], count, rng) if own else math.nan
        out["r_fair_matched"] = fairness_ratio(out["fid_majority_matched"], out["fid_minority_matched"])
        return out
