"""Builds ``experiments/results/families.{md,json}``: the meta-learning families side by side.

    metarl sweep experiments/sinusoid_probmaml.toml --seeds 3 --out runs/families/sinusoid-probmaml
    metarl sweep experiments/rl2_nav2d.toml --seeds 3 --out runs/families/nav2d-rl2
    python -m experiments.tables.families runs/families/*/ --out experiments/results/families
    python -m experiments.tables.families runs/families/cheetah-vel-rl2 --keep experiments/results/families.json
    python -m experiments.tables.families --omniglot-cells experiments/results/omniglot_cells --keep ...

Omniglot rows come from the trained cells of ``experiments.tables.omniglot_cells`` (5-way 1-shot):
``--methods probmaml mann learnedopt`` trains the families' cells beside MAML's, Meta-SGD's and
ProtoNets' (which omniglot.md shares).

One row per sweep (grid cell), grouped by benchmark (the task distribution and its shots/ways).
Each row gives the learner, its family, the score before adaptation and after the last adaptation
step of the learner's own protocol, and how much experience that adaptation used:

* gradient learners (MAML, Meta-SGD, probabilistic MAML, learned optimizer) take inner steps on
  the K support examples (RL: inner policy-gradient steps, each on a batch of episodes);
* MANN reads the support set once (step 1 = after reading it);
* ProtoNets compares with class means of the support set (no step count);
* RL² and PEARL adapt within episodes of experience (step k = after k episodes of the task).

Scores are pooled over held-out tasks × seeds: IQM with a 95% bootstrap interval, as every
metarl table. Meta-World ML10 rows stand beside the Meta-World paper's meta-test success.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

from experiments.tables.common import (
    fmt_gain,
    fmt_iqm,
    gain,
    kept_rows,
    load_sweep,
    machines_of,
    references,
)
from metarl.config import load_toml
from metarl.runtime import machine
from metarl.sweep import aggregate

# agent import path (and few-shot method) -> (learner, family)
LEARNERS: dict[str, tuple[str, str]] = {
    "metarl.fewshot.maml:GradientLearner/maml": ("MAML", "gradient (learned initialisation)"),
    "metarl.fewshot.maml:GradientLearner/fomaml": ("FOMAML", "gradient (learned initialisation)"),
    "metarl.fewshot.maml:GradientLearner/metasgd": ("Meta-SGD", "gradient (learned initialisation and rates)"),
    "metarl.fewshot.maml:GradientLearner/anil": ("ANIL", "gradient (learned initialisation)"),
    "metarl.fewshot.maml:GradientLearner/reptile": ("Reptile", "gradient (learned initialisation)"),
    "metarl.fewshot.maml:GradientLearner/pretrained": ("pretrained + fine-tune", "non-meta baseline"),
    "metarl.fewshot.prob_maml:ProbabilisticMAML": ("probabilistic MAML", "Bayesian (learned prior)"),
    "metarl.fewshot.mann:MemoryAugmentedNetwork": ("MANN", "model-based (external memory)"),
    "metarl.fewshot.learned_opt:LearnedOptimizerLearner": ("learned optimizer", "optimization (learned update rule)"),
    "metarl.fewshot.protonet:PrototypicalNetwork": ("ProtoNets", "metric"),
    "metarl.fewshot.matchingnet:MatchingNetwork": ("Matching Nets", "metric"),
    "agents.maml_trpo:MAMLTRPO": ("MAML-TRPO", "gradient (learned initialisation)"),
    "agents.maml_ppo:MAMLPPO": ("MAML-PPO", "gradient (learned initialisation)"),
    "agents.rl2:RL2": ("RL²", "model-based (recurrent memory)"),
    "agents.pearl:PEARL": ("PEARL", "Bayesian (probabilistic context)"),
}

# Meta-World paper (arXiv 1910.10897), table 1: meta-test success rate (%) on ML10, from
# experiments/references.toml (learner -> its key there).
ML10_PUBLISHED = {
    learner: references()["ml10"][key]["success_test"]
    for learner, key in (("MAML-TRPO", "maml_trpo"), ("RL²", "rl2_ppo"), ("PEARL", "pearl"))
}

METRIC_ORDER = ("loss", "accuracy", "coverage90", "return", "success")


def _learner(config: dict[str, Any]) -> tuple[str, str]:
    agent = config["run"]["agent"]
    method = config.get("agent", {}).get("method")
    key = f"{agent}/{method}" if method and f"{agent}/{method}" in LEARNERS else agent
    return LEARNERS.get(key, (agent.split(":")[-1], "other"))


def _benchmark(config: dict[str, Any]) -> str:
    tasks, agent = config["tasks"], config.get("agent", {})
    name = tasks["name"]
    if name == "sinusoid":
        return f"sinusoid, K = {agent.get('num_shots', '?')}"
    if name == "omniglot":
        return f"Omniglot {tasks.get('num_ways', '?')}-way {agent.get('num_shots', '?')}-shot ({tasks.get('subset', 'full')} background)"
    if name == "ml1":
        return f"ML1 {tasks.get('env_name', tasks.get('task', ''))}".strip()
    return name


def _unit(config: dict[str, Any]) -> str:
    """The agent's unit of adaptation (``metarl.agent``); ``gradient step`` for an agent that
    cannot be imported any more."""
    from metarl.config import ConfigError
    from metarl.registry import resolve_agent

    try:
        return resolve_agent(config["run"]["agent"]).adaptation_unit
    except ConfigError:
        return "gradient step"


def _episodes_per_step(config: dict[str, Any]) -> int | None:
    """Episodes of task experience one adaptation step stands for (RL only; None otherwise)."""
    unit = _unit(config)
    if unit == "episode":
        return 1
    if unit == "policy-gradient step":
        agent = config.get("agent", {})
        return int(agent.get("eval_episodes_per_task", agent.get("episodes_per_task", 1)))
    return None


def _experience(config: dict[str, Any], step: int) -> str:
    agent, unit = config.get("agent", {}), _unit(config)
    if unit == "episode":
        return f"{step} episode(s)"
    if unit == "policy-gradient step":
        episodes = agent.get("eval_episodes_per_task", agent.get("episodes_per_task", "?"))
        return f"{step} step(s) × {episodes} episodes"
    if unit == "memory read":
        return "support set read" if step else "empty memory"
    if unit == "support set":
        return "support set"
    return f"{step} step(s)"


def rows_of(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per grid cell of a finished sweep directory."""
    document = load_sweep(sweep_dir)
    rows = []
    for label, cell in document["cells"].items():
        runs = sorted(sweep_dir.glob(f"{label}-s*"))
        if not runs:
            raise FileNotFoundError(f"{sweep_dir} has no run directories {label}-s*")
        config = load_toml(runs[0] / "config.toml")
        learner, family = _learner(config)
        steps = cell["adaptation_steps"]
        metrics = {
            m: {k: cell[m][k] for k in ("iqm", "lo", "hi", "mean")}
            for m in METRIC_ORDER
            if isinstance(cell.get(m), dict)
        }
        rows.append(
            {
                "benchmark": _benchmark(config),
                "learner": learner,
                "family": family,
                "sweep": document["title"],
                "cell": label,
                "num_seeds": cell["num_seeds"],
                "iterations": config["run"]["num_iterations"],
                "adaptation_steps": steps,
                "experience_last": _experience(config, steps[-1]),
                "episodes_per_step": _episodes_per_step(config),
                "metrics": metrics,
                "command": document.get("sweep_command") or document["commands"][label],
            }
        )
        # after the last adaptation step minus before, paired over tasks × seeds (RL² and PEARL:
        # the trial's last episode against its first)
        if len(steps) > 1:
            rows[-1]["gain"] = {m: gain(runs, m, step=-1) for m in metrics}
        # where the finished seeds trained (their machines.jsonl, most iterations first); where
        # they record no machine, the table's own is assumed
        trained_on = machines_of([r for r in runs if (r / "eval.json").exists()])
        if trained_on:
            rows[-1]["machine"] = "; ".join(trained_on)
    return rows


# omniglot_table method -> its config, for the families' Omniglot rows
OMNIGLOT_LEARNERS = ("maml", "metasgd", "probmaml", "mann", "learnedopt", "protonet")


def omniglot_rows(cells_dir: Path, ways: int = 5, shots: int = 1) -> list[dict[str, Any]]:
    """Rows of the families' learners from trained Omniglot cells (``omniglot_table``), pooled
    over held-out episodes × seeds. Cells that kept only their reported step give "after" alone."""
    from experiments.tables.omniglot_cells import (
        cell_machines,
        load_cells,
        merge_cells,
        seed_command,
    )

    cells = merge_cells(load_cells(cells_dir))
    rows = []
    for method in OMNIGLOT_LEARNERS:
        group = sorted(
            (
                c
                for c in cells
                if c["method"] == method and c["ways"] == ways and c["shots"] == shots
                and str(ways) in c["accuracy"]
            ),
            key=lambda c: c["seed"],
        )
        if not group:
            continue
        config = load_toml(Path("experiments") / f"omniglot_{method}.toml")
        learner, family = _learner(config)
        scores = [c["accuracy"][str(ways)] for c in group]
        step = scores[0]["step"]
        curves = [a.get("curve") for a in scores]
        if all(curves) and len({tuple(c["steps"]) for c in curves}) == 1:
            steps = list(curves[0]["steps"])
            matrices = [np.asarray(c["per_task"], dtype=float).T for c in curves]  # [task, step]
        else:  # cells that kept only the reported step
            steps, matrices = [step], [np.asarray(a["per_task"], dtype=float)[:, None] for a in scores]
        # pooled over tasks × seeds as a sweep pools its runs (accuracy as a fraction)
        pooled = aggregate(
            [{"summary": {"adaptation_steps": steps}, "per_task": {"accuracy": m / 100.0}} for m in matrices]
        )["accuracy"]
        stats = {k: pooled[k] for k in ("iqm", "lo", "hi", "mean")}
        if step in steps:  # "after" is the step the Omniglot table reports
            last = steps.index(step) + 1
            steps, stats = steps[:last], {k: v[:last] for k, v in stats.items()}
        seeds = [c["seed"] for c in group]
        rows.append(
            {
                "benchmark": f"Omniglot {ways}-way {shots}-shot (minimal background)",
                "learner": learner,
                "family": family,
                # keyed without the budget, so a table rebuilt with --keep replaces the row
                "sweep": f"omniglot-cells/{method}",
                "cell": f"{ways}w{shots}s",
                "num_seeds": len(group),
                "iterations": group[0]["iterations"],
                "adaptation_steps": steps,
                "after_only": len(steps) == 1,
                "experience_last": _experience(config, steps[-1]),
                "episodes_per_step": None,
                "metrics": {"accuracy": stats},
                "command": seed_command([c["run"] for c in group], seeds),
                "machine": "; ".join(cell_machines(group)),
            }
        )
    return rows


def _published(row: dict[str, Any]) -> str:
    if row["benchmark"] == "ml10" and row["learner"] in ML10_PUBLISHED:
        return f"{ML10_PUBLISHED[row['learner']]}% (Meta-World table 1)"
    return "–"


def _slug(text: str) -> str:
    return "_".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def plot_benchmarks(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """One PNG per benchmark and metric: each learner's IQM (95% band) and mean against its
    adaptation, with the Meta-World paper's ML10 meta-test success where it has one.

    RL curves are drawn against episodes of the held-out task's experience (a MAML step counts
    its episodes), so meta-RL families with different adaptation mechanisms share one axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        group = [r for r in rows if r["benchmark"] == benchmark]
        for metric in dict.fromkeys(m for r in group for m in r["metrics"]):
            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            episodes = all(r["episodes_per_step"] for r in group if metric in r["metrics"])
            for i, r in enumerate(r for r in group if metric in r["metrics"]):
                stats = r["metrics"][metric]
                x = [s * (r["episodes_per_step"] or 1) for s in r["adaptation_steps"]]
                if len(x) == 1:  # one score (a metric learner, or a cell with its reported step only)
                    low, high = stats["iqm"][0] - stats["lo"][0], stats["hi"][0] - stats["iqm"][0]
                    ax.errorbar(x, stats["iqm"], yerr=[[low], [high]], fmt="o", capsize=4,
                                color=f"C{i}", label=r["learner"])
                    continue
                ax.plot(x, stats["iqm"], marker="o", color=f"C{i}", label=r["learner"])
                ax.fill_between(x, stats["lo"], stats["hi"], color=f"C{i}", alpha=0.2)
                # the mean beside the IQM: where most tasks score 0 (ML10 success) the IQM stays
                # flat while the mean, the papers' statistic, moves
                ax.plot(x, stats["mean"], ls="--", color=f"C{i}", alpha=0.8, label=f"{r['learner']} (mean)")
                if metric == "success" and benchmark == "ml10" and r["learner"] in ML10_PUBLISHED:
                    ax.axhline(ML10_PUBLISHED[r["learner"]] / 100, ls=":", color=f"C{i}",
                               label=f"{r['learner']}, Meta-World table 1 (max over training)")
            ax.set_xlabel("episodes of task experience" if episodes else "adaptation steps")
            ax.set_ylabel(f"{metric} (IQM; dashed: mean)")
            ax.set_title(benchmark)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out.parent / f"{out.stem}_{_slug(benchmark)}_{metric}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def write_table(rows: list[dict[str, Any]], out: Path, command: str, notes: list[str] | None = None) -> None:
    """``out.json``, ``out.md`` and the curves beside them; ``notes`` are the lines of the table's
    Notes section (what a reader must know about some rows), one a row or a group of rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = plot_benchmarks(rows, out)
    document = {
        "benchmark": "meta-learning families",
        "machine": (here := machine()),
        "command": command,
        "notes": list(notes or []),
        "ml10_published_test_success": ML10_PUBLISHED,
        "rows": rows,
        "plots": [p.name for p in plots],
    }
    out.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        "# Meta-learning families on one platform",
        "",
        "Held-out tasks; IQM over tasks × seeds with a 95% bootstrap interval in brackets. "
        "\"Before\" is the score with no task data; \"after\" is the score after the learner's own "
        "adaptation, with the experience it used in the \"adaptation used\" column; \"after first step\" "
        "is one inner step (one episode for RL² and PEARL). The plain mean after adaptation stands "
        "beside the IQM: far above it, some tasks or seeds diverged. \"After − before\" is the mean "
        "change over the adaptation, each held-out task paired with itself, with a 95% bootstrap "
        "interval (rows from sweep directories; for RL² and PEARL the trial's last episode against "
        "its first, so an interval above 0 is a score rising with context). Regression scores are MSE "
        "(lower is better); classification scores accuracy; RL scores return or success. The "
        "iterations column is the meta-training length of each row: rows far below a paper's "
        "budget are early points of its setting, not converged figures.",
        "",
        f"Table written by `{command}` on {document['machine']}.",
        "",
        "Curves: " + ", ".join(f"[{p.name}]({p.name})" for p in plots),
    ]
    if notes:
        lines += ["", "What a reader must know about single rows (settings, budgets, dropped rows) is under Notes, "
                  "below the tables."]
    # a row trained elsewhere than where the table is built names its machine even when all agree
    per_row_machine = any(r.get("machine", here) != here for r in rows)
    if per_row_machine:
        lines += ["", "The machine column names the machines each row trained on, the one that trained "
                  "most iterations first."]
    for benchmark in dict.fromkeys(r["benchmark"] for r in rows):
        lines += [
            "",
            f"## {benchmark}",
            "",
            "| learner | family | seeds | iterations | metric | before | after first step | after | "
            "mean after | after − before, mean [95% CI] | adaptation used | published | "
            + ("machine | " if per_row_machine else "")
            + "command |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if per_row_machine else "") + "---|",
        ]
        for r in (r for r in rows if r["benchmark"] == benchmark):
            for metric, stats in r["metrics"].items():
                last = len(r["adaptation_steps"]) - 1
                before, first = (
                    ("–", "–") if r.get("after_only") else (fmt_iqm(stats, 0), fmt_iqm(stats, min(1, last)))
                )
                lines.append(
                    f"| {r['learner']} | {r['family']} | {r['num_seeds']} | {r['iterations']} | "
                    f"{metric} | {before} | {first} | {fmt_iqm(stats, last)} | "
                    f"{stats['mean'][last]:.3g} | {fmt_gain((r.get('gain') or {}).get(metric))} | "
                    f"{r['experience_last']} | "
                    f"{_published(r) if metric == 'success' else '–'} | "
                    + (f"{r.get('machine', document['machine'])} | " if per_row_machine else "")
                    + f"`{r['command']}` |"
                )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", help="finished `metarl sweep` output directories")
    parser.add_argument("--out", default="experiments/results/families")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the table's Notes section (repeat for several)",
    )
    parser.add_argument(
        "--keep",
        help="an earlier table's JSON: its rows for sweeps not given here are kept as they are, "
        "each with the machine it ran on",
    )
    parser.add_argument(
        "--omniglot-cells",
        help="folder of omniglot_table cells (e.g. experiments/results/omniglot_cells): adds the "
        "Omniglot 5-way 1-shot rows of the learners trained there",
    )
    parser.add_argument(
        "--drop",
        nargs="*",
        default=[],
        metavar="SWEEP",
        help="with --keep: leave out the kept rows of these sweeps (e.g. rows whose settings were replaced)",
    )
    args = parser.parse_args(argv)
    if not (args.sweeps or args.keep or args.omniglot_cells):
        parser.error("give finished sweep directories, --omniglot-cells, --keep an earlier table's JSON, or several")
    rows = [row for sweep_dir in args.sweeps for row in rows_of(Path(sweep_dir))]
    for row in rows:  # a sweep whose runs record no machine: the one building the table
        row.setdefault("machine", machine())
    if args.omniglot_cells:
        if not Path(args.omniglot_cells).is_dir():
            parser.error(f"--omniglot-cells {args.omniglot_cells}: no such folder")
        rows += omniglot_rows(Path(args.omniglot_cells))
    if args.keep:
        rows = [r for r in kept_rows(Path(args.keep), rows) if r["sweep"] not in args.drop] + rows
    given = sys.argv[1:] if argv is None else argv
    command = "python -m experiments.tables.families " + shlex.join(given)  # notes may hold quotes
    write_table(rows, Path(args.out), command, args.note)
    print(json.dumps({"rows": len(rows), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
