"""Scoring: what a generation's model is worth, against held-out real data.

Image families get FID, KID, precision and recall from torch-fidelity on the domain classifier's features
(or Inception's, when the user has its weights), plus the fairness view of the paper: the classifier labels
the unconditional samples, giving the minority share, per-class FID and R_Fair = FID_min / FID_maj.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.classifier import DomainClassifier, load_classifier, predict, save_classifier, train_classifier
from models.fidelity import CLASSIFIER_EXTRACTOR, INCEPTION_EXTRACTOR, fairness_ratio, fid, image_metrics
from tasks.datasets import Dataset, RealData, evaluation_reference
from tasks.params import Params
from tasks.storage import write_atomic


def data_fingerprint(data: Dataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.pixels).tobytes())
    h.update(np.ascontiguousarray(data.label).tobytes())
    return h.hexdigest()


def classifier_path(cache_dir: Path, train_full: Dataset, p: Params) -> Path:
    """Cache key: the bytes of the data it is trained on and every classifier knob."""
    key = hashlib.sha256(f"{data_fingerprint(train_full)}|{p.classifier.model_dump_json()}|{p.seed}".encode())
    return cache_dir / f"classifier-{key.hexdigest()[:20]}.safetensors"


def ensure_classifier(real: RealData, p: Params, cache_dir: Path, device: torch.device) -> tuple[Path, float]:
    """Train the domain classifier once per training set (reused from the cache after that); its test accuracy."""
    path = classifier_path(cache_dir, real.train_full, p)
    if path.is_file():
        try:
            model = load_classifier(path, device)
        except Exception:  # unreadable cache entry: train again (the cache is derived data)
            path.unlink()
        else:
            return path, accuracy(model, real.test)
    c = p.classifier
    model = train_classifier(real.train_full.pixels, real.train_full.label, real.num_classes, epochs=c.epochs,
                             batch_size=c.batch_size, lr=c.lr, seed=p.seed, channels=c.channels,
                             feature_dim=c.feature_dim, device=device)
    write_atomic(path, lambda tmp: save_classifier(model, tmp))
    return path, accuracy(model, real.test)


def accuracy(model: DomainClassifier, test: Dataset) -> float:
    return float((predict(model, test.pixels) == test.label).mean())


@dataclass
class ImageScorer:
    classifier: DomainClassifier
    extractor: str
    extractor_weights: str
    reference: np.ndarray  # held-out rows of the study's two classes at the training imbalance
    class_reference: dict[int, np.ndarray]  # every held-out row of the majority / the minority class
    majority: int
    minority: int
    kid_subset_size: int
    prc_neighborhood: int
    min_class_samples: int
    samples: int
    device: torch.device

    def label(self, pixels: np.ndarray) -> np.ndarray:
        return predict(self.classifier, pixels)

    def minority_share(self, data: Dataset) -> float:
        """Share of minority rows: true labels where known, the classifier's call for synthetic rows."""
        labels = np.where(data.label >= 0, data.label, -1)
        unknown = labels < 0
        if unknown.any():
            labels[unknown] = self.label(data.pixels[unknown])
        return float((labels == self.minority).mean()) if len(labels) else math.nan

    def score(self, samples: np.ndarray, seed: int) -> dict[str, float]:
        common = dict(extractor=self.extractor, weights_path=self.extractor_weights, device=self.device)
        metrics = image_metrics(samples, self.reference, kid_subset_size=self.kid_subset_size,
                                prc_neighborhood=self.prc_neighborhood, seed=seed, **common)
        labels = self.label(samples)
        per_class = {c: fid(samples[labels == c], self.class_reference[c], min_samples=self.min_class_samples,
                            **common) for c in (self.majority, self.minority)}
        metrics.update(
            minority_share=float((labels == self.minority).mean()),
            majority_share=float((labels == self.majority).mean()),
            fid_majority=per_class[self.majority],
            fid_minority=per_class[self.minority],
        )
        metrics["r_fair"] = fairness_ratio(metrics["fid_majority"], metrics["fid_minority"])
        return metrics


def build_image_scorer(p: Params, real: RealData, classifier_file: Path, device: torch.device) -> ImageScorer:
    s, d = p.score, p.data
    if s.feature_extractor == "inception":
        extractor, weights = INCEPTION_EXTRACTOR, s.inception_weights
    else:
        extractor, weights = CLASSIFIER_EXTRACTOR, str(classifier_file)
    reference = evaluation_reference(real.test, d, p.seed)
    return ImageScorer(
        classifier=load_classifier(classifier_file, device), extractor=extractor, extractor_weights=weights,
        reference=reference.pixels,
        class_reference={c: real.test.pixels[real.test.label == c] for c in (d.majority, d.minority)},
        majority=d.majority, minority=d.minority, kid_subset_size=s.kid_subset_size,
        prc_neighborhood=s.prc_neighborhood, min_class_samples=s.min_class_samples, samples=s.samples,
        device=device)
