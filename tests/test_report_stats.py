"""The report's statistics against independent computations (scipy, hand-worked examples)."""
import math

import numpy as np
import pytest
from scipy import stats

from xpertctl import report_stats as rs


def test_paired_p_and_interval_are_scipys_paired_t_test():
    x = {0: 4.91, 1: 5.02, 2: 4.97, 3: 5.10, 4: 4.88}
    y = {0: 5.05, 1: 5.07, 2: 5.01, 3: 5.20, 4: 5.02, 7: 0.0}
    diff, half, n, p = rs.paired(x, y)
    ref = stats.ttest_rel([x[s] for s in range(5)], [y[s] for s in range(5)])
    ci = ref.confidence_interval(0.95)
    assert n == 5 and p == pytest.approx(ref.pvalue) and diff - half == pytest.approx(ci.low)
    _, half99, _, _ = rs.paired(x, y, level=0.99)
    assert diff + half99 == pytest.approx(ref.confidence_interval(0.99).high)


def test_holm_by_hand():
    # sorted: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06 by monotonicity), 0.5 (x1 = 0.5)
    assert rs.holm([0.03, 0.5, 0.01, float("nan"), 0.02]) == pytest.approx([0.06, 0.5, 0.04, float("nan"), 0.06],
                                                                          nan_ok=True)
    assert rs.holm([0.6, 0.4]) == pytest.approx([0.8, 0.8])  # capped and monotone
    assert rs.simultaneous_level(4) == pytest.approx(0.9875)


def test_reach_step_interpolates_and_censored_median_keeps_the_seeds_that_never_got_there():
    curve = [(10, 5.0), (20, 4.0), (30, 3.5)]
    assert rs.reach_step(curve, 4.5) == pytest.approx(15.0)
    assert rs.reach_step(curve, 5.5) == 10 and rs.reach_step(curve, 3.0) is None
    # 3 of 5 seeds got there: the median is the third smallest, the two censored count as beyond
    assert rs.censored_median([40, None, 20, None, 30], 120) == (40.0, 3)
    # 2 of 5: the median itself is censored
    assert rs.censored_median([None, 20, None, None, 30], 120) == (None, 2)


def test_matching_budget_is_linear_in_log_budget_and_censored_outside_the_bracket():
    curve = {1: 5.0, 4: 4.0, 16: 3.6}
    b, side = rs.matching_budget(curve, 4.5)
    assert side == "" and b == pytest.approx(2.0)  # halfway in log between 1 and 4
    b, side = rs.matching_budget(curve, 3.8)
    assert b == pytest.approx(8.0)
    assert rs.matching_budget(curve, 5.2) == (None, "<") and rs.matching_budget(curve, 3.0) == (None, ">")


def test_budget_ratio_point_interval_and_censoring():
    rng = np.random.default_rng(0)
    base = {1: {s: 5.0 + 0.01 * rng.standard_normal() for s in range(8)},
            4: {s: 4.0 + 0.01 * rng.standard_normal() for s in range(8)},
            16: {s: 3.6 + 0.01 * rng.standard_normal() for s in range(8)}}
    arm = {s: 4.5 + 0.01 * rng.standard_normal() for s in range(8)}
    r = rs.budget_ratio(base, arm, 1)
    assert r["ratio"] == pytest.approx(2.0, rel=0.05) and r["low"] < r["ratio"] < r["high"] and r["beyond"] == 0
    far = rs.budget_ratio(base, {s: 3.0 for s in range(8)}, 1)  # better than the baseline at 16x: censored
    assert far["ratio"] is None and far["censored"] == ">" and far["beyond"] == 1.0 and math.isinf(far["low"])
    # an arm that saves nothing at 4x: the baseline matches it at 4x itself, ratio 1
    same = rs.budget_ratio(base, base[4], 4)
    assert same["ratio"] == pytest.approx(1.0, rel=0.01)
