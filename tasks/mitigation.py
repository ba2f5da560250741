"""Fairness mitigations applied per generation: the weights a lineage trains with, and the dynamic real/synthetic
mix. Usable with any estimator (MLE and PLE both take per-row weights).

- ``importance``: Choi et al. 2020. A logistic-regression classifier on the domain classifier's features tells
  a small balanced real reference set from dataset k; w(x) = c(x) / (1 - c(x)) (see ``models.reweighting``).
- ``group``: Kamiran & Calders reweighing over the study's classes: true labels for real rows, the domain
  classifier's call for synthetic rows.
- ``dynamic_ratio``: Dr-Fairness (../shared/seeds/003), simplified. Dataset k+1 is model k's samples plus, for
  each group g, a share r_g of that group's real rows. The rule: r_g(k+1) = min(1, r0 * FID_g(k) / FID_g(0)),
  where r0 = loop.real_fraction and FID_g is the per-class FID of the model's samples: a group whose samples got
  worse than at generation 0 gets proportionally more real data back; a group with no samples at all (FID
  undefined) gets all of its real rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.reweighting import fairness_discrepancy, fit_density_ratio, group_weights
from tasks.datasets import Dataset


def features(scorer, data: Dataset, batch_size: int = 2048) -> np.ndarray:
    """The domain classifier's penultimate features of every row (what the density-ratio classifier sees)."""
    model = scorer.classifier
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            x = torch.as_tensor(data.pixels[start:start + batch_size], dtype=torch.float32, device=device)
            out.append(model.features(x).cpu().numpy())
    return np.concatenate(out)


def groups_of(scorer, data: Dataset) -> np.ndarray:
    """Each row's class: its label where known, the domain classifier's prediction otherwise."""
    labels = data.label.copy()
    unknown = labels < 0
    if unknown.any():
        labels[unknown] = scorer.label(data.pixels[unknown])
    return labels


def reference_set(real_pool: Dataset, classes: list[int], per_class: int, seed: int) -> Dataset:
    """A small balanced set of real rows: ``per_class`` of each study class (fewer if a class has fewer)."""
    rng = np.random.default_rng([seed, 3])
    idx = np.concatenate([rng.permutation(np.flatnonzero(real_pool.label == c))[:per_class] for c in classes])
    return real_pool.take(np.sort(idx))


def training_weights(mitigation: str, scorer, dataset: Dataset, reference: Dataset | None, *, max_ece: float,
                     weight_clip: float, seed: int) -> tuple[np.ndarray | None, dict[str, float]]:
    """Per-row weights for training on ``dataset`` and what to log about them."""
    if mitigation in ("none", "dynamic_ratio"):
        return None, {}
    if mitigation == "group":
        weights = group_weights(groups_of(scorer, dataset))
        return weights, {"weight_max": float(weights.max() / weights.mean())}
    if mitigation == "importance":
        ratio = fit_density_ratio(features(scorer, reference), features(scorer, dataset), seed=seed,
                                  max_ece=max_ece, clip=weight_clip)
        weights = ratio.weights(features(scorer, dataset))
        return weights, {"importance_ece": ratio.ece, "importance_ece_before": ratio.ece_before,
                         "importance_recalibrated": float(ratio.recalibrated),
                         "weight_max": float(weights.max() / weights.mean())}
    raise ValueError(f"unknown mitigation {mitigation!r}")


def dynamic_shares(start: float, first: dict[str, float] | None, last: dict[str, float]) -> dict[str, float]:
    """r_g for the next dataset from per-group FID now (``last``) and at generation 0 (``first``)."""
    shares = {}
    for group in ("majority", "minority"):
        now = last.get(f"fid_{group}", math.nan)
        base = (first or last).get(f"fid_{group}", math.nan)
        if not math.isfinite(now):
            shares[group] = 1.0
        elif not (math.isfinite(base) and base > 0):
            shares[group] = start
        else:
            shares[group] = float(min(1.0, start * now / base))
    return shares


def dynamic_next_dataset(real: Dataset, synthetic: Dataset, shares: dict[str, float], classes: dict[str, int],
                         seed: int) -> Dataset:
    """Model k's samples plus a share r_g of each group's real rows (a fresh random subset per generation)."""
    rng = np.random.default_rng(seed)
    parts = [synthetic]
    for group, share in shares.items():
        rows = np.flatnonzero(real.label == classes[group])
        take = rng.permutation(rows)[:round(share * len(rows))]
        if len(take):
            parts.append(real.take(np.sort(take)))
    return Dataset.concat(parts)


def discrepancy(scorer, samples: np.ndarray) -> float:
    """Choi et al. Eq. 2 over the study's two classes, against a balanced reference (0.5 / 0.5)."""
    predicted = scorer.label(samples)
    classes = [scorer.majority, scorer.minority]
    return fairness_discrepancy(np.array(classes), predicted, classes)
