"""Does a trained MAML agent adapt better when the cheetah starts as rllab's did?

    python -m experiments.probe_reset_noise experiments/rl_runs/maml-trpo-cheetah-dir/base-s0 [...]

The MAML paper's HalfCheetah (rllab's MujocoEnv) resets the joint positions with N(0, 0.01²) noise
about the nominal pose; gymnasium draws U(-0.1, 0.1), six times the spread. Each run's checkpoint
is evaluated with its own protocol on its held-out tasks, once with ``tasks.reset_noise`` as it
was trained and once with each other value, over ``--repeats`` evaluation seeds; the held-out
return after each adaptation step is printed per run and noise, with its spread over the
repeats. The run directories are only read. One JSON object is the last line printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from envs.mujoco_tasks import RESET_NOISE
from experiments.checkpoint_run import checkpoint_experiment
from metarl.config import load_toml
from metarl.registry import make_distribution


def evaluate(run_dir: Path, seeds: list[int]) -> dict[str, list[list[float]]]:
    """Per reset noise, the held-out mean return after each adaptation step, one row per
    evaluation seed; the checkpoint is loaded once."""
    document = load_toml(run_dir / "config.toml")
    tasks = {k: v for k, v in document["tasks"].items() if k != "name"}
    rows: dict[str, list[list[float]]] = {}
    with checkpoint_experiment(run_dir, document) as experiment:
        for noise in RESET_NOISE:
            family = make_distribution(experiment.task_name, **{**tasks, "reset_noise": noise})
            rows[noise] = [
                [float(x) for x in np.asarray(result["return"], dtype=float).mean(0)]
                for result in (experiment.agent.evaluate(experiment.held_out_tasks(),
                                                         np.random.default_rng(seed), family)
                               for seed in seeds)
            ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--repeats", type=int, default=5, help="evaluation seeds per run and noise")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error(f"--repeats must be at least 2 (the spread over evaluation seeds needs two), got {args.repeats}")
    seeds = list(range(1000, 1000 + args.repeats))
    out: dict[str, Any] = {"seeds": seeds, "runs": {}}
    for run_dir in args.run_dirs:
        trained = load_toml(run_dir / "config.toml")["tasks"].get("reset_noise", "gymnasium")
        out["runs"][str(run_dir)] = per_noise = {"trained_with": trained}
        for noise, table in evaluate(run_dir, seeds).items():
            rows = np.array(table)
            per_noise[noise] = {"mean": rows.mean(0).tolist(), "sd": rows.std(0, ddof=1).tolist()}
            cells = "  ".join(f"{m:7.1f} ± {s:5.1f}" for m, s in zip(rows.mean(0), rows.std(0, ddof=1), strict=True))
            print(f"{run_dir} (trained with {trained}) reset {noise:9s}: steps 0.. {cells}", flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
