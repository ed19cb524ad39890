"""Cheap discrete families for fast tests: Bernoulli bandits and random tabular MDPs.

Source: Duan et al., "RL^2: Fast Reinforcement Learning via Slow Reinforcement Learning"
(arXiv 1611.02779), section 4.1 and 4.2:

- ``bandit``: K arms, each a Bernoulli with mean p_k ~ U[0, 1]; reward 1 with probability
  p_a, else 0. The observation carries no information (a constant zero), so the task is found
  only through rewards.
- ``tabular-mdp``: S states, A actions, transition distributions P(.|s, a) from a flat
  Dirichlet(1, ..., 1), mean rewards R(s, a) ~ N(1, 1), observed reward ~ N(R(s, a), 1),
  every episode starts in state 0 and lasts 10 steps (RL^2 used S = 10, A = 5).
  The observation is the one-hot state.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import EpisodeClock, Task, TaskDistribution, check_whole, seeded_split


class BanditEnv(gym.Env):
    """K-armed Bernoulli bandit. Observation ``[1]`` zero, action ``Discrete(K)``."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, task: Task, horizon: int) -> None:
        self.clock = EpisodeClock(horizon, task.family)
        self.set_task(task)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(self._means))

    def set_task(self, task: Task) -> None:
        self.task = task
        self._means = np.asarray(task["arm_means"], dtype=np.float64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.clock.start()
        return np.zeros(1, dtype=np.float32), {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.clock.check()
        arm = int(action)
        if not 0 <= arm < len(self._means):
            raise ValueError(f"arm {action!r} out of range; expected 0..{len(self._means) - 1}")
        reward = float(self.np_random.random() < self._means[arm])
        truncated = self.clock.tick(False)
        return (
            np.zeros(1, dtype=np.float32),
            reward,
            False,
            truncated,
            {"arm_mean": float(self._means[arm])},
        )


class TabularMDPEnv(gym.Env):
    """Random MDP. Observation: one-hot state ``[S]`` float32; action ``Discrete(A)``."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, task: Task, horizon: int) -> None:
        self.clock = EpisodeClock(horizon, task.family)
        self.set_task(task)
        num_states, num_actions = self._rewards.shape
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(num_states,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_actions)
        self._state = 0

    def set_task(self, task: Task) -> None:
        self.task = task
        self._transitions = np.asarray(task["transitions"], dtype=np.float64)  # [S, A, S]
        self._rewards = np.asarray(task["reward_means"], dtype=np.float64)  # [S, A]
        # Cumulative rows let one uniform draw pick the next state.
        self._cumulative = np.cumsum(self._transitions, axis=-1)
        self._cumulative[..., -1] = 1.0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self._rewards.shape[0], dtype=np.float32)
        obs[self._state] = 1.0
        return obs

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.clock.start()
        self._state = 0
        return self._obs(), {"state": 0}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.clock.check()
        a = int(action)
        if not 0 <= a < self._rewards.shape[1]:
            raise ValueError(
                f"action {action!r} out of range; expected 0..{self._rewards.shape[1] - 1}"
            )
        mean = self._rewards[self._state, a]
        reward = float(self.np_random.normal(mean, 1.0))
        u = self.np_random.random()
        self._state = int(np.searchsorted(self._cumulative[self._state, a], u, side="right"))
        truncated = self.clock.tick(False)
        return (
            self._obs(),
            reward,
            False,
            truncated,
            {"state": self._state, "reward_mean": float(mean)},
        )


class _DiscreteFamily(TaskDistribution):
    """Shared plumbing of the two discrete families (splits, env building, checks)."""

    env_cls: type[gym.Env]

    def __init__(self, num_train: int, num_test: int, split_seed: int) -> None:
        self._train, self._test = seeded_split(self.sample, num_train, num_test, split_seed)

    def train_tasks(self) -> list[Task]:
        return list(self._train)

    def test_tasks(self) -> list[Task]:
        return list(self._test)

    def make_env(self, task: Task) -> gym.Env:
        self._check_family(task)
        return self.env_cls(task, self.horizon)

    def set_task(self, env: gym.Env, task: Task) -> None:
        self._check_family(task)
        core = env.unwrapped
        if not isinstance(core, self.env_cls):
            raise TypeError(
                f"{self.name}.set_task needs an env from make_env, got {type(core).__name__}"
            )
        core.set_task(task)

    def _check_family(self, task: Task) -> None:
        if task.family != self.name:
            raise ValueError(
                f"task family {task.family!r} given to {self.name!r}; sample tasks from this distribution"
            )


class Bandit(_DiscreteFamily):
    """K-armed Bernoulli bandits (RL^2, arXiv 1611.02779). Task field: ``arm_means`` (K floats).

    Args:
        num_arms: K.
        horizon: pulls per episode.
        num_train, num_test, split_seed: the fixed, seeded, disjoint splits.
    """

    name = "bandit"
    env_cls = BanditEnv

    def __init__(
        self,
        num_arms: int = 5,
        horizon: int = 100,
        num_train: int = 100,
        num_test: int = 40,
        split_seed: int = 0,
    ) -> None:
        if num_arms < 2:
            raise ValueError(f"num_arms={num_arms} must be >= 2")
        self.num_arms = num_arms
        self.horizon = check_whole(self.name, "horizon", horizon)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_arms)
        super().__init__(num_train, num_test, split_seed)

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [
            Task.make(self.name, arm_means=m)
            for m in rng.uniform(0.0, 1.0, size=(n, self.num_arms))
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "RL^2 (arXiv 1611.02779) section 4.1",
            "params": {"num_arms": self.num_arms, "arm_means": "U[0, 1] each"},
            "num_train": len(self._train),
            "num_test": len(self._test),
        }


class TabularMDP(_DiscreteFamily):
    """Random tabular MDPs (RL^2, arXiv 1611.02779).

    Task fields: ``transitions`` (``[S][A][S]`` probabilities), ``reward_means`` (``[S][A]``).

    Args:
        num_states: S (10 in RL^2).
        num_actions: A (5 in RL^2).
        horizon: episode length (10 in RL^2).
        num_train, num_test, split_seed: the fixed, seeded, disjoint splits.
    """

    name = "tabular-mdp"
    env_cls = TabularMDPEnv

    def __init__(
        self,
        num_states: int = 10,
        num_actions: int = 5,
        horizon: int = 10,
        num_train: int = 100,
        num_test: int = 40,
        split_seed: int = 0,
    ) -> None:
        if num_states < 2 or num_actions < 2:
            raise ValueError(
                f"num_states={num_states} and num_actions={num_actions} must both be >= 2"
            )
        self.num_states, self.num_actions = num_states, num_actions
        self.horizon = check_whole(self.name, "horizon", horizon)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(num_states,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(num_actions)
        super().__init__(num_train, num_test, split_seed)

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        s, a = self.num_states, self.num_actions
        transitions = rng.dirichlet(np.ones(s), size=(n, s, a))
        reward_means = rng.normal(1.0, 1.0, size=(n, s, a))
        return [
            Task.make(self.name, transitions=p, reward_means=r)
            for p, r in zip(transitions, reward_means, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "RL^2 (arXiv 1611.02779) section 4.2",
            "params": {
                "num_states": self.num_states,
                "num_actions": self.num_actions,
                "transitions": "Dirichlet(1, ..., 1) per (s, a)",
                "reward_means": "N(1, 1); reward ~ N(mean, 1)",
            },
            "num_train": len(self._train),
            "num_test": len(self._test),
        }
