"""Mitigations: what a lineage does about collapse and unfairness, generation by generation.

A mitigation is a class registered by name (a lineage's ``mitigation``) with the settings it reads
(``mitigation.<name>`` for its own knobs, plus any shared section it reads, such as ``classifier`` when it
labels rows with the domain classifier: so changing those re-makes its lineages' datasets). One instance serves
one lineage; each hook has a do-nothing default, so a mitigation overrides only what it changes:

- :meth:`Mitigation.resume`: restore its state from the finished generations' manifests;
- :meth:`Mitigation.training_weights`: per-row weights for fitting model k on dataset k;
- :meth:`Mitigation.after_fit`: model k as fitted -> the model k that is scored, sampled and saved (Neon);
- :meth:`Mitigation.candidates` and :meth:`Mitigation.select`: how many samples model k draws so that the n its
  loop mode asks for are kept, and which n (verification filters, curation, entropy-based selection);
- :meth:`Mitigation.next_dataset`: dataset k+1 (default: the loop mode's).

A mitigation is given a :class:`MitigationContext`, what it may read of its lineage (a mode's
:class:`tasks.modes.ModeContext` plus the scorer, the lineage's mode, the device and the study seed), never the
lineage itself. Its public methods are the hooks above and nothing else: registration refuses any other public name
(a misspelled hook would silently never be called, the do-nothing default running instead); a helper's name starts
with ``_``.

Each module of this package is one mitigation, found on first lookup. ``none`` is this base class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tasks.datasets import Dataset
from tasks.modes import LoopMode, ModeContext
from tasks.registries import MITIGATIONS

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class MitigationContext(ModeContext):
    """What a lineage gives its mitigation: what its mode gets, and what a mitigation also acts with."""

    scorer: Any  # the study's scorer seen from this lineage: the labeller (domain classifier, its features)
    mode: LoopMode  # the lineage's loop mode (the default :meth:`Mitigation.next_dataset` defers to it)
    device: torch.device  # the device the lineage fits on (a mitigation that trains: Neon)
    study_seed: int  # the study's seed, which drew the study's shared splits (a reference set drawn from them)


class Mitigation:
    """No mitigation: the loop as its mode makes it."""

    needs_labels = False  # works on labelled groups (image families only)
    needs_classifier = False  # reads the domain classifier (image families only)

    def __init__(self, context: MitigationContext):
        self.context = context

    @classmethod
    def supports(cls, family) -> str | None:
        """Why this mitigation cannot run with ``family`` (a class), or None."""
        if cls.needs_labels and family.kind != "image":
            return f"is {family.kind}: it has no labelled groups"
        if cls.needs_classifier and family.kind != "image":
            return f"is {family.kind}: it has no domain classifier"
        return None

    def resume(self, finished: list[dict[str, Any]]) -> None:
        """Restore any state from the manifests of the generations finished earlier."""

    def training_weights(self, k: int, dataset: Dataset) -> tuple[np.ndarray | None, dict[str, float]]:
        """Per-row weights for fitting model k on ``dataset`` (None: unweighted), and what to log about them."""
        return None, {}

    def after_fit(self, k: int, model, dataset: Dataset) -> tuple[Any, dict[str, float]]:
        """Model k from the model the estimator fitted on ``dataset`` (a FittedTorchModel), and what to log."""
        return model, {}

    def candidates(self, n: int) -> int:
        """How many samples model k draws so that :meth:`select` keeps ``n``."""
        return n

    def select(self, k: int, candidates: Dataset, n: int) -> tuple[Dataset, dict[str, float]]:
        """The ``n`` of model k's ``candidates`` that go on to the next dataset, and what to log."""
        return candidates, {}

    def next_dataset(self, k: int, current: Dataset, synthetic: Dataset,
                     metrics: dict[str, float]) -> tuple[Dataset, dict[str, float]]:
        """Dataset k+1 from dataset k and model k's samples (``metrics``: model k's scores), and what to log."""
        return self.context.mode.next_dataset(k, current, synthetic), {}


MITIGATIONS.only_hooks_of(Mitigation)
MITIGATIONS.register("none")(Mitigation)


def kept_rows(candidates: Dataset, keep: np.ndarray) -> Dataset:
    """The rows ``keep`` (indices) of ``candidates``, in the order they were drawn."""
    return candidates.take(np.sort(np.asarray(keep, dtype=np.int64)))


def selection_info(scorer, candidates: Dataset, kept: Dataset) -> dict[str, float]:
    """What a selecting mitigation logs about itself: the share of candidates it kept and the minority share (the
    domain classifier's call) before and after, the bias a selection can add."""
    return {"acceptance_rate": len(kept) / max(len(candidates), 1),
            "minority_share_candidates": scorer.minority_share(candidates),
            "minority_share_kept": scorer.minority_share(kept)}
