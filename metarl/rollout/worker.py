"""The rollout worker every backend runs: several environments stepped in lockstep.

A :class:`RolloutWorker` owns up to ``max_envs`` environments of one task family, built once and
re-pointed with ``distribution.set_task``. Given a list of episodes it runs them to the horizon,
one batched policy forward per step for each distinct parameter set, and returns plain numpy
arrays with one row per episode. An environment whose episode ended takes the next pending
episode at once, so early termination costs no idle steps.

Each episode's randomness comes only from its own seed (:func:`episode_seeds`): the environment
reset seed and the action noise. Which worker or slot runs an episode therefore does not change
its trajectory.
"""

from __future__ import annotations

import traceback
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch

from envs.base import Task, TaskDistribution

Batch = dict[str, np.ndarray]


class EpisodeSpec(NamedTuple):
    """One episode to collect.

    Attributes:
        task: the task the environment is pointed at.
        task_index: position of the task in the sampler call (for seeding and messages).
        episode_index: position of the episode within its task.
        param_index: which of the worker's parameter sets acts in this episode.
        seed: the sampler seed.
        call_index: the sampler's call counter at this call.
    """

    task: Task
    task_index: int
    episode_index: int
    param_index: int
    seed: int
    call_index: int


class EpisodeError(RuntimeError):
    """An environment raised while running an episode; names the task and the episode."""


def episode_seeds(spec: EpisodeSpec) -> tuple[int, np.random.Generator]:
    """The environment reset seed and the action-noise generator of one episode.

    Both derive from ``(seed, call_index, task_index, episode_index)`` through a numpy
    ``SeedSequence``, independent streams for the reset and for the noise.
    """
    root = np.random.SeedSequence(
        spec.seed, spawn_key=(spec.call_index, spec.task_index, spec.episode_index)
    )
    env_seq, noise_seq = root.spawn(2)
    return int(env_seq.generate_state(1)[0]), np.random.default_rng(noise_seq)


def allocate_batch(
    num_episodes: int, horizon: int, obs_dim: int, action_space: gym.Space
) -> Batch:
    """Zeroed output arrays: ``obs``/``next_obs [M, T, obs_dim]``, ``actions [M, T(, act_dim)]``,
    ``rewards``/``log_probs``/``mask``/``terminated [M, T]``, ``success [M]`` (NaN)."""
    m, t = num_episodes, horizon
    if isinstance(action_space, gym.spaces.Discrete):
        actions = np.zeros((m, t), dtype=np.int64)
    else:
        actions = np.zeros((m, t, int(np.prod(action_space.shape))), dtype=np.float32)
    return {
        "obs": np.zeros((m, t, obs_dim), dtype=np.float32),
        "actions": actions,
        "rewards": np.zeros((m, t), dtype=np.float32),
        "log_probs": np.zeros((m, t), dtype=np.float32),
        "mask": np.zeros((m, t), dtype=np.float32),
        "success": np.full((m,), np.nan, dtype=np.float32),
        "next_obs": np.zeros((m, t, obs_dim), dtype=np.float32),
        "terminated": np.zeros((m, t), dtype=np.float32),
    }


class _Slot:
    """An environment and the episode it is running."""

    __slots__ = ("index", "env", "task", "job", "t", "param_index")

    def __init__(self, index: int, env: gym.Env, task: Task) -> None:
        self.index = index
        self.env = env
        self.task = task
        self.job = -1
        self.t = 0
        self.param_index = 0


class RolloutWorker:
    """Runs episodes of one task family on environments it builds once.

    Args:
        distribution: the task family; its ``make_env`` builds the environments.
        max_envs: how many environments to hold; ``None`` holds one per episode of the largest call.
        clip_actions: clip continuous actions to the action bounds before stepping (the stored
            action stays unclipped so its log-probability is exact).
    """

    def __init__(
        self, distribution: TaskDistribution, max_envs: int | None = None, clip_actions: bool = True
    ) -> None:
        if max_envs is not None and max_envs < 1:
            raise ValueError(f"max_envs={max_envs} must be at least 1 (or None for one per episode)")
        self.distribution = distribution
        self.max_envs = max_envs
        self.obs_dim = int(np.prod(distribution.observation_space.shape))
        self.action_space = distribution.action_space
        self.discrete = isinstance(self.action_space, gym.spaces.Discrete)
        box = None if self.discrete else self.action_space
        self._clip = None if box is None or not clip_actions else (box.low, box.high)
        self._action_start = int(self.action_space.start) if self.discrete else 0
        self._slots: list[_Slot] = []

    @property
    def num_envs(self) -> int:
        """How many environments are built."""
        return len(self._slots)

    def close(self) -> None:
        """Closes every environment."""
        for slot in self._slots:
            slot.env.close()
        self._slots = []

    def _slot_for(self, index: int, task: Task) -> _Slot:
        while len(self._slots) <= index:
            self._slots.append(_Slot(len(self._slots), self.distribution.make_env(task), task))
        slot = self._slots[index]
        if slot.task != task:
            self.distribution.set_task(slot.env, task)
            slot.task = task
        return slot

    def _start(self, slot: _Slot, job: int, spec: EpisodeSpec, out: Batch, noise: np.ndarray, policy: Any) -> None:
        env_seed, noise_rng = episode_seeds(spec)
        noise[job] = policy.sample_noise(noise_rng, noise.shape[1])
        obs, _ = slot.env.reset(seed=env_seed)
        out["obs"][job, 0] = np.reshape(obs, -1)
        slot.job, slot.t, slot.param_index = job, 0, spec.param_index

    def _act(self, policy: Any, param_sets: list[dict[str, torch.Tensor]], active: list[_Slot], out: Batch, noise: np.ndarray) -> np.ndarray:
        """One batched forward per parameter set; writes actions and log-probs, returns env actions."""
        jobs = np.fromiter((s.job for s in active), dtype=np.int64, count=len(active))
        steps = np.fromiter((s.t for s in active), dtype=np.int64, count=len(active))
        param_idx = np.fromiter((s.param_index for s in active), dtype=np.int64, count=len(active))
        obs = out["obs"][jobs, steps]
        step_noise = noise[jobs, steps]
        actions = np.empty((len(active), *out["actions"].shape[2:]), dtype=out["actions"].dtype)
        log_probs = np.empty(len(active), dtype=np.float32)
        for p in np.unique(param_idx):
            rows = np.flatnonzero(param_idx == p) if len(param_sets) > 1 else slice(None)
            a, lp = policy.act(param_sets[p], torch.from_numpy(obs[rows]), torch.from_numpy(step_noise[rows]))
            actions[rows] = a.numpy()
            log_probs[rows] = lp.numpy()
        out["actions"][jobs, steps] = actions
        out["log_probs"][jobs, steps] = log_probs
        out["mask"][jobs, steps] = 1.0
        if self.discrete:
            return actions + self._action_start
        if self._clip is not None:
            return np.clip(actions, self._clip[0], self._clip[1])
        return actions

    def _step(self, slot: _Slot, action: Any, out: Batch, horizon: int) -> bool:
        """Steps one environment and records the transition; returns whether the episode goes on."""
        job, t = slot.job, slot.t
        next_obs, reward, terminated, truncated, info = slot.env.step(action)
        next_obs = np.reshape(next_obs, -1)
        out["rewards"][job, t] = reward
        out["next_obs"][job, t] = next_obs
        if terminated:
            out["terminated"][job, t] = 1.0
        if "success" in info:
            success = float(info["success"])
            previous = out["success"][job]
            out["success"][job] = success if np.isnan(previous) else max(previous, success)
        slot.t = t + 1
        if terminated or truncated or slot.t >= horizon:
            return False
        out["obs"][job, slot.t] = next_obs
        return True

    def run(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        episodes: list[EpisodeSpec],
        horizon: int,
    ) -> Batch:
        """Collects ``episodes``; row ``i`` of every returned array belongs to ``episodes[i]``.

        Args:
            policy: a policy from :mod:`metarl.policies` (``act``, ``sample_noise``).
            param_sets: the parameter dicts that ``EpisodeSpec.param_index`` points into.
            episodes: what to collect.
            horizon: steps per episode ``T``.

        Returns:
            The arrays of :func:`allocate_batch` with ``M = len(episodes)``.
        """
        out = allocate_batch(len(episodes), horizon, self.obs_dim, self.action_space)
        noise = np.zeros((len(episodes), horizon, *policy.noise_shape), dtype=np.float32)
        num_slots = len(episodes) if self.max_envs is None else min(self.max_envs, len(episodes))
        pending = iter(range(num_slots, len(episodes)))
        active: list[_Slot] = []
        for job in range(num_slots):
            active.append(self._prepare(job, job, episodes[job], out, noise, policy))
        while active:
            env_actions = self._act(policy, param_sets, active, out, noise)
            still: list[_Slot] = []
            for i, slot in enumerate(active):
                if self._step_checked(slot, env_actions[i], out, horizon, episodes[slot.job]):
                    still.append(slot)
                    continue
                job = next(pending, None)
                if job is not None:
                    still.append(self._prepare(slot.index, job, episodes[job], out, noise, policy))
            active = still
        return out

    def _prepare(self, index: int, job: int, spec: EpisodeSpec, out: Batch, noise: np.ndarray, policy: Any) -> _Slot:
        try:
            slot = self._slot_for(index, spec.task)
            self._start(slot, job, spec, out, noise, policy)
        except Exception as exc:
            raise EpisodeError(_describe(spec, "building or resetting the environment")) from exc
        return slot

    def _step_checked(self, slot: _Slot, action: Any, out: Batch, horizon: int, spec: EpisodeSpec) -> bool:
        try:
            return self._step(slot, action, out, horizon)
        except Exception as exc:
            raise EpisodeError(_describe(spec, f"stepping at t={slot.t}")) from exc


def _describe(spec: EpisodeSpec, what: str) -> str:
    return (
        f"environment failed while {what} for task {spec.task_index} ({spec.task.to_json()}), "
        f"episode {spec.episode_index}"
    )


def describe_exception(exc: BaseException) -> str:
    """One summary line (with the direct cause) followed by the full traceback, for remote errors."""
    summary = "".join(traceback.format_exception_only(exc)).strip()
    if exc.__cause__ is not None:
        summary += f" (caused by {''.join(traceback.format_exception_only(exc.__cause__)).strip()})"
    return f"{summary}\n\nremote traceback:\n{''.join(traceback.format_exception(exc))}"
