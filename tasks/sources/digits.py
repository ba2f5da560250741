"""scikit-learn's bundled 8x8 digits: the offline default."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from models.registry import Settings
from tasks.sources import SOURCES, Source, SourceSplit


class DigitsSettings(Settings):
    study_wide = frozenset({"test_fraction"})  # the split every lineage shares

    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)  # digits: the held-out share (a stratified split)


@SOURCES.register("digits", settings={"data": DigitsSettings})
class Digits(Source):
    """scikit-learn's bundled 8x8 digits (1,797 images, 17 gray levels): the offline default."""

    @classmethod
    def load(cls, data, seed, project_root, family) -> SourceSplit:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        bunch = load_digits()
        x = (bunch.images / 16.0).astype(np.float32)[:, None]
        y = bunch.target.astype(np.int64)
        train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=data.test_fraction, random_state=seed,
                                                            stratify=y)
        return SourceSplit(train_x, train_y, test_x, test_y, 10)

    @classmethod
    def size_bound(cls, data):
        return 1797, (1, 8, 8), "data.source"
