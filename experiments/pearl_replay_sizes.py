"""Adds the replay sizes to a PEARL run's ``checkpoint.portable.pt`` written before portable
checkpoints recorded them (commit 62d1b8b), so that a resume from it refills each task's replay
to the size it had instead of collecting only the initial episodes.

The sizes are reconstructed, not guessed: the runner draws each iteration's meta-batch from one
generator seeded with the run's seed (restored from every checkpoint), so drawing again gives the
tasks each iteration collected on, in order. That takes episodes that always run to the horizon
(Meta-World's do); the script checks this against ``metrics.jsonl`` (the initial episodes' and
every iteration's ``train/env_steps``) and refuses a run it cannot reconstruct exactly.

    python -m experiments.pearl_replay_sizes experiments/rl_runs/pearl-ml1-reach/base-s0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from envs.base import Task, TaskDistribution
from metarl.config import build, load_toml
from metarl.experiment import PORTABLE_CHECKPOINT
from metarl.logger import load_checkpoint, save_checkpoint
from metarl.registry import make_distribution, resolve_agent


def _load(run_dir: Path) -> tuple[Any, int, TaskDistribution]:
    """The run's agent config, seed and task distribution, from its ``config.toml``."""
    document = load_toml(run_dir / "config.toml")
    cfg = build(resolve_agent(document["run"]["agent"]).Config, dict(document["agent"]), "agent")
    tasks = dict(document["tasks"])
    return cfg, int(document["run"]["seed"]), make_distribution(tasks.pop("name"), **tasks)


def _reconstruct(cfg: Any, seed: int, distribution: TaskDistribution, iterations: int) -> list[tuple[Task, int]]:
    rng = np.random.default_rng([seed, 0])  # the runner's meta-batch generator
    replay: OrderedDict[Task, int] = OrderedDict()

    def store(task: Task, episodes: int) -> None:
        replay[task] = replay.get(task, 0) + episodes * distribution.horizon
        replay.move_to_end(task)
        while len(replay) > cfg.max_replay_tasks:
            replay.popitem(last=False)

    for iteration in range(1, iterations + 1):
        batch = distribution.sample(cfg.meta_batch_size, rng)
        if iteration == 1 and cfg.num_initial_episodes:
            for task in distribution.train_tasks():
                store(task, cfg.num_initial_episodes)
        collect = list(batch)[: cfg.num_collect_tasks or len(batch)]
        for episodes in (cfg.num_prior_episodes, cfg.num_posterior_episodes):
            if episodes:
                for task in collect:
                    store(task, episodes)
    return list(replay.items())


def replay_sizes(run_dir: Path, iterations: int) -> list[tuple[Task, int]]:
    """``(task, transitions)`` in the replay's order after ``iterations`` steps of the run."""
    cfg, seed, distribution = _load(run_dir)
    return _reconstruct(cfg, seed, distribution, iterations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    path = args.run_dir / PORTABLE_CHECKPOINT
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    state = load_checkpoint(path)
    if "replay_sizes" in state["agent"]:
        print(f"error: {path} already records its replay sizes; nothing to do", file=sys.stderr)
        return 2
    iterations = int(state["iteration"])
    lines = [json.loads(x) for x in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {x["iteration"]: x for x in lines if x["iteration"] <= iterations}
    if sorted(logged) != list(range(1, iterations + 1)):
        print(f"error: metrics.jsonl lacks iterations up to {iterations}", file=sys.stderr)
        return 2
    cfg, seed, distribution = _load(args.run_dir)
    horizon = distribution.horizon
    per_iteration = cfg.num_collect_tasks * (cfg.num_prior_episodes + cfg.num_posterior_episodes) * horizon
    initial = cfg.num_initial_episodes * horizon * len(distribution.train_tasks())
    collected = {x["train/env_steps"] - x["train/initial_env_steps"] - x.get("train/recollected_env_steps", 0.0)
                 for x in logged.values()}
    if collected != {per_iteration} or logged[1]["train/initial_env_steps"] != initial:
        print(f"error: {args.run_dir}'s episodes did not all run to the horizon ({horizon} steps): "
              "its replay sizes cannot be reconstructed", file=sys.stderr)
        return 2
    sizes = _reconstruct(cfg, seed, distribution, iterations)
    state["agent"]["replay_sizes"] = sizes
    save_checkpoint(path, state, keep_previous=False)
    print(f"{path}: {len(sizes)} tasks, {sum(n for _, n in sizes)} transitions at iteration {iterations} "
          f"({min(n for _, n in sizes)} to {max(n for _, n in sizes)} per task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
