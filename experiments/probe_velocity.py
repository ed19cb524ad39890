"""Does adaptation move a velocity-task policy towards the goal velocity? One run's checkpoint,
a few held-out goals spread over the range.

    python -m experiments.probe_velocity experiments/rl_runs/maml-trpo-cheetah-vel-full-curvature/base-s0 --goals 5

A return gain after an inner step can come from anywhere in the reward (here also the control
cost). For ``halfcheetah-vel`` the goal is a forward velocity, so a policy that adapts runs
faster after its steps on a fast goal and slower on a slow one. For each picked held-out goal
this prints the mean forward velocity (``qvel[0]``, observation index 8 of HalfCheetah-v5) and
the mean return before adaptation and after each inner step (as the agent's held-out evaluation
takes them: episodes of step ``k`` sampled with the parameters after ``k`` steps, step ``k + 1``
adapting on them), and the least-squares slope of velocity on goal at each step: 0 for a policy
that ignores the goal, 1 for one that runs at it. One JSON object is the last line printed.
``--position-baseline`` adapts with the baseline also given the distance run so far
(:class:`PositionBaseline`), the one input the paper's observation has and gymnasium's lacks.
Works on a copy of the run's config; the run directory is only read.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments.checkpoint_run import checkpoint_experiment
from metarl import meta_pg
from metarl.config import load_toml

VELOCITY_INDEX = {"halfcheetah-vel": 8}  # qvel[0] in the observation


class PositionBaseline:
    """The linear feature baseline given the distance run so far as two more features.

    The MAML paper's HalfCheetah observation (rllab's, also pytorch-maml-rl's and garage's) ends
    with the torso's centre of mass, whose x grows with the distance run; gymnasium's v5
    observation leaves the position out. Here the distance is rebuilt from the observed forward
    velocity (``dt`` times its running sum, ``dt = 0.05``) and appended, with its square through
    the features, to what the baseline regresses on; the policy's input is unchanged.
    """

    def __init__(self, inner: Any, index: int, dt: float = 0.05) -> None:
        self.inner, self.index, self.dt = inner, index, dt

    def fit_values(self, obs: Any, next_obs: Any, returns: Any, mask: Any) -> tuple[Any, Any]:
        import torch

        travelled = torch.cumsum(next_obs[..., self.index] * mask, dim=-1) * self.dt  # after each step
        before = travelled - next_obs[..., self.index] * mask * self.dt
        return self.inner.fit_values(torch.cat([obs, before.unsqueeze(-1)], -1),
                                     torch.cat([next_obs, travelled.unsqueeze(-1)], -1), returns, mask)


def probe(run_dir: Path, num_goals: int, episodes: int | None, seed: int,
          position_baseline: bool = False) -> dict[str, Any]:
    document = load_toml(run_dir / "config.toml")
    family = document["tasks"]["name"]
    if family not in VELOCITY_INDEX:
        raise SystemExit(f"error: {run_dir} trains on {family!r}; this probe knows {sorted(VELOCITY_INDEX)}")
    index = VELOCITY_INDEX[family]
    with checkpoint_experiment(run_dir, document) as experiment:
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
                    baseline = PositionBaseline(agent.baseline, index) if position_baseline else None
                    batch = agent._advantages(traj, baseline)
                    adapted = {k: v.detach() for k, v in
                               meta_pg.inner_step(inner, start, batch, adapted is None).items()}
    goals = np.array([t["velocity"] for t in picked])
    v, r = np.stack(velocity, 1), np.stack(returns, 1)  # [goals, steps]
    slopes = [float(np.polyfit(goals, v[:, k], 1)[0]) for k in range(v.shape[1])]
    return {"run": str(run_dir), "iteration": experiment.iteration, "goals": goals.tolist(),
            "velocity": v.tolist(), "return": r.tolist(), "slope": slopes,
            "episodes": episodes or cfg.eval_episodes_per_task, "position_baseline": position_baseline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--goals", type=int, default=5, help="held-out goals, spread from slowest to fastest")
    parser.add_argument("--episodes", type=int, default=None, help="per goal and step (default: the config's)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--position-baseline", action="store_true",
                        help="adapt with the baseline also given the distance run so far (see PositionBaseline)")
    args = parser.parse_args(argv)
    if args.goals < 2:
        parser.error("--goals must be at least 2 (a slope needs two goals)")
    result = probe(args.run_dir, args.goals, args.episodes, args.seed, args.position_baseline)
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
