"""The 1-D scorer: the families know their truth, so a model is scored by its parameter estimates, their bias,
KL(estimate || truth) by Monte Carlo and the Wasserstein-1 distance to the true distribution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import PositiveInt

from models.families import build_family
from models.registry import Settings
from models.scalar import ScalarFamily, kl_divergence, wasserstein1
from tasks.datasets import Dataset
from tasks.scorers import SCORERS, Column, Scorer


class ScalarScoreSettings(Settings):
    mc_samples: PositiveInt = 100_000  # 1-D families: Monte Carlo draws for KL and Wasserstein-1 (paper: 1e5)


@SCORERS.register("scalar", settings={"score": ScalarScoreSettings})
@dataclass
class ScalarScorer(Scorer):
    """Parameter estimates and their bias, KL and W1 against the family's truth."""

    kind = "scalar"

    family: ScalarFamily
    mc_samples: int  # Monte Carlo draws for KL and W1 (paper §5.2: 1e5)
    picture_samples: int = 2000

    @classmethod
    def columns(cls, family) -> list[Column]:
        names = list(family.of().true_estimates())
        return [*(Column(f"param.{n}", summary=True) for n in names), *(Column(f"bias.{n}") for n in names),
                Column("kl", summary=True, better="lower"), Column("wasserstein", summary=True, better="lower")]

    @classmethod
    def build(cls, p, real, cache_dir: Path, device) -> tuple["ScalarScorer", str]:
        family = build_family(p.model.family, real.train.shape, p.model)
        return cls(family, p.score.mc_samples), f"1-D family {family.name}, truth {family.true_estimates()}"

    def evaluate(self, model, seed: int) -> tuple[np.ndarray, dict[str, float]]:
        estimate, truth = self.family.estimates(model), self.family.true_estimates()
        rng = np.random.default_rng(seed)
        metrics = {f"param.{k}": v for k, v in estimate.items()}
        metrics.update({f"bias.{k}": estimate[k] - truth[k] for k in truth})
        metrics["kl"] = kl_divergence(self.family, estimate, truth, self.mc_samples, rng)
        metrics["wasserstein"] = wasserstein1(self.family, estimate, truth, self.mc_samples, rng)
        return self.family.draw(estimate, self.picture_samples, rng), metrics

    def dataset_metrics(self, data: Dataset) -> dict[str, float]:
        return {}

    def picture(self, samples: np.ndarray, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        truth = self.family.true_estimates()
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        lo, hi = np.quantile(samples, [0.005, 0.995])
        ax.hist(samples, bins=60, range=(lo, hi), density=True, alpha=0.5, label="model samples")
        grid = np.linspace(lo, hi, 400)
        if self.family.name != "geometric":
            ax.plot(grid, np.exp(self.family.log_density(truth, grid)), "k-", lw=1.5, label="truth")
        ax.set_title(f"{self.family.name}: samples vs truth")
        ax.legend(frameon=False)
        fig.tight_layout()
        fig.savefig(path, format="png")
        plt.close(fig)

    @staticmethod
    def describe(metrics: dict[str, float]) -> str:
        params = "  ".join(f"{k.removeprefix('param.')} {v:.4g}" for k, v in metrics.items() if k.startswith("param."))
        return f"{params}  kl {metrics['kl']:.3g}  w1 {metrics['wasserstein']:.3g}"
