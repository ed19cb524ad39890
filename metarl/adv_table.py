"""Builds ``experiments/results/meta_adversarial.{md,json}`` from finished ``metarl sweep`` directories.

    python -m metarl.adv_table --imitation runs/adv/imitation-nav2d \\
        --generator runs/adv/generator-nav2d runs/adv/generator-nav2d-plain \\
        --out experiments/results/meta_adversarial

Imitation: held-out return (or success, where the environment reports it) after 0, 1 and the
last adaptation step, IQM with a 95% bootstrap interval over tasks × seeds, for the
meta-adversarial learner, its ablations (GAIL from scratch, meta G + fresh D, fresh G + meta D)
and the behaviour-cloning baselines, all on the same demonstrations. Generator: mean, worst case
and CVaR 0.1 of the post-adaptation return (last step) on held-out tasks, on shifted tasks
(outside the training range) and on held-out tasks under robustness wrappers.
Every row carries the sweep command that produced it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from metarl.bench.adapt import machine
from metarl.sweep import fmt_iqm, load_sweep

VARIANTS = {
    "": "meta-adversarial (meta G + meta D)",
    "_gail_scratch": "GAIL from scratch (fresh G + fresh D)",
    "_meta_g_fresh_d": "meta G + fresh D",
    "_fresh_g_meta_d": "fresh G + meta D",
}
KINDS = ("return", "return_shifted", "return_perturbed")  # held-out, shifted, perturbed tasks
BASELINES = {
    "bc_scratch": "BC from scratch",
    "bc_multitask": "multi-task BC fine-tuned",
    "maml_bc": "MAML-BC",
}


def _expert_returns(path: Path, label: str) -> Any:
    """The demonstrations' own returns pooled over the cell's runs (``demo_return`` in eval.json)."""
    import numpy as np

    pooled = []
    for run in sorted(path.glob(f"{label}-s*")):
        file = run / "eval.json"
        if file.exists():
            pooled += json.loads(file.read_text())["per_task"].get("demo_return") or []
    return np.asarray(pooled, dtype=float) if pooled else None


def imitation_rows(path: Path) -> list[dict[str, Any]]:
    """One row per learner and grid cell of an imitation sweep."""
    from metarl.evaluation import bootstrap_ci, iqm

    document, rows = load_sweep(path), []
    for label, cell in document["cells"].items():
        metric = "success" if "success" in cell else "return"
        base = {
            "sweep": document["title"],
            "cell": label,
            "metric": metric,
            "num_seeds": cell["num_seeds"],
            "command": document.get("sweep_command") or document["commands"][label],
        }
        steps = cell["adaptation_steps"]
        picks = sorted({0, min(1, len(steps) - 1), len(steps) - 1})
        for suffix, name in VARIANTS.items():
            stats = cell.get(metric + suffix)
            if stats is not None:
                rows.append(
                    {
                        **base,
                        "learner": name,
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


def generator_rows(path: Path) -> list[dict[str, Any]]:
    """One row per grid cell of a generator sweep: tail statistics on held-out and shifted tasks."""
    document, rows = load_sweep(path), []
    for label, cell in document["cells"].items():
        row = {
            "sweep": path.name,
            "cell": label,
            "num_seeds": cell["num_seeds"],
            "command": document.get("sweep_command") or document["commands"][label],
        }
        for key in KINDS:
            stats = cell.get(key)
            if stats is not None:
                row[key] = {k: stats[k][-1] for k in ("mean", "worst", "cvar10", "iqm", "lo", "hi")}
        rows.append(row)
    return rows


def write(
    imitation: list[dict[str, Any]], generator: list[dict[str, Any]], out: Path, command: str
) -> None:
    document = {
        "benchmark": "meta-adversarial agents",
        "machine": machine(),
        "command": command,
        "imitation": imitation,
        "generator": generator,
    }
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
        lines += [
            "## Few-shot imitation (no environment reward during adaptation)",
            "",
            "| sweep | learner | seeds | metric | adaptation steps | values | command |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in imitation:
            lines.append(
                f"| {r['sweep']} ({r['cell']}) | {r['learner']} | {r['num_seeds']} | {r['metric']} | "
                f"{', '.join(map(str, r['steps']))} | {' → '.join(r['values'])} | `{r['command']}` |"
            )
        lines.append("")
    if generator:
        lines += [
            "## Adversarial task generator: post-adaptation return (last step)",
            "",
            "Rows are named by their sweep directory; the command says what each ran: "
            "`agent.generated_fraction=0.0` is plain MAML-TRPO, `agent.proposal=uniform` with "
            "`generated_fraction=1.0` is wide domain randomisation over G's box (1.5× the nominal "
            "box), `plausibility-none` is G without D.",
            "",
            "| sweep | seeds | held-out mean | held-out worst | held-out CVaR 0.1 | shifted mean | "
            "shifted worst | shifted CVaR 0.1 | perturbed mean | perturbed worst | perturbed CVaR 0.1 | "
            "command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in generator:
            cells = []
            for key in KINDS:
                s = r.get(key)
                cells += (
                    [f"{s['mean']:.3g}", f"{s['worst']:.3g}", f"{s['cvar10']:.3g}"]
                    if s
                    else ["–"] * 3
                )
            lines.append(
                f"| {r['sweep']} ({r['cell']}) | {r['num_seeds']} | {' | '.join(cells)} | `{r['command']}` |"
            )
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
    args = parser.parse_args(argv)
    imitation = [r for p in args.imitation for r in imitation_rows(Path(p))]
    generator = [r for p in args.generator for r in generator_rows(Path(p))]
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
