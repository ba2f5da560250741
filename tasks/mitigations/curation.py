"""Curation by K-choice (Ferbach et al., NeurIPS 2024, "Self-Consuming Generative Models with Curated Data Provably
Optimize Human Preferences"): each sample that goes on into dataset k+1 is the one a user picked out of K
candidates, with the Bradley-Terry (generalised to K: Plackett-Luce) choice probability
P(pick i) = exp(beta r(x_i)) / sum_j exp(beta r(x_j)) under a reward r.

Our reading: model k draws n * K candidates, split at random into n groups of K; one sample is drawn from each
group by that rule. The reward (``mitigation.curation.reward``) is the domain classifier's confidence (its largest
softmax probability: the user prefers clear digits), or its probability of the study's minority or majority class
(a user with a taste for one class). The paper proves the loop then maximises the expected reward, and warns that
it can collapse onto what the reward favours: the minority share before and after curation is logged each
generation (``minority_share_candidates``, ``minority_share_kept``), with the mean reward of both.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, PositiveFloat

from models.registry import Settings
from tasks.mitigations import MITIGATIONS, Mitigation, kept_rows, selection_info
from tasks.scorers.image import ClassifierSettings
from tasks.seeds import SELECT, derive_seed


class CurationSettings(Settings):
    k: int = Field(4, ge=2)  # candidates per choice
    beta: PositiveFloat = 10.0  # reward scale in the choice probabilities (large: the best of K, nearly always)
    reward: Literal["confidence", "minority", "majority"] = "confidence"


def class_probabilities(classifier, pixels: np.ndarray, batch_size: int = 2048) -> np.ndarray:
    """The domain classifier's softmax probabilities, [N, classes]."""
    device = next(classifier.parameters()).device
    with torch.no_grad():
        out = [torch.softmax(classifier(torch.as_tensor(pixels[i:i + batch_size], dtype=torch.float32,
                                                        device=device)), 1).cpu()
               for i in range(0, len(pixels), batch_size)]
    return torch.cat(out).numpy().astype(np.float64)


def k_choice(rewards: np.ndarray, k: int, beta: float, seed: int) -> np.ndarray:
    """One index from each of len(rewards) // k random groups of k, drawn with probability softmax(beta * reward)
    within its group (Bradley-Terry / Plackett-Luce choice)."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(len(rewards))[:len(rewards) // k * k].reshape(-1, k)
    logits = beta * rewards[groups]
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    picks = (rng.random((len(groups), 1)) > np.cumsum(p, axis=1)).sum(axis=1)  # inverse-CDF draw per group
    return groups[np.arange(len(groups)), np.minimum(picks, k - 1)]


@MITIGATIONS.register("curation", settings={"mitigation.curation": CurationSettings, "classifier": ClassifierSettings})
class Curation(Mitigation):
    """Each kept sample is a Bradley-Terry pick out of K of model k's samples under a classifier reward."""

    needs_classifier = True

    def __init__(self, context):
        super().__init__(context)
        self.settings = context.settings["mitigation.curation"]

    def candidates(self, n):
        return n * self.settings.k

    def _rewards(self, pixels: np.ndarray) -> np.ndarray:
        probabilities = class_probabilities(self.context.scorer.classifier, pixels)
        reward = self.settings.reward
        if reward == "confidence":
            return probabilities.max(axis=1)
        return probabilities[:, getattr(self.context.data, reward)]

    def select(self, k, candidates, n):
        s = self.settings
        rewards = self._rewards(candidates.pixels)
        keep = k_choice(rewards, s.k, s.beta, derive_seed(self.context.seed, k, SELECT))[:n]
        kept = kept_rows(candidates, keep)
        return kept, {**selection_info(self.context.scorer, candidates, kept),
                      "curation_reward_kept": float(rewards[keep].mean()),
                      "curation_reward_all": float(rewards.mean())}
