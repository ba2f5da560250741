"""Loop modes: how dataset k+1 is made from the real data, dataset k and model k's samples.

A mode is a class registered by name (``loop.mode``, or a lineage's ``mode``) with the settings it reads, and
answers two questions for its lineage: how many samples model k contributes (:meth:`LoopMode.synthetic_rows`)
and what dataset k+1 is (:meth:`LoopMode.next_dataset`). Each module of this package is one mode.
"""

from __future__ import annotations

from pydantic import Field

from models.registry import Settings
from tasks.datasets import Dataset
from tasks.registries import MODES


class RealFractionSettings(Settings):
    real_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # share of real rows in dataset k+1 (modes that mix them)


class LoopMode:
    def __init__(self, lineage):  # a tasks.generation.Lineage
        self.lineage = lineage

    @classmethod
    def supports(cls, family) -> str | None:
        """Why this mode cannot run with ``family`` (a class), or None."""
        return None

    def synthetic_rows(self) -> int:
        """How many samples model k contributes to dataset k+1 (default ``loop.synthetic_size``, or as many as there
        are real training rows)."""
        return self.lineage.params.loop.synthetic_size or len(self.lineage.real.train)

    def next_dataset(self, k: int, current: Dataset, synthetic: Dataset) -> Dataset:
        raise NotImplementedError


__all__ = ["MODES", "LoopMode", "RealFractionSettings"]
