"""Density and coverage (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models"),
computed with the authors' ``prdc`` package on the domain classifier's features.

Density counts how many real k-NN balls each sample falls in (divided by k, averaged; about 1 when samples match
the real distribution, above 1 when they crowd its dense regions); coverage is the share of real rows whose k-NN
ball holds at least one sample. The real set is the scorer's held-out reference; like precision and recall
(``models.fidelity``), the two sets are compared at equal size, on a random subset of the samples as large as
the reference, since k-NN radii shrink as a set grows.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from pydantic import PositiveInt

from models.registry import Settings
from tasks.metrics import IMAGE_METRICS, ImageMetric
from tasks.scorers import Column


class DensityCoverageSettings(Settings):
    nearest_k: PositiveInt = 5  # k of the real k-NN balls (Naeem et al.: 5)


@IMAGE_METRICS.register("density_coverage", settings={"score.density_coverage": DensityCoverageSettings})
class DensityCoverage(ImageMetric):
    """Naeem et al.'s density and coverage of the samples against the held-out reference (prdc)."""

    order = 30
    columns = (Column("density", better="higher", scale="log"), Column("coverage", better="higher", scale="unit"))

    @classmethod
    def compute(cls, scorer, samples, labels, seed):
        # imported when used: validating params imports every plug-in module, and a 1-D study needs no prdc (it
        # imports scikit-learn: 0.3 s)
        from prdc import compute_prdc

        real = scorer.classifier_features(scorer.reference)
        subset = np.random.default_rng(seed).permutation(len(samples))[:len(real)]
        k = min(scorer.score_settings.density_coverage.nearest_k, len(real) - 1, len(subset) - 1)
        with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes on every call
            values = compute_prdc(real, scorer.classifier_features(samples[subset]), k)
        return {"density": float(values["density"]), "coverage": float(values["coverage"])}
