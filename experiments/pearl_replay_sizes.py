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

import numpy as np

from metarl.config import build, load_toml
from metarl.experiment import PORTABLE_CHECKPOINT
from metarl.logger import load_checkpoint, save_checkpoint
from metarl.registry import make_distribution, resolve_agent


def _settings(run_dir: Path) -> tuple[dict, object, int]:
    """The run's config document, its agent's config and its seed."""
    document = load_toml(run_dir / "config.toml")
    agent_cls = resolve_agent(document["run"]["agent"])
    return document, build(agent_cls.Config, dict(document["agent"]), "agent"), int(document["run"]["seed"])


def replay_sizes(run_dir: Path, iterations: int) -> list[tuple[object, int]]:
    """``(task, transitions)`` in the replay's order after ``iterations`` steps of the run."""
    document, cfg, seed = _settings(run_dir)
    tasks_cfg = dict(document["tasks"])
    distribution = make_distribution(tasks_cfg.pop("name"), **tasks_cfg)
    horizon = int(tasks_cfg["horizon"])
    rng = np.random.default_rng([seed, 0])  # the runner's meta-batch generator
    replay: OrderedDict[object, int] = OrderedDict()

    def store(task: object, rows: int) -> None:
        replay[task] = replay.get(task, 0) + rows
        replay.move_to_end(task)
        while len(replay) > cfg.max_replay_tasks:
            replay.popitem(last=False)

    for iteration in range(1, iterations + 1):
        batch = distribution.sample(cfg.meta_batch_size, rng)
        if iteration == 1 and cfg.num_initial_episodes:
            for task in distribution.train_tasks():
                store(task, cfg.num_initial_episodes * horizon)
        collect = list(batch)[: cfg.num_collect_tasks or len(batch)]
        for episodes in (cfg.num_prior_episodes, cfg.num_posterior_episodes):
            if episodes:
                for task in collect:
                    store(task, episodes * horizon)
    return list(replay.items())


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
    sizes = replay_sizes(args.run_dir, iterations)
    document, cfg, _ = _settings(args.run_dir)
    horizon = int(document["tasks"]["horizon"])
    per_iteration = cfg.num_collect_tasks * (cfg.num_prior_episodes + cfg.num_posterior_episodes) * horizon
    collected = {x["train/env_steps"] - x["train/initial_env_steps"] for x in logged.values()}
    tasks_cfg = dict(document["tasks"])
    train_tasks = make_distribution(tasks_cfg.pop("name"), **tasks_cfg).train_tasks()
    initial = cfg.num_initial_episodes * horizon * len(train_tasks)
    if collected != {per_iteration} or logged[1]["train/initial_env_steps"] != initial:
        print(f"error: {args.run_dir}'s episodes did not all run to the horizon ({horizon} steps): "
              "its replay sizes cannot be reconstructed", file=sys.stderr)
        return 2
    state["agent"]["replay_sizes"] = sizes
    save_checkpoint(path, state, keep_previous=False)
    print(f"{path}: {len(sizes)} tasks, {sum(n for _, n in sizes)} transitions at iteration {iterations} "
          f"({min(n for _, n in sizes)} to {max(n for _, n in sizes)} per task)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
