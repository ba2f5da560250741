"""Loop modes: how dataset k+1 is made from the real data, dataset k and model k's samples.

A mode is a class registered by name (``loop.mode``, or a lineage's ``mode``) with the settings it reads, and
answers its lineage's questions: how many samples model k contributes (:meth:`LoopMode.synthetic_rows`), what
dataset k+1 is (:meth:`LoopMode.next_dataset`) and which rows of dataset k model k trains on
(:meth:`LoopMode.training_rows`, by default all of them). Each module of this package is one mode.
"""

from __future__ import annotations

from pydantic import Field

from models.registry import Settings
from tasks.datasets import Dataset
from tasks.registries import MODES


class RealFractionSettings(Settings):
    real_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # share of real rows in dataset k+1 (modes that mix them)


class LoopMode:
    accumulates = False  # dataset k holds every generation's samples so far (it grows: tasks.sizing counts it)

    def __init__(self, lineage):  # a tasks.generation.Lineage
        self.lineage = lineage

    @classmethod
    def supports(cls, family) -> str | None:
        """Why this mode cannot run with ``family`` (a class), or None."""
        return None

    @classmethod
    def data_problem(cls, p, real) -> str | None:
        """Why this mode cannot run a lineage with params ``p`` on its real data ``real``
        (``tasks.datasets.RealData``) for ``loop.generations`` generations, or None: checked before any work."""
        return None

    def synthetic_rows(self) -> int:
        """How many samples model k contributes to dataset k+1 (default ``loop.synthetic_size``, or as many as there
        are real training rows)."""
        return self.lineage.params.loop.synthetic_size or len(self.lineage.real.train)

    def next_dataset(self, k: int, current: Dataset, synthetic: Dataset) -> Dataset:
        raise NotImplementedError

    def training_rows(self, k: int, dataset: Dataset) -> Dataset:
        """The rows of dataset k that model k is fitted on (default: every row)."""
        return dataset


__all__ = ["MODES", "LoopMode", "RealFractionSettings"]
