"""The statistics every report and verdict uses (tasks/stats.py), checked against scipy and brute-force
definitions, and the verdict rule on data built so that it must fail."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tasks.stats import (adjusted, holm, interval, interval_method, paired, summarize, verdict, welch)

RNG = np.random.default_rng(20261204)


@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_the_linear_interval_is_scipys_t_interval(n):
    values = RNG.normal(3.0, 2.0, n)
    centre, low, high = interval(values)
    expected = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert centre == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(expected)


@pytest.mark.parametrize("n", [2, 5, 20])
def test_a_positive_quantity_gets_the_geometric_mean_and_a_log_scale_interval(n):
    values = RNG.lognormal(0.0, 1.5, n)  # skewed: its plain t-interval reaches below 0 at small n
    centre, low, high = interval(values, "log")
    logs = np.log(values)
    expected = stats.t.interval(0.95, n - 1, loc=logs.mean(), scale=stats.sem(logs))
    assert centre == pytest.approx(stats.gmean(values))
    assert (low, high) == pytest.approx(tuple(np.exp(expected)))
    assert 0 < low < centre < high
    assert interval_method(values, "log").startswith("geometric mean")


def test_the_plain_t_interval_of_a_skewed_positive_quantity_goes_negative_and_the_log_one_does_not():
    values = np.array([0.002, 0.004, 0.09, 0.001, 0.003])  # e.g. KL at generation 1 over five seeds
    assert interval(values)[1] < 0
    assert interval(values, "log")[1] > 0


def test_a_log_quantity_with_a_value_not_positive_falls_back_to_a_t_interval_truncated_at_0():
    values = np.array([-0.0004, 0.001, 0.003, 0.0002])  # KID's unbiased estimate can be slightly negative
    centre, low, high = interval(values, "log")
    _, t_low, t_high = interval(values)
    assert centre == pytest.approx(values.mean()) and high == pytest.approx(t_high)
    assert t_low < 0 and low == 0.0
    assert "truncated at 0" in interval_method(values, "log")


def test_a_share_gets_a_t_interval_inside_0_and_1():
    near_zero, near_one = np.array([0.0, 0.01, 0.0, 0.05]), np.array([1.0, 0.99, 0.93, 1.0])
    assert interval(near_zero)[1] < 0 and interval(near_zero, "unit")[1] == 0.0
    assert interval(near_one)[2] > 1 and interval(near_one, "unit")[2] == 1.0
    assert interval(near_zero, "unit")[2] == pytest.approx(interval(near_zero)[2])


def test_intervals_drop_nan_and_need_two_values():
    assert interval([1.0, math.nan])[0] == 1.0 and math.isnan(interval([1.0, math.nan])[1])
    assert all(math.isnan(v) for v in interval([math.nan, math.nan], "log"))
    with pytest.raises(ValueError, match="unknown scale"):
        interval([1.0, 2.0], "logit")


def test_summaries_follow_each_metrics_scale():
    rows = [{"g": 0, "fid": f, "bias": b} for f, b in ((10.0, -1.0), (20.0, 1.0), (80.0, 0.5))]
    (row,) = summarize(rows, ["g"], ["fid", "bias"], {"fid": "log"})
    assert row["fid"] == pytest.approx(stats.gmean([10.0, 20.0, 80.0])) and row["fid_low"] > 0
    assert row["bias"] == pytest.approx(np.mean([-1.0, 1.0, 0.5])) and row["bias_low"] < 0
    assert row["fid_sd"] == pytest.approx(np.std([10.0, 20.0, 80.0], ddof=1)) and row["runs"] == 3


def test_paired_is_scipys_paired_t_test():
    a, b = RNG.normal(1.0, 1.0, 8), RNG.normal(0.5, 1.0, 8)
    c = paired(a, b)
    reference = stats.ttest_rel(a, b)
    assert c.p == pytest.approx(reference.pvalue) and c.n == 8
    assert (c.low, c.high) == pytest.approx(tuple(reference.confidence_interval()))
    assert c.mean == pytest.approx((a - b).mean())
    assert paired([1.0, math.nan, 3.0], [0.0, 2.0, 1.0]).n == 2  # a pair with a NaN is dropped


def test_welch_is_scipys_unequal_variance_t_test():
    a, b = RNG.normal(1.0, 1.0, 6), RNG.normal(0.0, 3.0, 9)
    c = welch(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False)
    assert c.p == pytest.approx(reference.pvalue)
    assert (c.low, c.high) == pytest.approx(tuple(reference.confidence_interval()))


def holm_by_definition(p_values: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure at level alpha, as written: order the p-values, reject while
    p_(j) <= alpha / (m - j) (j from 0), stop at the first that is not."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = set()
    for j, i in enumerate(order):
        if p_values[i] > alpha / (len(p_values) - j):
            break
        rejected.add(i)
    return rejected


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_procedure_rejects(seed):
    p_values = list(np.random.default_rng(seed).uniform(0, 0.08, 6))
    adjusted_p = holm(p_values)
    for alpha in np.linspace(0.001, 0.2, 400):
        assert {i for i, p in enumerate(adjusted_p) if p <= alpha} == holm_by_definition(p_values, alpha)


def test_holm_leaves_nan_out_of_the_count():
    assert holm([0.01, 0.04, 0.03, math.nan]) == pytest.approx([0.03, 0.06, 0.06, math.nan], nan_ok=True)


def shifted(shift: float, n: int = 8, noise: float = 0.1):
    base = RNG.normal(0, 1, n)
    return paired(base + shift + RNG.normal(0, noise, n), base)


def test_the_verdict_rule_fails_when_it_should():
    better = [shifted(1.0) for _ in range(3)]
    worse = [shifted(-1.0) for _ in range(3)]
    noise = [shifted(0.0, noise=0.5) for _ in range(3)]
    assert verdict(better) == "reproduced" and verdict(worse, "negative") == "reproduced"
    assert verdict(worse) == "not reproduced" and verdict(better, "negative") == "not reproduced"
    assert verdict(better[:1] + worse[:2]) == "not reproduced"  # contradicted in most conditions
    assert verdict(better[:2] + worse[:1]) == "inconclusive"  # confirmed in most, contradicted in one
    assert verdict(noise) == "inconclusive"  # a leaning mean decides nothing
    assert verdict([paired([1.0], [0.0])]) == "not tested"


def test_a_verdict_is_holm_adjusted_across_its_conditions():
    # one condition at p ~ 0.03 is significant alone, not as one of four
    weak = paired([1.0, 1.3, 0.8, 1.1, 0.75], [0.5, 0.4, 0.6, 0.3, 0.6])
    assert 0.01 < weak.p < 0.05
    assert verdict([weak]) == "reproduced"
    filler = [paired([0.1, -0.2, 0.3, 0.0, 0.1], [0.0, 0.1, 0.1, 0.2, -0.1])] * 3
    assert verdict([weak, *filler]) == "inconclusive"
    assert adjusted([weak, *filler])[0].p_holm == pytest.approx(min(1.0, 4 * weak.p))


def test_no_uncorrected_rule_in_the_verdict_words():
    from tasks.stats import VERDICTS

    assert VERDICTS == ("reproduced", "inconclusive", "not reproduced")
    assert not any("partly" in word for word in itertools.chain(VERDICTS))


@pytest.mark.repo
def test_no_committed_report_gives_a_positive_quantity_a_negative_bound():
    """Every interval in reports/ (CSV columns ``<metric>_low``) respects its quantity: a positive one (scale log:
    FID, KID, KL, a rate; scale unit: a share, precision, recall) never has a lower bound below 0."""
    import csv
    import subprocess

    from models.families import FAMILIES
    from tasks.scorers import scorer_class

    repo = Path(__file__).resolve().parents[1]
    scales = {c.name: c.scale for name in FAMILIES.names()
              for c in scorer_class(name).columns(FAMILIES.get(name))}
    positive = {name for name, scale in scales.items() if scale in ("log", "unit")}
    tracked = subprocess.run(["git", "ls-files", "reports/*.csv", "reports/**/*.csv"], cwd=repo, text=True,
                             capture_output=True, check=True).stdout.split()
    from flows.studies import frozen_stages  # made by an earlier revision, and said so (tests/test_dvc_pipeline.py)

    frozen = tuple(f"reports/{name}/" for name in frozen_stages(repo))
    tracked = [path for path in tracked if not path.startswith(frozen)]
    assert tracked, "no committed reports found"
    bad = []
    for path in tracked:
        with open(repo / path, newline="") as handle:
            for row in csv.DictReader(handle):
                for column, value in row.items():
                    if column and column.endswith("_low") and column[:-4] in positive and value not in ("", "nan"):
                        if float(value) < 0:
                            bad.append(f"{path}: {column} = {value}")
    assert not bad, f"{len(bad)} negative lower bounds of positive quantities, e.g. {bad[:40]}"
