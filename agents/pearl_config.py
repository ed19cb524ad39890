"""Settings of the PEARL agent (:mod:`agents.pearl`), with their defaults and checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from metarl.config import require_at_least
from metarl.runtime import check_device


@dataclass(frozen=True)
class PEARLConfig:
    meta_batch_size: int = 16
    """Tasks per gradient step; also the tasks the runner samples per iteration (Meta-World paper: 16 / 10 / 45)."""
    num_collect_tasks: int = 5
    """How many of the iteration's tasks collect new data (0: all); the paper's num_tasks_sample = 5."""
    num_prior_episodes: int = 2
    """Episodes per collecting task with z from the prior; they refill the task's encoder buffer."""
    num_posterior_episodes: int = 3
    """Episodes per collecting task with z from the posterior on its encoder buffer (replay buffer only)."""
    num_train_steps: int = 2000
    """Gradient steps per iteration (the paper: 2000 on the MuJoCo tasks)."""
    batch_size: int = 256
    """SAC transitions per task per gradient step."""
    context_batch_size: int = 100
    """Context transitions per task from which the encoder infers z during training."""
    use_next_obs_in_context: bool = False
    """The encoder reads ``(s, a, r, s')`` instead of ``(s, a, r)`` (off in oyster and garage)."""
    num_initial_episodes: int = 0
    """Before the first gradient step, prior episodes on every one of the distribution's
    ``train_tasks()`` (oyster's and garage's ``num_initial_steps``); 0: none."""
    latent_dim: int = 5
    """Size of z (the paper: 5; Meta-World: 7)."""
    kl_weight: float = 0.1
    """Weight β of KL(q(z|c) || N(0, I)), summed over the meta-batch (as oyster and garage)."""
    hidden_sizes: tuple[int, ...] = (300, 300, 300)
    """Hidden widths of the policy and of each critic."""
    encoder_hidden_sizes: tuple[int, ...] = (200, 200, 200)
    """Hidden widths of the context encoder."""
    policy_lr: float = 3e-4
    """Adam step size of the policy."""
    q_lr: float = 3e-4
    """Adam step size of the critics."""
    encoder_lr: float = 3e-4
    """Adam step size of the context encoder."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak rate of the target critics (updated every gradient step)."""
    reward_scale: float = 5.0
    """Rewards are multiplied by this in the critic target (not in the context); the paper: 5, Meta-World: 10,000."""
    alpha: float = 1.0
    """Entropy temperature α (fixed), or its initial value with auto_entropy."""
    auto_entropy: bool = False
    """Tune α by gradient towards the target entropy −act_dim (off in the paper)."""
    policy_reg: float = 1e-3
    """Weight of the policy's mean² and log-std² penalties (the paper's code: 1e-3)."""
    replay_capacity: int = 1_000_000
    """Transitions kept per task (oldest overwritten)."""
    max_replay_tasks: int = 200
    """Per-task buffers kept; past it the task collected least recently is dropped."""
    backend: Literal["serial", "process", "ray"] = "serial"
    """Rollout backend."""
    num_workers: int = 1
    """Rollout worker processes or actors (process and ray backends)."""
    envs_per_worker: int = 0
    """Environments each worker keeps; 0 keeps one per episode of its share."""
    horizon: int = 0
    """Steps per episode; 0 uses the task distribution's horizon."""
    eval_adapt_steps: int = 2
    """Posterior updates at evaluation: episodes 0..N are scored, episode k uses the context of 0..k-1."""
    eval_episodes_per_task: int = 1
    """Independent adaptation runs per held-out task (each its own posteriors), averaged."""
    eval_deterministic: bool = True
    """Act with the mean action at evaluation (z is still sampled from the posterior)."""
    device: str = "cpu"
    """Where the encoder, critics and policy train ('cpu' or 'cuda'); rollouts always run on the CPU."""

    def __post_init__(self) -> None:
        positive = (
            "meta_batch_size",
            "num_prior_episodes",
            "num_train_steps",
            "batch_size",
            "context_batch_size",
            "latent_dim",
            "replay_capacity",
            "max_replay_tasks",
            "num_workers",
            "eval_episodes_per_task",
        )
        require_at_least(self, positive)
        check_device(self.device)
        for name in (
            "num_collect_tasks",
            "num_posterior_episodes",
            "num_initial_episodes",
            "envs_per_worker",
            "horizon",
            "eval_adapt_steps",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_collect_tasks > self.meta_batch_size:
            raise ValueError(
                f"num_collect_tasks={self.num_collect_tasks} exceeds meta_batch_size="
                f"{self.meta_batch_size}: tasks are collected from the iteration's meta-batch"
            )
        for name in ("policy_lr", "q_lr", "encoder_lr", "reward_scale"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")
        for name in ("kl_weight", "alpha", "policy_reg"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise ValueError(f"{name} must be finite and >= 0, got {getattr(self, name)}")
        if self.auto_entropy and not self.alpha > 0:
            raise ValueError("auto_entropy tunes log α, so alpha (its initial value) must be > 0")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 < self.tau <= 1.0:
            raise ValueError(
                f"need gamma in [0, 1] and tau in (0, 1], got {self.gamma}, {self.tau}"
            )
        for name in ("hidden_sizes", "encoder_hidden_sizes"):
            sizes = getattr(self, name)
            if not sizes or min(sizes) < 1:
                raise ValueError(
                    f"{name} must be positive widths, e.g. [300, 300, 300], got {sizes}"
                )
