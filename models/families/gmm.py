"""The two-component 1-D Gaussian mixture of §5.2, fitted by EM (MLE) or by the hypernetwork (PLE)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, PositiveFloat, PositiveInt
from scipy import stats

from models.families import FAMILIES
from models.registry import Settings
from models.scalar import ScalarFamily, positive, softplus_inverse


class GMMSettings(Settings):
    """The true mixture (data.source: model draws from it) and EM's stopping rule."""

    means: list[float] = Field(default_factory=lambda: [0.0, 2.0], min_length=2, max_length=2)
    variances: list[PositiveFloat] = Field(default_factory=lambda: [1.0, 1.0], min_length=2, max_length=2)
    minority_weight: float = Field(0.2, gt=0.0, lt=1.0)  # weight of the component at means[1]
    em_tol: PositiveFloat = 1e-8
    em_max_iter: PositiveInt = 10000


@FAMILIES.register("gmm", settings={"model.gmm": GMMSettings})
class GaussianMixture1D(ScalarFamily):
    """Two-component 1-D Gaussian mixture (§5.2): true means 0 and 2, unit variances, minority weight w.

    MLE is EM (scikit-learn's GaussianMixture, tight tolerance). The hypernetwork predicts means, variances
    (softplus) and responsibilities (softmax) in one step. Components are reported sorted by mean, so
    ``weight_1`` is the weight of the component near 2 (the minority in the truth).
    """

    name, raw_shapes = "gmm", {"means": (2,), "variances": (2,), "logits": (2,)}
    truth_fields = ("means", "variances", "minority_weight")

    def natural_from(self, raw):
        return {"means": raw["means"], "variances": positive(raw["variances"]),
                "weights": torch.softmax(raw["logits"], dim=-1)}

    def raw_from(self, natural):
        means, variances, weights = (np.asarray(natural[k], dtype=np.float64)
                                     for k in ("means", "variances", "weights"))
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

    def estimate_scales(self):
        return {name: {"mean": "linear", "var": "log", "weight": "unit"}[name.split("_")[0]]
                for name in self.true_estimates()}

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

        gm = GaussianMixture(2, tol=self.settings.em_tol, max_iter=self.settings.em_max_iter,
                             random_state=seed)
        gm.fit(x.reshape(-1, 1))
        return {"means": gm.means_.reshape(-1).tolist(), "variances": gm.covariances_.reshape(-1).tolist(),
                "weights": gm.weights_.tolist()}


def em_batch(x: np.ndarray, *, tol: float, max_iter: int, components: int = 2,
             reg_covar: float = 1e-6) -> dict[str, np.ndarray]:
    """EM for S 1-D Gaussian mixtures at once: x [S, n] -> means, variances, weights [S, K] and iterations [S].

    The same algorithm as scikit-learn's GaussianMixture (full EM; a variance floor ``reg_covar``; stop when
    the mean log-likelihood per point changes by less than ``tol``), vectorized across datasets: at a tolerance
    near float precision EM needs thousands of iterations on overlapping components, and one numpy pass over
    all S datasets per iteration is what makes the Fig. 3 study fit in minutes. Initialization, as
    scikit-learn's default: k-means (here Lloyd's iterations from the data's quantiles, deterministic)."""
    x = np.asarray(x, dtype=np.float64)
    S, n = x.shape
    means = np.quantile(x, (np.arange(components) + 0.5) / components, axis=1).T  # [S, K]
    for _ in range(100):  # Lloyd's k-means in 1-D
        assign = np.abs(x[..., None] - means[:, None]).argmin(-1)  # [S, n]
        onehot = assign[..., None] == np.arange(components)
        counts = onehot.sum(1)
        new = np.where(counts > 0, (onehot * x[..., None]).sum(1) / np.maximum(counts, 1), means)
        if np.allclose(new, means):
            break
        means = new
    resp = onehot.astype(np.float64)
    means, variances, weights = (np.zeros((S, components)) for _ in range(3))
    iterations = np.zeros(S, dtype=np.int64)
    previous = np.full(S, -np.inf)
    active = np.arange(S)  # the datasets still iterating: each pass computes only those
    xa, ra = x, resp
    for _ in range(max_iter + 1):
        nk = ra.sum(1) + 10 * np.finfo(float).eps  # M-step
        mu = np.einsum("snk,sn->sk", ra, xa) / nk
        diff = xa[..., None] - mu[:, None]
        var = np.einsum("snk,snk->sk", ra, diff * diff) / nk + reg_covar
        w = nk / n
        means[active], variances[active], weights[active] = mu, var, w
        iterations[active] += 1
        log_prob = (np.log(w) - 0.5 * np.log(2 * np.pi * var))[:, None] - 0.5 * diff * diff / var[:, None]  # E-step
        norm = np.logaddexp(log_prob[..., 0], log_prob[..., 1]) if components == 2 else \
            np.logaddexp.reduce(log_prob, axis=-1)
        loglik = norm.mean(1)
        going = np.abs(loglik - previous[active]) >= tol
        previous[active] = loglik
        if not going.any():
            break
        active, xa = active[going], xa[going]
        ra = np.exp(log_prob[going] - norm[going][..., None])
    return {"means": means, "variances": variances, "weights": weights, "iterations": iterations}
