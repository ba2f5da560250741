"""1-D families with known truth: the two-component GMM of §5.2 and the analytic families of App. H.3.

Each is a :class:`~models.families.TorchFamily` (so the PLE hypernetwork trains it like any module): the module
holds unconstrained raw parameters, :meth:`ScalarFamily.natural` maps them to the distribution's parameters
(softplus for scales and rates, sigmoid for probabilities, softmax for mixture weights). MLE is closed form
(EM via scikit-learn for the GMM); ``fit_ple_closed`` exists where the paper derives PLE analytically
(uniform: (n+1)/n max, App. E.4; Gaussian: the unbiased variance, App. F.3). Data have shape [N, 1].
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from models.families import FAMILIES, FittedTorchModel, TorchFamily, run


def softplus_inverse(y: float) -> float:
    return float(y + math.log(-math.expm1(-y))) if y < 20 else float(y)


def logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class RawParameters(nn.Module):
    """Unconstrained parameters of a 1-D distribution; ``forward`` is the per-sample NLL (for functional calls)."""

    def __init__(self, family: "ScalarFamily", shapes: dict[str, tuple[int, ...]]):
        super().__init__()
        self.family = [family]  # a list, so the family is not registered as a submodule
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    def raw(self) -> dict[str, torch.Tensor]:
        # getattr, not named_parameters(): inside torch.func.functional_call the attributes are the swapped-in
        # tensors the hypernetwork emitted.
        return {name: getattr(self, name) for name in self.family[0].raw_shapes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        family = self.family[0]
        return family.nll_natural(family.natural_from(self.raw()), x)


class ScalarFamily(TorchFamily):
    kind = "scalar"
    raw_shapes: dict[str, tuple[int, ...]] = {}
    has_closed_ple = False

    def __init__(self, data_shape=(1,), **truth):
        super().__init__((1,))
        self.truth = {k: (list(v) if isinstance(v, (list, tuple)) else float(v)) for k, v in truth.items()}

    # --- the model -------------------------------------------------------------------------------------------

    def build(self) -> RawParameters:
        module = RawParameters(self, self.raw_shapes)
        self.set_natural(module, self.initial_natural())
        return module

    def natural_from(self, raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def raw_from(self, natural: dict[str, float]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def natural(self, module: nn.Module, weights=None) -> dict[str, torch.Tensor]:
        return self.natural_from(weights if weights is not None else module.raw())

    @torch.no_grad()
    def set_natural(self, module: nn.Module, natural: dict[str, float]) -> None:
        for name, value in self.raw_from(natural).items():
            getattr(module, name).copy_(value)

    def initial_natural(self) -> dict[str, float]:
        return dict(self.true_natural())

    def nll_natural(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, module, x, weights=None):
        return run(module, weights, x.reshape(-1, 1)).reshape(-1)

    def sample(self, module, n, generator=None, temperature=1.0, weights=None):
        params = self.natural(module, weights)
        device = next(iter(params.values())).device
        u = torch.rand(n, 1, generator=generator, device=device).clamp(1e-7, 1 - 1e-7)
        return self.sample_natural(params, u, generator)

    def sample_natural(self, params, u, generator):
        raise NotImplementedError

    def point_features(self, x: torch.Tensor) -> torch.Tensor:
        """What h1 sees of one data point, elementwise (default: the value itself)."""
        return x

    def hyper_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_features(x).flatten(1)

    def prior_box(self, spread: float) -> dict[str, tuple[float, float, str]]:
        """Ranges of each natural parameter for amortized training: (low, high, 'log' | 'linear')."""
        box = {}
        for name, value in self.true_natural().items():
            if name in ("mean", "loc"):
                scale = next(v for k, v in self.true_natural().items() if k in ("std", "scale"))
                box[name] = (value - spread * scale, value + spread * scale, "linear")
            elif name == "p":
                box[name] = (0.02, 0.98, "linear")
            else:
                box[name] = (value / spread, value * spread, "log")
        return box

    # --- truth and estimates ---------------------------------------------------------------------------------

    def true_natural(self) -> dict[str, float]:
        raise NotImplementedError

    def estimates(self, model: FittedTorchModel) -> dict[str, float]:
        """The fitted distribution's parameters by name (what Fig. 4 plots)."""
        with torch.no_grad():
            return {k: float(v) for k, v in self.natural(model.module, model.weights).items()}

    def true_estimates(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.true_natural().items()}

    def scipy_dist(self, params: dict[str, float]):
        raise NotImplementedError

    def log_density(self, params: dict[str, float], y: np.ndarray) -> np.ndarray:
        dist = self.scipy_dist(params)
        return dist.logpmf(y) if hasattr(dist, "logpmf") else dist.logpdf(y)

    def draw(self, params: dict[str, float], n: int, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(self.scipy_dist(params).rvs(size=n, random_state=rng), dtype=np.float64)

    def true_sample(self, n: int, seed: int) -> np.ndarray:
        return self.draw(self.true_estimates(), n, np.random.default_rng(seed)).astype(np.float32).reshape(n, 1)

    # --- closed-form fits ------------------------------------------------------------------------------------

    def closed_mle(self, x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """Closed-form MLE along the last axis: x of shape [..., n] gives parameters of shape [...]
        (vectorized across seeds for the Fig. 4 study)."""
        raise NotImplementedError

    def closed_ple(self, x: np.ndarray, seed: int) -> dict[str, float]:
        raise NotImplementedError(f"no closed-form PLE is derived for the {self.name} family")

    def fitted(self, natural: dict[str, float], device="cpu") -> FittedTorchModel:
        module = self.build().to(device)
        self.set_natural(module, natural)
        return FittedTorchModel(self, module.eval())

    def fit_mle(self, x: np.ndarray, seed: int, device="cpu", **_) -> FittedTorchModel:
        return self.fitted(as_floats(self.closed_mle(np.asarray(x, dtype=np.float64).reshape(-1), seed)), device)

    def fit_ple_closed(self, x: np.ndarray, seed: int, device="cpu", **_) -> FittedTorchModel:
        return self.fitted(as_floats(self.closed_ple(np.asarray(x, dtype=np.float64).reshape(-1), seed)), device)

    def draw_batch(self, params: dict[str, np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
        """n draws for each of S parameter settings (arrays of shape [S]): an [S, n] array."""
        column = {k: np.asarray(v, dtype=np.float64)[:, None] for k, v in params.items()}
        size = (len(next(iter(column.values()))), n)
        return np.asarray(self.scipy_dist(column).rvs(size=size, random_state=rng), dtype=np.float64)


def as_floats(params: dict) -> dict:
    return {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in params.items()}


def positive(raw: torch.Tensor) -> torch.Tensor:
    return F.softplus(raw) + 1e-6


def hinge_outside(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor, steepness: float = 50.0):
    """Differentiable stand-in for an infinite NLL outside the support [low, high] (needed by gradient fits)."""
    width = high - low
    return steepness * (F.relu(x - high) + F.relu(low - x)) / width


@FAMILIES.register("uniform")
class Uniform(ScalarFamily):
    """U[0, a]. MLE max(X) (biased by -a/(n+1)); closed-form PLE (n+1)/n max(X) (App. E.4)."""

    name, raw_shapes, has_closed_ple = "uniform", {"a": ()}, True

    def __init__(self, data_shape=(1,), a=1.0):
        super().__init__(data_shape, a=a)

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


@FAMILIES.register("gaussian")
class Gaussian(ScalarFamily):
    """N(mu, sigma^2). MLE variance (1/n) sum (x - mean)^2 (biased by -sigma^2/n); closed-form PLE: the unbiased
    variance (App. F.3)."""

    name, raw_shapes, has_closed_ple = "gaussian", {"mean": (), "std": ()}, True

    def __init__(self, data_shape=(1,), mean=0.0, std=1.0):
        super().__init__(data_shape, mean=mean, std=std)

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


@FAMILIES.register("laplace")
class Laplace(ScalarFamily):
    """Laplace(mu, b). MLE: median and mean absolute deviation from it (App. H.3)."""

    name, raw_shapes = "laplace", {"loc": (), "scale": ()}

    def __init__(self, data_shape=(1,), loc=0.0, scale=1.0):
        super().__init__(data_shape, loc=loc, scale=scale)

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


@FAMILIES.register("geometric")
class Geometric(ScalarFamily):
    """Geometric(p) on {1, 2, ...}. MLE p = n / sum x. Samples are discrete: no gradient flows through them."""

    name, raw_shapes = "geometric", {"p": ()}

    def __init__(self, data_shape=(1,), p=0.5):
        super().__init__(data_shape, p=p)

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


@FAMILIES.register("exponential")
class Exponential(ScalarFamily):
    """Exponential(rate). MLE rate = n / sum x (biased up by n/(n-1))."""

    name, raw_shapes = "exponential", {"rate": ()}

    def __init__(self, data_shape=(1,), rate=0.5):
        super().__init__(data_shape, rate=rate)

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


@FAMILIES.register("pareto")
class Pareto(ScalarFamily):
    """Type-I Pareto with density b / x^(b+1) on x >= 1 (scale 1, as in App. H.3).

    MLE as App. H.3 states it: b = n / (sum log x - n log min x), i.e. the MLE when the scale is unknown too;
    samples use scale 1. The hypernetwork sees log x (heavy tails would swamp h1 otherwise).
    """

    name, raw_shapes = "pareto", {"b": ()}

    def __init__(self, data_shape=(1,), b=1.0):
        super().__init__(data_shape, b=b)

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


@FAMILIES.register("gmm")
class GaussianMixture1D(ScalarFamily):
    """Two-component 1-D Gaussian mixture (§5.2): true means 0 and 2, unit variances, minority weight w.

    MLE is EM (scikit-learn's GaussianMixture, tight tolerance). The hypernetwork predicts means, variances
    (softplus) and responsibilities (softmax) in one step. Components are reported sorted by mean, so
    ``weight_1`` is the weight of the component near 2 (the minority in the truth).
    """

    name, raw_shapes = "gmm", {"means": (2,), "variances": (2,), "logits": (2,)}

    def __init__(self, data_shape=(1,), means=(0.0, 2.0), variances=(1.0, 1.0), minority_weight=0.2,
                 em_tol=1e-8, em_max_iter=10000):
        super().__init__(data_shape, means=means, variances=variances, minority_weight=minority_weight)
        self.em_tol, self.em_max_iter = float(em_tol), int(em_max_iter)

    def natural_from(self, raw):
        return {"means": raw["means"], "variances": positive(raw["variances"]),
                "weights": torch.softmax(raw["logits"], dim=-1)}

    def raw_from(self, natural):
        means, variances, weights = (np.asarray(natural[k], dtype=np.float64) for k in ("means", "variances", "weights"))
        return {"means": torch.tensor(means, dtype=torch.float32),
                "variances": torch.tensor([softplus_inverse(v) for v in variances], dtype=torch.float32),
                "logits": torch.tensor(np.log(np.clip(weights, 1e-9, None)), dtype=torch.float32)}

    def true_natural(self):
        w = self.truth["minority_weight"]
        return {"means": self.truth["means"], "variances": self.truth["variances"], "weights": [1 - w, w]}

    def initial_natural(self):
        # Start from an uninformed symmetric guess, not the truth (the truth is what we estimate).
        return {"means": [-1.0, 1.0], "variances": [1.0, 1.0], "weights": [0.5, 0.5]}

    def nll_natural(self, params, x):
        normal = torch.distributions.Normal(params["means"], params["variances"].sqrt())
        return -torch.logsumexp(torch.log(params["weights"]) + normal.log_prob(x), dim=-1)

    def sample_natural(self, params, u, generator):
        """Broadcasts: params [..., K] (or [B, 1, K] for a batch of mixtures), u [..., n, 1]."""
        weights = params["weights"].detach()  # the component choice is discrete: no gradient flows through it
        shape = u.shape[:-1] + weights.shape[-1:]
        pick = torch.rand(u.shape, generator=generator, device=u.device)
        component = (pick > weights.cumsum(-1)[..., :-1]).sum(-1, keepdim=True)  # inverse CDF over components
        mean = torch.gather(params["means"].expand(shape), -1, component)
        std = torch.gather(params["variances"].expand(shape), -1, component).sqrt()
        return mean + std * torch.special.ndtri(u)

    def estimates(self, model):
        with torch.no_grad():
            params = {k: v.cpu().numpy() for k, v in self.natural(model.module, model.weights).items()}
        return self.flat(params)

    @staticmethod
    def flat(params) -> dict[str, float]:
        order = np.argsort(np.asarray(params["means"]))
        out = {}
        for i, j in enumerate(order):
            out[f"mean_{i}"] = float(np.asarray(params["means"])[j])
            out[f"var_{i}"] = float(np.asarray(params["variances"])[j])
            out[f"weight_{i}"] = float(np.asarray(params["weights"])[j])
        return out

    def true_estimates(self):
        return self.flat(self.true_natural())

    def log_density(self, params, y):
        means = np.array([params["mean_0"], params["mean_1"]])
        stds = np.sqrt([params["var_0"], params["var_1"]])
        weights = np.array([params["weight_0"], params["weight_1"]])
        return np.logaddexp(*(np.log(weights[k]) + stats.norm.logpdf(y, means[k], stds[k]) for k in range(2)))

    def draw(self, params, n, rng):
        weights = np.array([params["weight_0"], params["weight_1"]])
        component = rng.choice(2, size=n, p=weights / weights.sum())
        means = np.array([params["mean_0"], params["mean_1"]])[component]
        stds = np.sqrt(np.array([params["var_0"], params["var_1"]]))[component]
        return rng.normal(means, stds)

    def closed_mle(self, x, seed):
        from sklearn.mixture import GaussianMixture

        gm = GaussianMixture(2, tol=self.em_tol, max_iter=self.em_max_iter, random_state=seed)
        gm.fit(x.reshape(-1, 1))
        return {"means": gm.means_.reshape(-1).tolist(), "variances": gm.covariances_.reshape(-1).tolist(),
                "weights": gm.weights_.tolist()}


def kl_divergence(family: ScalarFamily, estimate: dict[str, float], truth: dict[str, float], samples: int,
                  rng: np.random.Generator) -> float:
    """KL(estimate || truth) by Monte Carlo: mean of log q(y) - log p(y) over y ~ q (paper §5.2: 1e5 samples)."""
    y = family.draw(estimate, samples, rng)
    with np.errstate(divide="ignore"):
        diff = family.log_density(estimate, y) - family.log_density(truth, y)
    return float(np.mean(diff)) if np.all(np.isfinite(diff)) else math.inf


def wasserstein1(family: ScalarFamily, estimate: dict[str, float], truth: dict[str, float], samples: int,
                 rng: np.random.Generator) -> float:
    """W1 between the estimated and true distributions, from samples of each."""
    return float(stats.wasserstein_distance(family.draw(estimate, samples, rng), family.draw(truth, samples, rng)))


ScoreFn = Callable[[ScalarFamily, dict, dict, int, np.random.Generator], float]
