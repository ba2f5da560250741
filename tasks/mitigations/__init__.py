"""Mitigations: what a lineage does about collapse and unfairness, generation by generation.

A mitigation is a class registered by name (a lineage's ``mitigation``) with the settings it reads
(``mitigation.<name>`` for its own knobs, plus any shared section it reads, such as ``classifier`` when it
labels rows with the domain classifier: so changing those re-makes its lineages' datasets). One instance serves
one lineage; each hook has a do-nothing default, so a mitigation overrides only what it changes:

- :meth:`Mitigation.resume`: restore its state from the finished generations' manifests;
- :meth:`Mitigation.training_weights`: per-row weights for fitting model k on dataset k;
- :meth:`Mitigation.next_dataset`: dataset k+1 (default: the loop mode's).

Each module of this package is one mitigation, found on first lookup. ``none`` is this base class.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tasks.datasets import Dataset
from tasks.registries import MITIGATIONS


@MITIGATIONS.register("none")
class Mitigation:
    """No mitigation: the loop as its mode makes it."""

    needs_labels = False  # works on labelled groups (image families only)

    def __init__(self, lineage):  # a tasks.generation.Lineage
        self.lineage = lineage

    @classmethod
    def supports(cls, family) -> str | None:
        """Why this mitigation cannot run with ``family`` (a class), or None."""
        if cls.needs_labels and family.kind != "image":
            return f"is {family.kind}: it has no labelled groups"
        return None

    def resume(self, finished: list[dict[str, Any]]) -> None:
        """Restore any state from the manifests of the generations finished earlier."""

    def training_weights(self, k: int, dataset: Dataset) -> tuple[np.ndarray | None, dict[str, float]]:
        """Per-row weights for fitting model k on ``dataset`` (None: unweighted), and what to log about them."""
        return None, {}

    def next_dataset(self, k: int, current: Dataset, synthetic: Dataset,
                     metrics: dict[str, float]) -> tuple[Dataset, dict[str, float]]:
        """Dataset k+1 from dataset k and model k's samples (``metrics``: model k's scores), and what to log."""
        return self.lineage.mode.next_dataset(k, current, synthetic), {}
