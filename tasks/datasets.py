"""Datasets: rows of images with their provenance, Parquet files, and the class-imbalanced real data.

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

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.registries import SOURCES

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


def data_digest(data: Dataset) -> str:
    """sha256 of a dataset's content as it is in memory (every column, its shape and source): what a manifest
    records as the data a model was fitted on, and what a dataset read back from its Parquet file must match."""
    h = hashlib.sha256(json.dumps([data.source, list(data.shape), len(data)]).encode())
    h.update(np.ascontiguousarray(data.pixels, dtype=np.float32).tobytes())
    for column in (data.label, data.generation):
        h.update(np.ascontiguousarray(column, dtype=np.int64).tobytes())
    for column in (data.origin, data.lineage):
        h.update("\x1f".join("\x00" if v is None else str(v) for v in column).encode())
    return h.hexdigest()


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


# --- the real data a study starts from -------------------------------------------------------------------


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
class RealSplit:
    """A study's real data before any lineage draws from it: the source's training split (every class) and its
    held-out test split, the same for every lineage of the study (they decide the domain classifier and the
    scores' references)."""

    train_full: Dataset  # the full, balanced training split of every class (the domain classifier's data)
    test: Dataset  # the full held-out split, every class
    num_classes: int  # 0: an unlabelled source (the 1-D families' draws from their truth)


@dataclass(frozen=True)
class RealData:
    """One lineage's real data: its dataset 0 (its own draw), the study's splits, and which rows of the training
    split the draw used and kept aside. For an unlabelled source the index arrays are empty."""

    train: Dataset  # dataset 0: every majority row and round(n_maj / R_I) minority rows of the training split
    test: Dataset  # the full held-out split, every class (classifier accuracy, per-class references)
    train_full: Dataset  # the full, balanced training split of every class (the domain classifier's data)
    num_classes: int
    train_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # rows of train_full
    pool_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the fresh-data pool

    @property
    def pool(self) -> Dataset:
        """Real rows kept out of dataset 0 for the ``fresh`` loop mode (``data.fresh_pool``), never trained on
        unless a fresh generation draws them."""
        return self.train_full.take(self.pool_index)

    def unused_index(self, label: int) -> np.ndarray:
        """Rows of class ``label`` in the training split that neither dataset 0 nor the fresh pool holds: real
        images no model of this lineage ever trains on (they join the held-out ones as a class's reference)."""
        taken = np.zeros(len(self.train_full), dtype=bool)
        taken[self.train_index] = True
        taken[self.pool_index] = True
        return np.flatnonzero((self.train_full.label == label) & ~taken)


def load_split(p, seed: int, project_root: Path, family=None) -> RealSplit:
    """The source's training and test splits (``data.max_per_class`` caps each class of both, chosen by the
    study's ``seed``): what every lineage of the study shares."""
    split = SOURCES.get(p.source).load(p, seed, project_root, family)
    if split.num_classes == 0:
        return RealSplit(Dataset.real(split.train_x, split.train_y, p.source),
                         Dataset.real(split.test_x, split.test_y, p.source), 0)
    rng = np.random.default_rng([seed, 1])
    train_x, train_y = cap_per_class(split.train_x, split.train_y, p.max_per_class, rng)
    test_x, test_y = cap_per_class(split.test_x, split.test_y, p.max_per_class, rng)
    return RealSplit(Dataset.real(train_x, train_y, p.source), Dataset.real(test_x, test_y, p.source),
                     split.num_classes)


def fresh_pool_index(y: np.ndarray, classes: tuple[int, int], fraction: float, seed: int) -> np.ndarray:
    """``floor(fraction * n_c)`` random rows of each of the study's two classes: the fresh-data pool. Its own
    random stream, so a study without a pool draws exactly what it drew before pools existed."""
    if fraction <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng([seed, 2])
    rows = [rng.permutation(np.flatnonzero(y == c))[:int(fraction * (y == c).sum())] for c in classes]
    return np.sort(np.concatenate(rows)).astype(np.int64)


def draw_real(split: RealSplit, p, draw_seed: int, family=None) -> RealData:
    """One lineage's dataset 0 from the study's split, decided by ``draw_seed`` (the lineage's seed under
    ``data.draw: per_seed``, the study's under ``shared``): the class-imbalanced subset of the training split
    (paper §1.2, §5.1), after ``data.fresh_pool`` of each class was kept aside; for an unlabelled source, the
    source's own draw (``Source.draw``: the 1-D families draw from their truth)."""
    source = SOURCES.get(p.source)
    if split.num_classes == 0:
        return RealData(train=source.draw(p, draw_seed, family), test=split.test, train_full=split.train_full,
                        num_classes=0)
    y = split.train_full.label
    pool = fresh_pool_index(y, (p.majority, p.minority), p.fresh_pool, draw_seed)
    candidates = np.setdiff1d(np.arange(len(y)), pool)
    chosen = candidates[imbalanced_indices(y[candidates], p.majority, p.minority, p.imbalance_ratio,
                                           np.random.default_rng([draw_seed, 1]))]
    return RealData(train=split.train_full.take(chosen), test=split.test, train_full=split.train_full,
                    num_classes=split.num_classes, train_index=chosen, pool_index=pool)


def load_real(p, seed: int, project_root: Path, family=None) -> RealData:
    """The study's shared draw (its own ``seed``): :func:`load_split` then :func:`draw_real`."""
    return draw_real(load_split(p, seed, project_root, family), p, seed, family)


def evaluation_reference(test: Dataset, p) -> Dataset:
    """Every held-out row of the study's two classes (the test split is balanced), the reference the overall
    scores of generated images are computed against: as many real images as the split holds, so precision and
    recall do not move in coarse steps (digits: about 45 per class; mnist5k: 100)."""
    return test.take(np.flatnonzero(np.isin(test.label, [p.majority, p.minority])))
