"""Cross-check: a metarl MAML agent scored by Meta-World's own meta-learning evaluation.

:class:`MetaLearningAdapter` implements the ``MetaLearningAgent`` protocol of
``metaworld.evaluation`` (``init``, ``adapt_action``, ``step``, ``adapt``, ``eval_action``,
``reset``) on top of an agent with ``policy``, ``params`` and ``adapt(task, trajectories,
params)`` (MAML-TRPO, MAML-PPO). :func:`crosscheck` runs ``metaworld.evaluation.
metalearning_evaluation`` with it on a benchmark's test split.

Meta-World's ``evaluation`` (3.1.1) counts success per task name over all sub-environments of that
name (an agent that succeeds in 1 of 10 counts 1.0), so its figure can exceed ours; metarl's own evaluation
(``metarl eval``) counts success once per goal and episode. Use this to compare the two, not as
the headline number.

    python -m metarl.metaworld_eval RUN_DIR --num-evals 1
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch

from metarl.types import Trajectories


class MetaLearningAdapter:
    """One metarl agent behind Meta-World's ``MetaLearningAgent`` protocol for ``num_envs`` sub-envs.

    Args:
        agent: has ``policy``, ``params`` and ``adapt(task, trajectories, params) -> params``.
        num_envs: sub-environments of the vector env (one task each).
        seed: seeds the exploration noise of ``adapt_action``.
    """

    def __init__(self, agent: Any, num_envs: int, seed: int = 0) -> None:
        self.agent, self.num_envs = agent, num_envs
        self.generator = torch.Generator().manual_seed(seed)
        self.init()

    def init(self) -> None:
        """Back to the meta-learned parameters; forgets collected episodes."""
        self.params = [dict(self.agent.params) for _ in range(self.num_envs)]
        self.current: list[list[tuple]] = [[] for _ in range(self.num_envs)]
        self.episodes: list[list[list[tuple]]] = [[] for _ in range(self.num_envs)]

    def _forward(self, obs: np.ndarray, explore: bool) -> tuple[np.ndarray, np.ndarray]:
        actions, log_probs = [], []
        policy = self.agent.policy
        with torch.no_grad():
            for i in range(self.num_envs):
                o = torch.as_tensor(obs[i : i + 1], dtype=torch.float32)
                if explore:
                    noise = torch.randn((1, *policy.noise_shape), generator=self.generator)
                    a, lp = policy.act(self.params[i], o, noise)
                else:
                    a, lp = policy.distribution_params(self.params[i], o)[0], torch.zeros(1)
                actions.append(a[0].numpy())
                log_probs.append(float(lp[0]))
        return np.stack(actions).astype(np.float64), np.asarray(log_probs)

    def adapt_action(self, observations: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Exploration actions of each sub-env's current parameters, with their log-probabilities."""
        actions, log_probs = self._forward(observations, explore=True)
        return actions, {"log_probs": log_probs}

    def eval_action(self, observations: np.ndarray) -> np.ndarray:
        """The mean action of each sub-env's adapted policy."""
        return self._forward(observations, explore=False)[0]

    def reset(self, env_mask: np.ndarray) -> None:
        """No recurrent state to clear."""

    def step(self, timestep: Any) -> None:
        """Buffers one vector step (a ``metaworld.evaluation.Timestep``); closes ended episodes."""
        for i in range(self.num_envs):
            self.current[i].append((
                np.asarray(timestep.observation[i], dtype=np.float32),
                np.asarray(timestep.action[i], dtype=np.float32),
                float(timestep.reward[i]),
                float(timestep.aux_policy_outputs["log_probs"][i]),
            ))
            if timestep.terminated[i] or timestep.truncated[i]:
                self.episodes[i].append(self.current[i] + [bool(timestep.terminated[i])])  # type: ignore[list-item]
                self.current[i] = []

    def trajectories(self, i: int) -> Trajectories:
        """Sub-env ``i``'s finished episodes as ``[1, E, T, ...]`` trajectories (T: longest episode).

        ``next_obs`` is the next step's observation (the last step repeats its own, since the vector
        env has already reset); ``terminated`` marks the last step of a terminated episode.
        """
        episodes = self.episodes[i]
        if not episodes:
            raise ValueError(f"sub-env {i} finished no episode before adapt(); collect at least one")
        steps = [ep[:-1] for ep in episodes]
        num_eps, horizon = len(steps), max(len(s) for s in steps)
        obs_dim, act_dim = steps[0][0][0].shape[0], steps[0][0][1].shape[0]
        obs = torch.zeros(1, num_eps, horizon, obs_dim)
        actions = torch.zeros(1, num_eps, horizon, act_dim)
        rewards, log_probs, mask, terminated = (torch.zeros(1, num_eps, horizon) for _ in range(4))
        ended_by_termination = [bool(ep[-1]) for ep in episodes]
        for e, (ep, done_by_termination) in enumerate(zip(steps, ended_by_termination, strict=True)):
            n = len(ep)
            obs[0, e, :n] = torch.as_tensor(np.stack([s[0] for s in ep]))
            actions[0, e, :n] = torch.as_tensor(np.stack([s[1] for s in ep]))
            rewards[0, e, :n] = torch.as_tensor([s[2] for s in ep])
            log_probs[0, e, :n] = torch.as_tensor([s[3] for s in ep])
            mask[0, e, :n] = 1.0
            terminated[0, e, n - 1] = float(done_by_termination)
        next_obs = torch.cat([obs[:, :, 1:], obs[:, :, -1:]], dim=2)
        for e, ep in enumerate(steps):
            next_obs[0, e, len(ep) - 1] = obs[0, e, len(ep) - 1]
        success = torch.full((1, num_eps), float("nan"))
        return Trajectories(obs, actions, rewards, log_probs, mask, success, torch.zeros(1, 0), next_obs, terminated)

    def adapt(self) -> None:
        """One inner step per sub-env on the episodes it collected since the last adapt()."""
        for i in range(self.num_envs):
            self.params[i] = self.agent.adapt(None, self.trajectories(i), self.params[i])
            self.episodes[i], self.current[i] = [], []


def crosscheck(
    agent: Any,
    benchmark: str,
    seed: int = 0,
    meta_batch_size: int = 10,
    num_evals: int = 1,
    adaptation_steps: int = 1,
    adaptation_episodes: int = 10,
    evaluation_episodes: int = 3,
) -> dict[str, Any]:
    """``metaworld.evaluation.metalearning_evaluation`` of ``agent`` on ``benchmark``'s test split.

    Args:
        benchmark: a v3 env name for ML1 (``"reach-v3"``), or ``"ML10"`` / ``"ML45"``.

    Returns:
        ``{"success_rate", "mean_return", "success_per_task", "protocol"}`` as Meta-World computes them.
    """
    import metaworld
    from metaworld.evaluation import metalearning_evaluation

    envs = metaworld.make_ml_envs_test(benchmark, seed=seed, meta_batch_size=meta_batch_size)
    try:
        adapter = MetaLearningAdapter(agent, envs.num_envs, seed)
        success, mean_return, per_task = metalearning_evaluation(
            adapter, envs,  # type: ignore[arg-type]
            num_evals=num_evals, adaptation_steps=adaptation_steps,
            adaptation_episodes=adaptation_episodes, evaluation_episodes=evaluation_episodes,
        )
    finally:
        envs.close()
    return {
        "success_rate": float(success),
        "mean_return": float(mean_return),
        "success_per_task": {k: float(v) for k, v in per_task.items()},
        "protocol": (f"metaworld.evaluation.metalearning_evaluation(num_evals={num_evals}, adaptation_steps="
                     f"{adaptation_steps}, adaptation_episodes={adaptation_episodes}, evaluation_episodes="
                     f"{evaluation_episodes}), meta_batch_size={meta_batch_size}: success as Meta-World counts it"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Meta-World's own meta-test evaluation of a metarl run")
    parser.add_argument("run_dir")
    parser.add_argument("--meta-batch-size", type=int, default=10)
    parser.add_argument("--num-evals", type=int, default=1)
    parser.add_argument("--adaptation-episodes", type=int, default=10)
    parser.add_argument("--evaluation-episodes", type=int, default=3)
    args = parser.parse_args(argv)
    from metarl.experiment import Experiment

    experiment = Experiment.resume(args.run_dir)
    try:
        dist = experiment.distribution
        benchmark = getattr(dist, "env_name", None) if experiment.task_name == "ml1" else experiment.task_name.upper()
        if experiment.task_name not in ("ml1", "ml10", "ml45") or not benchmark:
            raise SystemExit(f"{args.run_dir} trains on {experiment.task_name!r}, not a Meta-World ML benchmark")
        result = crosscheck(experiment.agent, benchmark, experiment.eval_cfg.seed, args.meta_batch_size,
                            args.num_evals, 1, args.adaptation_episodes, args.evaluation_episodes)
    finally:
        experiment.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
