"""Fairness mitigations that reweight the training set (pure numpy / scikit-learn).

* Importance reweighting by density ratio (Choi et al. 2020, "Fair Generative Modeling via Weak Supervision",
  Alg. 1, Eq. 5): a probabilistic classifier c(x) = P(reference | x) between a small, balanced reference set and
  the (biased) training set gives w(x) = gamma * c(x) / (1 - c(x)), gamma = |train| / |reference|, an estimate
  of p_ref(x) / p_train(x). We fit c with balanced class weights, which folds gamma into c (gamma = 1 here) and
  keeps the logistic regression from leaning on the larger set. Its calibration is checked on held-out rows
  (expected calibration error) and, when poor, the classifier is recalibrated (isotonic regression,
  scikit-learn's CalibratedClassifierCV).
* Group reweighing (Kamiran & Calders 2012, as in the Tab-DDPM fairness study): w(x) = (1/G) / P_train(group(x)),
  so every group carries the same total weight.
* The fairness discrepancy of Choi et al. Eq. 2: || p_ref(u) - p_model(u) ||_2 over the sensitive attribute u.

Weights are normalized per batch by the estimators (``models.estimators.weighted_mean``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class DensityRatio:
    """w(x) = c(x) / (1 - c(x)) from a reference-vs-train classifier fitted on balanced classes (gamma = 1)."""

    classifier: object
    ece: float  # held-out expected calibration error of the classifier used
    ece_before: float  # ... and of the raw logistic regression, before any recalibration
    recalibrated: bool
    clip: float

    def weights(self, features: np.ndarray) -> np.ndarray:
        c = np.clip(self.classifier.predict_proba(features)[:, 1], 1e-6, 1 - 1e-6)
        return np.clip(c / (1 - c), 1.0 / self.clip, self.clip)


def fit_density_ratio(reference: np.ndarray, train: np.ndarray, *, seed: int = 0, max_ece: float = 0.05,
                      clip: float = 20.0, holdout: float = 0.3) -> DensityRatio:
    """Fit c(x) on features of the reference (label 1) and training (label 0) rows; recalibrate when the
    held-out ECE exceeds ``max_ece``. Weights are clipped to [1/clip, clip] (a few extreme ratios would
    otherwise carry whole batches)."""
    # imported when used, as in every plug-in module: validating params imports them all, and a 1-D study
    # needs no scikit-learn (0.6 s of start-up)
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = np.concatenate([reference, train])
    y = np.concatenate([np.ones(len(reference)), np.zeros(len(train))])
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=holdout, random_state=seed, stratify=y)
    balance = {0: 0.5 / max((y_fit == 0).mean(), 1e-9), 1: 0.5 / max((y_fit == 1).mean(), 1e-9)}
    # Balanced classes in the fit, so c(x) is the ratio p_ref / (p_ref + p_train) and gamma is 1 ...
    base = LogisticRegression(max_iter=2000, C=1.0, class_weight=balance).fit(x_fit, y_fit)
    # ... and calibration is judged on the same footing: held-out rows reweighted to balanced classes.
    held_weight = np.where(y_held == 1, balance[1], balance[0])
    ece_before = expected_calibration_error(base.predict_proba(x_held)[:, 1], y_held, held_weight)
    classifier, ece, recalibrated = base, ece_before, False
    if ece_before > max_ece:
        classifier = CalibratedClassifierCV(LogisticRegression(max_iter=2000, class_weight=balance),
                                            method="isotonic", cv=3).fit(x_fit, y_fit)
        ece = expected_calibration_error(classifier.predict_proba(x_held)[:, 1], y_held, held_weight)
        recalibrated = True
    return DensityRatio(classifier, ece, ece_before, recalibrated, clip)


def expected_calibration_error(probability: np.ndarray, label: np.ndarray, weight: np.ndarray | None = None,
                               bins: int = 10) -> float:
    """Mean |confidence - frequency| over equal-width probability bins, weighted by each bin's (row) weight."""
    weight = np.ones_like(probability) if weight is None else weight
    which = np.clip(np.digitize(probability, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            w = weight[mask]
            error += w.sum() / weight.sum() * abs(np.average(probability[mask], weights=w)
                                                  - np.average(label[mask], weights=w))
    return float(error)


def group_weights(groups: np.ndarray) -> np.ndarray:
    """Kamiran & Calders reweighing for a single attribute: every group gets the same total weight."""
    values, counts = np.unique(groups, return_counts=True)
    share = dict(zip(values.tolist(), (counts / counts.sum()).tolist()))
    return np.array([1.0 / (len(values) * share[g]) for g in groups.tolist()])


def fairness_discrepancy(reference_groups: np.ndarray, model_groups: np.ndarray, groups: list[int]) -> float:
    """Choi et al. Eq. 2: the L2 distance between the group distributions of the reference and the model."""
    ref = np.array([(reference_groups == g).mean() for g in groups])
    model = np.array([(model_groups == g).mean() for g in groups])
    return float(np.linalg.norm(ref - model))
