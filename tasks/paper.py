"""The paper's evidence as plain functions (the flows in ``flows/studies.py`` wrap them).

* :func:`madness_curves` (Fig. 4/5, §5.3, App. H.3): estimate, draw n points from the estimate, re-estimate,
  for G generations and S seeds at once (one [S, n] array per generation), with MLE, closed-form PLE and the
  data-driven PLE hypernetwork.
* :func:`gmm_cell` (Fig. 3, §5.2): EM vs hypernetwork PLE for one (minority weight, n) cell over S seeds,
  KL(estimate || truth) by Monte Carlo.
* :func:`summarize` (Table 1, Fig. 2): mean and spread over seeds of the main loop's per-generation metrics.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
from joblib import Parallel, delayed

from models.batched import apply_estimator, fit_gmm_ple_batch, train_amortized_ple
from models.families import FAMILIES
from models.scalar import GaussianMixture1D, ScalarFamily

# The parameter each Fig. 4 panel shows (the others are in the CSV too).
MAIN_PARAMETER = {"uniform": "a", "gaussian": "std", "laplace": "scale", "geometric": "p", "exponential": "rate",
                  "pareto": "b"}
Progress = Callable[[int, int], None] | None


def valid(family: ScalarFamily, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep estimates inside the family's domain so a collapsed lineage stays collapsed instead of crashing
    the sampler (a variance of exactly 0, a rate of inf): scales in [1e-12, 1e12], probabilities in (0, 1)."""
    out = {}
    for name, value in params.items():
        value = np.nan_to_num(np.asarray(value, dtype=np.float64), nan=1e-12, posinf=1e12, neginf=-1e12)
        if name == "p":
            out[name] = np.clip(value, 1e-9, 1 - 1e-9)
        elif name in ("mean", "loc"):
            out[name] = np.clip(value, -1e12, 1e12)
        else:
            out[name] = np.clip(value, 1e-12, 1e12)
    return out


def run_lineages(family: ScalarFamily, estimate: Callable[[np.ndarray], dict], n: int, seeds: int, generations: int,
                 seed: int) -> dict[str, np.ndarray]:
    """Parameters of ``seeds`` independent lineages over ``generations``: name -> array [G, S]."""
    rng = np.random.default_rng(seed)
    truth = {k: np.full(seeds, v) for k, v in family.true_estimates().items()}
    x = family.draw_batch(truth, n, rng)
    history: dict[str, list[np.ndarray]] = {k: [] for k in truth}
    for _ in range(generations):
        params = valid(family, estimate(x))
        for name in history:
            history[name].append(params[name])
        x = family.draw_batch(params, n, rng)
    return {name: np.stack(values) for name, values in history.items()}


def calibration(family: ScalarFamily, estimators: dict[str, Callable], n: int, seeds: int, seed: int) -> list[dict]:
    """Does an estimator track the truth, or just return the middle of its training box? Mean estimate of the
    main parameter over ``seeds`` fresh datasets drawn at half, once and twice its true value (p: 0.25/0.5/0.75)."""
    name = MAIN_PARAMETER[family.name]
    truth = family.true_estimates()
    values = [0.25, 0.5, 0.75] if name == "p" else [truth[name] / 2, truth[name], truth[name] * 2]
    rng = np.random.default_rng([seed, 7])
    rows = []
    for value in values:
        x = family.draw_batch({**{k: np.full(seeds, v) for k, v in truth.items()}, name: np.full(seeds, value)}, n,
                              rng)
        for estimator, estimate in estimators.items():
            rows.append({"distribution": family.name, "parameter": name, "estimator": estimator,
                         "true_value": value, "mean_estimate": float(np.mean(valid(family, estimate(x))[name]))})
    return rows


def madness_curves(distribution: str, *, n: int, seeds: int, generations: int, lam: float, m: int, penalty: str,
                   steps: int, batch: int, lr: float, hidden, head_hidden, spread: float, seed: int = 0,
                   progress: Progress = None) -> tuple[list[dict], list[dict], dict[str, float]]:
    """Fig. 4 rows for one distribution: per estimator, parameter and generation, the mean, its standard error,
    the median and quartiles across seeds; calibration rows; the seconds each part took.

    Estimators: ``mle``; ``ple_closed`` where the paper derives it; ``ple``, the hypernetwork trained with the
    penalty; and ``hyper_nopenalty``, the same hypernetwork trained on the same datasets with lambda = 0. The
    last one is the control: whatever keeps it from collapsing (its training box, its architecture) is not the
    penalty's doing."""
    family = FAMILIES.get(distribution)()
    seconds: dict[str, float] = {}
    estimators: dict[str, Callable[[np.ndarray], dict]] = {"mle": lambda x: family.closed_mle(x, 0)}
    if family.has_closed_ple:
        estimators["ple_closed"] = lambda x: family.closed_ple(x, 0)
    if distribution != "uniform":  # the paper's uniform panel is the closed form (App. H.3, subfigure 1)
        for name, weight in (("ple", lam), ("hyper_nopenalty", 0.0)):
            started = time.perf_counter()
            hyper = train_amortized_ple(family, n, lam=weight, m=m, penalty=penalty, steps=steps, batch=batch, lr=lr,
                                        hidden=hidden, head_hidden=head_hidden, spread=spread, seed=seed,
                                        progress=progress if name == "ple" else None)
            seconds[f"train_{name}"] = time.perf_counter() - started
            estimators[name] = (lambda h: lambda x: apply_estimator(h, x))(hyper)
    truth = family.true_estimates()
    rows = []
    started = time.perf_counter()
    for name, estimate in estimators.items():
        history = run_lineages(family, estimate, n, seeds, generations, seed + 1)  # same data streams: paired
        for parameter, values in history.items():
            q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75], axis=1)
            for g in range(generations):
                rows.append({"distribution": distribution, "parameter": parameter, "estimator": name,
                             "generation": g, "mean": float(values[g].mean()),
                             "sem": float(values[g].std(ddof=1) / math.sqrt(seeds)), "median": float(median[g]),
                             "q25": float(q25[g]), "q75": float(q75[g]), "seeds": seeds, "n": n,
                             "truth": truth[parameter]})
    seconds["loops"] = time.perf_counter() - started
    return rows, calibration(family, estimators, n, seeds, seed), seconds


# --- Fig. 3 -------------------------------------------------------------------------------------------------


def gmm_arrays(fits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, stds, weights), each [S, K], components sorted by mean."""
    means, variances, weights = (np.atleast_2d(np.asarray(fits[k], dtype=np.float64))
                                 for k in ("means", "variances", "weights"))
    order = np.argsort(means, axis=1)
    pick = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return pick(means), np.sqrt(np.maximum(pick(variances), 1e-300)), pick(weights)


def gmm_logpdf(y: np.ndarray, means, stds, weights) -> np.ndarray:
    """log density of [S, N] points under S mixtures (arrays [S, K])."""
    z = (y[..., None] - means[:, None]) / stds[:, None]
    comp = np.log(np.maximum(weights[:, None], 1e-300)) - 0.5 * z ** 2 - np.log(stds[:, None]) \
        - 0.5 * math.log(2 * math.pi)
    return np.logaddexp.reduce(comp, axis=-1)


def gmm_kl(fits: dict[str, np.ndarray], truth: dict[str, np.ndarray], samples: int, rng: np.random.Generator,
           chunk: int = 10) -> np.ndarray:
    """KL(fit || truth) per seed by Monte Carlo, ``samples`` draws from each fit (paper: 1e5)."""
    means, stds, weights = gmm_arrays(fits)
    t_means, t_stds, t_weights = gmm_arrays(truth)
    out = np.empty(len(means))
    for start in range(0, len(means), chunk):
        sl = slice(start, start + chunk)
        k = rng.random((means[sl].shape[0], samples))
        component = (k[..., None] > np.cumsum(weights[sl], axis=1)[:, None, :-1]).sum(-1)
        y = np.take_along_axis(means[sl], component, 1) + np.take_along_axis(stds[sl], component, 1) * \
            rng.standard_normal(component.shape)
        tm, ts, tw = (np.broadcast_to(a, means[sl].shape) for a in (t_means, t_stds, t_weights))
        out[sl] = (gmm_logpdf(y, means[sl], stds[sl], weights[sl]) - gmm_logpdf(y, tm, ts, tw)).mean(axis=1)
    return out


def gmm_cell(weight: float, n: int, *, seeds: int, lam: float, m: int, steps: int, batch: int, lr: float,
             hidden, head_hidden, em_tol: float, em_max_iter: int, kl_samples: int, seed: int = 0,
             progress: Progress = None) -> dict[str, float]:
    """One cell of Fig. 3: S datasets of n points from the GMM with minority weight w; EM and PLE fit each;
    the seed-averaged KL(fit || truth) of both and their difference KL_MLE - KL_PLE (> 0: PLE better)."""
    family = GaussianMixture1D(minority_weight=weight, em_tol=em_tol, em_max_iter=em_max_iter)
    rng = np.random.default_rng([seed, int(weight * 1e6), n])
    truth = family.true_natural()
    x = np.stack([family.draw(family.true_estimates(), n, rng) for _ in range(seeds)])
    started = time.perf_counter()
    # EM to a tight tolerance is the slow half at large n (overlapping components converge slowly): one fit
    # per seed, independent, so joblib spreads them over the cores.
    em = Parallel(n_jobs=-1)(delayed(family.closed_mle)(x[s], seed + s) for s in range(seeds))
    em_fits = {k: np.array([fit[k] for fit in em]) for k in ("means", "variances", "weights")}
    em_seconds = time.perf_counter() - started
    started = time.perf_counter()
    ple_fits = fit_gmm_ple_batch(family, x, lam=lam, m=m, steps=steps, batch=batch, lr=lr, hidden=hidden,
                                 head_hidden=head_hidden, seed=seed, progress=progress)
    ple_seconds = time.perf_counter() - started
    truth_arrays = {k: np.asarray(v, dtype=np.float64)[None] for k, v in truth.items()}
    kl_mle = gmm_kl(em_fits, truth_arrays, kl_samples, rng)
    kl_ple = gmm_kl(ple_fits, truth_arrays, kl_samples, rng)
    diff = kl_mle - kl_ple
    return {"minority_weight": weight, "n": n, "seeds": seeds,
            "kl_mle": float(kl_mle.mean()), "kl_ple": float(kl_ple.mean()),
            "kl_mle_median": float(np.median(kl_mle)), "kl_ple_median": float(np.median(kl_ple)),
            "kl_diff": float(diff.mean()), "kl_diff_sem": float(diff.std(ddof=1) / math.sqrt(seeds)),
            "ple_better_share": float((diff > 0).mean()), "em_seconds": em_seconds, "ple_seconds": ple_seconds}


# --- Table 1 and Fig. 2: summaries of main-loop runs ----------------------------------------------------------


def summarize(rows: list[dict], keys: list[str], metrics: list[str]) -> list[dict]:
    """Group rows by ``keys``; per metric the mean, the standard deviation and standard error over the group
    (NaN values, e.g. an undefined minority FID, are left out and counted)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        summary = dict(zip(keys, key))
        summary["runs"] = len(members)
        for metric in metrics:
            values = np.array([float(r.get(metric, math.nan)) for r in members], dtype=np.float64)
            finite = values[np.isfinite(values)]
            summary[metric] = float(finite.mean()) if len(finite) else math.nan
            summary[f"{metric}_sd"] = float(finite.std(ddof=1)) if len(finite) > 1 else math.nan
            summary[f"{metric}_sem"] = summary[f"{metric}_sd"] / math.sqrt(len(finite)) if len(finite) > 1 \
                else math.nan
            summary[f"{metric}_defined"] = int(len(finite))
        out.append(summary)
    return out
