"""Expert demonstrations as :class:`~metarl.types.Trajectories`, for imitation and its baselines.

Experts are the analytic one of 2D navigation (:func:`envs.navigation.expert_policy`) and
Meta-World's scripted policies (:func:`envs.metaworld.expert_policy`, which reads the true goal
itself while the recorded observations keep it hidden). Demonstrations are recorded in the main
process, one environment per task re-pointed with ``set_task``: a few episodes per task cost far
less than the learner's own rollouts.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl.types import Trajectories

Expert = Callable[[np.ndarray], np.ndarray]


def expert_for(task: Task) -> Expert:
    """The scripted or analytic expert of ``task``; raises ``ValueError`` for a family without one."""
    if "env_name" in task.keys():
        from envs.metaworld import expert_policy as metaworld_expert

        return metaworld_expert(task)
    if task.family.startswith("navigation-2d"):
        from envs.navigation import expert_policy as navigation_expert

        return navigation_expert(task)
    raise ValueError(
        f"no expert for task family {task.family!r}; demonstrations exist for navigation-2d "
        "(analytic) and Meta-World families (scripted policies)"
    )


def record(
    distribution: TaskDistribution,
    tasks: list[Task],
    num_episodes: int,
    horizon: int,
    seed: int,
    expert: Callable[[Task], Expert] = expert_for,
) -> Trajectories:
    """``num_episodes`` expert episodes of every task, shaped like the sampler's output.

    Args:
        distribution: builds the environment and re-points it.
        tasks: the ``N`` tasks.
        num_episodes: ``K`` episodes per task.
        horizon: ``T``; an episode stops earlier where the environment ends it.
        seed: seeds the environment resets (episode ``k`` of task ``i``: ``seed + 1000 i + k``).
        expert: maps a task to its expert.

    Returns:
        :class:`Trajectories` ``[N, K, T, ...]`` with ``log_probs`` 0 (the experts are
        deterministic) and ``success`` NaN where the environment reports none.
    """
    if num_episodes < 1 or horizon < 1:
        raise ValueError(f"need num_episodes >= 1 and horizon >= 1, got {num_episodes}, {horizon}")
    env = distribution.make_env(tasks[0])
    obs_dim = int(np.prod(env.observation_space.shape or ()))
    act_dim = int(np.prod(env.action_space.shape or ()))
    shape = (len(tasks), num_episodes, horizon)
    obs = np.zeros((*shape, obs_dim), np.float32)
    next_obs = np.zeros((*shape, obs_dim), np.float32)
    actions = np.zeros((*shape, act_dim), np.float32)
    rewards, mask, terminated = (np.zeros(shape, np.float32) for _ in range(3))
    success = np.full(shape[:2], np.nan, np.float32)
    try:
        for i, task in enumerate(tasks):
            distribution.set_task(env, task)
            act = expert(task)
            for k in range(num_episodes):
                o, _ = env.reset(seed=seed + 1000 * i + k)
                for t in range(horizon):
                    a = np.asarray(act(o), np.float32).reshape(act_dim)
                    o2, r, term, trunc, info = env.step(a)
                    obs[i, k, t], actions[i, k, t], next_obs[i, k, t] = o, a, o2
                    rewards[i, k, t], mask[i, k, t], terminated[i, k, t] = r, 1.0, float(term)
                    if "success" in info:
                        success[i, k] = max(np.nan_to_num(success[i, k]), float(info["success"]))
                    o = o2
                    if term or trunc:
                        break
    finally:
        env.close()
    task_vectors = np.stack([t.vector() for t in tasks]).astype(np.float32)
    return Trajectories(
        obs=torch.from_numpy(obs),
        actions=torch.from_numpy(actions),
        rewards=torch.from_numpy(rewards),
        log_probs=torch.zeros(shape),
        mask=torch.from_numpy(mask),
        success=torch.from_numpy(success),
        task=torch.from_numpy(task_vectors),
        next_obs=torch.from_numpy(next_obs),
        terminated=torch.from_numpy(terminated),
    )
