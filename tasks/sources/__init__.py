"""Data sources: where a study's real data come from.

A source is a class registered by name (``data.source`` in params.yaml) with the fields it adds to the ``data``
section (``data.test_fraction``, ``data.root``, ...). It knows its kind (``image`` data with classes, or
``scalar`` draws for the 1-D families), how to name its classes, how to check itself against the machine before
any work (``check``), and how to load its full train and test splits (``load``). The class-imbalanced subset is
cut from those the same way for every source, once per lineage seed (``tasks.datasets.draw_real``); an unlabelled
source draws its own (``draw``). Each module of this package is one source (or a family of them) and is found on
first lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.registries import SOURCES


@dataclass(frozen=True)
class SourceSplit:
    """A source's full train and test splits, all classes, as images in [0, 1] (labels -1 where there are none)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


class Source:
    kind = "image"  # image sources have labelled classes; scalar ones are draws for the 1-D families
    classes: tuple[str, ...] = tuple(str(c) for c in range(10))  # class names; an index is also accepted

    @classmethod
    def class_index(cls, key: str, value: int | str) -> int | str:
        """The class index of ``value`` (an index, or a name of ``classes``); ValueError naming ``data.<key>``."""
        if cls.kind != "image":
            return value
        if isinstance(value, str) and value in cls.classes:
            return cls.classes.index(value)
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, int) and 0 <= value < len(cls.classes):
            return value
        names = "" if cls.classes == tuple(str(c) for c in range(len(cls.classes))) else \
            f", or a name: {', '.join(cls.classes)}"
        raise ValueError(f"data.{key}: unknown class {value!r} (known: 0-{len(cls.classes) - 1}{names})")

    @classmethod
    def check(cls, data, project_root: Path) -> None:
        """Fail before any work (ParamsError naming the key) when the source cannot be loaded here."""

    @classmethod
    def load(cls, data, seed: int, project_root: Path, family) -> SourceSplit:
        """The full train and test splits (the study's ``seed`` where the split is random)."""
        raise NotImplementedError

    @classmethod
    def draw(cls, data, seed: int, family):
        """An unlabelled source's dataset 0 for one lineage (a ``tasks.datasets.Dataset``), decided by ``seed``;
        labelled sources are cut by ``tasks.datasets.draw_real`` instead."""
        raise NotImplementedError(f"{cls.__name__} has no draw of its own")

    @classmethod
    def size_bound(cls, data) -> tuple[int, tuple[int, ...], str] | None:
        """Before loading: at most how many rows the source's train and test splits hold together, the shape of a
        row, and the params key that decides the rows (for the memory and disk estimate, ``tasks.sizing``).
        None: unknown (the estimate then leaves the real data out, and the samples when they follow its size)."""
        return None


__all__ = ["SOURCES", "Source", "SourceSplit"]
