"""Datasets: real sources behind one interface, the class-imbalanced subset, and Parquet files.

Parquet schema (one row per image; ``madloop.*`` keys in the file's schema metadata):

=============  ==========================  ==========================================================
column         type                        meaning
=============  ==========================  ==========================================================
pixels         fixed_size_list<float32>    the image, C*H*W intensities in [0, 1], row-major (C, H, W)
label          int16, nullable             the class where known (real rows); null for synthetic rows
origin         dictionary<string>          ``real`` or ``synthetic``
generation     int32                       dataset index the row first appeared in: real rows 0, the
                                           samples of generation k's model k + 1
lineage        string, nullable            the lineage whose model made the row; null for real rows
=============  ==========================  ==========================================================

Metadata: ``madloop.shape`` (JSON [C, H, W]), ``madloop.source`` (digits, mnist, cifar10),
``madloop.schema`` (version, currently 1).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.registry import Registry
from tasks.params import DataParams, ParamsError

SCHEMA_VERSION = "1"
REAL, SYNTHETIC = "real", "synthetic"


@dataclass(frozen=True)
class Dataset:
    pixels: np.ndarray  # float32 [N, C, H, W] in [0, 1]
    label: np.ndarray  # int64 [N]; -1 where unknown
    origin: np.ndarray  # str [N]: real | synthetic
    generation: np.ndarray  # int64 [N]
    lineage: np.ndarray  # object [N]: lineage name, or None for real rows
    source: str

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape[1:])

    @classmethod
    def real(cls, pixels: np.ndarray, label: np.ndarray, source: str) -> "Dataset":
        n = len(pixels)
        return cls(np.ascontiguousarray(pixels, dtype=np.float32), np.asarray(label, dtype=np.int64),
                   np.full(n, REAL, dtype=object), np.zeros(n, dtype=np.int64), np.full(n, None, dtype=object),
                   source)

    @classmethod
    def synthetic(cls, pixels: np.ndarray, lineage: str, generation: int, source: str) -> "Dataset":
        n = len(pixels)
        return cls(np.ascontiguousarray(pixels, dtype=np.float32), np.full(n, -1, dtype=np.int64),
                   np.full(n, SYNTHETIC, dtype=object), np.full(n, generation, dtype=np.int64),
                   np.full(n, lineage, dtype=object), source)

    def take(self, idx: np.ndarray) -> "Dataset":
        return replace(self, pixels=self.pixels[idx], label=self.label[idx], origin=self.origin[idx],
                       generation=self.generation[idx], lineage=self.lineage[idx])

    @staticmethod
    def concat(parts: list["Dataset"]) -> "Dataset":
        return replace(parts[0], **{f: np.concatenate([getattr(p, f) for p in parts])
                                    for f in ("pixels", "label", "origin", "generation", "lineage")})


# --- Parquet ------------------------------------------------------------------------------------------------


def arrow_schema(shape: tuple[int, ...], source: str) -> pa.Schema:
    fields = [
        pa.field("pixels", pa.list_(pa.float32(), int(np.prod(shape)))),
        pa.field("label", pa.int16(), nullable=True),
        pa.field("origin", pa.dictionary(pa.int8(), pa.string())),
        pa.field("generation", pa.int32()),
        pa.field("lineage", pa.string(), nullable=True),
    ]
    meta = {"madloop.shape": json.dumps(list(shape)), "madloop.source": source, "madloop.schema": SCHEMA_VERSION}
    return pa.schema(fields, metadata=meta)


def to_table(data: Dataset) -> pa.Table:
    schema = arrow_schema(data.shape, data.source)
    flat = data.pixels.reshape(len(data), -1)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.float32()), flat.shape[1])
    label = pa.array(np.where(data.label >= 0, data.label, 0).astype(np.int16), mask=data.label < 0)
    origin = pa.array(data.origin.astype(str)).dictionary_encode().cast(schema.field("origin").type)
    return pa.Table.from_arrays(
        [pixels, label, origin, pa.array(data.generation.astype(np.int32)), pa.array(list(data.lineage), pa.string())],
        schema=schema)


def write_parquet(data: Dataset, path: Path) -> None:
    pq.write_table(to_table(data), path, compression="zstd")


def read_parquet(path: Path) -> Dataset:
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("madloop.schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a madloop dataset (schema {meta.get('madloop.schema')!r})")
    shape = tuple(json.loads(meta["madloop.shape"]))
    n = table.num_rows
    flat = table.column("pixels").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    label = table.column("label").to_numpy(zero_copy_only=False)
    return Dataset(
        pixels=flat.astype(np.float32).reshape(n, *shape),
        label=np.nan_to_num(label.astype(np.float64), nan=-1).astype(np.int64),
        origin=np.asarray(table.column("origin").cast(pa.string()).to_pylist(), dtype=object),
        generation=table.column("generation").to_numpy().astype(np.int64),
        lineage=np.asarray(table.column("lineage").to_pylist(), dtype=object),
        source=meta["madloop.source"],
    )


# --- real sources -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceSplit:
    """A source's full train and test splits, all classes, as images in [0, 1]."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


SourceLoader = Callable[[DataParams, int, Path], SourceSplit]
SOURCES: Registry[SourceLoader] = Registry("data source")


@SOURCES.register("digits")
def load_digits_source(p: DataParams, seed: int, project_root: Path) -> SourceSplit:
    """scikit-learn's bundled 8x8 digits (1,797 images, 17 gray levels): the offline default."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=p.test_fraction, random_state=seed,
                                                        stratify=y)
    return SourceSplit(train_x, train_y, test_x, test_y, 10)


def torchvision_root(p: DataParams, project_root: Path) -> Path:
    root = Path(p.root) if p.root else project_root / "data" / "raw"
    return root if root.is_absolute() else project_root / root


def check_source(p: DataParams, project_root: Path) -> None:
    """Fail early, naming data.root, when a local torchvision dataset is not where params say."""
    if p.source in ("digits", "model"):
        return
    root = torchvision_root(p, project_root)
    if p.download:
        return
    if p.root is None:
        raise ParamsError(f"data.root: {p.source} needs a local dataset root (torchvision layout), "
                          f"or data.download: true to fetch it into {root}")
    if not root.is_dir():
        raise ParamsError(f"data.root: {root} does not exist (expected a torchvision {p.source} root)")
    try:
        open_torchvision(p, root, train=False)
    except RuntimeError as err:
        raise ParamsError(f"data.root: {root} holds no usable {p.source} files ({err})") from None


def open_torchvision(p: DataParams, root: Path, train: bool):
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "cifar10": torchvision.datasets.CIFAR10}[p.source]
    return cls(str(root), train=train, download=p.download)


def torchvision_arrays(p: DataParams, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
    ds = open_torchvision(p, root, train)
    data = np.asarray(ds.data)
    x = (data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)).astype(np.float32) / 255.0
    return x, np.asarray(ds.targets, dtype=np.int64)


@SOURCES.register("mnist")
@SOURCES.register("cifar10")
def load_torchvision_source(p: DataParams, seed: int, project_root: Path) -> SourceSplit:
    """MNIST or CIFAR-10 through torchvision, with their official train/test splits."""
    root = torchvision_root(p, project_root)
    train_x, train_y = torchvision_arrays(p, root, train=True)
    test_x, test_y = torchvision_arrays(p, root, train=False)
    return SourceSplit(train_x, train_y, test_x, test_y, 10)


def cap_per_class(x: np.ndarray, y: np.ndarray, cap: int | None, rng: np.random.Generator):
    if cap is None:
        return x, y
    keep = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:cap] for c in np.unique(y)])
    keep.sort()
    return x[keep], y[keep]


def imbalanced_indices(y: np.ndarray, majority: int, minority: int, ratio: float,
                       rng: np.random.Generator) -> np.ndarray:
    """Every row of the majority class and a random round(n_maj / R_I) rows (at least 1) of the minority class.

    When the minority class has too few rows for the ratio, the majority is cut instead, so the ratio holds.
    """
    maj, mino = np.flatnonzero(y == majority), rng.permutation(np.flatnonzero(y == minority))
    n_min = max(1, int(round(len(maj) / ratio)))
    if n_min > len(mino):
        n_min = len(mino)
        maj = rng.permutation(maj)[:max(1, int(round(n_min * ratio)))]
    idx = np.concatenate([maj, mino[:n_min]])
    idx.sort()
    return idx


@dataclass(frozen=True)
class RealData:
    train: Dataset  # dataset 0: every majority row and round(n_maj / R_I) minority rows of the training split
    test: Dataset  # the full held-out split, every class (classifier accuracy, per-class FID references)
    train_full: Dataset  # the full, balanced training split of every class (the domain classifier's data)
    num_classes: int


def load_real(p: DataParams, seed: int, project_root: Path, truth=None) -> RealData:
    """Load a source and cut the class-imbalanced training subset the study starts from (paper §1.2, §5.1).

    Source ``model`` (1-D families): ``data.size`` draws from ``truth`` (the family, which knows its true
    parameters) for training, as many independent ones for the test split; no labels."""
    if p.source == "model":
        if truth is None:
            raise ValueError("data.source model needs the family whose true distribution to draw from")
        train = Dataset.real(truth.true_sample(p.size, seed), np.full(p.size, -1), "model")
        test = Dataset.real(truth.true_sample(p.size, seed + 1_000_003), np.full(p.size, -1), "model")
        return RealData(train=train, test=test, train_full=train, num_classes=0)
    split = SOURCES.get(p.source)(p, seed, project_root)
    rng = np.random.default_rng([seed, 1])
    train_x, train_y = cap_per_class(split.train_x, split.train_y, p.max_per_class, rng)
    test_x, test_y = cap_per_class(split.test_x, split.test_y, p.max_per_class, rng)
    idx = imbalanced_indices(train_y, p.majority, p.minority, p.imbalance_ratio, rng)
    return RealData(train=Dataset.real(train_x[idx], train_y[idx], p.source),
                    test=Dataset.real(test_x, test_y, p.source),
                    train_full=Dataset.real(train_x, train_y, p.source),
                    num_classes=split.num_classes)


def evaluation_reference(test: Dataset, p: DataParams, seed: int) -> Dataset:
    """The held-out rows of the two study classes at the training imbalance ratio: what a perfect model of
    dataset 0 would generate, so overall FID, KID, precision and recall compare like with like."""
    idx = imbalanced_indices(test.label, p.majority, p.minority, p.imbalance_ratio, np.random.default_rng([seed, 2]))
    return test.take(idx)
