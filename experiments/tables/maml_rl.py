"""Builds ``experiments/results/maml_rl.{md,json}`` from finished ``metarl sweep`` directories.

    metarl sweep experiments/maml_trpo_nav2d.toml --seeds 3 --baselines --out runs/rl/trpo-nav2d
    python -m experiments.tables.maml_rl runs/rl/trpo-nav2d runs/rl/ppo-nav2d --out experiments/results/maml_rl

One row per sweep (grid cell): held-out return (and success) IQM with a 95% bootstrap interval
over tasks × seeds before adaptation and after each inner step, the SB3 baselines where the sweep
trained them, and the mean sampling and optimisation seconds per iteration with their ratio
(from each run's ``timing.jsonl``). Every row carries the sweep command that produced it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from experiments.bench.trpo import floor_lines, timing_table
from experiments.rl_curves import reference_for
from experiments.tables.common import (
    fmt_gain,
    fmt_iqm,
    gain,
    kept_rows,
    load_sweep,
    machine_at_iteration,
    machines_of,
    references,
)
from metarl.runtime import machine


def _timing(run_dirs: list[Path], main: str | None) -> dict[str, Any]:
    """Mean sampling and optimisation seconds per iteration, over the iterations trained on
    ``main``, the machine that trained most of them (runs that record no machines count whole)."""
    sampling, optimisation, iterations = [], [], 0
    for run in run_dirs:
        machine_at = machine_at_iteration(run)
        lines = (
            (run / "timing.jsonl").read_text().splitlines()
            if (run / "timing.jsonl").exists()
            else []
        )
        rows = [json.loads(line) for line in lines]
        iterations = max(iterations, max((r["iteration"] for r in rows), default=0))
        rows = [r for r in rows if main is None or machine_at(int(r["iteration"])) in (main, None)]
        sampling += [r["time/sampling_s"] for r in rows if "time/sampling_s" in r]
        optimisation += [r["time/optimization_s"] for r in rows if "time/optimization_s" in r]
    if not sampling or not optimisation:
        return {}
    s, o = float(np.mean(sampling)), float(np.mean(optimisation))
    return {
        "sampling_s": s,
        "optimization_s": o,
        "optimization_over_sampling": o / s,
        "iterations": iterations,
        **({"machine": main} if main else {}),
    }


def rows_of(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per grid cell of a finished sweep directory."""
    document = load_sweep(sweep_dir)
    rows = []
    for label, cell in document["cells"].items():
        runs = sorted(r for r in sweep_dir.glob(f"{label}-s*") if (r / "eval.json").exists())  # finished seeds
        config = json.loads((runs[0] / "eval.json").read_text()) if runs else {}
        machines = machines_of(runs)
        rows.append(
            {
                "sweep": document["title"],
                "cell": label,
                "num_seeds": cell["num_seeds"],
                "adaptation_steps": cell["adaptation_steps"],
                "return": cell.get("return"),
                "success": cell.get("success"),
                "baselines": cell.get("baselines", {}),
                "timing": _timing(runs, next(iter(machines), None)),
                "machines": machines,
                "num_tasks": config.get("summary", {}).get("num_tasks"),
                "repeats": config.get("summary", {}).get("repeats", 1),
                "command": document.get("sweep_command") or document["commands"][label],
                "gain": {metric: gain(runs, metric) for metric in ("return", "success")},
                "published": published_after(runs[0]) if runs else None,
            }
        )
    return rows


def published_after(run: Path) -> dict[str, Any] | None:
    """The published held-out return (or success) after one step for the run's benchmark and
    algorithm (the MAML-TRPO curve stands for MAML-PPO where only it is published), where it was
    reached (``iterations`` or ``env_steps``), from references.toml."""
    config = tomllib.loads((run / "config.toml").read_text())
    entry = reference_for(config, references())
    if "return_post" not in entry and "success_post" not in entry:
        return None
    out = {"iterations": entry.get("iterations"), "env_steps": entry.get("env_steps"),
           "source": entry.get("source"), "how": entry.get("how")}
    if "return_post" in entry:
        out |= {"return_post": entry["return_post"], "range": entry.get("return_post_range")}
    if "success_post" in entry:
        out |= {"success_post": entry["success_post"], "success_range": entry.get("success_post_range")}
    return out


# What the papers report for the rows of this table, with sources: experiments/references.toml.
PUBLISHED = tuple(references()["maml_rl_table"]["published"])


def _timing_section(timing: dict[str, Any], source: str) -> list[str]:
    """The paper-sized optimisation/sampling measurement of ``metarl bench trpo`` as table lines."""
    lines = [
        "",
        f"## Optimisation against sampling time, {timing['task']} "
        f"({timing['meta_batch_size']} tasks × {timing['episodes_per_task']} episodes), "
        f"meta-update on {timing.get('device', 'cpu')}",
        "",
        f"From `{source}` (written by `{timing.get('command', 'metarl bench trpo')}` on "
        f"{timing['machine']}); target: optimisation ≤ 0.10 × sampling.",
        "",
    ]
    lines += timing_table(timing["settings"])
    return lines + (floor_lines(timing["settings"], timing["reference"]) if "reference" in timing else [])


def _fmt_published(row: dict[str, Any], metric: str) -> str:
    """The published value after one step and how far the row's mean after one step is from it
    (from its range where the value was read off a plot)."""
    ref = row.get("published")
    if not ref or f"{metric}_post" not in ref or row[metric] is None:
        return "–"
    value = ref[f"{metric}_post"]
    ours = row[metric]["mean"][1] if "mean" in row[metric] else row[metric]["iqm"][1]
    low, high = ref.get("range" if metric == "return" else f"{metric}_range") or (value, value)
    off = 0.0 if low <= ours <= high else (ours - high if ours > high else ours - low)
    where = "within its range" if off == 0 else f"{off:+.3g} from its range [{low:.3g}, {high:.3g}]"
    at = ref.get("iterations") or (f"{ref['env_steps'] / 1e6:.3g}M steps" if ref.get("env_steps") else "?")
    return f"{value:.3g} ({at}); ours {where}"


def write_table(
    rows: list[dict[str, Any]],
    out: Path,
    command: str,
    trpo_timing: list[tuple[dict[str, Any], str]] | None = None,
    notes: list[str] | None = None,
) -> None:
    """``out.json`` and ``out.md``; ``trpo_timing`` holds (``metarl bench trpo`` result, its file),
    ``notes`` lines for a "Notes" section (what a reader must know about some rows)."""
    document = {
        "benchmark": "MAML-RL held-out adaptation",
        "machine": machine(),
        "command": command,
        "rows": rows,
        "trpo_timing": [t for t, _ in trpo_timing or []],
        "notes": list(notes or []),
    }
    out.with_suffix(".json").write_text(json.dumps(document, indent=1))
    lines = [
        "# MAML-RL: held-out adaptation",
        "",
        "Held-out tasks of each family; IQM over tasks × seeds with a 95% bootstrap interval in brackets. "
        "Baselines (stable-baselines3) train on each held-out task with the environment steps the "
        "meta-learner used there. Timing: mean seconds per training iteration over all seeds, on the "
        "machine that trained most iterations (the first in the machine column, which names every "
        "machine a row trained on). The "
        "iterations column counts the meta-iterations trained; the MAML paper trains up to 500, so a row "
        "far below that is an early point of the paper's setting, not its converged figure. A "
        "MAML-PPO row without baselines shares its held-out tasks, evaluation settings and step "
        "budget with the MAML-TRPO row of the same family, whose baseline columns hold for both.",
        "",
        f"Table written by `{command}` on {document['machine']}; each row names the machine it ran on.",
        "",
        "| sweep | seeds × tasks | iterations | metric | before adaptation | after 1 step | after last step | "
        "gain after 1 step, mean [95% CI] | published after 1 step (at iterations or steps); our mean against it | "
        "scratch baseline | multi-task fine-tuned | sampling s/it | optimisation s/it (ratio) | machine | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = row["timing"]
        timing = (
            f"{t['sampling_s']:.2f} | {t['optimization_s']:.2f} ({t['optimization_over_sampling']:.2f})"
            if t
            else "– | –"
        )
        for metric in ("return", "success"):
            if row[metric] is None:
                continue
            b = row["baselines"]
            scratch, multi = b.get(f"scratch/{metric}"), b.get(f"multitask/{metric}")
            base = [
                f"{x['iqm']:.3g} [{x['lo']:.3g}, {x['hi']:.3g}] ({x['algo']})" if x else "–"
                for x in (scratch, multi)
            ]
            last = len(row["adaptation_steps"]) - 1
            repeats = f" (each scored {row['repeats']} times)" if row.get("repeats", 1) > 1 else ""
            lines.append(
                f"| {row['sweep']} ({row['cell']}) | {row['num_seeds']} × {row['num_tasks']}{repeats} | "
                f"{t.get('iterations', '–')} | {metric} | {fmt_iqm(row[metric], 0)} | {fmt_iqm(row[metric], 1)} | "
                f"{fmt_iqm(row[metric], last)} (step {row['adaptation_steps'][last]}) | "
                f"{fmt_gain((row.get('gain') or {}).get(metric))} | {_fmt_published(row, metric)} | {base[0]} | {base[1]} | "
                f"{timing} | {row.get('machine', document['machine'])} | `{row['command']}` |"
            )
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Published reference points", ""] + [f"- {p}" for p in PUBLISHED]
    for timing_result, source in trpo_timing or []:
        lines += _timing_section(timing_result, source)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweeps", nargs="*", help="finished `metarl sweep` output directories")
    parser.add_argument("--out", default="experiments/results/maml_rl")
    parser.add_argument(
        "--timing",
        nargs="*",
        default=[],
        help="`metarl bench trpo --out X` results (X.json) to include, e.g. a CPU and a GPU one",
    )
    parser.add_argument(
        "--keep",
        help="an earlier table's JSON: its rows for sweeps not given here are "
        "kept as they are, each with the machine it ran on",
    )
    parser.add_argument(
        "--drop",
        nargs="*",
        default=[],
        metavar="SWEEP",
        help="with --keep: leave out the kept rows of these sweeps (e.g. rows whose settings were replaced)",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the table's Notes section (repeat for several)",
    )
    args = parser.parse_args(argv)
    if not args.sweeps and not args.keep:
        parser.error("give finished sweep directories, or --keep TABLE.json to rebuild from its rows")
    rows = [row for sweep_dir in args.sweeps for row in rows_of(Path(sweep_dir))]
    for row in rows:
        trained = row.pop("machines")
        row["machine"] = (
            "; ".join(f"{name} ({count} iterations)" for name, count in trained.items()) if len(trained) > 1
            else next(iter(trained), machine())
        )
    if args.keep:
        rows = [r for r in kept_rows(Path(args.keep), rows) if r["sweep"] not in args.drop] + rows
    timing = [(json.loads(Path(p).read_text()), p) for p in args.timing]
    given = sys.argv[1:] if argv is None else argv
    command = "python -m experiments.tables.maml_rl " + shlex.join(given)  # notes hold spaces and quotes
    write_table(rows, Path(args.out), command, timing, args.note)
    print(json.dumps({"rows": len(rows), "out": args.out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
