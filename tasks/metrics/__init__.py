"""Image metrics: what the image scorer measures of a model's samples, each a plug-in.

A metric is a class registered by name with the settings it reads (its own at ``score.<name>``, if any). It
declares its columns (``tasks.scorers.Column``) and computes them from the samples, their predicted classes and
the scorer (held-out references, the feature extractor, the classifier). Metrics run in ``order``; every
registered metric runs for every image generation and lands in the manifests, MLflow and the reports. Each
module of this package is one metric (or one library's group of them).
"""

from __future__ import annotations

import numpy as np

from tasks.registries import IMAGE_METRICS


class ImageMetric:
    order = 100  # position of its columns in tables (lower first)
    columns: tuple = ()  # tasks.scorers.Column, in table order

    @classmethod
    def compute(cls, scorer, samples: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, float]:
        """The columns' values for ``samples`` (``labels``: their predicted classes; ``scorer``: the ImageScorer)."""
        raise NotImplementedError



def image_metrics_in_order() -> list[type[ImageMetric]]:
    return sorted((entry.obj for entry in IMAGE_METRICS.entries()), key=lambda m: (m.order, m.__name__))
