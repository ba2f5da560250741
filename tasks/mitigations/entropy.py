"""Entropy-based selection (Shi et al., NeurIPS 2025, "A Closer Look at Model Collapse: From a
Generalization-to-Memorization Perspective"): the entropy of the training data falls generation after
generation and models turn from generalising to memorising; selecting synthetic samples that keep the entropy
high slows that down.

Our reading: model k draws ``pool`` times as many candidates as its loop mode keeps, and the n kept are chosen
greedily to maximise the Kozachenko-Leonenko 1-NN entropy estimate of the kept set in the domain classifier's
feature space (``models.neighbors.greedy_entropy_subset``). Logged: the estimate (k = 1) of the kept set and of the
first n candidates (what no selection would have kept), and the minority share before and after.
"""

from __future__ import annotations

import math

from pydantic import Field

from models.neighbors import greedy_entropy_subset, knn_entropy
from models.registry import Settings
from tasks.mitigations import MITIGATIONS, Mitigation, kept_rows, selection_info
from tasks.scorers.image import ClassifierSettings


class EntropySettings(Settings):
    pool: float = Field(2.0, ge=1.0)  # candidates drawn per sample kept


@MITIGATIONS.register("entropy", settings={"mitigation.entropy": EntropySettings, "classifier": ClassifierSettings})
class EntropySelection(Mitigation):
    """Keep the samples that greedily maximise the k-NN entropy estimate of what is kept."""

    needs_classifier = True

    def candidates(self, n):
        return math.ceil(n * self.context.settings["mitigation.entropy"].pool)

    def select(self, k, candidates, n):
        scorer = self.context.scorer
        features = scorer.classifier_features(candidates.pixels)
        keep = greedy_entropy_subset(features, n)
        kept = kept_rows(candidates, keep)
        return kept, {**selection_info(scorer, candidates, kept),
                      "entropy_kept": knn_entropy(features[keep], 1),
                      "entropy_unselected": knn_entropy(features[:n], 1)}
