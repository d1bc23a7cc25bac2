"""The demo report's statistics against independent computations."""
import pytest
from scipy import stats

from xpertctl.report import paired_ci


def test_paired_ci_is_the_paired_t_interval():
    arm = {0: 5.91, 1: 6.02, 2: 5.97, 3: 6.10, 4: 5.88}
    base = {0: 6.05, 1: 6.07, 2: 6.01, 3: 6.20, 4: 6.02, 9: 1.0}  # seed 9 has no partner: left out
    diff, half, n = paired_ci(arm, base)
    ref = stats.ttest_rel([arm[s] for s in range(5)], [base[s] for s in range(5)]).confidence_interval(0.95)
    assert n == 5
    assert diff - half == pytest.approx(ref.low, abs=1e-9)
    assert diff + half == pytest.approx(ref.high, abs=1e-9)


def test_paired_ci_pairs_by_seed_not_by_position():
    # unpaired, the means differ by 0; paired seed by seed, the arm is 0.1 lower every time
    arm = {0: 1.0, 1: 2.0, 2: 3.0}
    base = {2: 3.1, 0: 1.1, 1: 2.1}
    diff, half, n = paired_ci(arm, base)
    assert diff == pytest.approx(-0.1) and half == pytest.approx(0.0, abs=1e-9) and n == 3


def test_one_seed_gives_no_interval():
    diff, half, n = paired_ci({0: 1.0}, {0: 1.5})
    assert diff == pytest.approx(-0.5) and n == 1 and half != half  # NaN


def test_seeds_for_the_goal_is_the_fewest_that_reach_it():
    import numpy as np
    from xpertctl.report import seeds_for
    rng = np.random.default_rng(3)
    d = rng.normal(-0.17, 0.14, size=8)  # the spread of the random arm's paired differences in demo v2
    res = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    half, sd = (res.high - res.low) / 2, d.std(ddof=1)
    m = seeds_for(half, 8, 0.05)
    width = lambda k: stats.t.ppf(0.975, k - 1) * sd / np.sqrt(k)  # noqa: E731
    assert width(m) <= 0.05 < width(m - 1)
    assert m > 8
    assert seeds_for(0.03, 8, 0.05) <= 8  # already narrow enough
    assert seeds_for(float("nan"), 1) is None
