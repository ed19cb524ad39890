"""The meta-adversarial table's goal checks and Markdown: ``write`` renders the rows that
``experiments.tables.meta_adversarial`` reads from finished sweeps into ``meta_adversarial.{md,json}``.

Imitation goal: the meta-adversarial learner at least 10 points of success over the best
behaviour-cloning baseline after its last adaptation step. Generator goal, per benchmark and task
set: G + D's CVaR 0.1 above plain MAML's, with a mean return at most 5% below it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments.tables.common import several_machines
from metarl.evaluation import bootstrap_difference_ci, cvar
from metarl.runtime import machine

VARIANTS = {
    "": "meta-adversarial (meta G + meta D)",
    "_gail_scratch": "GAIL from scratch (fresh G + fresh D)",
    "_meta_g_fresh_d": "meta G + fresh D",
    "_fresh_g_meta_d": "fresh G + meta D",
}
KINDS = ("return", "return_shifted", "return_perturbed")  # held-out, shifted, perturbed tasks
PLAIN = "plain MAML (no generated tasks)"
GENERATOR = "G + D (meta-adversarial)"
MEAN_TOLERANCE = 0.05  # the goal: mean return at most 5% below plain MAML's
SUCCESS_MARGIN = 0.10  # the imitation goal: 10 points of success over the best BC baseline
BASELINES = {
    "bc_scratch": "BC from scratch",
    "bc_multitask": "multi-task BC fine-tuned",
    "maml_bc": "MAML-BC",
}


def imitation_checks(imitation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per imitation sweep cell: the meta-adversarial learner after its last adaptation step
    against the best non-adversarial imitation baseline (BC, multi-task BC, MAML-BC), by IQM.
    The goal (10 points) is defined on success; on return the difference is reported alone."""
    checks = []
    for key in dict.fromkeys((r["sweep"], r["cell"]) for r in imitation):
        group = [r for r in imitation if (r["sweep"], r["cell"]) == key]
        ours = next((r for r in group if r.get("ours", r["learner"] == VARIANTS[""])), None)
        baselines = [r for r in group if r["learner"] in BASELINES.values()]
        if ours is None or not baselines:
            continue
        best = max(baselines, key=lambda r: r["stats"]["iqm"])
        value, metric = ours["stats"]["iqm"][-1], ours["metric"]
        delta = value - best["stats"]["iqm"]
        checks.append(
            {
                "sweep": key[0],
                "cell": key[1],
                "metric": metric,
                "steps": ours["steps"][-1],
                "value": value,
                "best_baseline": best["learner"],
                "baseline_value": best["stats"]["iqm"],
                "delta": delta,
                "met": delta >= SUCCESS_MARGIN if metric == "success" else None,
            }
        )
    return checks


def goal_checks(generator: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per benchmark and task set: G + D's mean and CVaR 0.1 against plain MAML's (the issue's goal)."""
    checks = []
    for benchmark in dict.fromkeys(r.get("benchmark") for r in generator):
        group = [r for r in generator if r.get("benchmark") == benchmark]
        plain = next((r for r in group if r.get("role") == PLAIN), None)
        ours = [r for r in group if r.get("role") == GENERATOR]
        if plain is None or not ours:
            continue
        for r in ours:
            for key, tasks in zip(KINDS, ("held-out", "shifted", "perturbed"), strict=True):
                if key not in r or key not in plain:
                    continue
                mine, base = r[key], plain[key]
                delta = mine["mean"] - base["mean"]
                both = "values" in mine and "values" in base
                cvar_ci = (
                    bootstrap_difference_ci(mine["values"], base["values"], cvar) if both else None
                )
                mean_ci = bootstrap_difference_ci(mine["values"], base["values"]) if both else None
                within = delta >= -MEAN_TOLERANCE * abs(base["mean"])
                above = mine["cvar10"] > base["cvar10"]
                checks.append(
                    {
                        "benchmark": benchmark,
                        "sweep": r["sweep"],
                        "tasks": tasks,
                        "mean": mine["mean"],
                        "mean_delta": delta,
                        "mean_delta_pct": 100 * delta / abs(base["mean"]) if base["mean"] else 0.0,
                        "cvar10": mine["cvar10"],
                        "cvar10_delta": mine["cvar10"] - base["cvar10"],
                        "cvar10_delta_ci": cvar_ci,
                        "mean_delta_ci": mean_ci,
                        "cvar_above": above,
                        "mean_within": within,
                        "met": above and within,
                        # the CVaR gain's paired-bootstrap interval lies above 0
                        "cvar_above_clearly": None if cvar_ci is None else cvar_ci[0] > 0,
                    }
                )
    return checks


def _imitation_lines(
    imitation: list[dict[str, Any]], checks: list[dict[str, Any]], here: str
) -> list[str]:
    """The few-shot imitation section: one row per learner, then the goal check."""
    per_row_machine = several_machines(imitation, here)
    lines = [
        "## Few-shot imitation (no environment reward during adaptation)",
        "",
        "| sweep | learner | seeds | metric | adaptation steps | values | "
        + ("machine | " if per_row_machine else "")
        + "command |",
        "|---|---|---|---|---|---|" + ("---|" if per_row_machine else "") + "---|",
    ]
    for r in imitation:
        where = f"{r.get('machine', here)} | " if per_row_machine else ""
        lines.append(
            f"| {r['sweep']} ({r['cell']}) | {r['learner']} | {r['num_seeds']} | {r['metric']} | "
            f"{', '.join(map(str, r['steps']))} | {' → '.join(r['values'])} | {where}`{r['command']}` |"
        )
    if checks:
        lines += [
            "",
            "### Goal check: meta-adversarial imitation against the best non-adversarial baseline",
            "",
            f"Goal (success): at least {SUCCESS_MARGIN * 100:.0f} points over the best of BC from "
            "scratch, multi-task BC fine-tuned and MAML-BC, after the last adaptation step (IQM). "
            "On return the difference is shown without a goal.",
            "",
            "| sweep | metric | meta-adversarial (step) | best baseline | Δ | goal met |",
            "|---|---|---|---|---|---|",
        ]
        for c in checks:
            met = "–" if c["met"] is None else f"**{'yes' if c['met'] else 'no'}**"
            lines.append(
                f"| {c['sweep']} ({c['cell']}) | {c['metric']} | {c['value']:.3g} ({c['steps']}) | "
                f"{c['best_baseline']}: {c['baseline_value']:.3g} | {c['delta']:+.3g} | {met} |"
            )
    return lines + [""]


def _generator_lines(generator: list[dict[str, Any]], here: str) -> list[str]:
    """The task-generator section: tail statistics per row on held-out, shifted, perturbed tasks."""
    per_row_machine = several_machines(generator, here)
    lines = [
        "## Adversarial task generator: post-adaptation return (last step)",
        "",
        "Each row's role follows from its command: `agent.generated_fraction=0.0` is plain "
        "MAML-TRPO, `agent.proposal=uniform` with `generated_fraction=1.0` is wide domain "
        "randomisation over G's box (1.5× the nominal box), `plausibility-none` is G without D. "
        "Mean, worst and CVaR 0.1 are over held-out tasks × seeds; the IQM has its 95% "
        "bootstrap interval.",
        "",
        "| benchmark | sweep | role | seeds | iterations | held-out IQM [95% CI] | held-out mean | "
        "held-out worst | held-out CVaR 0.1 | shifted mean | shifted worst | shifted CVaR 0.1 | "
        "perturbed mean | perturbed worst | perturbed CVaR 0.1 | "
        + ("machine | " if per_row_machine else "")
        + "command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        + ("---|" if per_row_machine else "")
        + "---|",
    ]
    for r in generator:
        held = r.get("return")
        cells = [f"{held['iqm']:.3g} [{held['lo']:.3g}, {held['hi']:.3g}]" if held else "–"]
        for key in KINDS:
            s = r.get(key)
            cells += (
                [f"{s['mean']:.3g}", f"{s['worst']:.3g}", f"{s['cvar10']:.3g}"] if s else ["–"] * 3
            )
        if per_row_machine:
            cells.append(r.get("machine", here))
        lines.append(
            f"| {r.get('benchmark', '–')} | {r['sweep']} ({r['cell']}) | {r.get('role', '–')} | "
            f"{r['num_seeds']} | {r.get('iterations', '–')} | {' | '.join(cells)} | `{r['command']}` |"
        )
    return lines


def _interval(ci: Any) -> str:
    return "–" if ci is None else f"[{ci[0]:+.3g}, {ci[1]:+.3g}]"


def _generator_goal_lines(checks: list[dict[str, Any]]) -> list[str]:
    """The generator goal check: G + D against plain MAML per benchmark and task set."""
    lines = [
        "",
        "### Goal check: G + D against plain MAML",
        "",
        f"Goal: CVaR 0.1 of the post-adaptation return above plain MAML's, with a mean "
        f"return at most {MEAN_TOLERANCE:.0%} below it. Δ is G + D minus plain MAML "
        "(positive is better).",
        "",
        "| benchmark | tasks | mean (Δ, % of plain's magnitude) | mean Δ 95% CI | CVaR 0.1 (Δ) | "
        f"CVaR Δ 95% CI | CVaR above plain | mean within {MEAN_TOLERANCE:.0%} | goal met | "
        "CVaR gain clear of noise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        clear = c.get("cvar_above_clearly")
        lines.append(
            f"| {c['benchmark']} | {c['tasks']} | {c['mean']:.3g} ({c['mean_delta']:+.3g}, "
            f"{c['mean_delta_pct']:+.1f}%) | {_interval(c.get('mean_delta_ci'))} | "
            f"{c['cvar10']:.3g} ({c['cvar10_delta']:+.3g}) | {_interval(c.get('cvar10_delta_ci'))} | "
            f"{'yes' if c['cvar_above'] else 'no'} | {'yes' if c['mean_within'] else 'no'} | "
            f"**{'yes' if c['met'] else 'no'}** | {'–' if clear is None else ('yes' if clear else 'no')} |"
        )
    return lines + [
        "",
        "The intervals are paired bootstraps over held-out tasks × seeds (the same tasks for "
        'every row of a benchmark); "clear of noise" means the CVaR gain\'s interval lies '
        "above 0. Rows kept from before the table stored per-task scores have no interval.",
    ]


def write(
    imitation: list[dict[str, Any]], generator: list[dict[str, Any]], out: Path, command: str
) -> None:
    """Writes ``out``.json (rows, goal checks, machine, command) and ``out``.md (the tables)."""
    here = machine()
    generator_goal, imitation_goal = goal_checks(generator), imitation_checks(imitation)
    document = {
        "benchmark": "meta-adversarial agents",
        "machine": here,
        "command": command,
        "imitation": imitation,
        "generator": generator,
        "generator_goal": generator_goal,
        "imitation_goal": imitation_goal,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        "# Meta-adversarial agents",
        "",
        f"Table written by `{command}` on {here}. IQM over held-out tasks × seeds with a "
        "95% bootstrap interval in brackets.",
        "",
    ]
    if imitation:
        lines += _imitation_lines(imitation, imitation_goal, here)
    if generator:
        lines += _generator_lines(generator, here)
        if generator_goal:
            lines += _generator_goal_lines(generator_goal)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
