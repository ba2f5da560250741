"""Loop modes: how dataset k+1 is made from the real data, dataset k and model k's samples.

A mode is a class registered by name (``loop.mode``, or a lineage's ``mode``) with the settings it reads, and
answers its lineage's questions: how many samples model k contributes (:meth:`LoopMode.synthetic_rows`), what
dataset k+1 is (:meth:`LoopMode.next_dataset`) and which rows of dataset k model k trains on
(:meth:`LoopMode.training_rows`, by default all of them). Each module of this package is one mode.

A mode is given a :class:`ModeContext`, what it may read of its lineage (its seed, real data, family and the
settings sections it reads), never the lineage itself. Its public methods are the hooks below and nothing else:
registration refuses any other public name (a misspelled hook would silently never be called); a helper's name
starts with ``_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from pydantic import BaseModel, Field

from models.registry import Settings
from tasks.datasets import Dataset, RealData
from tasks.registries import MODES

if TYPE_CHECKING:
    from models.families import TorchFamily


class RealFractionSettings(Settings):
    real_fraction: float = Field(0.5, gt=0.0, lt=1.0)  # share of real rows in dataset k+1 (modes that mix them)


@dataclass(frozen=True)
class ModeContext:
    """What a lineage gives its loop mode: exactly what decides the mode's datasets (the lineage's resume hash
    covers each of these)."""

    seed: int  # the lineage's seed (each random draw derives its own from it: tasks.seeds)
    real: RealData  # the lineage's real data: its dataset 0, the study's splits, the fresh-data pool
    family: TorchFamily  # the lineage's model family (its kind; the 1-D families' truth to draw fresh rows from)
    loop: BaseModel  # the core knobs of the lineage's ``loop`` section (``synthetic_size``, ``temperature``, ...)
    data: BaseModel  # the lineage's ``data`` section: the study's classes (``majority``, ``minority``)
    # each section the part declared at registration, by params path, holding exactly the fields it declared
    # (a mode's own ``loop`` fields too: ``settings["loop"].real_fraction``)
    settings: Mapping[str, BaseModel]


class LoopMode:
    accumulates = False  # dataset k holds every generation's samples so far (it grows: tasks.sizing counts it)

    def __init__(self, context: ModeContext):
        self.context = context

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
        return self.context.loop.synthetic_size or len(self.context.real.train)

    def next_dataset(self, k: int, current: Dataset, synthetic: Dataset) -> Dataset:
        raise NotImplementedError

    def training_rows(self, k: int, dataset: Dataset) -> Dataset:
        """The rows of dataset k that model k is fitted on (default: every row)."""
        return dataset


MODES.only_hooks_of(LoopMode)

__all__ = ["MODES", "LoopMode", "ModeContext", "RealFractionSettings"]
