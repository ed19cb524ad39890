"""Meta-World ML1, ML10 and ML45 (Yu et al., arXiv 1910.10897), goal hidden from the policy.

Built on ``metaworld`` 3.1.1 directly, avoiding the traps of its gym registrations:

- The split comes from ``metaworld.ML1(env_name, seed)`` / ``ML10(seed)`` / ``ML45(seed)``
  (``train_tasks`` / ``test_tasks``), never from the ``Meta-World/ML1-train`` gym id, which gives
  the test split.
- A task is set explicitly with the Sawyer env's ``set_task``; nothing is sampled on reset.
- ``reset(seed=...)`` is ignored by the Sawyer envs, so ours calls ``env.seed(seed)``.
- Episodes stop at ``horizon`` (at most ``max_path_length`` = 500): stepping further raises a
  clear ``RuntimeError`` instead of Meta-World's ``ValueError`` deep inside.
- The benchmark object (ML10 about 25 s, ML45 about 80 s to build) is built once per process
  and per seed, and its pickled task data lives in the distribution (so a pickled distribution
  carries it to worker processes). Each env instance builds each Sawyer class at most once and
  re-points it with ``set_task``.
- Meta-World's ``touching_object`` (the grasp test behind ``info["grasp_success"]``) walks
  ``data.contact`` in Python, a fifth of a push-v3 step; every Sawyer class built here runs
  :func:`_touching_object` instead, the same test on the contact arrays (same sums, same order).
- Its object observations call scipy's ``Rotation.from_matrix`` on MuJoCo's orientation matrices,
  whose validity checks take a sixth of a push-v3 step; once a Sawyer class is built here, its
  module (for the whole process) calls it with ``assume_valid=True`` on finite matrices
  (:class:`_RotationOfValidMatrix`): the same quaternion for a rotation matrix, which MuJoCo's
  are to rounding.
- Success is counted per episode: ``info["success"]`` is 1.0 from the first step at which the
  Sawyer env reported success until the episode ends (the running "any success so far"); its
  value at the last step is the episode's success, also given there as
  ``info["episode_success"]``. ``info["step_success"]`` is the raw per-step flag.

A task is ``Task.make("ml10", env_name="reach-v3", goal_index=7, split="train", seed=0)``:
JSON-serialisable, with the goal itself kept out of it.

The learner's observation (``[39]`` float32) has the goal ``obs[-3:]`` zeroed, as in the ML
benchmarks. :func:`expert_policy` puts the true goal back into its own copy before calling
Meta-World's scripted policy.
"""

from __future__ import annotations

import functools
import inspect
import pickle
import sys
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from envs.base import EpisodeClock, Task, TaskDistribution, check_whole

NUM_GOALS = 50  # goals per env class in every ML benchmark (metaworld's _N_GOALS)
MAX_PATH_LENGTH = 500
OBS_DIM, ACT_DIM = 39, 4
BENCHMARKS = ("ml1", "ml10", "ml45")

# (benchmark, env_name or "", seed) -> {(split, env_name): [pickled task data per goal]}
_TASK_DATA: dict[tuple[str, str, int], dict[tuple[str, str], list[bytes]]] = {}
_EXPERT_GOALS: dict[Task, np.ndarray] = {}
_GOAL_SIMS: dict[str, Any] = {}


def _split_names(benchmark: str, env_name: str) -> tuple[list[str], list[str]]:
    """Train and test env names, read from metaworld's own definitions without building."""
    from metaworld import env_dict

    if benchmark == "ml1":
        if env_name not in env_dict.ALL_V3_ENVIRONMENTS:
            raise ValueError(
                f"ml1: unknown env_name {env_name!r}; expected one of {sorted(env_dict.ALL_V3_ENVIRONMENTS)}"
            )
        return [env_name], [env_name]
    table = env_dict.ML10_V3 if benchmark == "ml10" else env_dict.ML45_V3
    return list(table["train"]), list(table["test"])


def _build_task_data(
    benchmark: str, env_name: str, seed: int
) -> dict[tuple[str, str], list[bytes]]:
    """Builds the metaworld benchmark once per process and keeps only its pickled task data."""
    key = (benchmark, env_name, seed)
    if key not in _TASK_DATA:
        import metaworld

        bench: Any
        if benchmark == "ml1":
            bench = metaworld.ML1(env_name, seed=seed)
        else:
            bench = (metaworld.ML10 if benchmark == "ml10" else metaworld.ML45)(seed=seed)
        data: dict[tuple[str, str], list[bytes]] = {}
        for split, tasks in (("train", bench.train_tasks), ("test", bench.test_tasks)):
            for mw_task in tasks:
                data.setdefault((split, mw_task.env_name), []).append(mw_task.data)
        bad = {k: len(v) for k, v in data.items() if len(v) != NUM_GOALS}
        if bad:
            raise RuntimeError(
                f"{benchmark}: expected {NUM_GOALS} goals per env and split, got {bad}"
            )
        _TASK_DATA[key] = data
    return _TASK_DATA[key]


def _observation_space() -> gym.spaces.Box:
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    hand = SawyerXYZEnv._HAND_SPACE
    inf = np.full(14, np.inf)
    low = np.concatenate([hand.low, [-1.0], -inf, hand.low, [-1.0], -inf, np.zeros(3)])
    high = np.concatenate([hand.high, [1.0], inf, hand.high, [1.0], inf, np.zeros(3)])
    return gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)


def _make_sim(env_name: str) -> Any:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    sim: Any = ALL_V3_ENVIRONMENTS[env_name]()
    cls: Any = type(sim)
    cls.touching_object = _touching_object
    module: Any = sys.modules[cls.__module__]
    scipy_rotation = _RotationOfValidMatrix.scipy_rotation()
    if scipy_rotation is not None and getattr(module, "Rotation", None) is scipy_rotation:
        module.Rotation = _RotationOfValidMatrix
    return sim


class _RotationOfValidMatrix:
    """Stands in for scipy's ``Rotation`` in metaworld's env modules, which only ever call
    ``Rotation.from_matrix(xmat).as_quat()``: the same call with ``assume_valid=True`` (scipy
    1.17 and later), which skips the orthogonality checks and gives the same quaternion for a
    rotation matrix (tested on expert episodes); with an older scipy nothing is replaced."""

    @staticmethod
    @functools.cache
    def scipy_rotation() -> Any:
        """scipy's ``Rotation`` if its ``from_matrix`` takes ``assume_valid``, else None (once)."""
        from scipy.spatial.transform import Rotation

        if "assume_valid" not in inspect.signature(Rotation.from_matrix).parameters:
            return None
        return Rotation

    @staticmethod
    def from_matrix(matrix: Any) -> Any:
        # A blown-up state (NaN, inf) keeps scipy's checked conversion, which raises on it.
        rotation = _RotationOfValidMatrix.scipy_rotation()
        return rotation.from_matrix(matrix, assume_valid=bool(np.isfinite(matrix).all()))


def _touching_object(sim: Any, object_geom_id: int) -> bool:
    """``SawyerXYZEnv.touching_object`` (metaworld 3.1.1) on the contact arrays: whether both
    gripper pads push on the object, i.e. the constraint forces of each pad's contacts with it sum
    to more than 0. The same contacts summed in the same order, so the same answer bit for bit."""
    data = sim.data
    contact, forces = data.contact, data.efc_force
    geom1, geom2 = contact.geom1, contact.geom2
    with_object = (geom1 == object_geom_id) | (geom2 == object_geom_id)

    def force(pad: str) -> Any:
        pad_id = data.geom(pad).id
        rows = contact.efc_address[with_object & ((geom1 == pad_id) | (geom2 == pad_id))]
        return sum(forces[row] for row in rows)

    return bool(0 < force("leftpad_geom") and 0 < force("rightpad_geom"))


class MetaWorldEnv(gym.Env):
    """One learner-facing Meta-World env that can be re-pointed at any task of its benchmark.

    Observation ``[39]`` float32 with ``obs[-3:] == 0``; action ``[4]`` in [-1, 1]. A new task
    takes effect at the next ``reset()`` (Meta-World places the goal and objects on reset), so
    :attr:`task_switch_needs_reset` is True.
    """

    metadata: dict[str, Any] = {"render_modes": []}
    task_switch_needs_reset = True

    def __init__(self, family: str, horizon: int) -> None:
        self.observation_space = _observation_space()
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32)
        self.clock = EpisodeClock(horizon, family)
        self._sims: dict[str, Any] = {}
        self._sim: Any = None
        self._any_success = False
        self.task: Task | None = None

    @property
    def mujoco_model(self) -> Any:
        return self._sim.model

    @property
    def mujoco_data(self) -> Any:
        return self._sim.data

    def point(self, task: Task, data: bytes) -> None:
        """Sets the Sawyer env of ``task["env_name"]`` (built on first use) to the task's goal."""
        from metaworld.types import Task as MetaWorldTask

        env_name = task["env_name"]
        if env_name not in self._sims:
            self._sims[env_name] = _make_sim(env_name)
        sim = self._sims[env_name]
        sim.set_task(MetaWorldTask(env_name=env_name, data=data))
        if sim is not self._sim:
            self.clock = EpisodeClock(self.clock.horizon, self.clock.family)  # must reset first
        self._sim = sim
        self.task = task

    def _learner_obs(self, obs: np.ndarray) -> np.ndarray:
        obs = np.array(obs, dtype=np.float64)
        obs[-3:] = 0.0
        space: Any = self.observation_space
        return np.clip(
            obs.astype(np.float32), space.low, space.high
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if self._sim is None:
            raise RuntimeError("Meta-World env has no task; call the distribution's set_task first")
        if seed is not None:
            self._sim.seed(seed)  # the Sawyer envs ignore reset(seed=...)
        obs, _ = self._sim.reset()
        self.clock.start()
        self._any_success = False
        return self._learner_obs(obs), {"success": 0.0}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.clock.check()
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(ACT_DIM), -1.0, 1.0)
        obs, reward, _, _, inner_info = self._sim.step(action)
        step_success = bool(inner_info.get("success", 0.0))
        self._any_success = self._any_success or step_success
        info = dict(inner_info)
        info["step_success"] = float(step_success)
        info["success"] = float(self._any_success)
        truncated = self.clock.tick(False)
        if truncated:
            info["episode_success"] = float(self._any_success)
        return self._learner_obs(obs), float(reward), False, truncated, info


class MetaWorld(TaskDistribution):
    """ML1 / ML10 / ML45 with the benchmark's own train/test split and the goal hidden.

    Task fields: ``env_name`` (str), ``goal_index`` (0..49), ``split`` ("train" or "test"),
    ``seed`` (the benchmark seed that generated the goals).

    Args:
        benchmark: "ml1", "ml10" or "ml45".
        env_name: the ML1 env (any of the 50 v3 names); must be "" for ML10 / ML45.
        seed: benchmark seed passed to metaworld (ML1 test goals use seed + 1, as metaworld does).
        horizon: episode length, at most 500 (Meta-World's ``max_path_length``).
    """

    def __init__(
        self, benchmark: str, env_name: str = "", seed: int = 0, horizon: int = MAX_PATH_LENGTH
    ) -> None:
        if benchmark not in BENCHMARKS:
            raise ValueError(f"benchmark {benchmark!r} unknown; expected one of {BENCHMARKS}")
        check_whole(benchmark, "horizon", horizon)
        check_whole(benchmark, "seed", seed, minimum=0)
        if not 1 <= horizon <= MAX_PATH_LENGTH:
            raise ValueError(
                f"{benchmark}: horizon={horizon} must be in [1, {MAX_PATH_LENGTH}]; "
                "Meta-World refuses to step past max_path_length=500"
            )
        self.name, self.env_name, self.seed, self.horizon = benchmark, env_name, int(seed), horizon
        self.train_names, self.test_names = _split_names(benchmark, env_name)
        self.observation_space = _observation_space()
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACT_DIM,), dtype=np.float32)
        self._data: dict[tuple[str, str], list[bytes]] | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._data is not None:  # share the carried data with expert_policy in this process
            _TASK_DATA.setdefault((self.name, self.env_name, self.seed), self._data)

    def _tasks(self, split: str, env_names: list[str]) -> list[Task]:
        # Goal-major order, round robin over task types: any prefix (``eval.num_tasks``) covers
        # the types evenly instead of holding the goals of the first type alone.
        return [
            Task.make(self.name, env_name=n, goal_index=i, split=split, seed=self.seed)
            for i in range(NUM_GOALS)
            for n in env_names
        ]

    def train_tasks(self) -> list[Task]:
        return self._tasks("train", self.train_names)

    def test_tasks(self) -> list[Task]:
        return self._tasks("test", self.test_names)

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        """Draws ``n`` training tasks, without replacement while ``n`` allows.

        ML1: goals uniformly. ML10 / ML45: balanced over the task types, as garage's
        Meta-World task sampler (the protocol behind the paper's table 1): each type gets
        ``n // k`` of its goals (``k`` types), and the ``n % k`` left over go to as many distinct
        types drawn at random; a uniform draw over (type, goal) pairs would leave a batch of 10
        ML10 tasks with about 6.5 of the 10 types. Returned type by type."""
        train = self.train_tasks()
        k = len(self.train_names)  # ML1: k = 1, one draw over the goals
        counts = np.full(k, n // k)
        counts[rng.choice(k, size=n % k, replace=False)] += 1
        tasks = []
        for t, count in enumerate(counts.tolist()):
            goals = rng.choice(NUM_GOALS, size=count, replace=count > NUM_GOALS)
            tasks += [train[int(g) * k + t] for g in goals]  # goal-major order (_tasks)
        return tasks

    def task_data(self, task: Task) -> bytes:
        """The pickled metaworld task data (goal included) behind ``task``; builds the benchmark once."""
        self._check(task)
        if self._data is None:
            self._data = _build_task_data(self.name, self.env_name, self.seed)
        return self._data[(task["split"], task["env_name"])][task["goal_index"]]

    def make_env(self, task: Task) -> gym.Env:
        env = MetaWorldEnv(self.name, self.horizon)
        self.set_task(env, task)
        return env

    def set_task(self, env: gym.Env, task: Task) -> None:
        core = env.unwrapped
        if not isinstance(core, MetaWorldEnv):
            raise TypeError(
                f"{self.name}.set_task needs an env from make_env, got {type(core).__name__}"
            )
        core.point(task, self.task_data(task))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "source": "Meta-World (arXiv 1910.10897); metaworld 3.1.1 benchmark definitions",
            "params": {
                "env_name": self.env_name or None,
                "seed": self.seed,
                "goal": "hidden (obs[-3:] = 0)",
            },
            "train_env_names": self.train_names,
            "test_env_names": self.test_names,
            "num_train": len(self.train_names) * NUM_GOALS,
            "num_test": len(self.test_names) * NUM_GOALS,
        }

    def _check(self, task: Task) -> None:
        names = {"train": self.train_names, "test": self.test_names}
        ok = (
            task.family == self.name
            and task.get("seed") == self.seed
            and task.get("env_name") in names.get(task.get("split"), [])
            and 0 <= task.get("goal_index", -1) < NUM_GOALS
        )
        if not ok:
            raise ValueError(
                f"task {task.to_json()} does not belong to {self.name} (env_name={self.env_name!r}, seed={self.seed}); "
                "take tasks from this distribution's train_tasks(), test_tasks() or sample()"
            )


def _true_goal(task: Task) -> np.ndarray:
    """The goal of ``task`` as a goal-observable Sawyer env reports it in ``obs[-3:]``."""
    if task not in _EXPERT_GOALS:
        from metaworld.types import Task as MetaWorldTask

        dist = MetaWorld(
            task.family, task["env_name"] if task.family == "ml1" else "", task["seed"]
        )
        data = pickle.loads(dist.task_data(task))
        data["partially_observable"] = False  # the scripted experts read the goal
        env_name = task["env_name"]
        if env_name not in _GOAL_SIMS:
            _GOAL_SIMS[env_name] = _make_sim(env_name)
        sim = _GOAL_SIMS[env_name]
        sim.set_task(MetaWorldTask(env_name=env_name, data=pickle.dumps(data)))
        obs, _ = sim.reset()
        _EXPERT_GOALS[task] = np.array(obs[-3:], dtype=np.float64)
    return _EXPERT_GOALS[task]


def expert_policy(task: Task) -> Callable[[np.ndarray], np.ndarray]:
    """Meta-World's scripted expert for ``task``, acting on goal-hidden learner observations.

    Args:
        task: a Meta-World task (any benchmark and split).

    Returns:
        A function from observations ``[B, 39]`` (or one ``[39]``) to actions ``[B, 4]``
        (or ``[4]``) float32. It writes the task's true goal into its own copy of each observation
        and calls ``metaworld.policies.ENV_POLICY_MAP[env_name]`` row by row.
    """
    from metaworld.policies import ENV_POLICY_MAP

    goal = _true_goal(task)
    policy_cls: Any = ENV_POLICY_MAP[task["env_name"]]
    policy = policy_cls()

    def act(obs: np.ndarray) -> np.ndarray:
        batch = np.array(obs, dtype=np.float64, ndmin=2)
        if batch.shape[-1] != OBS_DIM:
            raise ValueError(
                f"expert_policy expects observations [B, {OBS_DIM}], got {np.shape(obs)}"
            )
        batch[:, -3:] = goal
        actions = np.stack([policy.get_action(row) for row in batch]).astype(np.float32)
        return actions[0] if np.ndim(obs) == 1 else actions

    return act


def ml1(env_name: str = "reach-v3", seed: int = 0, horizon: int = MAX_PATH_LENGTH) -> MetaWorld:
    """ML1: one env class, 50 train goals (``seed``) and 50 held-out goals (``seed + 1``)."""
    return MetaWorld("ml1", env_name, seed, horizon)


def ml10(seed: int = 0, horizon: int = MAX_PATH_LENGTH) -> MetaWorld:
    """ML10: 10 train env classes, 5 held-out classes, 50 goals each."""
    return MetaWorld("ml10", "", seed, horizon)


def ml45(seed: int = 0, horizon: int = MAX_PATH_LENGTH) -> MetaWorld:
    """ML45: 45 train env classes, 5 held-out classes, 50 goals each."""
    return MetaWorld("ml45", "", seed, horizon)
