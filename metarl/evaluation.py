"""Held-out evaluation: statistics, ``eval.json`` and plots.

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

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
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


def summarize_curves(result: dict[str, Any]) -> dict[str, Any]:
    """Aggregates per-task score arrays ``[num_tasks, num_steps]`` step by step."""
    steps = list(result["adaptation_steps"])
    out: dict[str, Any] = {"adaptation_steps": steps}
    for key, values in result.items():
        if key == "adaptation_steps" or values is None or isinstance(values, dict):
            continue
        arr = np.asarray(values, dtype=float)
        if arr.ndim != 2 or arr.shape[1] != len(steps):
            continue
        per_step = [summarize(arr[:, j]) for j in range(len(steps))]
        out[key] = {stat: [s[stat] for s in per_step] for stat in per_step[0]}
        out[f"{key}_mean"] = out[key]["mean"]
    return out


def plot_curves(
    summary: dict[str, Any],
    path: Path,
    title: str,
    references: dict[str, dict[str, float]] | None = None,
) -> list[Path]:
    """One PNG per metric: mean ± 95% CI against adaptation steps.

    ``references`` maps a metric to ``{label: value}`` drawn as horizontal lines (baselines).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steps = summary["adaptation_steps"]
    curves = {k: v for k, v in summary.items() if isinstance(v, dict) and "mean" in v}
    # ``<metric>_<variant>`` curves (ablations) are drawn in ``<metric>``'s figure.
    variants = {k: k.split("_", 1) for k in curves if "_" in k and k.split("_", 1)[0] in curves}
    for key, stats in curves.items():
        if key in variants:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        drawn = [("meta-learner", stats)] + [
            (variant, curves[k]) for k, (base, variant) in variants.items() if base == key
        ]
        for i, (label, curve) in enumerate(drawn):
            mean, ci = np.array(curve["mean"]), np.nan_to_num(np.array(curve["ci95"]))
            ax.errorbar(steps, mean, yerr=ci, marker="o", capsize=3, color=f"C{i}", label=label)
        for j, (label, value) in enumerate((references or {}).get(key, {}).items()):
            ax.axhline(value, color=f"C{len(drawn) + j}", linestyle="--", label=label)
        if len(drawn) > 1 or (references and key in references):
            ax.legend(fontsize=7)
        ax.set_xticks(steps)
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = path.parent / f"{path.stem}_{key}.png"
        fig.savefig(out, dpi=120)
        plt.close(fig)
        paths.append(out)
    return paths


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def baseline_budget(experiment: Any) -> int:
    """Environment steps the meta-learner takes on one held-out task before its last score."""
    cfg = experiment.agent.config
    if not hasattr(cfg, "eval_episodes_per_task"):
        from metarl.config import ConfigError

        raise ConfigError(
            f"{type(experiment.agent).__name__} is not an RL agent; the stable-baselines3 baselines "
            "compare RL meta-learners only"
        )
    horizon = getattr(cfg, "horizon", 0) or experiment.distribution.horizon
    return max(1, cfg.eval_adapt_steps) * cfg.eval_episodes_per_task * horizon


def _baseline_summary(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "budget_steps": result["budget_steps"],
        "pretrain_steps": result["pretrain_steps"],
    }
    for name in ("scratch", "multitask"):
        part = result[name]
        entry: dict[str, Any] = {"algo": part["algo"]}
        for key, values in part.items():
            if key == "algo":
                continue
            arr = np.asarray(values, dtype=float)
            if np.isnan(arr).all():
                continue
            entry[key] = summarize(arr)
            entry[f"{key}_mean"] = entry[key]["mean"]
        out[name] = entry
    return out


def _agent_baseline_summary(baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{name: {metric: [N] scores}}`` -> ``{name: {metric: summary}}``, unreported metrics dropped."""
    out: dict[str, Any] = {}
    for name, scores in baselines.items():
        entry = {}
        for metric, values in scores.items():
            arr = np.asarray(values, dtype=float)
            if arr.ndim == 1 and not np.isnan(arr).all():
                entry[metric] = summarize(arr)
        out[name] = entry
    return out


def _run_sb3(
    experiment: Any,
    tasks: list[Any],
    budget: int,
    options: dict[str, Any],
    summary: dict[str, Any],
    references: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """Trains the stable-baselines3 baselines on ``tasks``; adds their summary to ``summary`` and
    their mean scores to the plots' ``references``; returns their per-task results."""
    from metarl.sb3_baselines import run_baselines

    result = run_baselines(
        experiment.distribution,
        experiment.task_name,
        tasks,
        budget,
        seed=experiment.eval_cfg.seed,
        **options,
    )
    summary["baselines"] = _baseline_summary(result)
    for metric in ("return", "success"):
        for name in ("scratch", "multitask"):
            entry = summary["baselines"][name]
            if metric in entry:
                label = f"{name} {entry['algo'].upper()} ({summary['baselines']['budget_steps']} steps)"
                references.setdefault(metric, {})[label] = entry[metric]["mean"]
    return result


def evaluate_experiment(experiment: Any, baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluates an experiment's agent on held-out tasks; writes ``eval.json`` and PNG plots.

    Args:
        experiment: a created or resumed :class:`~metarl.experiment.Experiment`.
        baselines: when given, also trains the stable-baselines3 baselines of
            :mod:`metarl.sb3_baselines` on the same held-out tasks and budget; the dict holds
            ``run_baselines``' optional arguments (``pretrain_steps``, ``episodes``, ``algo``).

    Returns:
        The summary: ``adaptation_steps`` and, aligned with it, ``<metric>_mean`` lists, plus the
        paths of the plots (and ``baselines`` when asked for).
    """
    budget = (
        baseline_budget(experiment) if baselines is not None else 0
    )  # fail before the long work
    tasks = experiment.held_out_tasks()
    rng = np.random.default_rng(experiment.eval_cfg.seed)
    result = experiment.agent.evaluate(tasks, rng)
    summary = summarize_curves(result)
    run_dir = Path(experiment.run_dir)
    title = f"{experiment.task_name}: {Path(run_dir).name}"
    references: dict[str, dict[str, float]] = {}
    if isinstance(result.get("baselines"), dict):  # scores of baselines the agent trains itself
        summary["agent_baselines"] = _agent_baseline_summary(result["baselines"])
        for name, entry in summary["agent_baselines"].items():
            for metric, stats in entry.items():
                references.setdefault(metric, {})[name] = stats["mean"]
    baseline_result = None
    if baselines is not None:
        baseline_result = _run_sb3(experiment, tasks, budget, baselines, summary, references)
    plots = plot_curves(summary, run_dir / "adaptation.png", title, references)
    plot_fits = getattr(experiment.distribution, "plot_fits", None)
    if plot_fits is not None:
        plots.append(plot_fits(experiment.agent, tasks[:3], run_dir / "fits.png"))
    summary["plots"] = [str(p) for p in plots]
    summary["iteration"] = experiment.iteration
    summary["num_tasks"] = len(tasks)
    document = {
        "summary": summary,
        "per_task": {k: v for k, v in result.items() if k != "adaptation_steps"},
        "tasks": [t.to_dict() for t in tasks],
    }
    if baseline_result is not None:
        document["baselines_per_task"] = baseline_result
    (run_dir / "eval.json").write_text(json.dumps(_jsonable(document), indent=1))
    return _jsonable(summary)
