"""1-D estimation vectorized across seeds: what the paper-reproduction studies (Fig. 3, Fig. 4) run.

Two forms of the paper's hypernetwork H(X) = h2(mean_i h1(x_i)) (Eq. 6), trained by PLE (Eq. 5):

* :class:`SetEstimator` + :func:`train_amortized_ple`: one H for a family and a sample size n, trained on
  many datasets X drawn at parameters spread over a box around the truth (a parametric bootstrap), then used
  as a fixed estimator, like the closed forms MLE and PLE are. This is our reading of App. H.3's "data-driven
  form": the constraint E_{X,Y}[H(Y) - H(X)] = 0 is an expectation over datasets X, so H must see many. (Trained
  on one 20-point dataset alone, H can satisfy the penalty by ignoring its input, and its estimate is the MLE;
  we measured exactly that.) Applying it to 1,000 seeds x 50 generations is one batched forward per generation.

* :class:`BatchedMLP` + :func:`fit_gmm_ple_batch`: S independent hypernetworks, one per seed, each trained on
  its own dataset as in §5.2 (H predicts means, variances via softplus and weights via softmax), all in one
  batched computation: weights carry a leading seed axis and Adam, being elementwise, treats them as S
  separate optimizers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.hypernet import mlp
from models.penalty import penalized
from models.penalty import penalty as eq5_penalty
from models.scalar import ScalarFamily


def expand(params: dict[str, torch.Tensor], extra_dims: int = 2) -> dict[str, torch.Tensor]:
    """[B, *param_shape] -> [B, 1 (x extra_dims-1), ...] so parameters broadcast against data [B, n, 1]."""
    out = {}
    for name, value in params.items():
        if value.dim() == 1:  # a scalar parameter per batch entry
            out[name] = value.reshape(-1, *([1] * extra_dims))
        else:  # a vector parameter (GMM: K components) per batch entry
            out[name] = value.reshape(value.shape[0], *([1] * (extra_dims - 1)), value.shape[-1])
    return out


class SetEstimator(nn.Module):
    """H over a batch of datasets: x [B, n, 1] -> the family's natural parameters, each [B, *shape].

    H is made equivariant to the family's symmetry (``ScalarFamily.roles``): each dataset is standardized by its
    own statistics before h1 (location-scale families: mean and standard deviation; scale families: the mean
    |x|; Pareto: the mean log x; no transform for a probability), and the outputs are mapped back (a location
    becomes m + s v, a scale s v, a rate v / s). The MLEs share this equivariance, so H trained with lambda = 0
    can learn them, and no estimator profits from where the truth sits in its training box: H sees the same
    standardized data whatever the truth's scale and location."""

    def __init__(self, family: ScalarFamily, hidden: list[int], head_hidden: list[int]):
        super().__init__()
        self.family = [family]  # not a submodule
        self.names = list(family.raw_shapes)
        self.sizes = [math.prod(family.raw_shapes[n]) for n in self.names]
        features = family.point_features(torch.ones(1, 1, 1)).shape[-1]
        self.h1 = mlp([features, *hidden])
        self.h2 = mlp([hidden[-1], *head_hidden, sum(self.sizes)])

    def standardize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(standardized data, shift m, scale s), m and s of shape [..., 1, 1] (per dataset)."""
        family = self.family[0]
        roles = set(family.roles.values())
        zero = torch.zeros_like(x[..., :1, :])
        if "location" in roles:
            m, s = x.mean(dim=-2, keepdim=True), x.std(dim=-2, keepdim=True).clamp_min(1e-6)
            return (x - m) / s, m, s
        if roles & {"scale", "rate"} and family.log_space:
            log_x = torch.log(x.clamp_min(1.0))
            s = log_x.mean(dim=-2, keepdim=True).clamp_min(1e-6)
            return torch.exp(log_x / s), zero, s
        if roles & {"scale", "rate"}:
            s = x.abs().mean(dim=-2, keepdim=True).clamp_min(1e-12)
            return x / s, zero, s
        return x, zero, torch.ones_like(zero)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        family = self.family[0]
        z, m, s = self.standardize(x)
        flat = self.h2(self.h1(family.point_features(z)).mean(dim=-2))
        raw = {}
        for name, chunk in zip(self.names, flat.split(self.sizes, dim=-1)):
            shape = family.raw_shapes[name]
            raw[name] = chunk.reshape(*chunk.shape[:-1], *shape) if shape else chunk[..., 0]
        natural = family.natural_from(raw)  # of the standardized data
        m, s = m[..., 0, 0], s[..., 0, 0]
        back = {"location": lambda v: m + s * v, "scale": lambda v: s * v, "rate": lambda v: v / s}
        return {name: back.get(family.roles.get(name), lambda v: v)(value) for name, value in natural.items()}


def unconstrained(family: ScalarFamily, natural: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """H's outputs in the coordinates the penalty compares: locations as they are, scales and rates as logs,
    probabilities as logits."""
    out = {}
    for name, value in natural.items():
        role = family.roles.get(name, "scale")
        out[name] = value if role == "location" else torch.logit(value.clamp(1e-6, 1 - 1e-6)) \
            if role == "probability" else torch.log(value.clamp_min(1e-12))
    return out


def sample_prior(family: ScalarFamily, batch: int, spread: float, generator: torch.Generator,
                 centre: dict[str, float] | None = None) -> dict:
    """``batch`` parameter draws, uniform over the prior box (log-uniform for scales and rates)."""
    out = {}
    for name, (low, high, scale) in family.prior_box(spread, centre).items():
        u = torch.rand(batch, generator=generator)
        out[name] = (math.log(low) + u * (math.log(high) - math.log(low))).exp() if scale == "log" \
            else low + u * (high - low)
    return out


def draw(family: ScalarFamily, params: dict[str, torch.Tensor], n: int, generator: torch.Generator,
         sets: int | None = None) -> torch.Tensor:
    """Reparameterized draws: [B, n, 1], or [B, sets, n, 1] with ``sets`` independent datasets per entry."""
    batch = next(iter(params.values())).shape[0]
    shape = (batch, n, 1) if sets is None else (batch, sets, n, 1)
    u = torch.rand(shape, generator=generator).clamp(1e-7, 1 - 1e-7)
    return family.sample_natural(expand(params, 2 if sets is None else 3), u, generator)


def flat_raw(raw: dict[str, torch.Tensor], batch_dims: int) -> torch.Tensor:
    return torch.cat([v.reshape(*v.shape[:batch_dims], -1) for v in raw.values()], dim=-1)


def penalty_term(raw_y: torch.Tensor, raw_x: torch.Tensor, kind: str) -> torch.Tensor:
    """raw_y [B, m, P] (H of m synthetic sets per dataset), raw_x [B, P]: Eq. 5's penalty
    (``models.penalty.penalty``) of each dataset, averaged over the B datasets. ``kind``: ``per_set``,
    (1/m) sum_j |H(Y_j) - H(X)|, Eq. 5 as printed (it also penalizes the spread of H(Y_j)); ``mean``,
    |(1/m) sum_j H(Y_j) - H(X)|, the Lagrangian relaxation of Eq. 4's constraint E[H(Y) - H(X)] = 0, the one the
    closed forms of App. E-F solve. Both average over the P outputs."""
    return eq5_penalty(raw_y - raw_x[:, None], kind, "mean").mean()


def amortized_objective(model: "SetEstimator", x: torch.Tensor, *, lam: float, m: int, penalty: str,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, NLL per point, penalty or None) of H on the datasets x [B, n, 1]: Eq. 5 with the NLL averaged over
    the B datasets' points and the penalty over H's outputs in unconstrained coordinates (:func:`unconstrained`),
    Y_j ~ family(H(X)) reparameterized (``generator``: the synthetic sets' stream)."""
    family = model.family[0]
    natural_x = model(x)
    nll = family.nll_natural(expand(natural_x), x).mean()
    if lam <= 0:
        return nll, nll, None
    y = draw(family, natural_x, x.shape[1], generator, sets=m)  # [B, m, n, 1]
    h_y = flat_raw(unconstrained(family, model(y)), 2)  # [B, m, P]
    value = penalty_term(h_y, flat_raw(unconstrained(family, natural_x), 1), penalty)
    return penalized(nll, value, lam), nll, value


def train_amortized_ple(family: ScalarFamily, n: int, *, lam: float, m: int, steps: int, batch: int, lr: float,
                        hidden: list[int], head_hidden: list[int], spread: float, penalty: str, seed: int,
                        progress=None, centre: dict[str, float] | None = None) -> SetEstimator:
    """Train H on datasets of size n drawn over the prior box (around ``centre``, default the family's truth):
    :func:`amortized_objective`, Eq. 5 per point; a cosine learning-rate schedule over ``steps``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # the training datasets: the same for every lambda
    penalty_generator = torch.Generator().manual_seed(seed + 1)  # the synthetic sets: the penalty's own stream
    model = SetEstimator(family, hidden, head_hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        with torch.no_grad():
            x = draw(family, sample_prior(family, batch, spread, generator, centre), n, generator)
        loss, _, _ = amortized_objective(model, x, lam=lam, m=m, penalty=penalty, generator=penalty_generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, steps)
    return model.eval()


@torch.no_grad()
def apply_estimator(model: SetEstimator, x: np.ndarray) -> dict[str, np.ndarray]:
    """H on S datasets at once: x [S, n] -> natural parameters, each [S] (GMM-like vectors: [S, K])."""
    natural = model(torch.as_tensor(x, dtype=torch.float32)[..., None])
    return {k: v.double().numpy() for k, v in natural.items()}


class BatchedMLP(nn.Module):
    """S independent MLPs evaluated together: x [S, N, d_in] -> [S, N, d_out] (ReLU between layers)."""

    def __init__(self, copies: int, sizes: list[int], generator: torch.Generator):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            bound = 1 / math.sqrt(n_in)  # torch.nn.Linear's default initialization, per copy
            self.weights.append(nn.Parameter((torch.rand(copies, n_in, n_out, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(copies, 1, n_out, generator=generator) * 2 - 1) * bound))

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``members``: run only these copies (x then holds their inputs only, [len(members), N, d_in])."""
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if members is not None:
                w, b = w[members], b[members]
            x = torch.baddbmm(b, x, w)
            if i < last:
                x = torch.relu(x)
        return x


def fit_gmm_ple_batch(family: ScalarFamily, x: np.ndarray, *, lam: float, m: int, steps: int, batch: int, lr: float,
                      hidden: list[int], head_hidden: list[int], seed: int, finish_lr: float = 1e-3,
                      max_finish_steps: int = 0, reference_nll: np.ndarray | None = None, nll_gap: float = 0.0,
                      finish_m: int | None = None, check_every: int = 50, progress=None) -> dict[str, np.ndarray]:
    """PLE of a 1-D GMM for S datasets at once, one hypernetwork per dataset (§5.2): x [S, n] -> natural
    parameters of each fit ([S, K] each), and each fit's diagnostics.

    ``steps`` minibatch steps (``batch`` points; synthetic sets share that size) with a cosine learning-rate
    schedule from ``lr`` down to ``finish_lr``, then full-batch steps at ``finish_lr`` (every point: what the
    minibatch noise leaves undone), ``finish_m`` synthetic sets each (default m; Eq. 5's per-set penalty has the
    same expectation for any m, so fewer sets only add noise, at a fraction of the cost on big n).

    Trained to a tolerance: given each dataset's ``reference_nll`` (EM's NLL per point), a fit trains in the
    finish until its training NLL per point is within ``nll_gap`` of its reference (checked every
    ``check_every`` steps; from then on its weights stay as they are), or for ``max_finish_steps`` steps at most
    (the cap). Without a reference, every fit takes ``max_finish_steps`` full-batch steps. Returned per seed
    besides the parameters: ``nll`` (the fit's training NLL per point), ``penalty`` (Eq. 5's per-set penalty at
    the fitted H, m fresh synthetic sets of n points), ``finish_steps`` (full-batch steps it took), and with a
    reference ``nll_gap`` (NLL minus the reference's) and ``within_gap`` (1 when it reached the tolerance, 0 when
    the cap stopped it). The penalty's synthetic sets and the minibatches draw from random
    streams of their own, so lambda changes nothing else."""
    generator = torch.Generator().manual_seed(seed)  # initialization and minibatches: the same for every lambda
    penalty_generator = torch.Generator().manual_seed(seed + 1)
    data = torch.as_tensor(x, dtype=torch.float32)[..., None]  # [S, n, 1]
    copies, n = data.shape[:2]
    k = family.raw_shapes["means"][0]
    h1 = BatchedMLP(copies, [1, *hidden], generator)
    h2 = BatchedMLP(copies, [hidden[-1], *head_hidden, 3 * k], generator)
    parameters = [*h1.parameters(), *h2.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=finish_lr)

    def estimate(points: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:  # [A, b, 1] -> [A, 3K]
        return h2(h1(points, members).mean(dim=1, keepdim=True), members)[:, 0]

    def natural(raw: torch.Tensor) -> dict[str, torch.Tensor]:
        means, variances, logits = raw.split(k, dim=-1)
        return family.natural_from({"means": means, "variances": variances, "logits": logits})

    def objective(points: torch.Tensor, sets: int, members: torch.Tensor | None = None) -> torch.Tensor:  # [A]
        raw_x = estimate(points, members)
        params = natural(raw_x)
        loss = family.nll_natural(expand(params), points).mean(dim=1)
        if lam > 0:
            differences = []
            for _ in range(sets):
                u = torch.rand(*points.shape[:2], 1, generator=penalty_generator).clamp(1e-7, 1 - 1e-7)
                y = family.sample_natural(expand(params), u, penalty_generator)
                differences.append(estimate(y, members) - raw_x)
            loss = penalized(loss, eq5_penalty(torch.stack(differences, dim=1), "per_set", "mean"), lam)
        return loss

    @torch.no_grad()
    def training_nll() -> torch.Tensor:  # [S]: each fit's NLL per point on its whole dataset, in float64
        return family.nll_natural(expand(natural(estimate(data))), data).mean(dim=1).double()

    size = min(batch, n)
    total = steps + max_finish_steps
    for step in range(steps):
        points = data if size >= n else torch.gather(
            data, 1, torch.stack([torch.randperm(n, generator=generator)[:size] for _ in range(copies)])[..., None])
        optimizer.zero_grad(set_to_none=True)
        objective(points, m).sum().backward()  # summed over seeds: independent problems
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step + 1, total)

    for group in optimizer.param_groups:
        group["lr"] = finish_lr
    reference = None if reference_nll is None else torch.as_tensor(reference_nll, dtype=torch.float64)
    active = torch.ones(copies, dtype=torch.bool)
    taken = torch.zeros(copies)
    for step in range(max_finish_steps):
        if reference is not None and step % check_every == 0:
            active &= training_nll() - reference > nll_gap  # a fit within its tolerance stops here for good
            if not active.any():
                break
        members = active.nonzero()[:, 0]
        every = len(members) == copies
        frozen = [p.detach().clone() for p in parameters] if not every else None
        optimizer.zero_grad(set_to_none=True)
        objective(data if every else data[members], finish_m or m, None if every else members).sum().backward()
        optimizer.step()
        if frozen is not None:  # Adam moves a row with a zero gradient too (its momentum): put the others back
            with torch.no_grad():
                for p, before in zip(parameters, frozen):
                    p[~active] = before[~active]
        taken += active.float()
        if progress is not None:
            progress(steps + step + 1, total)

    with torch.no_grad():
        # The fit is H over the whole dataset (a streamed mean would be the same: h1 is per point).
        raw = estimate(data)
        params = natural(raw)
        check = torch.Generator().manual_seed(seed + 2)  # the penalty at the fit: a stream of its own
        differences = []
        for _ in range(m):
            u = torch.rand(copies, n, 1, generator=check).clamp(1e-7, 1 - 1e-7)
            differences.append(estimate(family.sample_natural(expand(params), u, check)) - raw)
        penalty_at_fit = eq5_penalty(torch.stack(differences, dim=1), "per_set", "mean")
    out = {name: value.double().numpy() for name, value in params.items()}
    nll = training_nll()
    out.update(nll=nll.numpy(), finish_steps=taken.double().numpy(), penalty=penalty_at_fit.double().numpy())
    if reference is not None:
        out.update(nll_gap=(nll - reference).numpy(), within_gap=(nll - reference <= nll_gap).double().numpy())
    return out
