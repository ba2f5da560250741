"""Verification filter (Feng et al., ICLR 2025, "Beyond Model Collapse: Scaling Up with Synthesized Data Requires
Verification"; Yi et al., ICLR 2026, "Escaping Model Collapse via Synthetic Data Verification"): a verifier scores
each of model k's samples and only the top-scoring share goes on into dataset k+1.

Our reading, for unconditional images: model k draws ceil(n / keep) candidates, the verifier scores them, and the
n best (the top ``keep`` quantile) are kept. Two verifiers (``mitigation.verify.verifier``):

- ``classifier``: the domain classifier's confidence, its largest softmax probability over all classes (a sample
  the classifier reads as a clear digit passes). Its accuracy is the classifier's on the held-out real test split.
- ``discriminator``: a real-vs-synthetic discriminator trained afresh each generation, as in Yi et al.: a logistic
  regression on the domain classifier's features (``ImageScorer.classifier_features``) telling the real training
  rows (dataset 0) from the candidates; the score is P(real). It is cross-fitted (two folds: each candidate is
  scored by the half of the discriminator that did not see it), and its accuracy is the balanced accuracy of
  those held-out calls (0.5: it cannot tell the samples from real images).

Logged per generation: ``acceptance_rate``, ``verifier_accuracy``, the mean score of kept and of all candidates,
and the minority share before and after the filter.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from models.registry import Settings
from tasks.mitigations import MITIGATIONS, Mitigation, kept_rows, selection_info
from tasks.scorers.image import ClassifierSettings, accuracy
from tasks.seeds import SELECT, derive_seed


class VerifySettings(Settings):
    keep: float = Field(0.5, gt=0.0, le=1.0)  # share of candidates kept (the top quantile of the verifier's score)
    verifier: Literal["classifier", "discriminator"] = "discriminator"


def confidence(classifier, pixels: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """The domain classifier's largest softmax probability for each image."""
    device = next(classifier.parameters()).device
    with torch.no_grad():
        out = [torch.softmax(classifier(torch.as_tensor(pixels[i:i + batch_size], dtype=torch.float32,
                                                        device=device)), 1).amax(1).cpu()
               for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def discriminator_scores(real: np.ndarray, synthetic: np.ndarray, seed: int,
                         folds: int = 2) -> tuple[np.ndarray, float]:
    """Cross-fitted P(real) of each synthetic row from logistic regressions on real vs synthetic features (balanced
    classes), and the balanced accuracy of the held-out calls over both sets."""
    # imported when used, as in every plug-in module: validating params imports them all, and a 1-D study
    # needs no scikit-learn (0.6 s of start-up)
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    x = np.concatenate([real, synthetic])
    y = np.r_[np.ones(len(real)), np.zeros(len(synthetic))]
    p_real = np.zeros(len(x))
    for fit_rows, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y):
        model = LogisticRegression(max_iter=2000, class_weight="balanced").fit(x[fit_rows], y[fit_rows])
        p_real[held] = model.predict_proba(x[held])[:, 1]
    return p_real[len(real):], float(balanced_accuracy_score(y, p_real > 0.5))


def top_quantile(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` highest scores (ties: the earlier drawn)."""
    return np.argsort(-scores, kind="stable")[:n]


@MITIGATIONS.register("verify", settings={"mitigation.verify": VerifySettings, "classifier": ClassifierSettings})
class Verify(Mitigation):
    """Keep the top ``keep`` share of model k's samples by a verifier's score (classifier confidence or a
    real-vs-synthetic discriminator)."""

    needs_classifier = True

    def __init__(self, context):
        super().__init__(context)
        self.settings = context.settings["mitigation.verify"]
        self._classifier_accuracy: float | None = None

    def candidates(self, n):
        return math.ceil(n / self.settings.keep)

    def select(self, k, candidates, n):
        scorer = self.context.scorer
        if self.settings.verifier == "classifier":
            scores = confidence(scorer.classifier, candidates.pixels)
            if self._classifier_accuracy is None:
                self._classifier_accuracy = accuracy(scorer.classifier, self.context.real.test)
            verifier_accuracy = self._classifier_accuracy
        else:
            real = scorer.classifier_features(self.context.real.train.pixels)
            scores, verifier_accuracy = discriminator_scores(real, scorer.classifier_features(candidates.pixels),
                                                             derive_seed(self.context.seed, k, SELECT))
        keep = top_quantile(scores, n)
        kept = kept_rows(candidates, keep)
        return kept, {**selection_info(scorer, candidates, kept), "verifier_accuracy": verifier_accuracy,
                      "verifier_score_kept": float(scores[keep].mean()), "verifier_score_all": float(scores.mean())}

