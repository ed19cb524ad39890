"""Meta-RL learning curves and a progress table from run directories, against published figures.

    python -m experiments.rl_curves experiments/rl_runs/* --out experiments/results/rl_curves

Each argument is a sweep directory (``metarl sweep ... --out DIR``: one run directory per seed)
or a single run directory. From every run's ``metrics.jsonl`` it reads the held-out curves that
``run.eval_every`` logs (``eval/<metric>_step<k>``: the mean over held-out tasks after ``k``
adaptation steps) and the adaptation diagnostics (``adapt/*``, ``train/accepted``); from
``machines.jsonl`` which machine trained it. It writes ``OUT.md`` and ``OUT.json`` (one row per
benchmark: seeds, iterations and environment steps reached against the paper's budget, the last
held-out evaluation, the diagnostics, and the command that continues the runs) and one PNG per
benchmark: held-out return (and success) after each number of adaptation steps against
meta-iterations, with environment steps on the top axis, and the published values of
``experiments/references.toml`` drawn on the same axes at the iteration they were reported for.
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

REFERENCES = Path(__file__).with_name("references.toml")
EVAL_KEY = re.compile(r"^eval/(return|success)_step(\d+)$")
DIAGNOSTICS = ("adapt/inner_kl", "adapt/mean_shift", "adapt/return_gain", "train/accepted")


def run_dirs(path: Path) -> list[Path]:
    """The run directories of a sweep directory (or the directory itself if it is a run)."""
    if (path / "config.toml").exists():
        return [path]
    return sorted(p for p in path.iterdir() if (p / "config.toml").exists())


def read_run(run: Path) -> dict[str, Any]:
    """One run's config, per-iteration metrics and machines."""
    config = tomllib.loads((run / "config.toml").read_text())
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    machines_path = run / "machines.jsonl"
    machines = [json.loads(x)["machine"] for x in machines_path.read_text().splitlines()] if machines_path.exists() else []
    return {"dir": str(run), "config": config, "rows": rows, "machines": sorted(set(machines)) or ["unrecorded"]}


def benchmark_of(config: dict[str, Any]) -> tuple[str, str]:
    """``("halfcheetah-vel", "maml_trpo")`` from a resolved config: the keys of references.toml."""
    tasks = config["tasks"]
    name = tasks["name"] + (f".{tasks['env_name']}" if "env_name" in tasks else "")
    agent = config["run"]["agent"].split(":")[0].rsplit(".", 1)[-1]
    return name, {"rl2": "rl2_ppo"}.get(agent, agent)


def reference_for(config: dict[str, Any], references: dict[str, Any]) -> dict[str, Any]:
    """The published entry of references.toml for a run's benchmark and algorithm (the
    MAML-TRPO entry stands for an algorithm with none of its own; a run told the task, with an
    ``*-oracle`` observation, is compared with the paper's oracle); ``{}`` when there is none."""
    benchmark, algorithm = benchmark_of(config)
    family, _, env = benchmark.partition(".")
    entries = references.get(family, {}).get(env, {}) if env else references.get(family, {})
    if str(config["tasks"].get("observation", "")).endswith("oracle"):
        algorithm = "oracle"
    elif algorithm not in entries:
        algorithm = "maml_trpo"
    entry = entries.get(algorithm, {})
    return entry if isinstance(entry, dict) else {}


def curves(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric and adaptation step: the evaluation iterations and the per-seed values there."""
    out: dict[str, dict[int, dict[int, list[float]]]] = {}
    for run in runs:
        for row in run["rows"]:
            for key, value in row.items():
                match = EVAL_KEY.match(key)
                if match and value is not None:
                    metric, step = match.group(1), int(match.group(2))
                    out.setdefault(metric, {}).setdefault(step, {}).setdefault(row["iteration"], []).append(value)
    return out


def recollected_steps(row: dict[str, Any]) -> float:
    """Environment steps an iteration spent collecting again data its run had before a resume
    (PEARL resumed from its portable checkpoint, which leaves out the replay). Logs written before
    ``train/recollected_env_steps`` existed recorded them as ``train/initial_env_steps`` at an
    iteration past the first (a run collects its initial episodes only at its first)."""
    again = float(row.get("train/recollected_env_steps", 0.0))
    return again + (float(row.get("train/initial_env_steps", 0.0)) if row["iteration"] > 1 else 0.0)


def steps_per_iteration(runs: list[dict[str, Any]]) -> float:
    """Mean new environment steps per iteration (re-collected ones left out)."""
    values = [r["train/env_steps"] - recollected_steps(r) for run in runs for r in run["rows"]
              if "train/env_steps" in r]
    return float(np.mean(values)) if values else float("nan")


def run_env_steps(run: dict[str, Any], per_iteration: float) -> tuple[float, float]:
    """A run's new and re-collected environment steps: summed over its logged iterations, or, where
    some iteration did not log them, its iterations times the benchmark's mean per iteration."""
    rows = run["rows"]
    if rows and all("train/env_steps" in r for r in rows):
        again = sum(recollected_steps(r) for r in rows)
        return sum(r["train/env_steps"] for r in rows) - again, again
    return (rows[-1]["iteration"] if rows else 0) * per_iteration, 0.0


def summarize(sweep: Path, references: dict[str, Any]) -> dict[str, Any]:
    """One benchmark's row: progress, last held-out evaluation, diagnostics, references."""
    runs = [read_run(r) for r in run_dirs(sweep)]
    config = runs[0]["config"]
    benchmark, algorithm = benchmark_of(config)
    iterations = [run["rows"][-1]["iteration"] if run["rows"] else 0 for run in runs]
    per_iteration = steps_per_iteration(runs)
    steps = [run_env_steps(run, per_iteration) for run in runs]
    curve = curves(runs)
    last_eval: dict[str, Any] = {}
    for metric, by_step in curve.items():
        common = set.intersection(*(set(v) for v in by_step.values()))
        full = [it for it in sorted(common) if all(len(by_step[s][it]) == len(runs) for s in by_step)]
        at = full[-1] if full else max(common)
        last_eval[metric] = {"iteration": at, "steps": {s: float(np.mean(by_step[s][at])) for s in sorted(by_step)},
                             "seeds": len(by_step[0][at])}
    recent = [r for run in runs for r in run["rows"][-10:]]
    diagnostics = {k: float(np.mean([r[k] for r in recent if k in r])) for k in DIAGNOSTICS
                   if any(k in r for r in recent)}
    max_kl = config.get("agent", {}).get("max_kl")
    accepted = [r["train/kl"] for r in recent if r.get("train/accepted") == 1.0 and "train/kl" in r]
    if max_kl and accepted:  # the share of the trust region an accepted step used
        diagnostics["trust_region_used"] = float(np.mean(accepted)) / float(max_kl)
    reference = reference_for(config, references)
    tasks = config["tasks"]
    variant = ", ".join(f"{k} {tasks[k]}" for k in ("frame_skip", "observation") if k in tasks)
    return {
        "sweep": str(sweep), "benchmark": benchmark + (f" ({variant})" if variant else ""),
        "algorithm": algorithm, "seeds": len(runs),
        "iterations": iterations, "budget_iterations": config["run"]["num_iterations"],
        "env_steps_per_iteration": per_iteration,
        "env_steps": [new for new, _ in steps],
        "recollected_env_steps": [again for _, again in steps],
        "last_eval": last_eval, "diagnostics": diagnostics, "curves": curve,
        "reference": {k: v for k, v in reference.items() if not isinstance(v, dict)},
        "machines": sorted({m for run in runs for m in run["machines"]}),
        "sweep_command": sweep_command(sweep),
    }


def sweep_command(sweep: Path) -> str | None:
    """The command that made (and, run again, continues) the sweep, from its ``sweep.json``;
    None until the sweep has finished once."""
    path = sweep / "sweep.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("sweep_command")
    except json.JSONDecodeError:
        return None


def plot(row: dict[str, Any], path: Path) -> Path:
    """Held-out metric after each number of adaptation steps against meta-iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = sorted(row["curves"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(8.5, 6.5 * len(metrics)), 4.4), squeeze=False)
    per_iteration = row["env_steps_per_iteration"]
    for ax, metric in zip(axes[0], metrics, strict=True):
        colors = {}
        for step, by_iteration in sorted(row["curves"][metric].items()):
            its = sorted(by_iteration)
            values = [by_iteration[i] for i in its]
            mean = [float(np.mean(v)) for v in values]
            line, = ax.plot(its, mean, marker="o", ms=3, label=f"after {step} step(s)")
            colors[step] = line.get_color()
            ax.fill_between(its, [min(v) for v in values], [max(v) for v in values], color=line.get_color(), alpha=0.15)
        ref = row["reference"]
        at = reference_iteration(ref, per_iteration, row["budget_iterations"])
        for key, step in ((f"{metric}_pre", 0), (f"{metric}_post", 1)):
            if key in ref:
                ax.scatter([at], [ref[key]], marker="*", s=150, zorder=5, color=colors.get(step),
                           edgecolors="black", label=f"published, after {step} step(s)")
        curve = ref.get(f"{metric}_post_curve")
        if curve and np.isfinite(per_iteration) and per_iteration > 0:
            span = 2 * max(max(row["iterations"]), row["budget_iterations"])  # the points near ours
            points = [(steps / per_iteration, v) for steps, v in curve if steps / per_iteration <= span]
            if points:
                ax.plot([x for x, _ in points], [v for _, v in points], ls="--", marker="*", ms=7,
                        color="black", lw=0.8, label="published log, adapted")
                at = max(at, max(x for x, _ in points))
        ax.set_xlabel("meta-iteration")
        ax.set_ylabel(f"held-out {metric}")
        ax.set_xlim(0, max(at, max(row["iterations"])) * 1.05)
        if np.isfinite(per_iteration) and per_iteration > 0:
            top = ax.secondary_xaxis("top", functions=(lambda x: x * per_iteration / 1e6, lambda s: s * 1e6 / per_iteration))
            top.set_xlabel("environment steps (millions)")
        ax.legend(fontsize=7, loc="lower right")
    source = row["reference"].get("source")
    note = f"stars: {source} ({row['reference'].get('how')})" if source else "no published value on file"
    fig.suptitle(f"{row['benchmark']}, {row['algorithm']}: {row['seeds']} seed(s), mean and min-max band\n{note}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reference_iteration(ref: dict[str, Any], per_iteration: float, default: int) -> float:
    """Where a published value sits on the meta-iteration axis: its ``iterations``, or its
    ``env_steps`` at this benchmark's environment steps per iteration (the papers' iterations
    hold other numbers of steps than ours)."""
    if "iterations" in ref:
        return float(ref["iterations"])
    if "env_steps" in ref and np.isfinite(per_iteration) and per_iteration > 0:
        return float(ref["env_steps"]) / per_iteration
    return float(default)


def fmt(value: float | None) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.3g}"


def env_steps_cell(row: dict[str, Any]) -> list[str]:
    """Each run's new environment steps, and those it collected again after a resume where any."""
    again = row.get("recollected_env_steps") or [0.0] * len(row["env_steps"])
    return [f"{new / 1e6:.1f}M" + (f" (+{extra / 1e6:.2f}M again)" if extra else "")
            for new, extra in zip(row["env_steps"], again, strict=True)]


def table(rows: list[dict[str, Any]], command: str, machine: str) -> str:
    lines = [
        "# Meta-RL benchmarks: progress and held-out curves", "",
        "Each row is one benchmark's runs (one per seed) kept under `experiments/rl_runs/`, read from their "
        "`metrics.jsonl`. Env steps: each seed's, summed from its log; those a resumed run spent collecting "
        "again the data its checkpoint left out (PEARL's replay) are shown apart (\"again\") and not counted. Held-out: the mean over held-out tasks at the last evaluation every seed reached "
        "(`run.eval_every`; where no evaluation has every seed yet, the latest one, and the eval-at column "
        "says how many seeds its figures hold), averaged over seeds, before adaptation (step 0), after one step and after the "
        "last. Diagnostics: the mean of the last 10 logged iterations of every seed (`adapt/inner_kl`: KL "
        "between the pre- and post-update policies; `adapt/return_gain`: training tasks' post- minus "
        "pre-update return; `train/accepted`: TRPO line-search acceptance; KL used: an accepted TRPO step's "
        "KL over `max_kl`: about 1 when the curvature model is right and the full step is taken, about 0.64 "
        "after one backtrack at ratio 0.8; far below that, the curvature overestimates the KL). Published values are in "
        "`experiments/references.toml`, with how each was read.", "",
        f"Written by `{command}` on {machine}.", "",
        "| benchmark | agent | seeds | iterations (budget) | env steps | held-out metric | eval at | step 0 | step 1 | last step | published (before → after) | inner KL | train gain | TRPO accepted | KL used | plot | trained on | continue with |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["diagnostics"]
        continue_cmd = (f"`{row['sweep_command']}`" if row.get("sweep_command")
                        else f"`metarl sweep ... --out {row['sweep']}` (see docs/reproducing.md)")
        progress = (f"| {row['benchmark']} | {row['algorithm']} | {row['seeds']} | "
                    f"{', '.join(map(str, row['iterations']))} ({row['budget_iterations']}) | "
                    f"{', '.join(env_steps_cell(row))} |")
        diagnostics = (f"{fmt(d.get('adapt/inner_kl'))} | {fmt(d.get('adapt/return_gain'))} | "
                       f"{fmt(d.get('train/accepted'))} | {fmt(d.get('trust_region_used'))} |")
        tail = f"{'; '.join(row['machines'])} | {continue_cmd} |"
        if not row["last_eval"]:  # too young for its first held-out point: its progress alone
            lines.append(f"{progress} – | no held-out point yet | – | – | – | – | {diagnostics} – | {tail}")
        for metric, last in sorted(row["last_eval"].items()):
            steps = last["steps"]
            seeds_note = f" ({last['seeds']} of {row['seeds']} seeds)" if last["seeds"] < row["seeds"] else ""
            ref = row["reference"]
            published = (f"{fmt(ref.get(f'{metric}_pre'))} → {fmt(ref.get(f'{metric}_post'))}"
                         if f"{metric}_pre" in ref or f"{metric}_post" in ref else "–")
            if published != "–":
                where = (f"{ref['iterations']} its" if "iterations" in ref
                         else f"{ref['env_steps'] / 1e6:.1f}M steps" if "env_steps" in ref else "")
                published += f" ({where}, {ref.get('how', '')})" if where else ""
            lines.append(
                f"{progress} {metric} | {last['iteration']}{seeds_note} | "
                f"{fmt(steps.get(0))} | {fmt(steps.get(1))} | {fmt(steps[max(steps)])} (step {max(steps)}) | {published} | "
                f"{diagnostics} [png]({Path(row['plot']).name}) | {tail}"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run directories")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/rl_curves"))
    args = parser.parse_args(argv)
    from metarl.runtime import machine

    references = tomllib.loads(REFERENCES.read_text())
    rows = []
    for sweep in args.dirs:
        row = summarize(sweep, references)
        # a sweep too young for its first held-out point has no curve to draw yet
        row["plot"] = str(plot(row, args.out.parent / f"{args.out.name}_{sweep.name}.png")) if row["curves"] else None
        rows.append(row)
    command = "python -m experiments.rl_curves " + " ".join(str(d) for d in args.dirs) + f" --out {args.out}"
    here = machine()
    args.out.with_suffix(".md").write_text(table(rows, command, here))
    args.out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": here, "rows": rows}, indent=1))
    print(f"wrote {args.out}.md, {args.out}.json and {sum(bool(r['plot']) for r in rows)} plot(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
