"""The analytic 1-D families of App. H.3: uniform, Gaussian, Laplace, geometric, exponential, Pareto.

Each knows its truth (its settings at ``model.<name>``), a closed-form MLE, and where the paper derives one, a
closed-form PLE (uniform: (n+1)/n max, App. E.4; Gaussian: the unbiased variance, App. F.3).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, PositiveFloat
from scipy import stats

from models.families import FAMILIES
from models.registry import Settings
from models.scalar import ScalarFamily, hinge_outside, logit, positive, softplus_inverse


class UniformSettings(Settings):
    """The true parameters of the uniform family (data.source: model draws the real data from them)."""

    a: PositiveFloat = 1.0


class GaussianSettings(Settings):
    """The true parameters of the gaussian family (data.source: model draws the real data from them)."""

    mean: float = 0.0
    std: PositiveFloat = 1.0


class LaplaceSettings(Settings):
    """The true parameters of the laplace family (data.source: model draws the real data from them)."""

    loc: float = 0.0
    scale: PositiveFloat = 1.0


class GeometricSettings(Settings):
    """The true parameters of the geometric family (data.source: model draws the real data from them)."""

    p: float = Field(0.5, gt=0.0, lt=1.0)


class ExponentialSettings(Settings):
    """The true parameters of the exponential family (data.source: model draws the real data from them)."""

    rate: PositiveFloat = 0.5


class ParetoSettings(Settings):
    """The true parameters of the pareto family (data.source: model draws the real data from them)."""

    b: PositiveFloat = 1.0


@FAMILIES.register("uniform", settings={"model.uniform": UniformSettings})
class Uniform(ScalarFamily):
    """U[0, a]. MLE max(X) (biased by -a/(n+1)); closed-form PLE (n+1)/n max(X) (App. E.4)."""

    name, raw_shapes, has_closed_ple = "uniform", {"a": ()}, True
    roles = {"a": "scale"}


    def point_features(self, x):
        return torch.cat([x, torch.log(x.clamp_min(1e-6))], dim=-1)

    def natural_from(self, raw):
        return {"a": positive(raw["a"])}

    def raw_from(self, natural):
        return {"a": torch.tensor(softplus_inverse(natural["a"]))}

    def true_natural(self):
        return {"a": self.truth["a"]}

    def nll_natural(self, params, x):
        a = params["a"]
        return torch.log(a) + hinge_outside(x, 0.0, a)

    def sample_natural(self, params, u, generator):
        return params["a"] * u

    def scipy_dist(self, params):
        return stats.uniform(0, params["a"])

    def closed_mle(self, x, seed):
        return {"a": x.max(-1)}

    def closed_ple(self, x, seed):
        n = x.shape[-1]
        return {"a": (n + 1) / n * x.max(-1)}


@FAMILIES.register("gaussian", settings={"model.gaussian": GaussianSettings})
class Gaussian(ScalarFamily):
    """N(mu, sigma^2). MLE variance (1/n) sum (x - mean)^2 (biased by -sigma^2/n); closed-form PLE: the unbiased
    variance (App. F.3)."""

    name, raw_shapes, has_closed_ple = "gaussian", {"mean": (), "std": ()}, True
    roles = {"mean": "location", "std": "scale"}


    def point_features(self, x):
        return torch.cat([x, x * x], dim=-1)  # what h1 starts from: the sufficient statistics' summands

    def natural_from(self, raw):
        return {"mean": raw["mean"], "std": positive(raw["std"])}

    def raw_from(self, natural):
        return {"mean": torch.tensor(float(natural["mean"])), "std": torch.tensor(softplus_inverse(natural["std"]))}

    def true_natural(self):
        return {"mean": self.truth["mean"], "std": self.truth["std"]}

    def nll_natural(self, params, x):
        return -torch.distributions.Normal(params["mean"], params["std"]).log_prob(x)

    def sample_natural(self, params, u, generator):
        return params["mean"] + params["std"] * torch.special.ndtri(u)

    def scipy_dist(self, params):
        return stats.norm(params["mean"], params["std"])

    def closed_mle(self, x, seed):
        return {"mean": x.mean(-1), "std": x.std(-1, ddof=0)}

    def closed_ple(self, x, seed):
        return {"mean": x.mean(-1), "std": x.std(-1, ddof=1)}


@FAMILIES.register("laplace", settings={"model.laplace": LaplaceSettings})
class Laplace(ScalarFamily):
    """Laplace(mu, b). MLE: median and mean absolute deviation from it (App. H.3)."""

    name, raw_shapes = "laplace", {"loc": (), "scale": ()}
    roles = {"loc": "location", "scale": "scale"}


    def point_features(self, x):
        return torch.cat([x, x.abs()], dim=-1)

    def natural_from(self, raw):
        return {"loc": raw["loc"], "scale": positive(raw["scale"])}

    def raw_from(self, natural):
        return {"loc": torch.tensor(float(natural["loc"])), "scale": torch.tensor(softplus_inverse(natural["scale"]))}

    def true_natural(self):
        return {"loc": self.truth["loc"], "scale": self.truth["scale"]}

    def nll_natural(self, params, x):
        return torch.log(2 * params["scale"]) + (x - params["loc"]).abs() / params["scale"]

    def sample_natural(self, params, u, generator):
        centered = u - 0.5
        return params["loc"] - params["scale"] * centered.sign() * torch.log1p(-2 * centered.abs())

    def scipy_dist(self, params):
        return stats.laplace(params["loc"], params["scale"])

    def closed_mle(self, x, seed):
        median = np.median(x, -1)
        return {"loc": median, "scale": np.abs(x - median[..., None]).mean(-1)}


@FAMILIES.register("geometric", settings={"model.geometric": GeometricSettings})
class Geometric(ScalarFamily):
    """Geometric(p) on {1, 2, ...}. MLE p = n / sum x. Samples are discrete: no gradient flows through them."""

    name, raw_shapes = "geometric", {"p": ()}
    roles = {"p": "probability"}


    def point_features(self, x):
        return torch.cat([x, torch.log(x.clamp_min(1e-6))], dim=-1)

    def natural_from(self, raw):
        return {"p": torch.sigmoid(raw["p"]).clamp(1e-6, 1 - 1e-6)}

    def raw_from(self, natural):
        return {"p": torch.tensor(logit(natural["p"]))}

    def true_natural(self):
        return {"p": self.truth["p"]}

    def nll_natural(self, params, x):
        p = params["p"]
        return -((x - 1) * torch.log1p(-p) + torch.log(p))

    def sample_natural(self, params, u, generator):
        p = params["p"].detach()
        return torch.floor(torch.log(u) / torch.log1p(-p)) + 1

    def scipy_dist(self, params):
        return stats.geom(params["p"])

    def closed_mle(self, x, seed):
        return {"p": x.shape[-1] / x.sum(-1)}


@FAMILIES.register("exponential", settings={"model.exponential": ExponentialSettings})
class Exponential(ScalarFamily):
    """Exponential(rate). MLE rate = n / sum x (biased up by n/(n-1))."""

    name, raw_shapes = "exponential", {"rate": ()}
    roles = {"rate": "rate"}


    def point_features(self, x):
        return torch.cat([x, torch.log(x.clamp_min(1e-6))], dim=-1)

    def natural_from(self, raw):
        return {"rate": positive(raw["rate"])}

    def raw_from(self, natural):
        return {"rate": torch.tensor(softplus_inverse(natural["rate"]))}

    def true_natural(self):
        return {"rate": self.truth["rate"]}

    def nll_natural(self, params, x):
        return params["rate"] * x - torch.log(params["rate"])

    def sample_natural(self, params, u, generator):
        return -torch.log(u) / params["rate"]

    def scipy_dist(self, params):
        return stats.expon(scale=1.0 / params["rate"])

    def closed_mle(self, x, seed):
        return {"rate": x.shape[-1] / x.sum(-1)}


@FAMILIES.register("pareto", settings={"model.pareto": ParetoSettings})
class Pareto(ScalarFamily):
    """Type-I Pareto with density b / x^(b+1) on x >= 1 (scale 1, as in App. H.3).

    MLE as App. H.3 states it: b = n / (sum log x - n log min x), i.e. the MLE when the scale is unknown too;
    samples use scale 1. The hypernetwork sees log x (heavy tails would swamp h1 otherwise).
    """

    name, raw_shapes = "pareto", {"b": ()}
    roles = {"b": "rate"}
    log_space = True  # log x is exponential with rate b: the symmetry acts on log x


    def natural_from(self, raw):
        return {"b": positive(raw["b"])}

    def raw_from(self, natural):
        return {"b": torch.tensor(softplus_inverse(natural["b"]))}

    def true_natural(self):
        return {"b": self.truth["b"]}

    def nll_natural(self, params, x):
        b = params["b"]
        return -torch.log(b) + (b + 1) * torch.log(x.clamp_min(1.0))

    def sample_natural(self, params, u, generator):
        # x = u^(-1/b) overflows float32 for small b; cap log x at 80 (x < 6e34) so training never sees inf
        return torch.exp((-torch.log(u) / params["b"]).clamp(max=80.0))

    def point_features(self, x):
        return torch.log(x.clamp_min(1.0))

    def scipy_dist(self, params):
        return stats.pareto(params["b"])

    def closed_mle(self, x, seed):
        n = x.shape[-1]
        return {"b": n / (np.log(x).sum(-1) - n * np.log(x.min(-1)))}
