"""Statistics over seeds, shared by the reports and the paper studies: summaries (mean, standard deviation,
standard error), 95% t-intervals, and paired comparisons of seed-aligned runs (a paired t-test)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats


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


@dataclass(frozen=True)
class Comparison:
    """A paired comparison over seeds of ``a`` vs ``b`` (difference a - b): its mean, standard error, 95% t-interval,
    two-sided paired t-test p-value, and n (pairs where both are finite)."""

    mean: float
    se: float
    low: float
    high: float
    p: float
    n: int

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"n = {self.n}: no test"
        return (f"{self.mean:+.{digits}g} (95% CI {self.low:+.{digits}g} to {self.high:+.{digits}g}; "
                f"paired t-test p = {self.p:.2g}, n = {self.n})")


def paired(a, b) -> Comparison:
    """Paired comparison of two seed-aligned samples (NaN pairs dropped)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    if n < 2:
        return Comparison(float(d.mean()) if n else math.nan, math.nan, math.nan, math.nan, math.nan, n)
    se = float(d.std(ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.975, n - 1)) * se
    p = float(stats.ttest_rel(a[keep], b[keep]).pvalue) if se > 0 else (0.0 if d.mean() != 0 else 1.0)
    return Comparison(float(d.mean()), se, float(d.mean()) - half, float(d.mean()) + half, p, n)


def interval(values) -> tuple[float, float, float]:
    """Mean and 95% t-interval over seeds (NaN values dropped); (mean, nan, nan) for fewer than 2 values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return (float(v.mean()) if len(v) else math.nan), math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1)) * float(v.std(ddof=1)) / math.sqrt(len(v))
    return float(v.mean()), float(v.mean()) - half, float(v.mean()) + half


VERDICTS = ("reproduced", "partly", "not reproduced")
