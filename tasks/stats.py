"""Summaries over seeds (mean, standard deviation, standard error), shared by the reports and the paper studies."""

from __future__ import annotations

import math

import numpy as np


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
