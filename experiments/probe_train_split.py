"""Does a trained agent score on its training tasks what training logged, and how far below are the
held-out tasks?

    python -m experiments.probe_train_split experiments/rl_runs/rl2-ml10/base-s0 [...] [--tasks 50]

Each run's checkpoint is scored with its agent's own evaluation protocol twice, with the same
evaluation seed (by default the run's ``eval.seed``): on its held-out tasks, as ``metarl eval``
scores them (from a final checkpoint the row is ``eval.json``'s, figure for figure), and on
``--tasks`` of its training tasks, drawn as training draws them (balanced over the task types on
ML10 / ML45). The
training tasks' score answers two questions a held-out figure alone cannot: whether the evaluation
path reproduces what the training metrics say (a gap there is a bug, not generalisation), and how
much of a low held-out figure is the meta-train / meta-test gap (the Meta-World paper reports
both). The mean return and success after each adaptation step (RL²: each episode of the trial) are
printed per run and split. The run directories are only read. One JSON object is the last line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments.checkpoint_run import checkpoint_experiment
from metarl.config import load_toml


def score(run_dir: Path, num_tasks: int, seed: int | None) -> dict[str, dict[str, Any]]:
    """``{"held_out" | "train": {"num_tasks", "seed", "steps", "return", "success"}}``: per-step
    means."""
    out: dict[str, dict[str, Any]] = {}
    with checkpoint_experiment(run_dir, load_toml(run_dir / "config.toml")) as experiment:
        seed = experiment.eval_cfg.seed if seed is None else seed
        held_out = experiment.held_out_tasks()
        n = num_tasks or len(held_out)
        train = experiment.distribution.sample(n, np.random.default_rng([seed, 1]))
        for split, tasks in (("held_out", held_out), ("train", train)):
            result = experiment.agent.evaluate(tasks, np.random.default_rng(seed))
            row: dict[str, Any] = {"num_tasks": len(tasks), "seed": seed, "steps": list(result["adaptation_steps"])}
            for key in ("return", "success"):
                values = result.get(key)
                row[key] = None if values is None else np.nanmean(np.asarray(values, float), 0).tolist()
            out[split] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--tasks", type=int, default=0,
                        help="training tasks to score (default: as many as the held-out tasks scored)")
    parser.add_argument("--seed", type=int, help="evaluation seed of both splits (default: the run's eval.seed)")
    args = parser.parse_args(argv)
    if args.seed is not None and args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.tasks < 0:
        parser.error(f"--tasks must be >= 0 (0: as many as the held-out tasks), got {args.tasks}")
    for run_dir in args.run_dirs:
        if not (run_dir / "checkpoint.pt").is_file():
            parser.error(f"{run_dir}: no checkpoint.pt there; give a run directory that has trained")
    out: dict[str, Any] = {"runs": {}}
    for run_dir in args.run_dirs:
        out["runs"][str(run_dir)] = splits = score(run_dir, args.tasks, args.seed)
        for split, row in splits.items():
            for key in ("return", "success"):
                if row[key] is not None:
                    cells = " ".join(f"{v:7.3g}" for v in row[key])
                    print(f"{run_dir} {split:8s} ({row['num_tasks']} tasks) {key:7s}: {cells}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
