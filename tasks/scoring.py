"""Scoring: what a generation's model is worth, against held-out real data or the known truth.

Image families get FID, KID, precision and recall from torch-fidelity on the domain classifier's features
(or Inception's, when the user has its weights), plus the fairness view of the paper: the classifier labels
the unconditional samples, giving the minority share, per-class FID and R_Fair = FID_min / FID_maj.

1-D families know their truth: parameter estimates, their bias, KL(estimate || truth) by Monte Carlo and the
Wasserstein-1 distance to the true distribution.

A scorer has one job per call: ``evaluate(model, seed) -> (samples to picture, metrics)``, plus
``dataset_metrics`` (what the training set itself looked like) and ``picture`` (a PNG for MLflow).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.classifier import DomainClassifier, load_classifier, predict, save_classifier, train_classifier
from models.families import FAMILIES
from models.reweighting import fairness_discrepancy
from models.scalar import ScalarFamily, kl_divergence, wasserstein1
from models.fidelity import CLASSIFIER_EXTRACTOR, INCEPTION_EXTRACTOR, fairness_ratio, fid, image_metrics
from tasks.datasets import Dataset, RealData, evaluation_reference
from tasks import as_task
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

    def evaluate(self, model, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        samples = model.sample(self.samples, seed)
        return samples, self.score(samples, seed)

    def dataset_metrics(self, data: Dataset) -> dict[str, float]:
        return {"minority_share_train": self.minority_share(data)}

    def picture(self, samples: np.ndarray, path: Path) -> None:
        save_sample_grid(samples, path)

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return (f"fid {metrics['fid']:.3g}  precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}  "
                f"minority share {metrics['minority_share']:.3f} (trained on {metrics['minority_share_train']:.3f})"
                f"  r_fair {metrics['r_fair']:.3g}")

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
        # Choi et al. Eq. 2: distance of the generated class mix from a balanced reference over the two classes
        metrics["fairness_discrepancy"] = fairness_discrepancy(
            np.array([self.majority, self.minority]), labels, [self.majority, self.minority])
        return metrics


def save_sample_grid(pixels: np.ndarray, path: Path, n: int = 64) -> None:
    from torchvision.utils import make_grid, save_image

    images = torch.as_tensor(pixels[:n])
    scale = max(1, 96 // images.shape[-1])  # 8x8 digits are unreadable at 1:1
    images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(make_grid(images, nrow=8, padding=2, pad_value=0.5), str(path), format="png")


@dataclass
class ScalarScorer:
    family: ScalarFamily
    mc_samples: int  # Monte Carlo draws for KL and W1 (paper §5.2: 1e5)
    picture_samples: int = 2000

    def evaluate(self, model, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        estimate, truth = self.family.estimates(model), self.family.true_estimates()
        rng = np.random.default_rng(seed)
        metrics = {f"param.{k}": v for k, v in estimate.items()}
        metrics.update({f"bias.{k}": estimate[k] - truth[k] for k in truth})
        metrics["kl"] = kl_divergence(self.family, estimate, truth, self.mc_samples, rng)
        metrics["wasserstein"] = wasserstein1(self.family, estimate, truth, self.mc_samples, rng)
        return self.family.draw(estimate, self.picture_samples, rng), metrics

    def dataset_metrics(self, data: Dataset) -> dict[str, float]:
        return {}

    def picture(self, samples: np.ndarray, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        truth = self.family.true_estimates()
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        lo, hi = np.quantile(samples, [0.005, 0.995])
        ax.hist(samples, bins=60, range=(lo, hi), density=True, alpha=0.5, label="model samples")
        grid = np.linspace(lo, hi, 400)
        if self.family.name != "geometric":
            ax.plot(grid, np.exp(self.family.log_density(truth, grid)), "k-", lw=1.5, label="truth")
        ax.set_title(f"{self.family.name}: samples vs truth")
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        params = "  ".join(f"{k.removeprefix('param.')} {v:.4g}" for k, v in metrics.items() if k.startswith("param."))
        return f"{params}  kl {metrics['kl']:.3g}  w1 {metrics['wasserstein']:.3g}"


def build_scorer(p: Params, real: RealData, cache_dir: Path, device: torch.device):
    """The scorer for the family's kind, and a line for the log (classifier accuracy for images)."""
    family = FAMILIES.get(p.model.family)(real.train.shape, **p.model.family_options())
    if family.kind == "scalar":
        return ScalarScorer(family, p.score.mc_samples), f"1-D family {family.name}, truth {family.true_estimates()}"
    classifier_file, accuracy = ensure_classifier(real, p, cache_dir, device)
    note = f"domain classifier accuracy {accuracy:.3f} on the {len(real.test)}-image test split"
    return build_image_scorer(p, real, classifier_file, device), note


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


build_scorer_task = as_task(build_scorer)
