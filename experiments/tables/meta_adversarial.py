"""Builds ``experiments/results/meta_adversarial.{md,json}`` from finished ``metarl sweep`` directories.

    python -m experiments.tables.meta_adversarial --imitation runs/adv/imitation-nav2d \\
        --generator runs/adv/generator-nav2d runs/adv/generator-nav2d-plain \\
        --out experiments/results/meta_adversarial
    python -m experiments.tables.meta_adversarial --generator runs/adv/generator-cheetah \\
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

from experiments.tables.common import command_config, fmt_iqm, kept_rows, load_sweep
from experiments.tables.meta_adversarial_report import (
    BASELINES,
    GENERATOR,
    KINDS,
    PLAIN,
    VARIANTS,
    write,
)
from metarl.config import load_toml
from metarl.runtime import machine


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
        parts.append(
            f"BC fit to the demos ({agent['adapt_bc_steps']} steps) before the adversarial steps"
        )
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
        parser.error(
            "give --imitation / --generator sweep directories, --keep an earlier table's JSON, or both"
        )
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
    command = "python -m experiments.tables.meta_adversarial " + " ".join(sys.argv[1:] if argv is None else argv)
    write(imitation, generator, Path(args.out), command)
    print(
        json.dumps(
            {"imitation_rows": len(imitation), "generator_rows": len(generator), "out": args.out}
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
