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
from collections.abc import Callable
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


def flat_dim(space: gym.Space) -> int:
    """Number of entries in one (flattened) sample of a ``Box`` space."""
    return int(np.prod(space.shape or ()))


def allocate_batch(num_episodes: int, horizon: int, obs_dim: int, action_space: gym.Space) -> Batch:
    """Zeroed output arrays: ``obs``/``next_obs [M, T, obs_dim]``, ``actions [M, T(, act_dim)]``,
    ``rewards``/``log_probs``/``mask``/``terminated [M, T]``, ``success [M]`` (NaN)."""
    m, t = num_episodes, horizon
    actions: np.ndarray
    if isinstance(action_space, gym.spaces.Discrete):
        actions = np.zeros((m, t), dtype=np.int64)
    else:
        actions = np.zeros((m, t, flat_dim(action_space)), dtype=np.float32)
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
            raise ValueError(
                f"max_envs={max_envs} must be at least 1 (or None for one per episode)"
            )
        self.distribution = distribution
        self.max_envs = max_envs
        self.obs_dim = flat_dim(distribution.observation_space)
        space = self.action_space = distribution.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self._action_start = int(space.start) if isinstance(space, gym.spaces.Discrete) else 0
        self._clip = None
        if isinstance(space, gym.spaces.Box) and clip_actions:
            self._clip = (space.low, space.high)
        self._envs: list[gym.Env] = []
        self._env_tasks: list[Task] = []

    @property
    def num_envs(self) -> int:
        """How many environments are built."""
        return len(self._envs)

    def close(self) -> None:
        """Closes every environment."""
        for env in self._envs:
            env.close()
        self._envs, self._env_tasks = [], []

    def _begin(
        self, lane: int, job: int, spec: EpisodeSpec, out: Batch, noise: np.ndarray, policy: Any
    ) -> gym.Env:
        """Points environment ``lane`` at the episode's task, resets it with the episode's seed."""
        try:
            if lane == len(self._envs):
                self._envs.append(self.distribution.make_env(spec.task))
                self._env_tasks.append(spec.task)
            env = self._envs[lane]
            if self._env_tasks[lane] != spec.task:
                self.distribution.set_task(env, spec.task)
                self._env_tasks[lane] = spec.task
            env_seed, noise_rng = episode_seeds(spec)
            noise[job] = policy.sample_noise(noise_rng, noise.shape[1])
            obs, _ = env.reset(seed=env_seed)
        except Exception as exc:
            raise EpisodeError(_describe(spec, "building or resetting the environment")) from exc
        out["obs"][job, 0] = np.reshape(obs, -1)
        return env

    def _act(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        lanes: _Lanes,
        out: Batch,
        noise: np.ndarray,
    ) -> np.ndarray:
        """One batched forward per parameter set; records actions, log-probs and mask.

        Returns:
            ``[num_lanes, ...]`` the actions to send to the environments (clipped or offset).
        """
        jobs, steps = lanes.jobs, lanes.steps
        obs = torch.from_numpy(out["obs"][jobs, steps])
        step_noise = torch.from_numpy(noise[jobs, steps])
        if len(param_sets) == 1:
            a, lp = policy.act(param_sets[0], obs, step_noise)
            actions, log_probs = a.numpy(), lp.numpy()
        else:
            actions = np.empty((len(jobs), *out["actions"].shape[2:]), dtype=out["actions"].dtype)
            log_probs = np.empty(len(jobs), dtype=np.float32)
            for p in np.unique(lanes.params):
                rows = np.flatnonzero(lanes.params == p)
                a, lp = policy.act(param_sets[p], obs[rows], step_noise[rows])
                actions[rows], log_probs[rows] = a.numpy(), lp.numpy()
        out["actions"][jobs, steps] = actions
        out["log_probs"][jobs, steps] = log_probs
        out["mask"][jobs, steps] = 1.0
        if self.discrete:
            return actions + self._action_start
        if self._clip is not None:
            return np.clip(actions, self._clip[0], self._clip[1])
        return actions

    @staticmethod
    def _step_all(
        lanes: _Lanes, env_actions: np.ndarray, episodes: list[EpisodeSpec]
    ) -> list[tuple]:
        results = []
        for i, (env, action) in enumerate(zip(lanes.envs, env_actions, strict=True)):
            try:
                results.append(env.step(action))
            except Exception as exc:
                spec = episodes[lanes.jobs[i]]
                raise EpisodeError(_describe(spec, f"stepping at t={lanes.steps[i]}")) from exc
        return results

    @staticmethod
    def _record(results: list[tuple], lanes: _Lanes, out: Batch, horizon: int) -> np.ndarray:
        """Writes one step of every lane; returns ``[num_lanes]`` whether each episode ended."""
        jobs, steps = lanes.jobs, lanes.steps
        obs_list, rewards, term_list, trunc_list, infos = zip(*results, strict=True)
        next_obs = np.asarray(obs_list, dtype=np.float32).reshape(len(jobs), -1)
        terminated = np.asarray(term_list, dtype=bool)
        out["next_obs"][jobs, steps] = next_obs
        out["rewards"][jobs, steps] = rewards
        out["terminated"][jobs, steps] = terminated
        success = np.fromiter(
            (info.get("success", np.nan) for info in infos), np.float32, len(jobs)
        )
        # fmax ignores NaN: an episode's success is NaN until the env first reports one.
        out["success"][jobs] = np.fmax(out["success"][jobs], success)
        ended = terminated | np.asarray(trunc_list, dtype=bool) | (steps + 1 >= horizon)
        if ended.any():
            going = ~ended
            out["obs"][jobs[going], steps[going] + 1] = next_obs[going]
        else:
            out["obs"][jobs, steps + 1] = next_obs
        return ended

    def run(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        episodes: list[EpisodeSpec],
        horizon: int,
        on_episode_end: Callable[[], None] | None = None,
    ) -> Batch:
        """Collects ``episodes``; row ``i`` of every returned array belongs to ``episodes[i]``.

        Args:
            policy: a policy from :mod:`metarl.policies` (``act``, ``sample_noise``).
            param_sets: the parameter dicts that ``EpisodeSpec.param_index`` points into.
            episodes: what to collect.
            horizon: steps per episode ``T``.
            on_episode_end: called after each step at which an episode ended (a process
                worker's sign of life).

        Returns:
            The arrays of :func:`allocate_batch` with ``M = len(episodes)``.
        """
        # Inference mode skips autograd bookkeeping on every op; nothing here needs gradients.
        with torch.inference_mode():
            return self._run(policy, param_sets, episodes, horizon, on_episode_end)

    def _run(
        self,
        policy: Any,
        param_sets: list[dict[str, torch.Tensor]],
        episodes: list[EpisodeSpec],
        horizon: int,
        on_episode_end: Callable[[], None] | None,
    ) -> Batch:
        out = allocate_batch(len(episodes), horizon, self.obs_dim, self.action_space)
        noise = np.zeros((len(episodes), horizon, *policy.noise_shape), dtype=np.float32)
        num_lanes = len(episodes) if self.max_envs is None else min(self.max_envs, len(episodes))
        lanes = _Lanes(
            [self._begin(i, i, episodes[i], out, noise, policy) for i in range(num_lanes)], episodes
        )
        next_job = num_lanes
        while lanes.envs:
            env_actions = self._act(policy, param_sets, lanes, out, noise)
            results = self._step_all(lanes, env_actions, episodes)
            ended = self._record(results, lanes, out, horizon)
            lanes.steps += 1
            if on_episode_end is not None and ended.any():
                on_episode_end()
            for i in np.flatnonzero(ended).tolist():
                if next_job < len(episodes):
                    lanes.envs[i] = self._begin(
                        int(lanes.env_index[i]), next_job, episodes[next_job], out, noise, policy
                    )
                    lanes.restart(i, next_job, episodes[next_job].param_index)
                    next_job += 1
                else:
                    lanes.retire(i)
            lanes.compact()
        return out


class _Lanes:
    """The environments running in lockstep and, per lane, its episode row, step and parameter set."""

    def __init__(self, envs: list[gym.Env], episodes: list[EpisodeSpec]) -> None:
        self.envs = envs
        self.env_index = np.arange(len(envs))
        self.jobs = np.arange(len(envs))
        self.steps = np.zeros(len(envs), dtype=np.int64)
        self.params = np.array([episodes[j].param_index for j in range(len(envs))], dtype=np.int64)
        self._retired: list[int] = []

    def restart(self, lane: int, job: int, param_index: int) -> None:
        self.jobs[lane], self.steps[lane], self.params[lane] = job, 0, param_index

    def retire(self, lane: int) -> None:
        self._retired.append(lane)

    def compact(self) -> None:
        """Drops retired lanes (their environments stay built for the next call)."""
        if not self._retired:
            return
        keep = np.ones(len(self.envs), dtype=bool)
        keep[self._retired] = False
        self.envs = [env for env, k in zip(self.envs, keep, strict=True) if k]
        self.env_index, self.jobs = self.env_index[keep], self.jobs[keep]
        self.steps, self.params = self.steps[keep], self.params[keep]
        self._retired = []


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
