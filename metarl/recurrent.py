"""Recurrent (RL²) policies and a lockstep runner of whole trials.

A *trial* is ``E`` consecutive episodes of one task with one policy whose GRU hidden state is
carried from episode to episode and reset only when a new trial (a new task) starts. At every
step the GRU reads

    x_t = [o_t, a_{t-1}, r_{t-1}, d_{t-1}]

where ``a_{t-1}``, ``r_{t-1}`` are the previous step's action and reward *within the trial*
(so across an episode boundary they are the last action and reward of the episode before) and
``d_{t-1}`` is 1.0 when that previous step ended its episode, i.e. when ``o_t`` is the first
observation of a new episode. At the first step of a trial all three are 0. The action fed back
is the one the environment executed: the clipped continuous action, or the one-hot of the
discrete action (Duan et al. 2016, arXiv 1611.02779, §2.2; Wang et al. 2016, arXiv 1611.05763).

:class:`TrialRunner` steps one environment per task in lockstep, one batched GRU forward per
step. An episode that terminates early is followed at once by the trial's next episode, so a
lane's trial has at most ``E * T`` steps. Randomness (reset seed, action noise) is drawn per
episode with :func:`metarl.rollout.worker.episode_seeds`, so a trial depends only on the seed,
the call index, the task's position in the call and the parameters.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.base import Task, TaskDistribution
from metarl.gru import gru_sequence
from metarl.rollout.worker import EpisodeError, EpisodeSpec, episode_seeds, flat_dim

_LOG_2PI = math.log(2.0 * math.pi)
_UNIFORM_EPS = 1e-6


class Trials(NamedTuple):
    """``N`` trials of ``E`` episodes, horizon ``T``; a step is recorded where ``mask`` is 1.

    Attributes:
        obs: ``[N, E, T, obs_dim]``.
        inputs: ``[N, E, T, input_dim]`` the GRU input ``[o_t, a_{t-1}, r_{t-1}, d_{t-1}]``.
        actions: ``[N, E, T, act_dim]`` sampled (unclipped) actions, or ``[N, E, T]`` int64.
        rewards: ``[N, E, T]``.
        log_probs: ``[N, E, T]`` under the sampling parameters.
        mask: ``[N, E, T]`` 1.0 while the episode is alive.
        terminated: ``[N, E, T]`` 1.0 at a step that ended its episode by termination.
        success: ``[N, E]`` 1.0 if the env reported success at any step, NaN if it reports none.
    """

    obs: torch.Tensor
    inputs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    log_probs: torch.Tensor
    mask: torch.Tensor
    terminated: torch.Tensor
    success: torch.Tensor

    def episode_returns(self) -> torch.Tensor:
        """``[N, E]`` undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(-1)


def pack(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenates each trial's alive steps in order: ``[N, E, T, ...]`` -> ``[N, L, ...]``.

    ``L`` is the longest trial's number of alive steps; shorter trials are padded at the end
    (after their last step, so a causal GRU never reads the padding before a real step).

    Returns:
        ``(packed [N, L, ...], packed_mask [N, L])``.
    """
    num, episodes, horizon = mask.shape
    flat_mask = mask.reshape(num, episodes * horizon)
    # A stable sort on "not alive" lists the alive positions first, in trial order.
    order = torch.argsort(1.0 - flat_mask, dim=1, stable=True)
    length = max(int(flat_mask.sum(1).max()), 1)
    index = order[:, :length]
    flat = x.reshape(num, episodes * horizon, *x.shape[3:])
    expanded = index.reshape(num, length, *([1] * (x.dim() - 3))).expand(num, length, *x.shape[3:])
    return flat.gather(1, expanded), flat_mask.gather(1, index)


class RecurrentPolicy(nn.Module):
    """A GRU trunk with a policy head (Gaussian or categorical) and a value head.

    Both heads read the same hidden state, so the critic knows what the actor has inferred about
    the task; the agent keeps the value loss on the scale of the policy loss by standardising the
    value targets. Rollouts run the trunk and the policy head only.

    Args:
        obs_dim: size of the flat observation.
        action_space: a ``Box`` (diagonal Gaussian, state-independent log-std) or ``Discrete``.
        hidden_size: GRU width.
        init_log_std: initial log standard deviation (``Box`` only).
    """

    def __init__(
        self, obs_dim: int, action_space: gym.Space, hidden_size: int, init_log_std: float = 0.0
    ) -> None:
        super().__init__()
        if isinstance(action_space, gym.spaces.Discrete):
            self.discrete, self.act_dim = True, int(action_space.n)
        elif isinstance(action_space, gym.spaces.Box):
            self.discrete, self.act_dim = False, flat_dim(action_space)
        else:
            raise TypeError(f"action space {action_space} is not supported; use a Box or Discrete")
        self.obs_dim, self.hidden_size = int(obs_dim), int(hidden_size)
        self.input_dim = self.obs_dim + self.act_dim + 2
        self.noise_shape: tuple[int, ...] = (self.act_dim,)
        self.gru = nn.GRU(self.input_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, self.act_dim)
        self.value = nn.Linear(hidden_size, 1)
        with torch.no_grad():  # near-uniform initial policy, as the feed-forward policies do
            self.head.weight.mul_(0.01)
            self.head.bias.zero_()
        self.log_std = nn.Parameter(torch.full((self.act_dim,), float(init_log_std)))
        self.log_std.requires_grad_(not self.discrete)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        """``[B, hidden]`` zeros: the state at the start of every trial."""
        return torch.zeros(batch_size, self.hidden_size, device=self.head.weight.device)

    def encode(
        self,
        obs: torch.Tensor,
        prev_action: torch.Tensor,
        prev_reward: torch.Tensor,
        prev_done: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, obs_dim]``, ``[B, act_dim]`` (features), ``[B]``, ``[B]`` -> ``[B, input_dim]``."""
        return torch.cat([obs, prev_action, prev_reward[:, None], prev_done[:, None]], dim=-1)

    def action_features(self, actions: torch.Tensor) -> torch.Tensor:
        """What is fed back as ``a_{t-1}``: the executed ``Box`` action or a discrete one-hot."""
        if self.discrete:
            return F.one_hot(actions.long(), self.act_dim).to(torch.float32)
        return actions.to(torch.float32)

    def step(self, inputs: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``[B, input_dim]``, ``[B, hidden]`` -> ``(head [B, act_dim], hidden)``."""
        out, h = self.gru(inputs[:, None], hidden[None])
        return self.head(out[:, 0]), h[0]

    def sample(self, head: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions and log-probabilities from pre-drawn noise (normal, or uniform for Gumbel-max).

        Returns:
            ``(actions [B, act_dim] or [B] int64, log_probs [B])``.
        """
        if self.discrete:
            logp = torch.log_softmax(head, dim=-1)
            gumbel = -torch.log(-torch.log(noise.clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)))
            actions = torch.argmax(logp + gumbel, dim=-1)
            return actions, logp.gather(-1, actions[:, None])[:, 0]
        actions = head + self.log_std.exp() * noise
        return actions, self.log_prob(head, actions)

    def log_prob(self, head: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``head [..., act_dim]``, actions ``[..., act_dim]`` (or ``[...]`` ints) -> ``[...]``."""
        if self.discrete:
            logp = torch.log_softmax(head, dim=-1)
            return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
        z = (actions - head) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * _LOG_2PI).sum(-1)

    def entropy(self, head: torch.Tensor) -> torch.Tensor:
        """``head [..., act_dim]`` -> ``[...]``."""
        if self.discrete:
            logp = torch.log_softmax(head, dim=-1)
            return -(logp.exp() * logp).sum(-1)
        per_dim = self.log_std + 0.5 * (1.0 + _LOG_2PI)
        return per_dim.sum().expand(head.shape[:-1])

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole trials from a fresh state: ``[B, L, input_dim]`` -> ``(head [B, L, act_dim], values [B, L])``."""
        out = gru_sequence(self.gru, inputs)
        return self.head(out), self.value(out)[..., 0]

    def sample_noise(self, rng: np.random.Generator, num_steps: int) -> np.ndarray:
        """``[num_steps, act_dim]`` float32 draws for one episode (normal, or uniform if discrete)."""
        if self.discrete:
            return rng.random((num_steps, self.act_dim), dtype=np.float32)
        return rng.standard_normal((num_steps, self.act_dim), dtype=np.float32)


class _Lanes(NamedTuple):
    """Per-lane (per-task) state of a running batch of trials, all ``[N]`` or ``[N, ...]``."""

    obs: np.ndarray
    episode: np.ndarray
    t: np.ndarray
    alive: np.ndarray
    prev_action: np.ndarray
    prev_reward: np.ndarray
    prev_done: np.ndarray


class TrialRunner:
    """Runs one trial per task on environments built once and re-pointed with ``set_task``.

    Args:
        distribution: the task family.
        clip_actions: clip ``Box`` actions to the bounds before stepping (the stored action stays
            unclipped so that its log-probability is exact; the clipped one is fed back).
    """

    def __init__(self, distribution: TaskDistribution, clip_actions: bool = True) -> None:
        self.distribution = distribution
        self.obs_dim = flat_dim(distribution.observation_space)
        space = distribution.action_space
        self.discrete = isinstance(space, gym.spaces.Discrete)
        self._start = int(space.start) if isinstance(space, gym.spaces.Discrete) else 0
        self._clip = (
            (space.low, space.high) if isinstance(space, gym.spaces.Box) and clip_actions else None
        )
        self._envs: list[gym.Env] = []
        self._env_tasks: list[Task] = []

    def close(self) -> None:
        """Closes every environment."""
        for env in self._envs:
            env.close()
        self._envs, self._env_tasks = [], []

    def _env(self, lane: int, task: Task) -> gym.Env:
        if lane == len(self._envs):
            self._envs.append(self.distribution.make_env(task))
            self._env_tasks.append(task)
        if self._env_tasks[lane] != task:
            self.distribution.set_task(self._envs[lane], task)
            self._env_tasks[lane] = task
        return self._envs[lane]

    def run(
        self,
        policy: RecurrentPolicy,
        tasks: list[Task],
        num_episodes: int,
        seed: int,
        call_index: int = 0,
    ) -> Trials:
        """One trial of ``num_episodes`` episodes per task, from a fresh hidden state each.

        Args:
            policy: the recurrent policy (on the CPU).
            tasks: the ``N`` tasks; lane ``i`` runs ``tasks[i]``.
            num_episodes: ``E``.
            seed, call_index: with the task position and episode index, seed every episode.

        Returns:
            :class:`Trials` with horizon ``T = distribution.horizon``.
        """
        if num_episodes < 1 or not tasks:
            raise ValueError(
                f"need tasks and num_episodes >= 1, got {len(tasks)} tasks, {num_episodes}"
            )
        with torch.inference_mode():
            return self._run(policy, tasks, num_episodes, seed, call_index)

    def _begin(self, lane: int, episode: int, task: Task, seeds: np.ndarray) -> np.ndarray:
        try:
            obs, _ = self._env(lane, task).reset(seed=int(seeds[lane, episode]))
        except Exception as exc:
            raise EpisodeError(
                _describe(task, lane, episode, "building or resetting the environment")
            ) from exc
        return np.reshape(obs, -1)

    def _run(
        self,
        policy: RecurrentPolicy,
        tasks: list[Task],
        num_episodes: int,
        seed: int,
        call_index: int,
    ) -> Trials:
        num, horizon = len(tasks), self.distribution.horizon
        seeds = np.zeros((num, num_episodes), dtype=np.int64)
        noise = np.zeros((num, num_episodes, horizon, *policy.noise_shape), dtype=np.float32)
        for i, task in enumerate(tasks):
            for e in range(num_episodes):
                env_seed, rng = episode_seeds(EpisodeSpec(task, i, e, 0, seed, call_index))
                seeds[i, e], noise[i, e] = env_seed, policy.sample_noise(rng, horizon)
        out = _allocate(num, num_episodes, horizon, self.obs_dim, policy)
        lanes = _Lanes(
            obs=np.stack([self._begin(i, 0, task, seeds) for i, task in enumerate(tasks)]).astype(
                np.float32
            ),
            episode=np.zeros(num, dtype=np.int64),
            t=np.zeros(num, dtype=np.int64),
            alive=np.ones(num, dtype=bool),
            prev_action=np.zeros((num, policy.act_dim), dtype=np.float32),
            prev_reward=np.zeros(num, dtype=np.float32),
            prev_done=np.zeros(num, dtype=np.float32),
        )
        hidden = policy.initial_state(num)
        every = np.arange(num)
        while lanes.alive.any():
            # Finished lanes keep computing (ignored) so every forward has the same batch shape.
            inputs = policy.encode(
                torch.from_numpy(lanes.obs),
                torch.from_numpy(lanes.prev_action),
                torch.from_numpy(lanes.prev_reward),
                torch.from_numpy(lanes.prev_done),
            )
            head, hidden = policy.step(inputs, hidden)
            step_noise = noise[every, np.minimum(lanes.episode, num_episodes - 1), lanes.t]
            actions, log_probs = policy.sample(head, torch.from_numpy(step_noise))
            live = np.flatnonzero(lanes.alive)
            ep, ts = lanes.episode[live], lanes.t[live]
            out["obs"][live, ep, ts], out["inputs"][live, ep, ts] = (
                lanes.obs[live],
                inputs.numpy()[live],
            )
            live_actions = actions.numpy()[live]
            out["actions"][live, ep, ts] = live_actions
            out["log_probs"][live, ep, ts] = log_probs.numpy()[live]
            out["mask"][live, ep, ts] = 1.0
            self._advance(live, ep, ts, tasks, live_actions, policy, lanes, out, seeds)
        return Trials(**{k: torch.from_numpy(v) for k, v in out.items()})

    def _advance(
        self,
        live: np.ndarray,
        e: np.ndarray,
        t: np.ndarray,
        tasks: list[Task],
        actions: np.ndarray,
        policy: RecurrentPolicy,
        lanes: _Lanes,
        out: dict[str, np.ndarray],
        seeds: np.ndarray,
    ) -> None:
        """Steps the live lanes' environments and records the step; starts the next episode where one ended.

        ``e``, ``t``: each live lane's episode and step (``lanes.episode[live]``, ``lanes.t[live]``).
        """
        if self.discrete:
            env_actions: Any = actions + self._start
        else:
            env_actions = actions
            if self._clip is not None:
                env_actions = np.clip(env_actions, self._clip[0], self._clip[1])
        results = []
        for k, lane in enumerate(live.tolist()):
            action = int(env_actions[k]) if self.discrete else env_actions[k]
            try:
                results.append(self._envs[lane].step(action))
            except Exception as exc:
                raise EpisodeError(
                    _describe(tasks[lane], lane, int(e[k]), f"stepping at t={int(t[k])}")
                ) from exc
        obs_list, reward_list, term_list, trunc_list, infos = zip(*results, strict=True)
        rewards = np.asarray(reward_list, dtype=np.float32)
        terminated = np.asarray(term_list, dtype=bool)
        out["rewards"][live, e, t], out["terminated"][live, e, t] = rewards, terminated
        success = np.fromiter((i.get("success", np.nan) for i in infos), np.float32, len(live))
        # fmax ignores NaN: an episode's success stays NaN until the env first reports one.
        out["success"][live, e] = np.fmax(out["success"][live, e], success)
        ended = (
            terminated | np.asarray(trunc_list, dtype=bool) | (t + 1 >= self.distribution.horizon)
        )
        fed_back = torch.as_tensor(env_actions - self._start if self.discrete else env_actions)
        lanes.prev_action[live] = policy.action_features(fed_back).numpy()
        lanes.prev_reward[live], lanes.prev_done[live] = rewards, ended.astype(np.float32)
        going = ~ended
        next_obs = np.asarray(obs_list, dtype=np.float32).reshape(len(live), -1)
        lanes.obs[live[going]], lanes.t[live[going]] = next_obs[going], t[going] + 1
        for k in np.flatnonzero(ended).tolist():
            lane = int(live[k])
            lanes.episode[lane], lanes.t[lane] = e[k] + 1, 0
            if e[k] + 1 < out["mask"].shape[1]:
                lanes.obs[lane] = self._begin(lane, int(e[k]) + 1, tasks[lane], seeds)
            else:
                lanes.alive[lane] = False


def _allocate(
    num: int, episodes: int, horizon: int, obs_dim: int, policy: RecurrentPolicy
) -> dict[str, np.ndarray]:
    shape = (num, episodes, horizon)
    if policy.discrete:
        actions = np.zeros(shape, dtype=np.int64)
    else:
        actions = np.zeros((*shape, policy.act_dim), dtype=np.float32)
    return {
        "obs": np.zeros((*shape, obs_dim), dtype=np.float32),
        "inputs": np.zeros((*shape, policy.input_dim), dtype=np.float32),
        "actions": actions,
        "rewards": np.zeros(shape, dtype=np.float32),
        "log_probs": np.zeros(shape, dtype=np.float32),
        "mask": np.zeros(shape, dtype=np.float32),
        "terminated": np.zeros(shape, dtype=np.float32),
        "success": np.full((num, episodes), np.nan, dtype=np.float32),
    }


def _describe(task: Task, lane: int, episode: int, what: str) -> str:
    return (
        f"environment failed while {what} for task {lane} ({task.to_json()}), "
        f"episode {episode} of its trial"
    )
