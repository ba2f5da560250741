"""Statistics over seeds, the one home: summaries, 95% intervals that respect their quantity, paired and Welch
comparisons, Holm's adjustment, and the verdict rule every claim in the reports uses.

**Intervals by the kind of quantity** (a column's ``scale``, declared once beside the metric in
``tasks.scorers.Column`` or a family's estimates):

- ``linear`` (a bias, a difference, an entropy): the arithmetic mean and the 95% t-interval,
  mean ± t(0.975, n-1) · sd / √n.
- ``log`` (strictly positive and right-skewed: FID, KID, KL, W1, a std, a rate, bits/dim, R_Fair): the
  geometric mean and the t-interval of the logs mapped back, exp(mean(log x) ± t · sd(log x) / √n). Its bounds
  are positive and asymmetric, as the quantity is. Where a value is not positive (KID's unbiased estimate can
  be slightly negative; a Monte Carlo KL can be 0), the logs do not exist: that group falls back to the
  arithmetic mean and the t-interval truncated at 0, which keeps its coverage for a quantity that cannot be
  negative (intersecting a confidence set with the parameter space never drops the true value).
- ``unit`` (a share or rate in [0, 1]: precision, recall, the minority share): the arithmetic mean and the
  t-interval intersected with [0, 1], for the same reason.

:func:`interval` returns the centre with its bounds; :func:`interval_method` says in words what was used, for
the reports' notes. Differences between two recipes (:func:`paired`, :func:`welch`) are linear: they can be
negative.

**Verdicts** (:func:`verdict`): a claim is tested once per condition (a ratio, a family, a cell), each a
two-sided test; the p-values of one claim are Holm-adjusted across its conditions. *reproduced*: the adjusted
p < 0.05 on the claimed side in at least half the conditions and on the other side in none; *not reproduced*:
the adjusted p < 0.05 against the claim in at least one condition and for it in fewer than half; *inconclusive*:
anything else (no condition decides, or too few do). A leaning mean decides nothing: under no effect a mean lands
on either side with probability 1/2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

SCALES = ("linear", "log", "unit")
CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
VERDICTS = ("reproduced", "inconclusive", "not reproduced")


def finite(values) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    return v[np.isfinite(v)]


def t_half_width(values: np.ndarray) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)) * float(values.std(ddof=1)) / math.sqrt(
        len(values))


def interval(values, scale: str = "linear") -> tuple[float, float, float]:
    """(centre, low, high): the 95% interval over seeds of a quantity of the given ``scale`` (module docstring).
    NaN values are dropped; fewer than 2 values give (centre, nan, nan)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r} (known: {', '.join(SCALES)})")
    v = finite(values)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    if scale == "log" and (v > 0).all():
        logs = np.log(v)
        if len(v) < 2:
            return float(v[0]), math.nan, math.nan
        centre, half = float(logs.mean()), t_half_width(logs)
        return math.exp(centre), math.exp(centre - half), math.exp(centre + half)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = t_half_width(v)
    low, high = mean - half, mean + half
    if scale in ("log", "unit"):
        low = max(low, 0.0)
    if scale == "unit":
        high = min(high, 1.0)
    return mean, low, high


def interval_method(values, scale: str = "linear") -> str:
    """What :func:`interval` computed for these values, in words (for a report's note)."""
    if scale == "log":
        return ("geometric mean, t-interval on the log scale" if (finite(values) > 0).all()
                else "arithmetic mean, t-interval truncated at 0 (a value was not positive)")
    if scale == "unit":
        return "mean, t-interval intersected with [0, 1]"
    return "mean, t-interval"


SCALE_NOTE = ("Intervals are 95% over seeds and respect their quantity: for positive, skewed quantities (FID, KID, "
              "KL, W1, a std or rate, bits/dim, R_Fair) the centre is the geometric mean and the interval the "
              "t-interval of the logs mapped back, exp(mean log x ± t·sd/√n), so its bounds are positive (where a "
              "value is not positive, e.g. a slightly negative unbiased KID, the arithmetic mean and the t-interval "
              "truncated at 0); for shares in [0, 1] (precision, recall, minority share) the t-interval "
              "intersected with [0, 1]; for everything else (biases, differences) the plain t-interval.")


def summarize(rows: list[dict], keys: list[str], metrics: list[str],
              scales: dict[str, str] | None = None) -> list[dict]:
    """Group rows by ``keys``; per metric the centre (:func:`interval`, by its ``scales`` entry, default linear),
    its 95% interval (``_low``, ``_high``), the standard deviation and standard error of the values, and how many
    were defined (NaN values, e.g. an undefined minority FID, are left out and counted in ``_defined``)."""
    scales = scales or {}
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    out = []
    for key, members in groups.items():
        summary = dict(zip(keys, key))
        summary["runs"] = len(members)
        for metric in metrics:
            values = finite([float(r.get(metric, math.nan)) for r in members])
            centre, low, high = interval(values, scales.get(metric, "linear"))
            summary[metric] = centre
            summary[f"{metric}_low"], summary[f"{metric}_high"] = low, high
            summary[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
            summary[f"{metric}_sem"] = summary[f"{metric}_sd"] / math.sqrt(len(values)) if len(values) > 1 \
                else math.nan
            summary[f"{metric}_defined"] = int(len(values))
        out.append(summary)
    return out


@dataclass(frozen=True)
class Comparison:
    """A comparison over seeds of ``a`` vs ``b`` (difference a - b): its mean, standard error, 95% interval,
    two-sided p-value, n (pairs, or the smaller group, where values are finite) and, once a claim's conditions
    are adjusted together (:func:`holm`), ``p_holm``."""

    mean: float
    se: float
    low: float
    high: float
    p: float
    n: int
    p_holm: float = math.nan

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"n = {self.n}: no test"
        adjusted = f", Holm p = {self.p_holm:.2g}" if math.isfinite(self.p_holm) else ""
        return (f"{self.mean:+.{digits}g} (95% CI {self.low:+.{digits}g} to {self.high:+.{digits}g}; "
                f"paired t-test p = {self.p:.2g}{adjusted}, n = {self.n})")


def paired(a, b) -> Comparison:
    """Paired t-test and 95% t-interval of mean(a - b) over seed-aligned samples (pairs with a NaN dropped)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        return Comparison(float(d.mean()) if n else math.nan, math.nan, math.nan, math.nan, math.nan, n)
    se = float(d.std(ddof=1) / math.sqrt(n))
    if se == 0:
        mean = float(d.mean())
        return Comparison(mean, 0.0, mean, mean, 0.0 if mean else 1.0, n)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * se
    p = float(stats.ttest_rel(a[keep], b[keep]).pvalue)
    return Comparison(float(d.mean()), se, float(d.mean()) - half, float(d.mean()) + half, p, n)


def welch(a, b) -> Comparison:
    """Welch's unequal-variance t-test of mean(a) - mean(b) with its 95% interval (Welch-Satterthwaite df); for
    groups whose seeds do not pair."""
    a, b = finite(a), finite(b)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if min(len(a), len(b)) < 2:
        return Comparison(diff, math.nan, math.nan, math.nan, math.nan, min(len(a), len(b)))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(diff, 0.0, diff, diff, 0.0 if diff else 1.0, min(len(a), len(b)))
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
    return Comparison(diff, se, diff - half, diff + half, p, min(len(a), len(b)))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values (NaN stays NaN and is not counted among the tests)."""
    order = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def adjusted(comparisons: list[Comparison]) -> list[Comparison]:
    """The comparisons with ``p_holm`` set, Holm-adjusted across them (one claim's conditions; one without a test
    keeps a NaN p and is not counted)."""
    return [replace(c, p_holm=p) for c, p in zip(comparisons, holm([c.p for c in comparisons]))]


def verdict(comparisons: list[Comparison], direction: str = "positive") -> str:
    """The verdict of one claim tested once per condition (each a - b, where the claim says the difference is
    ``direction``: positive, or negative for a < b), Holm-adjusted across its conditions (module docstring).
    "not tested" when no condition has a test."""
    tested = [c for c in adjusted(comparisons) if math.isfinite(c.p_holm)]
    if not tested:
        return "not tested"
    sign = 1.0 if direction == "positive" else -1.0
    confirmed = sum(c.p_holm < SIGNIFICANCE and sign * c.mean > 0 for c in tested)
    against = sum(c.p_holm < SIGNIFICANCE and sign * c.mean < 0 for c in tested)
    if confirmed * 2 >= len(tested) and against == 0:
        return "reproduced"
    if against and confirmed * 2 < len(tested):
        return "not reproduced"
    return "inconclusive"


VERDICT_RULE = ("each condition is a two-sided test at the 0.05 level after Holm's adjustment across the claim's "
                "conditions: **reproduced** when at least half the conditions are significant on the claimed side "
                "and none on the other, **not reproduced** when any is significant against the claim (and fewer "
                "than half for it), **inconclusive** otherwise")
