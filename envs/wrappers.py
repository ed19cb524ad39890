# Over 400 lines: the robustness wrappers (observation and action noise, external forces, dynamics shifts, non-stationary tasks) form one family of small classes that share their validation helpers; split apart they would import each other.
"""Robustness wrappers, composable with every family: non-stationary tasks, noise, pushes, dynamics.

Each wrapper is a ``gymnasium.Wrapper``. All of its randomness comes from its own generator,
reseeded by ``reset(seed=s)`` from ``(s, salt)`` where the salt differs per wrapper class, so
wrappers stacked on one env draw independent streams. Each records what it did in ``info``
under ``wrapper/...`` keys, at reset and at every step.

``ExternalForce`` and ``DynamicsShift`` need a MuJoCo family (an env exposing ``mujoco_model`` and
``mujoco_data``); they raise ``TypeError`` on others.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import Task, TaskDistribution

MODES = ("episodes", "steps", "drift")


def _interpolate_value(a: Any, b: Any, weight: float, key: str) -> Any:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(_interpolate_value(x, y, weight, key) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return (1.0 - weight) * a + weight * b
    if a == b:
        return a
    raise ValueError(
        f"task parameter {key!r} ({a!r} -> {b!r}) cannot drift continuously: only floats interpolate; "
        "use mode='episodes' or mode='steps' for this family"
    )


def interpolate_tasks(a: Task, b: Task, weight: float) -> Task:
    """The task ``(1 - weight) * a + weight * b``, parameter by parameter (floats only)."""
    if a.family != b.family or a.keys() != b.keys():
        raise ValueError(f"cannot interpolate {a.family} {a.keys()} with {b.family} {b.keys()}")
    return Task.make(a.family, **{k: _interpolate_value(a[k], b[k], weight, k) for k in a.keys()})


def _generator(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, salt])


def _mujoco(env: gym.Env, wrapper: str) -> tuple[Any, Any]:
    core = env.unwrapped
    if not hasattr(core, "mujoco_model"):
        raise TypeError(
            f"{wrapper} needs a MuJoCo family (an env with mujoco_model/mujoco_data), got {type(core).__name__}"
        )
    return core.mujoco_model, core.mujoco_data


class NonStationary(gym.Wrapper):
    """Changes the task during training: every ``period`` episodes or steps, or continuously.

    Modes: ``"episodes"`` sets a new sampled task at every ``period``-th reset; ``"steps"`` sets
    one after every ``period`` steps (counted across episodes since the last seeded reset);
    ``"drift"`` moves the task linearly towards a new sample over ``period`` steps, then towards
    the next one (families with float parameters only). Tasks come from ``distribution.sample``
    with this wrapper's generator and are applied with ``distribution.set_task``. A seeded reset
    also restores the task the env had when wrapped, so a seed fixes the whole task sequence.

    Info: ``wrapper/task_switched`` (1.0 when the task changed at this reset or step) and
    ``wrapper/task_vector`` (the current task's numbers).
    """

    _SALT = 101

    def __init__(
        self, env: gym.Env, distribution: TaskDistribution, mode: str = "episodes", period: int = 1
    ) -> None:
        super().__init__(env)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {MODES}")
        if period < 1:
            raise ValueError(f"period={period} must be >= 1")
        if mode != "episodes" and getattr(env.unwrapped, "task_switch_needs_reset", False):
            raise ValueError(
                f"{type(env.unwrapped).__name__} applies a new task only on reset; use mode='episodes'"
            )
        self.distribution, self.mode, self.period = distribution, mode, period
        self._initial_task: Task = env.unwrapped.task
        self._rng = np.random.default_rng()
        self._count = 0
        self._drift_from = self._drift_to = self._initial_task

    @property
    def task(self) -> Task:
        return self.env.unwrapped.task

    def _switch(self, task: Task) -> None:
        self.distribution.set_task(self.env, task)

    def _info(self, info: dict[str, Any], switched: bool) -> dict[str, Any]:
        info["wrapper/task_switched"] = float(switched)
        info["wrapper/task_vector"] = self.task.vector()
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        switched = False
        if seed is not None:
            self._rng = _generator(seed, self._SALT)
            self._count = 0
            switched = self.task != self._initial_task
            self._switch(self._initial_task)
            self._drift_from = self._drift_to = self._initial_task
        elif self.mode == "episodes":
            self._count += 1
            if self._count % self.period == 0:
                self._switch(self.distribution.sample(1, self._rng)[0])
                switched = True
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, self._info(info, switched)

    def _before_step(self) -> bool:
        if self.mode == "steps":
            if self._count > 0 and self._count % self.period == 0:
                self._switch(self.distribution.sample(1, self._rng)[0])
                return True
            return False
        phase = self._count % self.period
        if phase == 0:
            self._drift_from, self._drift_to = self.task, self.distribution.sample(1, self._rng)[0]
        self._switch(interpolate_tasks(self._drift_from, self._drift_to, (phase + 1) / self.period))
        return True

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        switched = False
        if self.mode != "episodes":
            switched = self._before_step()
            self._count += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._info(info, switched)


class ObservationNoise(gym.Wrapper):
    """Adds N(0, std^2) to every observation element, then clips to the observation box.

    Info: ``wrapper/obs_noise_std``.
    """

    _SALT = 202

    def __init__(self, env: gym.Env, std: float = 0.01) -> None:
        super().__init__(env)
        if not isinstance(env.observation_space, gym.spaces.Box) or std < 0:
            raise ValueError(
                f"ObservationNoise needs a Box observation space and std >= 0, got {env.observation_space}, std={std}"
            )
        self.std = float(std)
        self._rng = np.random.default_rng()

    def _noisy(self, obs: np.ndarray) -> np.ndarray:
        space = self.observation_space
        noisy = obs + self._rng.normal(0.0, self.std, size=np.shape(obs))
        return np.clip(noisy, space.low, space.high).astype(space.dtype)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = _generator(seed, self._SALT)
        obs, info = self.env.reset(seed=seed, options=options)
        info["wrapper/obs_noise_std"] = self.std
        return self._noisy(obs), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["wrapper/obs_noise_std"] = self.std
        return self._noisy(obs), reward, terminated, truncated, info


class ActionNoise(gym.Wrapper):
    """Perturbs actions before the env sees them.

    Box actions get N(0, std^2) added and are clipped to the box; discrete actions are replaced by
    a uniform random action with probability ``random_action_prob``.
    Info: ``wrapper/action_noise_std``, ``wrapper/action_perturbed`` (1.0 if the action changed).
    """

    _SALT = 303

    def __init__(self, env: gym.Env, std: float = 0.05, random_action_prob: float = 0.1) -> None:
        super().__init__(env)
        if std < 0 or not 0.0 <= random_action_prob <= 1.0:
            raise ValueError(
                f"need std >= 0 and random_action_prob in [0, 1], got {std}, {random_action_prob}"
            )
        if not isinstance(env.action_space, (gym.spaces.Box, gym.spaces.Discrete)):
            raise TypeError(
                f"ActionNoise supports Box and Discrete actions, got {env.action_space}"
            )
        self.std, self.random_action_prob = float(std), float(random_action_prob)
        self._rng = np.random.default_rng()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = _generator(seed, self._SALT)
        return self.env.reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        space = self.action_space
        if isinstance(space, gym.spaces.Box):
            noisy = np.asarray(action, dtype=np.float64) + self._rng.normal(
                0.0, self.std, size=space.shape
            )
            new_action: Any = np.clip(noisy, space.low, space.high).astype(space.dtype)
            perturbed = self.std > 0
        else:
            perturbed = bool(self._rng.random() < self.random_action_prob)
            new_action = int(self._rng.integers(space.n)) if perturbed else action
        obs, reward, terminated, truncated, info = self.env.step(new_action)
        info["wrapper/action_noise_std"] = self.std
        info["wrapper/action_perturbed"] = float(perturbed)
        return obs, reward, terminated, truncated, info


class ExternalForce(gym.Wrapper):
    """Random pushes through MuJoCo's ``data.xfrc_applied`` (a force on one body's centre of mass).

    At each step without a push, a push starts with probability ``prob``: a uniformly random
    direction with magnitude ``force_scale`` times the model's total weight, held for
    ``duration`` steps. ``body`` names the pushed body (default: body 1, the root body of the
    locomotion models). Info: ``wrapper/force`` (the force vector ``[3]``, zeros when none).
    """

    _SALT = 404

    def __init__(
        self,
        env: gym.Env,
        force_scale: float = 0.5,
        prob: float = 0.05,
        duration: int = 5,
        body: str | None = None,
    ) -> None:
        super().__init__(env)
        if force_scale < 0 or not 0.0 <= prob <= 1.0 or duration < 1:
            raise ValueError(
                f"need force_scale >= 0, prob in [0, 1], duration >= 1; got {force_scale}, {prob}, {duration}"
            )
        model, _ = _mujoco(env, "ExternalForce")
        self.body_id = 1 if body is None else model.body(body).id
        self.force_scale, self.prob, self.duration = float(force_scale), float(prob), int(duration)
        self._rng = np.random.default_rng()
        self._steps_left = 0
        self._force = np.zeros(3)

    def _apply(self, force: np.ndarray) -> None:
        _, data = _mujoco(self.env, "ExternalForce")
        data.xfrc_applied[self.body_id, :3] = force
        self._force = force

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = _generator(seed, self._SALT)
        obs, info = self.env.reset(seed=seed, options=options)
        self._steps_left = 0
        self._apply(np.zeros(3))
        info["wrapper/force"] = self._force.copy()
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self._steps_left == 0 and self._rng.random() < self.prob:
            model, _ = _mujoco(self.env, "ExternalForce")
            weight = float(np.sum(model.body_mass)) * float(np.linalg.norm(model.opt.gravity))
            direction = self._rng.normal(size=3)
            self._apply(self.force_scale * weight * direction / np.linalg.norm(direction))
            self._steps_left = self.duration
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["wrapper/force"] = self._force.copy()
        if self._steps_left > 0:
            self._steps_left -= 1
            if self._steps_left == 0:
                self._apply(np.zeros(3))
        return obs, reward, terminated, truncated, info


class DynamicsShift(gym.Wrapper):
    """Scales all body masses and all geom frictions by factors drawn per episode.

    At each reset, ``mass_scale ~ U[mass_range]`` and ``friction_scale ~ U[friction_range]``
    multiply the values the model had before this wrapper's last change (if a ``set_task`` has
    rewritten them since, the new values are the base), so shifts never compound.
    Info: ``wrapper/mass_scale``, ``wrapper/friction_scale``.
    """

    _SALT = 505

    def __init__(
        self,
        env: gym.Env,
        mass_range: tuple[float, float] = (0.7, 1.3),
        friction_range: tuple[float, float] = (0.7, 1.3),
    ) -> None:
        super().__init__(env)
        for name, (low, high) in (("mass_range", mass_range), ("friction_range", friction_range)):
            if not 0 < low <= high:
                raise ValueError(f"{name}={(low, high)} must satisfy 0 < low <= high")
        _mujoco(env, "DynamicsShift")
        self.mass_range, self.friction_range = mass_range, friction_range
        self._rng = np.random.default_rng()
        self._base: dict[str, np.ndarray] = {}
        self._written: dict[str, np.ndarray] = {}
        self.scales = {"mass": 1.0, "friction": 1.0}

    def _shift(self) -> None:
        model, _ = _mujoco(self.env, "DynamicsShift")
        self.scales = {
            "mass": float(self._rng.uniform(*self.mass_range)),
            "friction": float(self._rng.uniform(*self.friction_range)),
        }
        for field, key in (("body_mass", "mass"), ("geom_friction", "friction")):
            current = getattr(model, field)
            untouched = field in self._written and np.array_equal(current, self._written[field])
            base = self._base[field] if untouched else current.copy()
            current[:] = base * self.scales[key]
            self._base[field], self._written[field] = base, current.copy()

    def _info(self, info: dict[str, Any]) -> dict[str, Any]:
        info["wrapper/mass_scale"] = self.scales["mass"]
        info["wrapper/friction_scale"] = self.scales["friction"]
        return info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = _generator(seed, self._SALT)
        self._shift()
        obs, info = self.env.reset(seed=seed, options=options)
        return obs, self._info(info)

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        return obs, reward, terminated, truncated, self._info(info)


WRAPPERS: dict[str, type[gym.Wrapper]] = {
    "observation_noise": ObservationNoise,
    "action_noise": ActionNoise,
    "external_force": ExternalForce,
    "dynamics_shift": DynamicsShift,
    "non_stationary": NonStationary,
}


class Perturbed(TaskDistribution):
    """A family whose every environment carries robustness wrappers, applied in the given order.

    Tasks, splits and spaces are the base family's; only the environments differ, so an agent
    trained on the base family is evaluated under perturbation by building its sampler on this.
    A ``non_stationary`` wrapper draws its new tasks from the base family.

    Args:
        base: the family.
        wrappers: ``[(name, kwargs), ...]`` with ``name`` in :data:`WRAPPERS`, e.g.
            ``[("observation_noise", {"std": 0.05}), ("non_stationary", {"mode": "steps", "period": 50})]``.
    """

    def __init__(self, base: TaskDistribution, wrappers: list[tuple[str, dict[str, Any]]]) -> None:
        unknown = sorted({name for name, _ in wrappers} - set(WRAPPERS))
        if unknown:
            raise ValueError(f"unknown wrapper(s) {unknown}; choose from {sorted(WRAPPERS)}")
        self.base = base
        self.wrappers = [(name, dict(kwargs)) for name, kwargs in wrappers]
        self.name, self.horizon = base.name, base.horizon
        self.observation_space, self.action_space = base.observation_space, base.action_space

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        return self.base.sample(n, rng)

    def train_tasks(self) -> list[Task]:
        return self.base.train_tasks()

    def test_tasks(self) -> list[Task]:
        return self.base.test_tasks()

    def make_env(self, task: Task) -> gym.Env:
        env = self.base.make_env(task)
        for name, kwargs in self.wrappers:
            if name == "non_stationary":
                env = NonStationary(env, self.base, **kwargs)
            else:
                env = WRAPPERS[name](env, **kwargs)  # type: ignore[call-arg]
        return env

    def set_task(self, env: gym.Env, task: Task) -> None:
        self.base.set_task(env, task)

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "wrappers": [f"{n}({kw})" for n, kw in self.wrappers]}
