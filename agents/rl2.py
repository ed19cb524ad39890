"""RL²: a recurrent policy that learns to adapt within its hidden state, trained with PPO.

Duan et al. 2016, "RL²: Fast Reinforcement Learning via Slow Reinforcement Learning" (arXiv
1611.02779); Wang et al. 2016, "Learning to reinforcement learn" (arXiv 1611.05763). A GRU
policy reads ``[o_t, a_{t-1}, r_{t-1}, d_{t-1}]`` (:mod:`metarl.recurrent`) and keeps its hidden
state across the ``episodes_per_trial`` episodes of one task; it starts from zeros for each new
task. Adaptation is nothing but the forward pass: no gradient step at meta-test time.

Each iteration runs one trial per task of the meta-batch and takes PPO steps (Schulman et al.
2017, arXiv 1707.06347) on minibatches of whole trials, back-propagating through each trial.

How the return crosses episode boundaries: the trial is RL²'s episode. The objective is the
discounted return of the whole trial, so a step's advantage also credits what its exploration
earns in the trial's later episodes. GAE therefore runs over the trial's concatenated steps: at
an inner episode boundary the next value is the value of the next episode's first step (the
recurrent state has seen the done flag), nothing is cut; only the trial's last step bootstraps
with 0, since the hidden state is thrown away after it. Garage's RL² concatenates the episodes
of a trial the same way.

Value targets are standardised with running statistics of the λ-returns (the critic predicts
``(G - mean) / std``): a trial's returns reach hundreds in locomotion, far from a freshly
initialised critic's outputs.

Settings: the Meta-World paper (arXiv 1910.10897, appendix) gives RL² a GRU of 256, PPO lr 5e-4,
meta-batch 25 / 10 / 25 for ML1 / ML10 / ML45 and 10 episodes per trial; clip 0.2, λ 0.95,
γ 0.99 and 10 epochs follow garage's RL²-PPO Meta-World examples.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl.config import require_at_least
from metarl.meta_pg import check_finite, eval_seed
from metarl.recurrent import RecurrentPolicy, TrialRunner, Trials, pack
from metarl.rollout.worker import flat_dim
from metarl.runtime import check_device


@dataclass(frozen=True)
class RL2Config:
    meta_batch_size: int = 20
    """Tasks per iteration; one trial is run on each."""
    episodes_per_trial: int = 2
    """Episodes of one task that share the hidden state (Meta-World paper: 10)."""
    hidden_size: int = 256
    """GRU width."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian policy."""
    lr: float = 5e-4
    """Adam step size."""
    clip_range: float = 0.2
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]."""
    num_epochs: int = 10
    """Passes over the iteration's trials."""
    num_minibatches: int = 4
    """Minibatches per epoch, each a set of whole trials (at most meta_batch_size)."""
    gamma: float = 0.99
    """Discount per step, across the episodes of a trial."""
    gae_lambda: float = 0.95
    """GAE's λ over the trial's concatenated steps."""
    normalize_advantages: bool = True
    """Standardise advantages over the iteration's alive steps."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus."""
    value_coef: float = 0.5
    """Weight of the critic's squared error (on standardised targets)."""
    max_grad_norm: float = 0.5
    """Global gradient-norm clip per minibatch step; 0 disables it."""
    eval_episodes: int = 1
    """N: held-out trials have N + 1 episodes, scored after 0..N episodes of experience."""
    device: str = "cpu"
    """Where the PPO update runs ('cpu' or 'cuda'); trials always run on the CPU."""

    def __post_init__(self) -> None:
        require_at_least(self, ("meta_batch_size", "episodes_per_trial", "hidden_size", "num_epochs"))
        if not 1 <= self.num_minibatches <= self.meta_batch_size:
            raise ValueError(
                f"num_minibatches must lie in [1, meta_batch_size={self.meta_batch_size}] (each "
                f"minibatch holds whole trials), got {self.num_minibatches}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 < self.clip_range < 1.0:
            raise ValueError(f"clip_range must lie in (0, 1) (PPO uses 0.2), got {self.clip_range}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(
                f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}"
            )
        for name in ("entropy_coef", "value_coef", "max_grad_norm"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.eval_episodes < 0:
            raise ValueError(f"eval_episodes must be >= 0, got {self.eval_episodes}")
        if not math.isfinite(self.init_log_std):
            raise ValueError(f"init_log_std must be finite, got {self.init_log_std}")
        check_device(self.device)


def trial_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """GAE over packed trials, each one long episode that ends (value 0) after its last step.

    ``A_t = δ_t + γλ A_{t+1}`` with ``δ_t = r_t + γ V_{t+1} − V_t``, where ``V_{t+1}`` is 0 after
    a trial's last alive step.

    Args:
        rewards, values, mask: ``[N, L]`` packed trials (mask 1 on a prefix of each row).
        gamma, lam: discount and GAE's λ.

    Returns:
        ``[N, L]`` advantages, 0 where masked.
    """
    next_values = torch.cat([values[:, 1:] * mask[:, 1:], torch.zeros_like(values[:, :1])], 1)
    deltas = (rewards + gamma * next_values - values) * mask
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in range(deltas.shape[1] - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running * mask[:, t]
        advantages[:, t] = running
    return advantages * mask


class RunningMoments:
    """Mean and variance of every value seen so far (parallel-variance merge, float64)."""

    def __init__(self) -> None:
        self.count, self.mean, self.var = 0.0, 0.0, 1.0

    def update(self, values: torch.Tensor) -> None:
        x = values.detach().double()
        n, mean, var = float(x.numel()), float(x.mean()), float(x.var(unbiased=False))
        total = self.count + n
        delta = mean - self.mean
        self.var = (self.count * self.var + n * var + delta**2 * self.count * n / total) / total
        self.mean += delta * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) + 1e-8

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]


class PPOBatch(NamedTuple):
    """One iteration's packed trials, ``[N, L, ...]``, on the update's device."""

    inputs: torch.Tensor
    actions: torch.Tensor
    old_log_probs: torch.Tensor
    advantages: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def ppo_loss(
    policy: RecurrentPolicy, batch: PPOBatch, cfg: RL2Config
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped loss on whole trials, plus the critic's error and the entropy bonus.

    Args:
        policy: the recurrent policy.
        batch: ``[B, L, ...]`` packed trials.
        cfg: clip range and coefficients.

    Returns:
        ``(loss, metrics)``; means over alive steps.
    """
    head, values = policy(batch.inputs)
    log_probs = policy.log_prob(head, batch.actions)
    log_ratio = log_probs - batch.old_log_probs
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)
    surrogate = _masked_mean(
        torch.minimum(ratio * batch.advantages, clipped * batch.advantages), batch.mask
    )
    value_loss = _masked_mean((values - batch.targets).pow(2), batch.mask)
    entropy = _masked_mean(policy.entropy(head), batch.mask)
    loss = -surrogate + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    with torch.no_grad():
        metrics = {
            "policy_loss": -surrogate.detach(),
            "value_loss": value_loss.detach(),
            "entropy": entropy.detach(),
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, batch.mask),
            "clip_fraction": _masked_mean(
                ((ratio - 1.0).abs() > cfg.clip_range).float(), batch.mask
            ),
        }
    return loss, metrics


def trial_metrics(trials: Trials) -> dict[str, float]:
    """``train/return``, ``train/return_ep{k}`` (mean over tasks) and ``adapt/return_gain`` (last
    episode minus first), success likewise, env steps."""
    returns = trials.episode_returns()
    metrics = {"train/return": float(returns.mean()), "train/env_steps": float(trials.mask.sum())}
    for k in range(returns.shape[1]):
        metrics[f"train/return_ep{k}"] = float(returns[:, k].mean())
    # What the trial's experience buys: its last episode against its first (the adaptation).
    metrics["adapt/return_gain"] = float((returns[:, -1] - returns[:, 0]).mean())
    success = trials.success.numpy()
    if not np.isnan(success).all():
        metrics["train/success"] = float(np.nanmean(success))
        for k in range(success.shape[1]):
            metrics[f"train/success_ep{k}"] = float(np.nanmean(success[:, k]))
    return metrics


class RL2:
    """RL² with PPO; see the module docstring.

    Args:
        config: the agent's settings.
        distribution: the task family.
        seed: seeds the initial parameters, the minibatch order and every trial.
    """

    Config = RL2Config
    family = "model-based"
    adaptation_unit = "episode"
    scores_tasks_independently = False

    def __init__(self, config: RL2Config, distribution: TaskDistribution, seed: int) -> None:
        self.config = config
        self.distribution = distribution
        self.seed = int(seed)
        self.device = torch.device(config.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            policy = RecurrentPolicy(
                flat_dim(distribution.observation_space),
                distribution.action_space,
                config.hidden_size,
                config.init_log_std,
            )
        self.policy = policy.to(self.device)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        self.value_moments = RunningMoments()
        self.shuffle_rng = np.random.default_rng([self.seed, 1])
        self.calls = 0
        self.runner = TrialRunner(distribution)

    def _rollout_policy(self) -> RecurrentPolicy:
        """The policy on the CPU for stepping environments (a copy when training elsewhere)."""
        if self.device.type == "cpu":
            return self.policy
        return copy.deepcopy(self.policy).cpu()

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One iteration: a trial per task, then PPO; returns ``train/*`` and ``time/*`` metrics."""
        start = time.perf_counter()
        trials = self.runner.run(
            self._rollout_policy(),
            list(tasks),
            self.config.episodes_per_trial,
            self.seed,
            self.calls,
        )
        self.calls += 1
        sampling_s = time.perf_counter() - start
        metrics = {**trial_metrics(trials), **self._update(self._batch(trials))}
        metrics["time/sampling_s"] = sampling_s
        metrics["time/optimization_s"] = time.perf_counter() - start - sampling_s
        metrics["time/env_steps_per_s"] = metrics["train/env_steps"] / max(sampling_s, 1e-9)
        return metrics

    def _batch(self, trials: Trials) -> PPOBatch:
        """Packs the trials, computes advantages with the current critic and standardised targets."""
        cfg, dev = self.config, self.device
        mask = pack(trials.mask, trials.mask)[1].to(dev)
        inputs, actions, old_log_probs, rewards = (
            pack(x, trials.mask)[0].to(dev)
            for x in (trials.inputs, trials.actions, trials.log_probs, trials.rewards)
        )
        moments = self.value_moments
        with torch.no_grad():
            values = self.policy(inputs)[1] * moments.std + moments.mean
        advantages = trial_gae(rewards, values, mask, cfg.gamma, cfg.gae_lambda)
        returns = advantages + values
        moments.update(returns[mask > 0])
        targets = (returns - moments.mean) / moments.std
        if cfg.normalize_advantages:
            alive = advantages[mask > 0]
            advantages = (advantages - alive.mean()) / (alive.std(unbiased=False) + 1e-8) * mask
        return PPOBatch(inputs, actions, old_log_probs, advantages, targets, mask)

    def _update(self, batch: PPOBatch) -> dict[str, float]:
        """PPO epochs over minibatches of trials; on a NaN everything is put back, then it raises."""
        cfg = self.config
        snapshot = (
            copy.deepcopy(self.policy.state_dict()),
            copy.deepcopy(self.optimizer.state_dict()),
        )
        params = [p for p in self.policy.parameters() if p.requires_grad]
        totals: dict[str, float] = {}
        num_steps = 0
        for _ in range(cfg.num_epochs):
            order = self.shuffle_rng.permutation(batch.mask.shape[0])
            # Fewer tasks than minibatches (a short call) gives one trial per minibatch.
            for rows in np.array_split(order, min(cfg.num_minibatches, len(order))):
                index = torch.as_tensor(rows, device=self.device)
                loss, metrics = ppo_loss(self.policy, PPOBatch(*(x[index] for x in batch)), cfg)
                self._check("PPO loss", loss.detach(), snapshot)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf)
                self._check("gradient norm", norm.detach(), snapshot)
                self.optimizer.step()
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                num_steps += 1
        out = {f"train/{k}": v / num_steps for k, v in totals.items()}
        if not self.policy.discrete:
            out["train/log_std"] = float(self.policy.log_std.detach().mean())
        return out

    def _check(self, name: str, value: torch.Tensor, snapshot: tuple[dict, dict]) -> None:
        if not bool(torch.isfinite(value).all()):
            self.policy.load_state_dict(snapshot[0])
            self.optimizer.load_state_dict(snapshot[1])
            check_finite(name, value, "lower lr, or check the environment's rewards for NaN/Inf")

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """One trial of ``eval_episodes + 1`` episodes per held-out task from a fresh hidden state.

        Returns:
            ``{"adaptation_steps": [0..N], "return": [num_tasks, N + 1], "success": same or
            None}``: column ``k`` scores episode ``k``, played after ``k`` episodes of experience.
        """
        cfg, seed = self.config, eval_seed(rng)
        policy, chunks = self._rollout_policy(), []
        size = cfg.meta_batch_size  # reuse the training environments, one per lane
        for call, first in enumerate(range(0, len(tasks), size)):
            chunk = list(tasks[first : first + size])
            chunks.append(self.runner.run(policy, chunk, cfg.eval_episodes + 1, seed, call))
        returns = torch.cat([t.episode_returns() for t in chunks]).numpy().astype(np.float64)
        success = torch.cat([t.success for t in chunks]).numpy().astype(np.float64)
        return {
            "adaptation_steps": list(range(cfg.eval_episodes + 1)),
            "return": returns,
            "success": None if np.isnan(success).all() else success,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "policy": {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "value_moments": self.value_moments.state_dict(),
            "shuffle_rng": self.shuffle_rng.bit_generator.state,
            "calls": self.calls,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.value_moments.load_state_dict(state["value_moments"])
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.calls, self.seed = int(state["calls"]), int(state["seed"])

    def adapt(self, task: Task, data: Trials) -> torch.Tensor:
        """RL² adapts in its recurrent state: the GRU state ``[hidden]`` after reading one trial
        ``data`` (a :class:`~metarl.recurrent.Trials` of one task, its live steps in order) from
        a fresh state; the parameters do not change. The state has read every step's input, which
        carries the previous step's action, reward and done flag, so the last step's own action
        and reward are not in it yet: to act on from it, first feed the next observation with
        them (as the trial runner does)."""
        inputs = data.inputs[0][data.mask[0].bool()]  # [L, input_dim]: the steps taken, in order
        with torch.no_grad():
            hidden = self.policy.initial_state(1)
            _, h = self.policy.gru(inputs[None].to(self.device), hidden[None])
        return h[0, 0]

    def close(self) -> None:
        """Closes the environments."""
        self.runner.close()
