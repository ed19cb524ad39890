"""2D point navigation (MAML paper) with an optional constant wind.

Source: Finn, Abbeel, Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
Networks", ICML 2017 (arXiv 1703.03400), section 5.3 "2D navigation", as implemented in
pytorch-maml-rl (``maml_rl/envs/navigation.py``): the point starts at the origin, the action is
a velocity clipped to [-0.1, 0.1] per coordinate, goals are drawn from U[-0.5, 0.5]^2, the
horizon is 100 and the reward is the negative Euclidean distance to the goal after the step.
(The paper's text says "negative squared distance"; its code and every re-implementation use the
distance, which we follow.) The episode terminates when both coordinates are within 0.01 of the
goal, as in that code.

The wind variant adds a per-task constant drift ``wind`` to the position at every step, after
the clipped action: ``x' = x + clip(a, -0.1, 0.1) + wind``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import EpisodeClock, Task, TaskDistribution, check_whole, seeded_split

MAX_SPEED = 0.1
GOAL_LOW, GOAL_HIGH = -0.5, 0.5
GOAL_TOLERANCE = 0.01


class Navigation2DEnv(gym.Env):
    """A point robot in the plane moving towards a hidden goal.

    Observation: the position, shape ``[2]`` float32. Action: a velocity, shape ``[2]``,
    clipped to ``[-0.1, 0.1]``. Info: ``distance`` (to the goal after the step) and ``wind``.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, task: Task, horizon: int) -> None:
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-MAX_SPEED, MAX_SPEED, shape=(2,), dtype=np.float32)
        self.clock = EpisodeClock(horizon, task.family)
        self._state = np.zeros(2, dtype=np.float64)
        self.set_task(task)

    def set_task(self, task: Task) -> None:
        """Points the environment at ``task`` (takes effect immediately, the state is kept)."""
        self.task = task
        self._goal = np.asarray(task["goal"], dtype=np.float64)
        self._wind = np.asarray(task.get("wind", (0.0, 0.0)), dtype=np.float64)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._state = np.zeros(2, dtype=np.float64)
        self.clock.start()
        return self._state.astype(np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.clock.check()
        velocity = np.clip(np.asarray(action, dtype=np.float64), -MAX_SPEED, MAX_SPEED)
        self._state = self._state + velocity + self._wind
        offset = self._state - self._goal
        distance = float(np.sqrt(np.sum(offset**2)))
        terminated = bool(np.all(np.abs(offset) < GOAL_TOLERANCE))
        truncated = self.clock.tick(terminated)
        info = {"distance": distance, "wind": self._wind.copy()}
        return self._state.astype(np.float32), -distance, terminated, truncated, info


def expert_policy(task: Task) -> Callable[[np.ndarray], np.ndarray]:
    """The analytic expert of ``task``: the velocity that cancels the wind and heads for the goal.

    Returns:
        A function from positions ``[B, 2]`` (or one ``[2]``) to actions of the same shape,
        ``clip(goal − x − wind, −0.1, 0.1)``: the goal is reached exactly in
        ``ceil(max|goal − x| / 0.1)`` steps when the wind is within the speed limit, which ends
        the episode (termination within 0.01 of the goal).
    """
    goal = np.asarray(task["goal"], dtype=np.float64)
    wind = np.asarray(task.get("wind", (0.0, 0.0)), dtype=np.float64)

    def act(obs: np.ndarray) -> np.ndarray:
        position = np.asarray(obs, dtype=np.float64)
        if position.shape[-1] != 2:
            raise ValueError(f"expects positions [..., 2], got shape {position.shape}")
        return np.clip(goal - position - wind, -MAX_SPEED, MAX_SPEED).astype(np.float32)

    return act


class Navigation2D(TaskDistribution):
    """Goals U[-0.5, 0.5]^2 and, when ``wind_scale > 0``, wind U[-wind_scale, wind_scale]^2.

    Task fields: ``goal=(x, y)``; the wind variant adds ``wind=(wx, wy)``.

    Args:
        horizon: episode length (100 in the MAML paper).
        wind_scale: half-width of the uniform wind box; 0 gives the plain MAML family.
        num_train, num_test: sizes of the fixed, seeded, disjoint splits.
        split_seed: seed of the fixed splits.
    """

    def __init__(
        self,
        horizon: int = 100,
        wind_scale: float = 0.0,
        num_train: int = 100,
        num_test: int = 40,
        split_seed: int = 0,
    ) -> None:
        if wind_scale < 0:
            raise ValueError(f"wind_scale={wind_scale} must be >= 0 (0 disables the wind)")
        self.name = "navigation-2d-wind" if wind_scale > 0 else "navigation-2d"
        self.horizon = check_whole(self.name, "horizon", horizon)
        self.wind_scale = float(wind_scale)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-MAX_SPEED, MAX_SPEED, shape=(2,), dtype=np.float32)
        self._train, self._test = seeded_split(self.sample, num_train, num_test, split_seed)

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        goals = rng.uniform(GOAL_LOW, GOAL_HIGH, size=(n, 2))
        if self.wind_scale == 0:
            return [Task.make(self.name, goal=g) for g in goals]
        winds = rng.uniform(-self.wind_scale, self.wind_scale, size=(n, 2))
        return [Task.make(self.name, goal=g, wind=w) for g, w in zip(goals, winds, strict=True)]

    def train_tasks(self) -> list[Task]:
        return list(self._train)

    def parameter_box(self) -> dict[str, tuple[list[float], list[float]]]:
        """The nominal box of each task field, ``{field: (low, high)}`` (for task generators)."""
        box = {"goal": ([GOAL_LOW] * 2, [GOAL_HIGH] * 2)}
        if self.wind_scale > 0:
            box["wind"] = ([-self.wind_scale] * 2, [self.wind_scale] * 2)
        return box

    def make_task(self, **fields: Any) -> Task:
        """A task of this family from field values (goals and winds anywhere, e.g. off-box)."""
        if set(fields) != set(self.parameter_box()):
            raise ValueError(
                f"{self.name} tasks need fields {sorted(self.parameter_box())}, got {sorted(fields)}"
            )
        return Task.make(self.name, **{k: tuple(float(x) for x in v) for k, v in fields.items()})

    def test_tasks(self) -> list[Task]:
        return list(self._test)

    def make_env(self, task: Task) -> gym.Env:
        self._check_family(task)
        return Navigation2DEnv(task, self.horizon)

    def set_task(self, env: gym.Env, task: Task) -> None:
        self._check_family(task)
        core = env.unwrapped
        if not isinstance(core, Navigation2DEnv):
            raise TypeError(
                f"{self.name}.set_task needs an env from make_env, got {type(core).__name__}"
            )
        core.set_task(task)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "MAML (arXiv 1703.03400) 2D navigation; pytorch-maml-rl",
            "params": {
                "goal": "U[-0.5, 0.5]^2",
                "wind": f"U[-{self.wind_scale}, {self.wind_scale}]^2",
            },
            "num_train": len(self._train),
            "num_test": len(self._test),
        }

    def _check_family(self, task: Task) -> None:
        if task.family != self.name:
            raise ValueError(
                f"task family {task.family!r} given to {self.name!r}; sample tasks from this distribution"
            )


def navigation_2d_wind(
    horizon: int = 100,
    wind_scale: float = 0.05,
    num_train: int = 100,
    num_test: int = 40,
    split_seed: int = 0,
) -> Navigation2D:
    """The wind variant: each task also draws a constant drift U[-wind_scale, wind_scale]^2."""
    if wind_scale <= 0:
        raise ValueError(
            f"navigation-2d-wind needs wind_scale > 0, got {wind_scale}; use navigation-2d for none"
        )
    return Navigation2D(horizon, wind_scale, num_train, num_test, split_seed)
