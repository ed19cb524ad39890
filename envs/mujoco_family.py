"""One environment class and one distribution class shared by every MuJoCo locomotion family.

A family is a :class:`FamilySpec`: which gymnasium v5 model to build, how tasks are drawn, the
published reward, and (for dynamics families) how a task rewrites the model. The physics and the
observation are gymnasium's own (``HalfCheetah-v5``, ``Ant-v5``, ``Hopper-v5``, ``Walker2d-v5``);
the reward is recomputed from the MuJoCo state by the family's reward function.

MuJoCo and gymnasium's MuJoCo models are imported only when an environment is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import EpisodeClock, Task, TaskDistribution, check_whole, seeded_split

# (sim, state before the step, action, task, (inner reward, inner terminated, inner info))
# -> (reward, terminated, info)
RewardFn = Callable[
    [Any, np.ndarray, np.ndarray, Task, tuple[float, bool, dict]], tuple[float, bool, dict]
]


@dataclass(frozen=True)
class FamilySpec:
    """Everything that distinguishes one MuJoCo task family from another.

    Attributes:
        name: registry name, also the family of its tasks.
        source: the paper and code the reward and task distribution come from.
        make_sim: builds the gymnasium MuJoCo env (unwrapped) that does the physics.
        obs_dim, act_dim: sizes of the observation and action, known without building.
        sample: ``(n, rng) -> list of task parameter dicts``.
        reward: the published reward, computed from the MuJoCo state.
        position: what to record before a step for the reward (e.g. ``qpos[0]``).
        params_doc: a line per task parameter for ``describe()``.
        fixed_tasks: the whole task set where it is finite (train and test are both this set).
        apply_task: rewrites model arrays for a task from the stored nominal values.
        model_fields: names of ``MjModel`` arrays whose nominal values the env stores.
        box: the nominal box of each (scalar or vector) task field, ``{field: (low, high)}``,
            where the family supports task generators (:meth:`MujocoFamily.parameter_box`).
        extra_obs: ``(sim, task) -> values`` appended to gymnasium's observation (``obs_dim``
            counts them), e.g. the torso's centre of mass of the MAML paper's HalfCheetah;
            ``extra_obs_dim`` of them.
        own_reward: the reward and termination use nothing of gymnasium's step, so a step runs
            only its physics and observation (``do_simulation``, ``_get_obs``): the same state
            and observation without gymnasium's reward and info code. ``reward`` then receives
            ``(0.0, False, {})`` as ``inner``.
    """

    name: str
    source: str
    make_sim: Callable[[], Any]
    obs_dim: int
    act_dim: int
    sample: Callable[[int, np.random.Generator], list[dict[str, Any]]]
    reward: RewardFn
    position: Callable[[Any], np.ndarray]
    params_doc: dict[str, str]
    fixed_tasks: tuple[dict[str, Any], ...] | None = None
    apply_task: Callable[[Any, Task, dict[str, np.ndarray]], None] | None = None
    model_fields: tuple[str, ...] = field(default_factory=tuple)
    box: dict[str, tuple[list[float], list[float]]] | None = None
    extra_obs: Callable[[Any, Task], np.ndarray] | None = None
    extra_obs_dim: int = 0
    own_reward: bool = False


class MujocoTaskEnv(gym.Env):
    """A gymnasium MuJoCo model fixed on one task of a family.

    Observation: gymnasium's v5 observation as float32, ``[spec.obs_dim]``. Action: the model's
    ``[spec.act_dim]`` box. Info: the reward components and the velocity or position used.
    ``mujoco_model`` / ``mujoco_data`` expose the simulation to the wrappers.
    """

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, spec: FamilySpec, task: Task, horizon: int) -> None:
        self.spec_ = spec
        self.sim = spec.make_sim()
        model = self.sim.model
        self.nominal = {name: getattr(model, name).copy() for name in spec.model_fields}
        self.clock = EpisodeClock(horizon, spec.name)
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, shape=(spec.obs_dim,), dtype=np.float32
        )
        low, high = self.sim.action_space.low, self.sim.action_space.high
        self.action_space = gym.spaces.Box(
            low.astype(np.float32), high.astype(np.float32), dtype=np.float32
        )
        inner_dim = spec.obs_dim - spec.extra_obs_dim
        if self.sim.observation_space.shape != (inner_dim,) or low.shape != (spec.act_dim,):
            raise RuntimeError(
                f"{spec.name}: built model has obs {self.sim.observation_space.shape} and action {low.shape}, "
                f"spec says ({inner_dim},) and ({spec.act_dim},); update the spec for this gymnasium version"
            )
        self.set_task(task)

    @property
    def mujoco_model(self) -> Any:
        return self.sim.model

    @property
    def mujoco_data(self) -> Any:
        return self.sim.data

    @property
    def dt(self) -> float:
        return float(self.sim.dt)

    def set_task(self, task: Task) -> None:
        """Points the env at ``task``; dynamics families rewrite the model from nominal values."""
        if task.family != self.spec_.name:
            raise ValueError(f"task family {task.family!r} given to a {self.spec_.name!r} env")
        self.task = task
        if self.spec_.apply_task is not None:
            self.spec_.apply_task(self.sim.model, task, self.nominal)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        obs, _ = self.sim.reset(seed=seed)
        self.clock.start()
        return self._observe(obs), {}

    def _observe(self, obs: np.ndarray) -> np.ndarray:
        if self.spec_.extra_obs is not None:
            obs = np.concatenate([obs, self.spec_.extra_obs(self.sim, self.task)])
        return obs.astype(np.float32)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.clock.check()
        action = np.asarray(action, dtype=np.float64)
        before = np.array(self.spec_.position(self.sim), dtype=np.float64)
        if self.spec_.own_reward:
            self.sim.do_simulation(action, self.sim.frame_skip)
            obs, inner = self.sim._get_obs(), (0.0, False, {})
        else:
            obs, inner_reward, inner_terminated, _, inner_info = self.sim.step(action)
            inner = (float(inner_reward), bool(inner_terminated), inner_info)
        reward, terminated, info = self.spec_.reward(self.sim, before, action, self.task, inner)
        truncated = self.clock.tick(terminated)
        return self._observe(obs), float(reward), bool(terminated), truncated, info


class MujocoFamily(TaskDistribution):
    """The task distribution of one :class:`FamilySpec`.

    Args:
        spec: the family.
        horizon: episode length (200 for every locomotion family here).
        num_train, num_test: sizes of the fixed, seeded, disjoint splits (ignored by families
            with a finite task set, whose train and test sets are that set).
        split_seed: seed of the fixed splits.
    """

    def __init__(
        self,
        spec: FamilySpec,
        horizon: int = 200,
        num_train: int = 100,
        num_test: int = 40,
        split_seed: int = 0,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.horizon = check_whole(spec.name, "horizon", horizon)
        self.observation_space = gym.spaces.Box(
            -np.inf, np.inf, shape=(spec.obs_dim,), dtype=np.float32
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(spec.act_dim,), dtype=np.float32)
        if spec.fixed_tasks is not None:
            fixed = [Task.make(spec.name, **p) for p in spec.fixed_tasks]
            self._train, self._test = fixed, fixed
        else:
            self._train, self._test = seeded_split(self.sample, num_train, num_test, split_seed)

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        return [Task.make(self.name, **p) for p in self.spec.sample(n, rng)]

    def train_tasks(self) -> list[Task]:
        return list(self._train)

    def parameter_box(self) -> dict[str, tuple[list[float], list[float]]]:
        """The nominal box of each task field (for task generators); not every family has one."""
        if self.spec.box is None:
            raise ValueError(
                f"{self.name} declares no parameter box for task generators; use halfcheetah-vel-mass "
                "or navigation-2d-wind"
            )
        return dict(self.spec.box)

    def make_task(self, **fields: Any) -> Task:
        """A task from field values, anywhere (off the nominal box too); 1-element lists become floats."""
        box = self.parameter_box()
        if set(fields) != set(box):
            raise ValueError(f"{self.name} tasks need fields {sorted(box)}, got {sorted(fields)}")
        values = {k: float(v[0]) if len(box[k][0]) == 1 else tuple(map(float, v)) for k, v in fields.items()}
        return Task.make(self.name, **values)

    def test_tasks(self) -> list[Task]:
        return list(self._test)

    def make_env(self, task: Task) -> gym.Env:
        return MujocoTaskEnv(self.spec, task, self.horizon)

    def set_task(self, env: gym.Env, task: Task) -> None:
        core = env.unwrapped
        if not isinstance(core, MujocoTaskEnv) or core.spec_.name != self.name:
            raise TypeError(
                f"{self.name}.set_task needs an env from this family's make_env, got {core!r}"
            )
        core.set_task(task)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": self.spec.source,
            "params": dict(self.spec.params_doc),
            "num_train": len(self._train),
            "num_test": len(self._test),
            "split": "the finite task set (train = test)"
            if self.spec.fixed_tasks
            else "fixed seeded draws",
        }
