"""Does adaptation move a velocity-task policy towards the goal velocity? One run's checkpoint,
a few held-out goals spread over the range.

    python -m experiments.probe_velocity experiments/rl_runs/maml-trpo-cheetah-vel/base-s0 --goals 5

A return gain after an inner step can come from anywhere in the reward (here also the control
cost). For ``halfcheetah-vel`` the goal is a forward velocity, so a policy that adapts runs
faster after its steps on a fast goal and slower on a slow one. For each picked held-out goal
this prints the mean forward velocity (``qvel[0]``, observation index 8 of HalfCheetah-v5) and
the mean return before adaptation and after each inner step (as the agent's held-out evaluation
takes them: episodes of step ``k`` sampled with the parameters after ``k`` steps, step ``k + 1``
adapting on them), and the least-squares slope of velocity on goal at each step: 0 for a policy
that ignores the goal, 1 for one that runs at it. One JSON object is the last line printed.
Works on a copy of the run's config; the run directory is only read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from metarl import meta_pg
from metarl.config import load_toml
from metarl.experiment import Experiment
from metarl.logger import load_checkpoint

VELOCITY_INDEX = {"halfcheetah-vel": 8}  # qvel[0] in the observation


def probe(run_dir: Path, num_goals: int, episodes: int | None, seed: int) -> dict[str, Any]:
    document = load_toml(run_dir / "config.toml")
    family = document["tasks"]["name"]
    if family not in VELOCITY_INDEX:
        raise SystemExit(f"error: {run_dir} trains on {family!r}; this probe knows {sorted(VELOCITY_INDEX)}")
    index = VELOCITY_INDEX[family]
    with tempfile.TemporaryDirectory() as scratch:
        experiment = Experiment(document, Path(scratch))
        try:
            experiment.load_state(load_checkpoint(run_dir / "checkpoint.pt"), run_dir / "checkpoint.pt")
            agent: Any = experiment.agent  # a meta-policy-gradient agent (metarl.meta_pg_agent)
            cfg = experiment.agent_cfg
            tasks = sorted(experiment.distribution.test_tasks(), key=lambda t: t["velocity"])
            picked = [tasks[i] for i in np.linspace(0, len(tasks) - 1, num_goals).round().astype(int)]
            inner = agent.inner._replace(first_order=True)
            params = {k: v.detach() for k, v in agent.params.items()}
            adapted = None
            velocity, returns = [], []
            with meta_pg.make_agent_sampler(cfg, experiment.distribution, seed) as sampler:
                for step in range(cfg.eval_adapt_steps + 1):
                    current = params if adapted is None else meta_pg.unstack(adapted)
                    traj = sampler.sample(agent.policy, current, picked, episodes or cfg.eval_episodes_per_task)
                    mask = traj.mask
                    velocity.append(((traj.obs[..., index] * mask).sum((1, 2)) / mask.sum((1, 2))).numpy())
                    returns.append(traj.episode_returns().mean(1).numpy())
                    if step < cfg.eval_adapt_steps:
                        start = params if adapted is None else adapted
                        adapted = {k: v.detach() for k, v in
                                   meta_pg.inner_step(inner, start, agent._advantages(traj), adapted is None).items()}
        finally:
            experiment.close()
    goals = np.array([t["velocity"] for t in picked])
    v, r = np.stack(velocity, 1), np.stack(returns, 1)  # [goals, steps]
    slopes = [float(np.polyfit(goals, v[:, k], 1)[0]) for k in range(v.shape[1])]
    return {"run": str(run_dir), "iteration": experiment.iteration, "goals": goals.tolist(),
            "velocity": v.tolist(), "return": r.tolist(), "slope": slopes,
            "episodes": episodes or cfg.eval_episodes_per_task}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--goals", type=int, default=5, help="held-out goals, spread from slowest to fastest")
    parser.add_argument("--episodes", type=int, default=None, help="per goal and step (default: the config's)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if args.goals < 2:
        parser.error("--goals must be at least 2 (a slope needs two goals)")
    result = probe(args.run_dir, args.goals, args.episodes, args.seed)
    steps = len(result["slope"])
    print(f"{result['run']} at iteration {result['iteration']}: mean forward velocity (return) per goal, "
          f"after 0..{steps - 1} inner steps")
    for g, v, r in zip(result["goals"], result["velocity"], result["return"], strict=True):
        print(f"  goal {g:4.2f}: " + "  ".join(f"{a:5.2f} ({b:7.1f})" for a, b in zip(v, r, strict=True)))
    print("  slope of velocity on goal: " + "  ".join(f"{s:+.2f}" for s in result["slope"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
