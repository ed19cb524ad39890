"""Raw single-process environment step rate of every family, with random actions.

Usage::

    python -m experiments.bench.envs --out experiments/results/envs [--seconds 3] [--names ml1 bandit]

writes ``envs.md`` (a table, the command that made it and the machine) and ``envs.json`` beside it
(the same figures). The rate counts ``step()`` calls only: resets and task switches are excluded.
Families with several tasks cycle through their training tasks, one per episode (ML10 / ML45
visit their env classes in turn); building the benchmark is timed separately as ``build_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import envs
from metarl.runtime import cpu_model


def _spread(tasks: list[Any]) -> list[Any]:
    """Orders tasks so that consecutive episodes visit different Meta-World env classes."""
    by_name: dict[Any, list[Any]] = {}
    for task in tasks:
        by_name.setdefault(task.get("env_name"), []).append(task)
    groups = list(by_name.values())
    return [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]


def _measure_one(name: str, seconds: float, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    dist = envs.make(name)
    tasks = _spread(dist.train_tasks())
    env = dist.make_env(tasks[0])
    build_s = time.perf_counter() - start
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    num_steps, num_episodes, stepping = 0, 0, 0.0
    while stepping < seconds:
        action = env.action_space.sample()
        t0 = time.perf_counter()
        _, _, terminated, truncated, _ = env.step(action)
        stepping += time.perf_counter() - t0
        num_steps += 1
        if terminated or truncated:
            num_episodes += 1
            dist.set_task(env, tasks[num_episodes % len(tasks)])
            env.reset()
    return {
        "name": name,
        "steps_per_s": round(num_steps / stepping, 1),
        "obs_dim": int(np.prod(env.observation_space.shape or ())),
        "act_dim": int(getattr(env.action_space, "n", 0) or np.prod(env.action_space.shape or ())),
        "horizon": dist.horizon,
        "num_steps": num_steps,
        "build_s": round(build_s, 2),
    }


def measure_env_rates(
    names: list[str] | None = None, seconds: float = 3.0, seed: int = 0
) -> list[dict[str, Any]]:
    """Steps/s of one env per family, stepped with seeded random actions in this process.

    Args:
        names: families to measure (default: every registered one).
        seconds: time spent inside ``step()`` per family.
        seed: seed of the actions and of the first reset.

    Returns:
        One dict per family: ``name, steps_per_s, obs_dim, act_dim, horizon, num_steps, build_s``
        (``act_dim`` is the number of actions for discrete families).
    """
    return [_measure_one(name, seconds, seed) for name in (names or envs.names())]


def host_info() -> dict[str, Any]:
    """The CPU model, core count and software versions the figures were taken on."""
    import gymnasium

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "gymnasium": gymnasium.__version__,
    }


def _markdown(rows: list[dict[str, Any]], command: str, host: dict[str, Any]) -> str:
    lines = [
        "# Raw environment step rates",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {host['cpu']}, {host['cores']} cores; Python {host['python']}, gymnasium {host['gymnasium']}.",
        "Single process, random actions, time inside `step()` only; `build_s` is the time to make",
        "the distribution and the first env (ML10/ML45: building the benchmark).",
        "",
        "| family | steps/s | obs dim | act dim | horizon | steps timed | build s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['steps_per_s']:,.0f} | {r['obs_dim']} | {r['act_dim']} | {r['horizon']} "
            f"| {r['num_steps']} | {r['build_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench.envs", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", default="experiments/results/envs", help="output path without suffix"
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="seconds inside step() per family"
    )
    parser.add_argument(
        "--names", nargs="*", default=None, help=f"families (default all: {' '.join(envs.names())})"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    command = "python -m experiments.bench.envs " + shlex.join(sys.argv[1:] if argv is None else argv)
    rows = measure_env_rates(args.names, args.seconds, args.seed)
    host = host_info()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(_markdown(rows, command, host))
    out.with_suffix(".json").write_text(
        json.dumps({"command": command, "machine": host, "results": rows}, indent=2) + "\n"
    )
    print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
