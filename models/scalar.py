"""The base of 1-D families with known truth (the analytic families of App. H.3 in ``models/families/analytic.py``,
the two-component GMM of §5.2 in ``models/families/gmm.py``), and their scores against the truth.

Each is a :class:`~models.families.TorchFamily` (so the PLE hypernetwork trains it like any module): the module
holds unconstrained raw parameters, :meth:`ScalarFamily.natural` maps them to the distribution's parameters
(softplus for scales and rates, sigmoid for probabilities, softmax for mixture weights). MLE is closed form
(EM via scikit-learn for the GMM); ``fit_ple_closed`` exists where the paper derives PLE analytically
(uniform: (n+1)/n max, App. E.4; Gaussian: the unbiased variance, App. F.3). Data have shape [N, 1].
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.families import FAMILIES, FittedTorchModel, TorchFamily, run
from models.registry import Settings


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
    # What each natural parameter is: "location", "scale", "rate" (1 / scale) or "probability". It fixes the
    # family's symmetry (models.batched makes the data-driven estimator equivariant to it) and its training box.
    roles: dict[str, str] = {}
    log_space = False  # the symmetry acts on log x (Pareto: x -> x^c maps b to b / c)
    SCALE_OF_ROLE = {"location": "linear", "scale": "log", "rate": "log", "probability": "unit"}

    def estimate_scales(self) -> dict[str, str]:
        """Each reported estimate's kind of quantity (``tasks.stats``): a location is linear, a scale or rate
        positive (log), a probability a share in [0, 1]; the interval over seeds follows it."""
        return {name: self.SCALE_OF_ROLE.get(self.roles.get(name, "location"), "linear")
                for name in self.true_estimates()}

    truth_fields: tuple[str, ...] | None = None  # the settings that are the true distribution (None: all of them)

    def __init__(self, data_shape=(1,), settings: Settings | None = None):
        super().__init__((1,), settings)
        values = settings.model_dump() if settings is not None else {}
        self.truth = {k: (list(v) if isinstance(v, (list, tuple)) else float(v)) for k, v in values.items()
                      if self.truth_fields is None or k in self.truth_fields}

    @classmethod
    def of(cls, **values) -> "ScalarFamily":
        """The family with these settings (the rest at their defaults), e.g. ``Uniform.of(a=2.0)``."""
        (settings_class,) = FAMILIES.entry(cls.name).settings.values()
        return cls((1,), settings_class(**values))

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

    def sample(self, module, n, generator=None, temperature=1.0, weights=None, penalty=False):
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

    def prior_box(self, spread: float, centre: dict[str, float] | None = None) -> dict[str, tuple[float, float, str]]:
        """Ranges of each natural parameter around the truth, or around ``centre`` (parameters by name, the truth's
        for those not given) (amortized training, per-seed truths): scales and rates x/÷ ``spread``
        (log-uniform), locations +- ``spread`` scales, probabilities in the logit box +- log(spread) around the
        centre's logit (linear in p between its ends)."""
        box, truth = {}, {**self.true_natural(), **(centre or {})}
        for name, value in truth.items():
            role = self.roles.get(name, "scale")
            if role == "location":
                scale = next(truth[k] for k, r in self.roles.items() if r == "scale")
                box[name] = (value - spread * scale, value + spread * scale, "linear")
            elif role == "probability":
                lo, hi = (1 / (1 + math.exp(-(logit(value) + d))) for d in (-math.log(spread), math.log(spread)))
                box[name] = (lo, hi, "linear")
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
    return wasserstein_distance(family.draw(estimate, samples, rng), family.draw(truth, samples, rng))


def wasserstein_distance(u: np.ndarray, v: np.ndarray) -> float:
    """``scipy.stats.wasserstein_distance(u, v)`` (unweighted), to the last bit, in about half its time: scipy
    argsorts both samples and then sorts their concatenation; here each is sorted once and the concatenation of two
    sorted runs is merged (a stable sort of two runs is a merge), and every later step is scipy's. A 1-D
    generation's score draws 2 x 1e5 points for it, which made it the largest cost of a cheap generation
    (tests/test_models.py checks the equality against scipy)."""
    u, v = np.sort(np.asarray(u, dtype=float)), np.sort(np.asarray(v, dtype=float))
    merged = np.concatenate((u, v))
    merged.sort(kind="mergesort")
    deltas = np.diff(merged)
    u_cdf = u.searchsorted(merged[:-1], "right") / u.size
    v_cdf = v.searchsorted(merged[:-1], "right") / v.size
    return float(np.vecdot(np.abs(u_cdf - v_cdf), deltas))

