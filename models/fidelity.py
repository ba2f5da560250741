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
from torch_fidelity import metric_fid, metric_kid, metric_prc
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


class Features:
    """The feature extractor torch-fidelity would use for FID (its registered extractor, its FID layer), run once
    per image set: every metric below is then computed from features with torch-fidelity's own functions."""

    def __init__(self, extractor: str, weights_path: str, device: torch.device, batch_size: int = 1000):
        from torch_fidelity.utils import create_feature_extractor

        self.rgb = extractor == INCEPTION_EXTRACTOR
        self.layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
        self.cuda, self.batch_size = device.type == "cuda", batch_size
        self.model = create_feature_extractor(extractor, [self.layer], cuda=self.cuda,
                                              feature_extractor_weights_path=str(weights_path), verbose=False)

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        from torch_fidelity.utils import get_featuresdict_from_dataset

        features = get_featuresdict_from_dataset(ImageSet(images, self.rgb), self.model, self.batch_size, self.cuda,
                                                 True, False)
        return features[self.layer].double()


def weighted_statistics(features: torch.Tensor, weights: np.ndarray) -> dict[str, np.ndarray]:
    """FID's Gaussian statistics (mean, covariance) of features whose rows carry weights (numpy's weighted mean and
    ``cov(aweights=...)``), in the form torch-fidelity's ``fid_statistics_to_metric`` takes."""
    f = features.cpu().numpy()
    return {"mu": np.average(f, axis=0, weights=weights), "sigma": np.cov(f, rowvar=False, aweights=weights)}


def fid_from_features(generated: torch.Tensor, reference: torch.Tensor,
                      reference_weights: np.ndarray | None = None) -> float:
    """torch-fidelity's FID between two feature sets; NaN when either has fewer than 2 rows. With
    ``reference_weights`` the reference's statistics weight its rows (e.g. to a class mix)."""
    if min(len(generated), len(reference)) < 2:
        return math.nan
    ref = metric_fid.fid_features_to_statistics(reference) if reference_weights is None else \
        weighted_statistics(reference, reference_weights)
    return metric_fid.fid_statistics_to_metric(metric_fid.fid_features_to_statistics(generated), ref,
                                               verbose=False)[torch_fidelity.KEY_METRIC_FID]


def kid_from_features(generated: torch.Tensor, reference: torch.Tensor, subset_size: int,
                      seed: int, subsets: int = 100) -> tuple[float, float]:
    """torch-fidelity's KID (mean, std over ``subsets`` subsets), subsets as large as both sets allow; NaN below 2
    rows."""
    size = min(subset_size, len(generated), len(reference))
    if size < 2:
        return math.nan, math.nan
    out = metric_kid.kid_features_to_metric(generated, reference, kid_subset_size=size, kid_subsets=subsets,
                                            rng_seed=seed, verbose=False)
    return out[torch_fidelity.KEY_METRIC_KID_MEAN], out[torch_fidelity.KEY_METRIC_KID_STD]


def fidelity_from_features(generated: torch.Tensor, reference: torch.Tensor, *, kid_subset_size: int,
                           prc_neighborhood: int, seed: int, bootstrap: int = 100, max_prc_subsets: int = 10,
                           reference_weights: np.ndarray | None = None) -> dict[str, float]:
    """FID, KID, precision and recall of generated vs reference features, each with a standard error.

    ``reference_weights`` (summing to 1) make the reference a mixture: FID compares with the weighted statistics,
    KID with a weighted draw of reference rows; precision and recall, which compare supports (k-NN manifolds),
    use every reference row as it is.

    Precision (quality: share of generated samples inside the reference's k-NN manifold) and recall (diversity:
    share of reference samples inside the generated manifold; Kynkäänniemi et al. 2019, torch-fidelity's prc)
    compare equal-size sets, as the k-NN radii shrink with a set's size: the generated samples are cut into up to
    ``max_prc_subsets`` disjoint subsets as large as the reference, and the reported value is the mean over
    subsets, with the standard error of that mean. FID's standard error is the bootstrap standard deviation over
    ``bootstrap`` resamples of the generated samples (the reference is the same for every model scored, so its
    own noise does not enter comparisons between models). ``kid_std`` is torch-fidelity's spread over its KID
    subsets."""
    rng = np.random.default_rng([seed, 11])
    order = torch.as_tensor(rng.permutation(len(generated)))
    size = len(reference)
    subsets = max(1, min(max_prc_subsets, len(generated) // max(size, 1)))
    prc = [metric_prc.prc_features_to_metric(generated[order[i * size:(i + 1) * size]], reference,
                                             prc_neighborhood=min(prc_neighborhood, size - 1), save_cpu_ram=True,
                                             verbose=False) for i in range(subsets)]
    precision = np.array([out[torch_fidelity.KEY_METRIC_PRECISION] for out in prc])
    recall = np.array([out[torch_fidelity.KEY_METRIC_RECALL] for out in prc])
    sem = lambda v: float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan  # noqa: E731
    kid_reference = reference if reference_weights is None else reference[torch.as_tensor(
        rng.choice(len(reference), len(reference), p=reference_weights))]
    kid, kid_std = kid_from_features(generated, kid_reference, kid_subset_size, seed)
    draws = [fid_from_features(generated[torch.as_tensor(rng.integers(0, len(generated), len(generated)))], reference,
                               reference_weights) for _ in range(bootstrap)]
    return {"fid": fid_from_features(generated, reference, reference_weights),
            "fid_se": float(np.std(draws, ddof=1)) if bootstrap > 1
            else math.nan, "kid": kid, "kid_std": kid_std,
            "precision": float(precision.mean()), "precision_se": sem(precision),
            "recall": float(recall.mean()), "recall_se": sem(recall)}


def image_metrics(generated: np.ndarray, reference: np.ndarray, *, extractor: str, weights_path: str,
                  device: torch.device, kid_subset_size: int = 1000, prc_neighborhood: int = 3,
                  seed: int = 0) -> dict[str, float]:
    """:func:`fidelity_from_features` of two image sets (pixels in [0, 1])."""
    features = Features(extractor, weights_path, device)
    return fidelity_from_features(features(generated), features(reference), kid_subset_size=kid_subset_size,
                                  prc_neighborhood=prc_neighborhood, seed=seed)


def fid(generated: np.ndarray, reference: np.ndarray, *, extractor: str, weights_path: str,
        device: torch.device, min_samples: int = 2) -> float:
    """FID alone; NaN when either side has fewer than ``min_samples`` images (undefined covariance)."""
    if min(len(generated), len(reference)) < max(2, min_samples):
        return math.nan
    features = Features(extractor, weights_path, device)
    return fid_from_features(features(generated), features(reference))


def fairness_ratio(fid_majority: float, fid_minority: float) -> float:
    """R_Fair = S_maj / S_min with S = 1/FID (paper Eq. 1), i.e. FID_min / FID_maj; 1 is perfectly fair."""
    if not (fid_majority > 0 and math.isfinite(fid_majority) and math.isfinite(fid_minority)):
        return math.nan
    return fid_minority / fid_majority
