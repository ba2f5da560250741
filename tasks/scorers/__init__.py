"""Scorers: what a generation's model is worth, against held-out real data or the known truth.

There is one scorer per kind of family (``image``: torch-fidelity scores and the fairness view; ``scalar``: the
error against the known truth), registered under that kind with the settings it reads. A scorer says which
metric columns it produces (``columns``), which of them the summary tables show, and which rank recipes, so
reports, the terminal table and the MLflow charts follow it instead of hand-kept lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.families import FAMILIES
from models.registry import Settings
from tasks.registries import SCORERS


@dataclass(frozen=True)
class Column:
    """A metric column. ``headline``: leads the per-generation CSV; ``summary``: in summary.md and the terminal
    table; ``rank``: in the recipe ranking; ``better``: "lower", "higher" or "" (no direction); ``scale``: what
    kind of quantity it is, which decides its interval over seeds (``tasks.stats``: "linear", "log" for positive
    skewed quantities, "unit" for shares in [0, 1])."""

    name: str
    headline: bool = False
    summary: bool = False
    rank: bool = False
    better: str = ""
    scale: str = "linear"


class Scorer:
    """``evaluate(model, seed) -> (samples to picture, metrics)``, ``dataset_metrics(data)`` (what a training
    set itself looked like), ``picture(samples, path, caption)`` (a PNG) and ``describe(metrics)`` (a log line)."""

    rank_by: str | None = None  # the metric recipes are ranked by (lower first); None: no ranking

    def for_lineage(self, real) -> "Scorer":
        """The scorer as one lineage sees it (``real``: its ``tasks.datasets.RealData``); by default the same."""
        return self

    @classmethod
    def columns(cls, family) -> list[Column]:
        raise NotImplementedError

    @classmethod
    def settings(cls) -> dict[str, type[Settings]]:
        """Everything that decides its metrics (its own settings and its parts')."""
        return dict(SCORERS.entry(cls.kind).settings)



def scorer_class(family_name: str) -> type[Scorer]:
    return SCORERS.get(FAMILIES.get(family_name).kind)


def build_scorer(p, real, cache_dir: Path, device) -> tuple[Any, str]:
    """The scorer for the family's kind, and a line for the log (``real``: the study's ``tasks.datasets.RealSplit``,
    or a ``tasks.realdata.StudyReal``, whose split it takes)."""
    real = getattr(real, "split", real)
    return scorer_class(p.model.family).build(p, real, cache_dir, device)
