"""Statistics of held-out scores: means, interquartile means, bootstrap intervals, tails.

Statistics follow common practice in the field: the mean with a normal 95% interval
(``1.96 · s / √n``), and the interquartile mean (IQM, the mean of the middle 50% of scores) with a
percentile bootstrap 95% interval, as recommended by Agarwal et al. 2021, "Deep reinforcement
learning at the edge of the statistical precipice" (NeurIPS). Per-task scores are kept, not just
the aggregates.

The bootstrap intervals come from :func:`scipy.stats.bootstrap` (percentile method, fixed seed).
That paper's own library, rliable, is not used: it does not install with the current stack (its
pinned dependency ``arch==5.3.0`` has no distribution for it). Degenerate samples are settled
before scipy is called: fewer than two scores (scipy refuses them) give a NaN interval, scores all
equal the point interval ``(statistic, statistic)``; a statistic that is NaN on resamples gives a
NaN bound, without scipy's warning.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% confidence interval (NaNs ignored)."""
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return math.nan, math.nan
    if values.size == 1:
        return float(values[0]), math.nan
    return float(values.mean()), float(1.96 * values.std(ddof=1) / math.sqrt(values.size))


def iqm(values: np.ndarray) -> float:
    """Interquartile mean: the mean of the scores between the 25th and 75th percentile ranks.

    With ``n`` sorted scores, the lowest and highest ``n/4`` are dropped, fractional scores
    weighted, as in a 25%-trimmed mean.
    """
    x = np.sort(np.asarray(values, dtype=float).ravel())
    n = x.size
    if n == 0:
        return math.nan
    lo, hi = 0.25 * n, 0.75 * n
    # Weight of each sorted score inside [lo, hi] on the rank axis (score i covers [i, i+1]).
    idx = np.arange(n)
    weights = np.clip(np.minimum(idx + 1, hi) - np.maximum(idx, lo), 0.0, 1.0)
    return float((weights * x).sum() / weights.sum())


def cvar(values: np.ndarray, alpha: float = 0.1) -> float:
    """Conditional value at risk: the mean of the lowest ``ceil(alpha · n)`` finite scores."""
    finite = np.sort(np.asarray(values, dtype=float)[np.isfinite(values)])
    if finite.size == 0:
        return float("nan")
    return float(finite[: max(1, math.ceil(alpha * finite.size))].mean())


def _iqm_along(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """:func:`iqm` of every slice of ``x`` along ``axis`` (no NaNs), for scipy's vectorised calls."""
    x = np.sort(np.moveaxis(np.asarray(x, dtype=float), axis, -1), axis=-1)
    n = x.shape[-1]
    idx = np.arange(n)
    weights = np.clip(np.minimum(idx + 1, 0.75 * n) - np.maximum(idx, 0.25 * n), 0.0, 1.0)
    return (x * weights).sum(axis=-1) / weights.sum()


def _cvar_along(x: np.ndarray, axis: int = -1, alpha: float = 0.1) -> np.ndarray:
    """:func:`cvar` of every slice of ``x`` along ``axis`` (non-finite scores ignored)."""
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    finite = np.isfinite(x)
    # Non-finite scores to +inf: sorted last, so the first m of a slice are its m finite ones.
    x = np.sort(np.where(finite, x, np.inf), axis=-1)
    m = finite.sum(axis=-1)
    k = np.maximum(1, np.ceil(alpha * m)).astype(int)
    sums = np.cumsum(np.where(np.isfinite(x), x, 0.0), axis=-1)
    head = np.take_along_axis(sums, (k - 1)[..., None], axis=-1)[..., 0]
    return np.where(m > 0, head / k, np.nan)


def _vectorized(statistic: Callable[..., Any]) -> Callable[..., Any] | None:
    """A version of ``statistic`` taking ``axis`` when this module knows one, else None."""
    if statistic is iqm:
        return _iqm_along
    if statistic is cvar:
        return _cvar_along
    if statistic is np.mean:
        return np.mean
    return None


# Scores held in memory at once per batch of resamples (about 16 MB of float64).
_BATCH_ELEMENTS = 2_000_000


def _percentile_interval(
    data: tuple[np.ndarray, ...],
    statistic: Callable[..., Any],
    vectorized: bool,
    paired: bool,
    num_samples: int,
    seed: int,
) -> tuple[float, float]:
    """``scipy.stats.bootstrap``'s percentile 95% interval; NaN where the statistic is NaN."""
    from scipy import stats as scipy_stats  # imported on use: scipy.stats takes a while to load

    batch = max(1, _BATCH_ELEMENTS // sum(d.size for d in data))
    with warnings.catch_warnings():
        # Raised when the interval is NaN (resamples whose statistic is NaN): returned as NaN.
        warnings.simplefilter("ignore", scipy_stats.DegenerateDataWarning)
        result = scipy_stats.bootstrap(
            data,
            statistic,
            n_resamples=num_samples,
            batch=batch,
            vectorized=vectorized,
            paired=paired,
            confidence_level=0.95,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def bootstrap_ci(
    values: np.ndarray, statistic=iqm, num_samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``statistic`` over the finite scores.

    ``scipy.stats.bootstrap`` with ``num_samples`` resamples drawn from a generator seeded with
    ``seed``. Fewer than two finite scores: ``(nan, nan)``. All scores equal: every resample is the
    sample itself, so ``(statistic(values), statistic(values))``.
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[np.isfinite(x)]
    if x.size < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        point = float(statistic(x))
        return point, point
    fast = _vectorized(statistic)
    if fast is not None:
        return _percentile_interval((x,), fast, True, False, num_samples, seed)
    return _percentile_interval((x,), statistic, False, False, num_samples, seed)


def bootstrap_difference_ci(
    a: np.ndarray, b: np.ndarray, statistic=np.mean, num_samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of ``statistic(a) − statistic(b)``.

    Paired (one index drawn for both) when ``a`` and ``b`` have the same length, as scores of two
    learners on the same held-out tasks × seeds do; otherwise each is resampled on its own
    (``scipy.stats.bootstrap`` with ``paired=False``). Scores are not filtered (that would break
    the pairing): a statistic that is NaN on resamples, as ``np.mean`` of scores holding a NaN,
    gives a NaN bound. Fewer than two scores in either sample: ``(nan, nan)``.
    """
    x, y = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if x.size < 2 or y.size < 2:
        return math.nan, math.nan
    paired = x.size == y.size
    fast = _vectorized(statistic)
    if fast is not None:

        def difference(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
            return fast(u, axis=axis) - fast(v, axis=axis)

        return _percentile_interval((x, y), difference, True, paired, num_samples, seed)

    def difference_1d(u: np.ndarray, v: np.ndarray) -> float:
        return statistic(u) - statistic(v)

    return _percentile_interval((x, y), difference_1d, False, paired, num_samples, seed)


def summarize(values: np.ndarray) -> dict[str, float]:
    """Mean ± 95% CI, IQM with its bootstrap interval, and the lower tail (worst, CVaR 0.1)."""
    mean, ci = mean_ci95(values)
    lo, hi = bootstrap_ci(values)
    finite = np.isfinite(np.asarray(values, dtype=float))
    worst = float(np.min(np.asarray(values, dtype=float)[finite])) if finite.any() else float("nan")
    return {
        "mean": mean,
        "ci95": ci,
        "iqm": iqm(np.asarray(values)[finite]),
        "iqm_lo": lo,
        "iqm_hi": hi,
        "worst": worst,
        "cvar10": cvar(values, 0.1),
        "num": int(finite.sum()),
        "num_nonfinite": int((~finite).sum()),
    }
