"""Image metrics through torch-fidelity: FID, KID, precision and recall, on a pluggable feature extractor.

The default extractor is the domain classifier (``models.classifier``), registered with
``torch_fidelity.register_feature_extractor`` under :data:`CLASSIFIER_EXTRACTOR`; torch-fidelity hands it the
``feature_extractor_weights_path`` we pass, which is where the trained classifier lives. Inception
(``inception-v3-compat``) works the same way when the user supplies its weights file; nothing here downloads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from models.classifier import load_classifier

CLASSIFIER_EXTRACTOR = "madloop-classifier"
INCEPTION_EXTRACTOR = "inception-v3-compat"


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """Penultimate-layer features (and logits) of the domain classifier; input uint8 [B, C, H, W]."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        vassert(feature_extractor_weights_path is not None,
                f"{name} needs feature_extractor_weights_path: the trained domain classifier (.safetensors)")
        self.classifier = load_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError

    def forward(self, x):
        features = self.classifier.features(x.float() / 255.0)
        out = {"features": features, "logits": self.classifier.head(features)}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER_EXTRACTOR, ClassifierFeatureExtractor)


class ImageSet(torch.utils.data.Dataset):
    """Images in [0, 1] as the uint8 tensors torch-fidelity expects (3 channels for Inception)."""

    def __init__(self, images: np.ndarray, rgb: bool = False):
        data = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        data = (data.clamp(0, 1) * 255).round().to(torch.uint8)
        if rgb and data.shape[1] == 1:
            data = data.expand(-1, 3, -1, -1)
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def fidelity_kwargs(extractor: str, weights_path: str, device: torch.device) -> dict:
    return dict(feature_extractor=extractor, feature_extractor_weights_path=str(weights_path),
                cuda=device.type == "cuda", verbose=False, cache=False, save_cpu_ram=True)


def image_metrics(generated: np.ndarray, reference: np.ndarray, *, extractor: str, weights_path: str,
                  device: torch.device, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """FID, KID (mean and std), precision and recall of ``generated`` against ``reference`` images.

    Precision is the share of generated samples inside the reference manifold (quality), recall the share of
    reference samples inside the generated manifold (diversity), with k-NN manifolds (Kynkäänniemi et al. 2019,
    torch-fidelity's ``prc``). The k-NN radii shrink as a set grows, so precision and recall compare equal-size
    sets: a random subset of the generated images as large as the reference. FID and KID use every image.
    """
    rgb = extractor == INCEPTION_EXTRACTOR
    common = fidelity_kwargs(extractor, weights_path, device)
    reference_set = ImageSet(reference, rgb)
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageSet(generated, rgb), input2=reference_set, fid=True, kid=True,
        kid_subset_size=min(kid_subset_size, len(generated), len(reference)), rng_seed=seed, **common)
    subset = np.random.default_rng(seed).permutation(len(generated))[:len(reference)]
    prc = torch_fidelity.calculate_metrics(
        input1=ImageSet(generated[subset], rgb), input2=reference_set, prc=True,
        prc_neighborhood=min(prc_neighborhood, len(subset) - 1, len(reference) - 1), **common)
    return {
        "fid": metrics[torch_fidelity.KEY_METRIC_FID],
        "kid": metrics[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": metrics[torch_fidelity.KEY_METRIC_KID_STD],
        "precision": prc[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": prc[torch_fidelity.KEY_METRIC_RECALL],
    }


def fid(generated: np.ndarray, reference: np.ndarray, *, extractor: str, weights_path: str,
        device: torch.device, min_samples: int = 2) -> float:
    """FID alone; NaN when either side has fewer than ``min_samples`` images (undefined covariance)."""
    if min(len(generated), len(reference)) < max(2, min_samples):
        return math.nan
    rgb = extractor == INCEPTION_EXTRACTOR
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageSet(generated, rgb), input2=ImageSet(reference, rgb), fid=True,
        **fidelity_kwargs(extractor, weights_path, device))
    return metrics[torch_fidelity.KEY_METRIC_FID]


def fairness_ratio(fid_majority: float, fid_minority: float) -> float:
    """R_Fair = S_maj / S_min with S = 1/FID (paper Eq. 1), i.e. FID_min / FID_maj; 1 is perfectly fair."""
    if not (fid_majority > 0 and math.isfinite(fid_majority) and math.isfinite(fid_minority)):
        return math.nan
    return fid_minority / fid_majority
