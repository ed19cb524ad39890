"""Held-out evaluation: ``eval.json``, the adaptation plots and the baselines beside them.

The statistics (IQM with bootstrap intervals, means, tails) are in :mod:`metarl.stats` and are
re-exported here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from metarl.stats import (  # noqa: F401  (re-exported)
    bootstrap_ci,
    bootstrap_difference_ci,
    cvar,
    iqm,
    mean_ci95,
    summarize,
)


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
    summary["num_tasks"] = len(tasks) // experiment.eval_cfg.repeats
    summary["repeats"] = experiment.eval_cfg.repeats
    from metarl.experiment import evaluation_settings

    document = {
        "summary": summary,
        "per_task": {k: v for k, v in result.items() if k != "adaptation_steps"},
        "tasks": [t.to_dict() for t in tasks],
        # what the scores depend on besides the model, so that a reuse is checked against this
        # file rather than against a config.toml that may have been edited since
        "settings": {"evaluation": evaluation_settings(experiment.document), "baselines": baselines},
    }
    if baseline_result is not None:
        document["baselines_per_task"] = baseline_result
    (run_dir / "eval.json").write_text(json.dumps(_jsonable(document), indent=1))
    return _jsonable(summary)
