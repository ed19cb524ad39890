"""The IQM and the bootstrap intervals of metarl.stats (scipy.stats.bootstrap underneath),
checked against results worked out independently of the code under test."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from metarl.stats import (
    _cvar_along,
    _iqm_along,
    bootstrap_ci,
    bootstrap_difference_ci,
    cvar,
    iqm,
    summarize,
)


def test_iqm_by_hand_and_as_scipy_trimmed_mean():
    # 5 scores, sorted 1 2 3 10 100: ranks 1.25..3.75 -> 3/4 of 2, all of 3, 3/4 of 10.
    assert iqm(np.array([10.0, 1, 3, 2, 100])) == pytest.approx((0.75 * 2 + 3 + 0.75 * 10) / 2.5)
    # When 4 divides n, the IQM is the 25% trimmed mean.
    x = np.random.default_rng(0).normal(size=40)
    assert iqm(x) == pytest.approx(stats.trim_mean(x, 0.25))
    # The batched forms used inside the bootstrap agree with the 1-D functions, row by row.
    rows = np.random.default_rng(1).normal(size=(30, 13))
    assert _iqm_along(rows) == pytest.approx([iqm(r) for r in rows])
    rows[np.random.default_rng(2).random(rows.shape) < 0.2] = np.nan
    rows[0] = np.nan
    rows[1, 4] = -np.inf
    np.testing.assert_allclose(_cvar_along(rows), [cvar(r) for r in rows], equal_nan=True)


def test_interval_of_a_large_normal_samples_mean_is_the_normal_interval():
    x = np.random.default_rng(3).normal(3.0, 2.0, size=2000)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    lo, hi = bootstrap_ci(x, np.mean)
    # 2000 resamples put each bound within ~0.06 half-widths of the normal one (one s.e.).
    assert lo == pytest.approx(x.mean() - half, abs=0.2 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.2 * half)
    # A statistic scipy has to call resample by resample draws the same resamples.
    assert bootstrap_ci(x, lambda v: float(np.mean(v))) == pytest.approx((lo, hi))


def test_iqm_interval_covers_the_iqm_and_the_true_centre():
    x = np.random.default_rng(4).normal(5.0, 1.0, size=200)
    lo, hi = bootstrap_ci(x)
    assert lo < iqm(x) < hi and lo < 5.0 < hi
    # The IQM of a normal sample varies a little more than its mean: not narrower than the mean's.
    assert hi - lo > 2 * 1.96 / math.sqrt(x.size) * 0.9
    stats_ = summarize(x)
    assert stats_["iqm_lo"] == lo and stats_["iqm_hi"] == hi


def test_difference_interval_of_separated_samples_covers_the_difference_and_not_zero():
    rng = np.random.default_rng(5)
    a, b = rng.normal(10.0, 1.0, size=50), rng.normal(0.0, 1.0, size=40)  # unpaired lengths
    for statistic in (np.mean, iqm):
        lo, hi = bootstrap_difference_ci(a, b, statistic)
        assert lo < 10.0 < hi and lo > 0.0
    lo, hi = bootstrap_difference_ci(a, b)
    half = 1.96 * math.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    delta = a.mean() - b.mean()
    assert (lo, hi) == pytest.approx((delta - half, delta + half), abs=0.2 * half)


def test_difference_interval_is_paired_for_equal_lengths():
    rng = np.random.default_rng(6)
    tasks = rng.normal(0.0, 10.0, size=60)  # per-task difficulty, shared by both learners
    a, b = tasks + 3.0 + rng.normal(0.0, 0.1, size=60), tasks
    lo, hi = bootstrap_difference_ci(a, b)
    assert lo < 3.0 < hi and hi - lo < 0.2  # paired: the task spread cancels
    lo_u, hi_u = bootstrap_difference_ci(a, b[:-1])  # unpaired: it does not
    assert hi_u - lo_u == pytest.approx(2 * 1.96 * 10.0 * math.sqrt(2 / 60), rel=0.3)
    # A statistic scipy has to call resample by resample gives the same interval.
    assert bootstrap_difference_ci(a, b, lambda u: cvar(u)) == pytest.approx(
        bootstrap_difference_ci(a, b, cvar)
    )


def test_intervals_are_deterministic_in_the_seed():
    x = np.random.default_rng(7).normal(size=30)
    y = np.random.default_rng(8).normal(size=25)
    assert bootstrap_ci(x) == bootstrap_ci(x)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1) != bootstrap_ci(x)
    assert bootstrap_difference_ci(x, y) == bootstrap_difference_ci(x, y)
    assert bootstrap_difference_ci(x, y, seed=1) != bootstrap_difference_ci(x, y)


def test_degenerate_samples():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these may warn
        assert all(np.isnan(bootstrap_ci(np.array([]))))
        assert all(np.isnan(bootstrap_ci(np.array([2.0]))))
        assert all(np.isnan(bootstrap_ci(np.array([2.0, np.nan, np.inf]))))  # one finite score
        assert bootstrap_ci(np.full(7, 2.5)) == (2.5, 2.5)
        assert bootstrap_ci(np.full(7, 2.5), np.mean) == (2.5, 2.5)
        x = np.arange(12.0)
        # non-finite scores are dropped
        assert bootstrap_ci(np.append(x, [np.nan, -np.inf])) == bootstrap_ci(x)
        assert all(np.isnan(bootstrap_difference_ci(np.array([]), x)))
        assert all(np.isnan(bootstrap_difference_ci(x, np.array([1.0]))))
        assert all(np.isnan(bootstrap_difference_ci(np.append(x, np.nan), x + 1)))  # NaN mean
        constant = bootstrap_difference_ci(np.full(5, 3.0), np.full(4, 1.0))
        assert constant == pytest.approx((2.0, 2.0))
