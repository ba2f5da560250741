"""The image scorer: torch-fidelity metrics on the domain classifier's features (or Inception's, when the user
has its weights), plus the fairness view of the paper; each metric is a plug-in of ``tasks.metrics``."""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from filelock import FileLock
from pydantic import Field, PositiveInt, model_validator

from models.classifier import DomainClassifier, load_classifier, predict, save_classifier, train_classifier
from models.registry import Settings
from tasks.datasets import Dataset, RealData, RealSplit, evaluation_reference
from tasks.layout import trash_folder
from tasks.metrics import IMAGE_METRICS, image_metrics_in_order
from tasks.scorers import SCORERS, Column, Scorer
from tasks.storage import CorruptOutputError, file_digest, move_to_trash, read_manifest, write_atomic, write_manifest

if TYPE_CHECKING:  # torch-fidelity (and torchvision, 1.2 s of start-up) is imported when an image study scores
    from models.fidelity import Features

# The cached classifier's accuracy on the test split, recomputed on load, may differ from the recorded one by this
# much: the file's sha256 already proves the weights are the same, so only another device's arithmetic (a few
# borderline images) may move it.
ACCURACY_TOLERANCE = 0.01


class ClassifierSettings(Settings):
    """The domain classifier: FID features and labels for generated images, trained once per training split."""

    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    lr: float = Field(1e-3, gt=0.0)
    channels: list[PositiveInt] = Field(default_factory=lambda: [32, 64], min_length=2, max_length=2)
    feature_dim: PositiveInt = 64
    arch: Literal["cnn", "resnet"] = "cnn"  # resnet: residual blocks, for 28x28 (closer to the paper's ResNet-18)
    # The labeller's check: a second classifier of another architecture (null: the other of cnn / resnet) and
    # seed (seed + 1), trained on the same split; its agreement with the first on generated images is reported.
    check_arch: Literal["cnn", "resnet"] | None = None

    def for_check(self) -> "ClassifierSettings":
        """The second, independent labeller's settings."""
        other = self.check_arch or ("resnet" if self.arch == "cnn" else "cnn")
        return self.model_copy(update={"arch": other, "check_arch": None})


class ImageScoreSettings(Settings):
    samples: PositiveInt = 1000  # fresh samples drawn from each model for scoring
    feature_extractor: Literal["classifier", "inception"] = "classifier"
    inception_weights: str | None = None  # local torch-fidelity Inception weights (never downloaded)
    kid_subset_size: PositiveInt = 1000
    prc_neighborhood: PositiveInt = 3
    min_class_samples: PositiveInt = 10  # fewer generated images of a class than this: its FID is NaN (KID: 2)
    bootstrap: int = Field(100, ge=0)  # resamples of the generated images for FID's standard error (0: none)
    fairness_resamples: int = Field(10, ge=0)  # half-samples for the KID-based R_Fair's standard error (0: none)

    @model_validator(mode="after")
    def inception_needs_weights(self) -> "ImageScoreSettings":
        if self.feature_extractor == "inception" and not self.inception_weights:
            raise ValueError("inception_weights: required when score.feature_extractor is 'inception' "
                             "(a local torch-fidelity Inception weights file; madloop never downloads it)")
        return self


def data_fingerprint(data: Dataset) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(data.pixels).tobytes())
    h.update(np.ascontiguousarray(data.label).tobytes())
    return h.hexdigest()


def classifier_path(cache_dir: Path, train_full: Dataset, settings: ClassifierSettings, seed: int) -> Path:
    """Cache key: the bytes of the data it is trained on, every classifier knob and its seed."""
    key = hashlib.sha256(f"{data_fingerprint(train_full)}|{settings.model_dump_json()}|{seed}".encode())
    return cache_dir / f"classifier-{key.hexdigest()[:20]}.safetensors"


def cached_accuracy(path: Path, test: Dataset, device: torch.device) -> float:
    """The test accuracy of a cached classifier, verified: its file against the sha256 its manifest recorded, its
    accuracy against the recorded one. Raises :class:`CorruptOutputError` saying what does not match."""
    manifest = read_manifest(path.with_suffix(".json"))
    if file_digest(path) != manifest["sha256"]:
        raise CorruptOutputError(f"{path} is corrupt: its sha256 does not match its manifest's")
    try:
        model = load_classifier(path, device)
    except Exception as err:  # a file of the right hash that does not load: a manifest written for another file
        raise CorruptOutputError(f"{path} does not load ({err})") from None
    acc = accuracy(model, test)
    if abs(acc - manifest["accuracy"]) > ACCURACY_TOLERANCE or len(test) != manifest["test_rows"]:
        raise CorruptOutputError(f"{path}: accuracy {acc:.3f} on the {len(test)}-image test split, but "
                                 f"{manifest['accuracy']:.3f} on {manifest['test_rows']} images when it was trained")
    return acc


def ensure_classifier(real: RealSplit, settings: ClassifierSettings, seed: int, cache_dir: Path,
                      device: torch.device) -> tuple[Path, float]:
    """Train a domain classifier once per training set, settings and seed (reused from the cache after that, once
    verified); its test accuracy. A cache entry that fails verification goes to the trash and is trained again
    (derived data). Studies share the cache: one process at a time checks or writes it."""
    path = classifier_path(cache_dir, real.train_full, settings, seed)
    sidecar = path.with_suffix(".json")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / ".classifier.lock")):
        if path.is_file() or sidecar.is_file():
            try:
                return path, cached_accuracy(path, real.test, device)
            except (CorruptOutputError, OSError, KeyError, TypeError) as err:
                root = cache_dir.parent.parent  # data/cache -> the project root (tasks.layout)
                moved = move_to_trash(root, trash_folder(root), [path, sidecar])
                warnings.warn(f"the cached domain classifier cannot be used ({err}): moved to {moved}, training it "
                              "again")
        c = settings
        model = train_classifier(real.train_full.pixels, real.train_full.label, real.num_classes, epochs=c.epochs,
                                 batch_size=c.batch_size, lr=c.lr, seed=seed, channels=c.channels,
                                 feature_dim=c.feature_dim, arch=c.arch, device=device)
        sha = write_atomic(path, lambda tmp: save_classifier(model, tmp))
        acc = accuracy(model, real.test)
        write_manifest(sidecar, {"sha256": sha, "accuracy": acc, "test_rows": len(real.test),
                                 "classifier": settings.model_dump(mode="json"), "seed": seed})
    return path, acc


def labeller_report(primary: DomainClassifier, check: DomainClassifier, test: Dataset,
                    classes: tuple[int, int]) -> dict[str, float]:
    """How far the labels of generated images can be trusted, measured on held-out real images: the labeller's
    accuracy, its precision and recall on the study's two classes (a generated image it calls a 6 is a 6 that
    often), and the second labeller's accuracy and agreement with it."""
    label, other = predict(primary, test.pixels), predict(check, test.pixels)
    out = {"accuracy": float((label == test.label).mean()), "check_accuracy": float((other == test.label).mean()),
           "agreement_held_out": float((label == other).mean()), "held_out_images": int(len(test))}
    for name, c in zip(("majority", "minority"), classes):
        called, actual = label == c, test.label == c
        out[f"precision_{name}"] = float((called & actual).sum() / max(called.sum(), 1))
        out[f"recall_{name}"] = float((called & actual).sum() / max(actual.sum(), 1))
    return out


def accuracy(model: DomainClassifier, test: Dataset) -> float:
    return float((predict(model, test.pixels) == test.label).mean())


def class_mix_weights(labels: np.ndarray, majority: int, minority: int, ratio: float) -> np.ndarray:
    """Row weights that make a set of majority and minority rows a mixture in the training proportions
    (R_I : 1), whatever their counts: what a perfect model of dataset 0 would generate."""
    share = {majority: ratio / (ratio + 1), minority: 1 / (ratio + 1)}
    counts = {c: (labels == c).sum() for c in share}
    return np.array([share[c] / counts[c] for c in labels.tolist()])


def save_sample_grid(pixels: np.ndarray, path: Path, n: int = 64, caption: str = "", labels=None,
                     columns: int = 8) -> None:
    """The first ``n`` images as a grid with gutters between them (8x8 digits run together into stripes
    without), each scaled up to about 64 px, ``labels`` (e.g. the classifier's call) under each, ``caption`` above."""
    from PIL import Image, ImageDraw, ImageFont

    images = (np.clip(np.asarray(pixels[:n], dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)
    count, channels, height, width = images.shape
    scale = max(1, 64 // width)
    tile_h, tile_w, gutter = height * scale, width * scale, 8
    label_h, head_h = (14 if labels is not None else 0), (24 if caption else 0)
    rows = -(-count // columns)
    size = (gutter + columns * (tile_w + gutter), head_h + gutter + rows * (tile_h + label_h + gutter))
    canvas = Image.new("RGB", size, (236, 236, 236))
    draw = ImageDraw.Draw(canvas)
    small = ImageFont.load_default(size=11)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        x, y = gutter + column * (tile_w + gutter), head_h + gutter + row * (tile_h + label_h + gutter)
        tile = image.repeat(scale, axis=1).repeat(scale, axis=2)
        canvas.paste(Image.fromarray(tile[0] if channels == 1 else tile.transpose(1, 2, 0)).convert("RGB"), (x, y))
        if labels is not None:
            draw.text((x + tile_w / 2, y + tile_h + 1), str(labels[i]), fill=(70, 70, 70), font=small, anchor="mt")
    if caption:
        draw.text((gutter, 5), caption, fill=(20, 20, 20), font=ImageFont.load_default(size=13))
    canvas.save(path, format="PNG")


@SCORERS.register("image", settings={"classifier": ClassifierSettings, "score": ImageScoreSettings})
@dataclass
class ImageScorer(Scorer):
    """FID, KID, precision, recall and the fairness view of fresh samples against held-out real images, all from
    one feature extraction per image set (the registered extractor's FID layer; torch-fidelity's functions)."""

    kind = "image"
    rank_by = "fid"

    classifier: DomainClassifier
    features: Features  # the feature extractor (see :meth:`features_of`)
    reference: np.ndarray  # every held-out row of the study's two classes
    reference_features: torch.Tensor
    reference_labels: np.ndarray
    reference_weights: np.ndarray  # per row: the training class mix (R_I : 1) spread over each class's rows
    # Per class: the held-out rows' features, and the training split's rows (their index in it) with features.
    # A lineage's class reference is the held-out rows plus the split's rows it never trains on (for_lineage).
    test_class_features: dict[int, torch.Tensor]
    split_class_rows: dict[int, np.ndarray]
    split_class_features: dict[int, torch.Tensor]
    majority: int
    minority: int
    kid_subset_size: int
    prc_neighborhood: int
    min_class_samples: int
    samples: int
    bootstrap: int
    device: torch.device
    fingerprint: str = ""  # sha256 of the feature extractor's weights: a retrained classifier means new scores
    check_classifier: DomainClassifier | None = None  # the second labeller (another architecture and seed)
    labeller: dict[str, float] | None = None  # the labellers on held-out real images (labeller_report)
    fairness_resamples: int = 0
    _cache: tuple = (None, None)
    # What one lineage sees (for_lineage); before that, the held-out rows alone and no dataset 0.
    class_reference_features: dict[int, torch.Tensor] | None = None
    train_class_features: dict[int, torch.Tensor] | None = None  # its dataset 0's rows of each class
    train: np.ndarray | None = None  # the lineage's dataset 0: what memorisation is measured against
    score_settings: Any = None  # params' score section: metric plug-ins read their own settings under it

    def __post_init__(self):
        if self.class_reference_features is None:
            self.class_reference_features = dict(self.test_class_features)

    @classmethod
    def settings(cls):
        out = dict(super().settings())
        for entry in IMAGE_METRICS.entries():
            out.update(entry.settings)
        return out

    @classmethod
    def columns(cls, family=None) -> list[Column]:
        """Every metric's columns, the training set's minority share, then the family's own held-out scores
        (``TorchFamily.held_out_columns``: a flow's bits per dimension)."""
        extra = getattr(family, "held_out_columns", {})
        return [column for metric in image_metrics_in_order() for column in metric.columns] + \
            [Column("minority_share_train", scale="unit"), Column("reference_size")] + \
            [Column(name, summary=True, better=b, scale="log") for name, b in extra.items()]

    @classmethod
    def build(cls, p, real: RealSplit, cache_dir: Path, device: torch.device) -> tuple["ImageScorer", str]:
        classifier_file, acc = ensure_classifier(real, p.classifier, p.seed, cache_dir, device)
        check_file, _ = ensure_classifier(real, p.classifier.for_check(), p.seed + 1, cache_dir, device)
        scorer = cls.from_classifier(p, real, classifier_file, device, check_file)
        lab = scorer.labeller
        note = (f"domain classifier accuracy {acc:.3f} on the {len(real.test)}-image test split (class "
                f"{scorer.minority}: precision {lab['precision_minority']:.3f}, recall {lab['recall_minority']:.3f}; "
                f"class {scorer.majority}: precision {lab['precision_majority']:.3f}, recall "
                f"{lab['recall_majority']:.3f}), a second labeller ({p.classifier.for_check().arch}) agrees on "
                f"{lab['agreement_held_out']:.3f}; scores against {len(scorer.reference)} held-out images of classes "
                f"{scorer.majority} and {scorer.minority}")
        return scorer, note

    @classmethod
    def from_classifier(cls, p, real: RealSplit, classifier_file: Path, device: torch.device,
                        check_file: Path | None = None) -> "ImageScorer":
        from models.fidelity import CLASSIFIER_EXTRACTOR, INCEPTION_EXTRACTOR, Features

        s, d = p.score, p.data
        weights = s.inception_weights if s.feature_extractor == "inception" else str(classifier_file)
        features = Features(INCEPTION_EXTRACTOR if s.feature_extractor == "inception" else CLASSIFIER_EXTRACTOR,
                            weights, device)
        reference = evaluation_reference(real.test, d)
        classes = (d.majority, d.minority)
        split_rows = {c: np.flatnonzero(real.train_full.label == c) for c in classes}
        classifier = load_classifier(classifier_file, device)
        check = load_classifier(check_file, device) if check_file is not None else None
        return cls(classifier=classifier, features=features, reference=reference.pixels,
                   reference_features=features(reference.pixels), reference_labels=reference.label,
                   reference_weights=class_mix_weights(reference.label, d.majority, d.minority, d.imbalance_ratio),
                   test_class_features={c: features(real.test.pixels[real.test.label == c]) for c in classes},
                   split_class_rows=split_rows,
                   split_class_features={c: features(real.train_full.pixels[rows]) for c, rows in split_rows.items()},
                   majority=d.majority, minority=d.minority, kid_subset_size=s.kid_subset_size,
                   prc_neighborhood=s.prc_neighborhood, min_class_samples=s.min_class_samples, samples=s.samples,
                   bootstrap=s.bootstrap, device=device, fingerprint=file_digest(Path(weights)), score_settings=s,
                   check_classifier=check, fairness_resamples=s.fairness_resamples,
                   labeller=labeller_report(classifier, check, real.test, classes) if check is not None else None)

    def for_lineage(self, real: RealData) -> "ImageScorer":
        """The scorer as one lineage sees it: each class's reference is its held-out images plus the training
        split's images of the class that the lineage never trains on (neither in its dataset 0 nor in its fresh
        pool: typically the minority rows the imbalanced draw left out), its dataset 0 is what memorisation and
        the per-class floors are measured against, and the overall reference is weighted to dataset 0's class
        mix."""
        reference, own = {}, {}
        for c, rows in self.split_class_rows.items():
            unused = np.isin(rows, real.unused_index(c))
            trained = np.isin(rows, real.train_index)
            reference[c] = torch.cat([self.test_class_features[c], self.split_class_features[c][torch.as_tensor(
                unused)]])
            own[c] = self.split_class_features[c][torch.as_tensor(trained)]
        labels = real.train.label
        ratio = float((labels == self.majority).sum() / max((labels == self.minority).sum(), 1))
        return replace(self, train=real.train.pixels, class_reference_features=reference, train_class_features=own,
                       reference_weights=class_mix_weights(self.reference_labels, self.majority, self.minority, ratio))

    def features_of(self, pixels: np.ndarray) -> torch.Tensor:
        """Features of an image set, extracted once: the metrics of one ``score`` call share them."""
        # Keyed by content: a memory address is reused by the next sample set of the same shape, which then got
        # the previous model's features and scores (hashing costs milliseconds; extracting features, seconds).
        key = (pixels.shape, hashlib.blake2b(np.ascontiguousarray(pixels).tobytes(), digest_size=16).digest())
        if self._cache[0] != key:
            self._cache = (key, self.features(pixels))
        return self._cache[1]

    def label(self, pixels: np.ndarray) -> np.ndarray:
        return predict(self.classifier, pixels)

    @torch.no_grad()
    def classifier_features(self, pixels: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """The domain classifier's penultimate features of images rounded to 8 bits, as torch-fidelity feeds them
        to it for FID: the space where the neighbour metrics and the selecting mitigations measure distances."""
        out = [self.classifier.features(torch.as_tensor(
            np.round(np.clip(pixels[i:i + batch_size], 0, 1) * 255) / 255, dtype=torch.float32, device=self.device))
            for i in range(0, len(pixels), batch_size)]
        return torch.cat(out).cpu().numpy().astype(np.float64) if out else np.zeros((0, 0))

    def minority_share(self, data: Dataset) -> float:
        """Share of minority rows: true labels where known, the classifier's call for synthetic rows."""
        labels = np.where(data.label >= 0, data.label, -1)
        unknown = labels < 0
        if unknown.any():
            labels[unknown] = self.label(data.pixels[unknown])
        return float((labels == self.minority).mean()) if len(labels) else math.nan

    def evaluate(self, model, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        """The image metrics of fresh samples, and the family's own scores of the held-out real reference."""
        samples = model.sample(self.samples, seed)
        reference = torch.as_tensor(self.reference, dtype=torch.float32, device=self.device)
        return samples, {**self.score(samples, seed),
                         **model.family.held_out_scores(model.module, model.weights, reference, seed)}

    def score(self, samples: np.ndarray, seed: int) -> dict[str, float]:
        # features_of's cache is keyed by the array's address, which a later array can reuse once this one is
        # freed: it is valid only while ``samples`` is alive, during this call
        labels = self.label(samples)
        metrics: dict[str, float] = {}
        for metric in image_metrics_in_order():
            metrics.update(metric.compute(self, samples, labels, seed))
        return metrics

    def dataset_metrics(self, data: Dataset) -> dict[str, float]:
        return {"minority_share_train": self.minority_share(data), "reference_size": float(len(self.reference))}

    def picture(self, samples: np.ndarray, path: Path, caption: str = "") -> None:
        shown = samples[:64]
        save_sample_grid(shown, path, caption=f"{caption}: {len(shown)} samples, the domain classifier's label under "
                                              "each" if caption else "", labels=self.label(shown))

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        return (f"FID {metrics['fid']:.3g}  precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}  "
                f"minority share {metrics['minority_share']:.3f} (trained on {metrics['minority_share_train']:.3f})"
                f"  R_Fair {metrics['r_fair']:.3g}  R_Fair(KID) {metrics['r_fair_kid']:.3g}")  # the table's names (tasks.reports.TITLES)
