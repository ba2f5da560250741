"""Nearest-neighbour statistics of feature vectors (pure numpy / scipy / scikit-learn): the k-NN entropy estimate,
a memorisation rate, and the subset that greedily maximises the entropy estimate.

* :func:`knn_entropy`: the Kozachenko-Leonenko estimate of differential entropy (nats),
  H = psi(n) - psi(k) + log V_d + (d / n) sum_i log r_k(i), with r_k(i) the distance of row i to its k-th
  nearest other row and V_d the volume of the unit ball in R^d.
* :func:`memorisation_rate`: the share of samples whose nearest training row is much closer to them than that
  training row is to any other training row: d(x, t) <= ratio * d(t, t'), t the nearest training row of x and t'
  the nearest training row of t other than itself (the rule of Carlini et al. 2023 with the training set's own
  spacing as the yardstick; ratio 1/3 by default). A training row measured against its own set is at distance 0
  from itself, so the training set against itself has rate 1.
* :func:`greedy_entropy_subset`: the n rows, of N candidates, chosen one at a time to maximise the 1-NN
  (k = 1) entropy estimate of the rows chosen so far (Shi et al., NeurIPS 2025, select synthetic data to maximise
  a k-NN entropy estimate; greedy, as exact maximisation is combinatorial).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.distance import cdist
from scipy.special import digamma, gammaln

TINY = 1e-10  # floor of a distance before its log: duplicates would otherwise give -inf


def knn_distances(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``x`` to its k-th nearest other row."""
    # imported when used, as in every plug-in module: validating params imports them all, and a 1-D study
    # needs no scikit-learn (0.6 s of start-up)
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x)
    return distances[:, k]


def knn_entropy(x: np.ndarray, k: int = 3) -> float:
    """Kozachenko-Leonenko entropy estimate of the rows of ``x`` [n, d], in nats; NaN for n <= k."""
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    if n <= k:
        return math.nan
    log_ball = d / 2 * math.log(math.pi) - gammaln(d / 2 + 1)
    r = np.maximum(knn_distances(x, k), TINY)
    return float(digamma(n) - digamma(k) + log_ball + d * np.log(r).mean())


def memorisation_rate(samples: np.ndarray, train: np.ndarray, ratio: float = 1 / 3) -> float:
    """Share of ``samples`` within ``ratio`` times their nearest training row's own nearest-neighbour distance
    of that row (see the module docstring); NaN without samples or with fewer than 2 training rows."""
    if len(samples) == 0 or len(train) < 2:
        return math.nan
    from sklearn.neighbors import NearestNeighbors

    to_train, nearest = NearestNeighbors(n_neighbors=1).fit(train).kneighbors(samples)
    spacing = knn_distances(train, 1)  # each training row to its nearest other training row
    return float((to_train[:, 0] <= ratio * spacing[nearest[:, 0]]).mean())


def greedy_entropy_subset(x: np.ndarray, n: int) -> np.ndarray:
    """Indices (sorted) of ``n`` rows of ``x`` chosen greedily to maximise sum_i log r_1(i) over the chosen rows,
    i.e. their 1-NN entropy estimate at size n. Starts from the farthest pair; each step adds the row with the
    largest gain: its own log distance to the chosen set plus the change it makes to the chosen rows' nearest
    distances. O(N n^2) time for N candidates."""
    total = len(x)
    if n >= total:
        return np.arange(total)
    log_d = np.log(np.maximum(cdist(x, x), TINY))
    np.fill_diagonal(log_d, np.inf)  # a row is never its own neighbour
    first, second = np.unravel_index(np.argmax(np.where(np.isfinite(log_d), log_d, -np.inf)), log_d.shape)
    chosen = [int(first), int(second)]
    nearest = np.array([log_d[first, second]] * 2)  # log distance of each chosen row to its nearest chosen row
    free = np.ones(total, dtype=bool)
    free[chosen] = False
    while len(chosen) < n:
        candidates = np.flatnonzero(free)
        to_chosen = log_d[np.ix_(candidates, chosen)]  # [candidates, chosen]
        own = to_chosen.min(axis=1)
        shrink = np.minimum(to_chosen, nearest[None, :]) - nearest[None, :]  # <= 0: a chosen row gets a closer one
        best = candidates[np.argmax(own + shrink.sum(axis=1))]
        nearest = np.append(np.minimum(nearest, log_d[best, chosen]), log_d[best, chosen].min())
        chosen.append(int(best))
        free[best] = False
    return np.sort(np.array(chosen[:n]))
