"""Builds ``experiments/results/meta_adversarial.{md,json}`` from finished ``metarl sweep`` directories.

    python -m metarl.adv_table --imitation runs/adv/imitation-nav2d \\
        --generator runs/adv/generator-nav2d runs/adv/generator-nav2d-plain \\
        --out experiments/results/meta_adversarial
    python -m metarl.adv_table --generator runs/adv/generator-cheetah \\
        --keep experiments/results/meta_adversarial.json

Imitation: held-out return (or success, where the environment reports it) after 0, 1 and the
last adaptation step, IQM with a 95% bootstrap interval over tasks × seeds, for the
meta-adversarial learner, its ablations (GAIL from scratch, meta G + fresh D, fresh G + meta D)
and the behaviour-cloning baselines, all on the same demonstrations. Generator: mean, worst case
and CVaR 0.1 of the post-adaptation return (last step) on held-out tasks, on shifted tasks
(outside the training range) and on held-out tasks under robustness wrappers, and a goal check
per benchmark: G + D against plain MAML (CVaR 0.1 above it, mean at most 5% below it).
Every row carries the sweep command that produced it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from metarl.bench.adapt import machine
from metarl.config import load_toml
from metarl.evaluation import bootstrap_difference_ci, cvar
from metarl.sweep import command_config, fmt_iqm, kept_rows, load_sweep, several_machines

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


def _expert_returns(path: Path, label: str) -> Any:
    """The demonstrations' own returns pooled over the cell's runs (``demo_return`` in eval.json)."""
    pooled: list[float] = []
    for run in sorted(path.glob(f"{label}-s*")):
        file = run / "eval.json"
        if file.exists():
            pooled += json.loads(file.read_text())["per_task"].get("demo_return") or []
    return np.asarray(pooled, dtype=float) if pooled else None


def _run_config(path: Path, label: str) -> dict[str, Any] | None:
    """The resolved ``config.toml`` of the cell's first run, or None without run directories."""
    runs = sorted(path.glob(f"{label}-s*/config.toml"))
    return load_toml(runs[0]) if runs else None


def bc_hybrid(agent: dict[str, Any]) -> str:
    """How an imitation run's ``[agent]`` table adds behaviour cloning to the adversarial learner
    (empty for the pure meta-adversarial one)."""
    parts = []
    if int(agent.get("bc_init_steps", 0)):
        parts.append(f"G initialised by multi-task BC ({agent['bc_init_steps']} steps)")
    if int(agent.get("adapt_bc_steps", 0)):
        parts.append(f"BC fit to the demos ({agent['adapt_bc_steps']} steps) before the adversarial steps")
    return "; ".join(parts)


def imitation_rows(path: Path) -> list[dict[str, Any]]:
    """One row per learner and grid cell of an imitation sweep."""
    from metarl.evaluation import bootstrap_ci, iqm

    document, rows = load_sweep(path), []
    for label, cell in document["cells"].items():
        metric = "success" if "success" in cell else "return"
        command = document.get("sweep_command") or document["commands"][label]
        hybrid = bc_hybrid((_run_config(path, label) or {}).get("agent", {}))
        base = {
            "sweep": path.name,
            "cell": label,
            "metric": metric,
            "num_seeds": cell["num_seeds"],
            "command": command,
        }
        steps = cell["adaptation_steps"]
        picks = sorted({0, min(1, len(steps) - 1), len(steps) - 1})
        for suffix, name in VARIANTS.items():
            stats = cell.get(metric + suffix)
            if stats is not None:
                rows.append(
                    {
                        **base,
                        "learner": f"{name} + BC: {hybrid}" if hybrid else name,
                        "ours": suffix == "",
                        "steps": [steps[j] for j in picks],
                        "values": [fmt_iqm(stats, j) for j in picks],
                        "stats": {
                            k: [stats[k][j] for j in picks] for k in ("iqm", "lo", "hi", "mean")
                        },
                    }
                )
        single = {}  # learners scored once, not along adaptation steps
        expert = _expert_returns(path, label)
        if expert is not None and metric == "return":
            lo, hi = bootstrap_ci(expert)
            single["expert (the demonstrations)"] = {
                "iqm": iqm(expert),
                "lo": lo,
                "hi": hi,
                "mean": float(expert.mean()),
            }
        for key, name in BASELINES.items():
            stats = cell.get("agent_baselines", {}).get(f"{key}/{metric}")
            if stats is not None:
                single[name] = stats
        for name, stats in single.items():
            rows.append(
                {
                    **base,
                    "learner": name,
                    "steps": ["–"],
                    "stats": stats,
                    "values": [f"{stats['iqm']:.3g} [{stats['lo']:.3g}, {stats['hi']:.3g}]"],
                }
            )
    return rows


def generator_role(agent: dict[str, Any]) -> str:
    """What a task-generator run stands for in the comparison, from its ``[agent]`` table."""
    if float(agent.get("generated_fraction", 0.5)) == 0.0:
        return PLAIN
    if agent.get("proposal", "generator") == "uniform":
        return "wide domain randomisation (uniform over G's box)"
    return {
        "none": "G without D",
        "kl": "G + exact KL to the nominal box",
    }.get(agent.get("plausibility", "discriminator"), GENERATOR)


def generator_rows(path: Path) -> list[dict[str, Any]]:
    """One row per grid cell of a generator sweep: tail statistics on held-out and shifted tasks."""
    document, rows = load_sweep(path), []
    for label, cell in document["cells"].items():
        config = _run_config(path, label)
        if config is None:
            raise FileNotFoundError(f"{path} has no run directories {label}-s*")
        files = [run / "eval.json" for run in sorted(path.glob(f"{label}-s*"))]
        per_task = (
            [json.loads(f.read_text())["per_task"] for f in files]
            if all(f.exists() for f in files)
            else None
        )
        row = {
            "sweep": path.name,
            "cell": label,
            "benchmark": config["tasks"]["name"],
            "role": generator_role(config.get("agent", {})),
            "iterations": config["run"]["num_iterations"],
            "num_seeds": cell["num_seeds"],
            "command": document.get("sweep_command") or document["commands"][label],
        }
        for key in KINDS:
            stats = cell.get(key)
            if stats is not None:
                row[key] = {k: stats[k][-1] for k in ("mean", "worst", "cvar10", "iqm", "lo", "hi")}
                if per_task is not None:  # last-step score of every task × seed, for the intervals
                    row[key]["values"] = [
                        float(v) for run in per_task for v in np.asarray(run[key])[:, -1]
                    ]
        rows.append(row)
    return rows


def imitation_checks(imitation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per imitation sweep cell: the meta-adversarial learner after its last adaptation step
    against the best non-adversarial imitation baseline (BC, multi-task BC, MAML-BC), by IQM.
    The goal (10 points) is defined on success; on return the difference is reported alone."""
    checks = []
    for key in dict.fromkeys((r["sweep"], r["cell"]) for r in imitation):
        group = [r for r in imitation if (r["sweep"], r["cell"]) == key]
        ours = next(
            (r for r in group if r.get("ours", r["learner"] == VARIANTS[""])), None
        )
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


def write(
    imitation: list[dict[str, Any]], generator: list[dict[str, Any]], out: Path, command: str
) -> None:
    document = {
        "benchmark": "meta-adversarial agents",
        "machine": (here := machine()),
        "command": command,
        "imitation": imitation,
        "generator": generator,
    }
    generator_goal, imitation_goal = goal_checks(generator), imitation_checks(imitation)
    document["generator_goal"], document["imitation_goal"] = generator_goal, imitation_goal
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        "# Meta-adversarial agents",
        "",
        f"Table written by `{command}` on {document['machine']}. IQM over held-out tasks × seeds with a "
        "95% bootstrap interval in brackets.",
        "",
    ]
    if imitation:
        per_row_machine = several_machines(imitation, here)
        lines += [
            "## Few-shot imitation (no environment reward during adaptation)",
            "",
            "| sweep | learner | seeds | metric | adaptation steps | values | "
            + ("machine | " if per_row_machine else "")
            + "command |",
            "|---|---|---|---|---|---|" + ("---|" if per_row_machine else "") + "---|",
        ]
        for r in imitation:
            where = f"{r.get('machine', document['machine'])} | " if per_row_machine else ""
            lines.append(
                f"| {r['sweep']} ({r['cell']}) | {r['learner']} | {r['num_seeds']} | {r['metric']} | "
                f"{', '.join(map(str, r['steps']))} | {' → '.join(r['values'])} | {where}`{r['command']}` |"
            )
        if imitation_goal:
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
            for c in imitation_goal:
                met = "–" if c["met"] is None else f"**{'yes' if c['met'] else 'no'}**"
                lines.append(
                    f"| {c['sweep']} ({c['cell']}) | {c['metric']} | {c['value']:.3g} ({c['steps']}) | "
                    f"{c['best_baseline']}: {c['baseline_value']:.3g} | {c['delta']:+.3g} | {met} |"
                )
        lines.append("")
    if generator:
        per_row_machine = several_machines(generator, here)
        lines += [
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
                    [f"{s['mean']:.3g}", f"{s['worst']:.3g}", f"{s['cvar10']:.3g}"]
                    if s
                    else ["–"] * 3
                )
            if per_row_machine:
                cells.append(r.get("machine", document["machine"]))
            lines.append(
                f"| {r.get('benchmark', '–')} | {r['sweep']} ({r['cell']}) | {r.get('role', '–')} | "
                f"{r['num_seeds']} | {r.get('iterations', '–')} | {' | '.join(cells)} | `{r['command']}` |"
            )
        checks = generator_goal
        if checks:
            lines += [
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

            def interval(ci: Any) -> str:
                return "–" if ci is None else f"[{ci[0]:+.3g}, {ci[1]:+.3g}]"

            for c in checks:
                clear = c.get("cvar_above_clearly")
                lines.append(
                    f"| {c['benchmark']} | {c['tasks']} | {c['mean']:.3g} ({c['mean_delta']:+.3g}, "
                    f"{c['mean_delta_pct']:+.1f}%) | {interval(c.get('mean_delta_ci'))} | "
                    f"{c['cvar10']:.3g} ({c['cvar10_delta']:+.3g}) | {interval(c.get('cvar10_delta_ci'))} | "
                    f"{'yes' if c['cvar_above'] else 'no'} | {'yes' if c['mean_within'] else 'no'} | "
                    f"**{'yes' if c['met'] else 'no'}** | {'–' if clear is None else ('yes' if clear else 'no')} |"
                )
            lines += [
                "",
                "The intervals are paired bootstraps over held-out tasks × seeds (the same tasks for "
                "every row of a benchmark); \"clear of noise\" means the CVaR gain's interval lies "
                "above 0. Rows kept from before the table stored per-task scores have no interval.",
            ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--imitation", nargs="*", default=[], help="finished imitation sweep directories"
    )
    parser.add_argument(
        "--generator", nargs="*", default=[], help="finished generator sweep directories"
    )
    parser.add_argument("--out", default="experiments/results/meta_adversarial")
    parser.add_argument(
        "--keep",
        help="an earlier table's JSON: its rows for sweeps not given here are kept as they are, "
        "each with the machine it ran on",
    )
    args = parser.parse_args(argv)
    if not (args.imitation or args.generator or args.keep):
        parser.error("give --imitation / --generator sweep directories, --keep an earlier table's JSON, or both")
    imitation = [r for p in args.imitation for r in imitation_rows(Path(p))]
    generator = [r for p in args.generator for r in generator_rows(Path(p))]
    for row in imitation + generator:
        row["machine"] = machine()
    if args.keep:
        imitation = kept_rows(Path(args.keep), imitation, "imitation") + imitation
        kept = kept_rows(Path(args.keep), generator, "generator")
        for row in kept:  # rows from before the table recorded their benchmark and role
            if "role" not in row:
                config = command_config(row["command"], row["cell"])
                row["benchmark"] = config["tasks"]["name"]
                row["role"] = generator_role(config.get("agent", {}))
                row["iterations"] = config["run"]["num_iterations"]
        generator = kept + generator
    command = "python -m metarl.adv_table " + " ".join(sys.argv[1:] if argv is None else argv)
    write(imitation, generator, Path(args.out), command)
    print(
        json.dumps(
            {"imitation_rows": len(imitation), "generator_rows": len(generator), "out": args.out}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
