"""Non-meta baselines with stable-baselines3, on the meta-learner's environment-step budget.

For each held-out task the meta-learner sees ``budget`` environment steps before it is scored
(``eval_adapt_steps × eval_episodes_per_task × horizon``). The baselines get the same budget:

* ``scratch``: a fresh PPO (or SAC) agent trained on the held-out task alone for ``budget`` steps.
* ``multitask``: one PPO policy trained on the training tasks (a new training task every episode,
  set explicitly with ``set_task``), scored on the held-out task as it is (``return_pre``), then
  fine-tuned on it for ``budget`` steps (``return``).

Scores are the mean undiscounted return (and success rate, where the env reports it) of
``episodes`` deterministic episodes per task after training, so they line up with the
meta-learner's post-adaptation figures.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import Task, TaskDistribution

MUJOCO_FAMILIES = ("halfcheetah", "ant", "hopper", "walker")


class TaskCycler(gym.Wrapper):
    """Switches to a new training task at every reset, explicitly through ``set_task``.

    The multi-task baseline trains on this; the meta-learner's envs never change task on reset.
    """

    def __init__(self, distribution: TaskDistribution, tasks: list[Task], seed: int):
        if not tasks:
            raise ValueError("TaskCycler needs at least one training task")
        super().__init__(distribution.make_env(tasks[0]))
        self.distribution, self.tasks = distribution, tasks
        self.rng = np.random.default_rng(seed)

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        task = self.tasks[int(self.rng.integers(len(self.tasks)))]
        self.distribution.set_task(self.env, task)
        return self.env.reset(**kwargs)


def default_algo(distribution: TaskDistribution, family: str) -> str:
    """SAC for continuous MuJoCo families (as the MAML-RL literature compares), PPO otherwise."""
    continuous = isinstance(distribution.action_space, gym.spaces.Box)
    return "sac" if continuous and family.startswith(MUJOCO_FAMILIES) else "ppo"


def _make(algo: str, env: gym.Env, seed: int, budget: int) -> Any:
    from stable_baselines3 import PPO, SAC

    if algo == "ppo":
        # Several updates even on small budgets: n_steps no larger than a quarter of the budget.
        n_steps = int(max(64, min(2048, budget // 4)))
        return PPO("MlpPolicy", env, n_steps=n_steps, batch_size=64, seed=seed, device="cpu")
    if algo == "sac":
        return SAC("MlpPolicy", env, learning_starts=min(1000, budget // 10), seed=seed, device="cpu")
    raise ValueError(f"unknown baseline algorithm {algo!r}; choose 'ppo' or 'sac'")


def score(model: Any, distribution: TaskDistribution, task: Task, episodes: int, seed: int) -> tuple[float, float]:
    """Mean return and success rate (NaN where unreported) of ``episodes`` deterministic episodes."""
    env = distribution.make_env(task)
    returns, successes = [], []
    for e in range(episodes):
        obs, _ = env.reset(seed=seed + e)
        total, success, done = 0.0, float("nan"), False
        while not done:
            action, _ = model.predict(obs, deterministic=True)
            obs, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            if "success" in info:
                success = max(0.0 if np.isnan(success) else success, float(info["success"]))
            done = terminated or truncated
        returns.append(total)
        successes.append(success)
    env.close()
    return float(np.mean(returns)), float(np.mean(successes)) if not np.isnan(successes).all() else float("nan")


def _clone(model: Any, env: gym.Env) -> Any:
    buffer = io.BytesIO()
    model.save(buffer)
    buffer.seek(0)
    return type(model).load(buffer, env=env, device="cpu")


def run_baselines(
    distribution: TaskDistribution,
    family: str,
    tasks: list[Task],
    budget: int,
    pretrain_steps: int,
    episodes: int = 5,
    seed: int = 0,
    algo: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Scores both baselines on each of ``tasks``.

    Args:
        distribution: the task family; training tasks come from its ``train_tasks()`` (or
            ``sample`` when it defines no split).
        family: the family's name (chooses SAC or PPO when ``algo`` is ``"auto"``).
        tasks: held-out tasks.
        budget: environment steps each baseline may take on each held-out task.
        pretrain_steps: environment steps of the multi-task policy on the training tasks.
        episodes: deterministic episodes per task for scoring.
        seed: seeds the agents and the scoring episodes.
        algo: ``"ppo"``, ``"sac"`` or ``"auto"`` (:func:`default_algo`) for the scratch baseline;
            the multi-task policy is always PPO.
        progress: called with a short line after each task.

    Returns:
        ``{"budget_steps", "pretrain_steps", "scratch": {"algo", "return": [N], "success": [N]},
        "multitask": {"algo", "return_pre": [N], "return": [N], "success_pre", "success"}}``.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1 environment step, got {budget}")
    algo = default_algo(distribution, family) if algo == "auto" else algo
    train = distribution.train_tasks() or distribution.sample(100, np.random.default_rng(seed))
    multitask = _make("ppo", TaskCycler(distribution, list(train), seed), seed, pretrain_steps)
    multitask.learn(total_timesteps=pretrain_steps)
    out: dict[str, Any] = {
        "budget_steps": budget,
        "pretrain_steps": pretrain_steps,
        "scratch": {"algo": algo, "return": [], "success": []},
        "multitask": {"algo": "ppo", "return_pre": [], "return": [], "success_pre": [], "success": []},
    }
    for i, task in enumerate(tasks):
        scratch = _make(algo, distribution.make_env(task), seed + i, budget)
        scratch.learn(total_timesteps=budget)
        ret, suc = score(scratch, distribution, task, episodes, seed)
        out["scratch"]["return"].append(ret)
        out["scratch"]["success"].append(suc)
        ret_pre, suc_pre = score(multitask, distribution, task, episodes, seed)
        tuned = _clone(multitask, distribution.make_env(task))
        tuned.learn(total_timesteps=budget, reset_num_timesteps=False)
        ret_post, suc_post = score(tuned, distribution, task, episodes, seed)
        mt = out["multitask"]
        mt["return_pre"].append(ret_pre)
        mt["return"].append(ret_post)
        mt["success_pre"].append(suc_pre)
        mt["success"].append(suc_post)
        if progress is not None:
            progress(f"baselines {i + 1}/{len(tasks)}: scratch {ret:.1f}, multitask {ret_pre:.1f} -> {ret_post:.1f}")
    return out
