"""Settings every meta-policy-gradient agent shares (MAML-TRPO, MAML-PPO, meta-adversarial
imitation): the task batch, the inner policy-gradient loop, the policy network, the rollouts and the
held-out evaluation. Each agent's config extends :class:`MetaPGConfig` with its outer loop."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class MetaPGConfig:
    meta_batch_size: int = 40
    """Tasks per meta-iteration (MAML paper: 20 for 2D navigation, 40 for locomotion)."""
    episodes_per_task: int = 20
    """Episodes sampled per task for each inner step and for the post-update batch."""
    adapt_steps: int = 1
    """Inner policy-gradient steps during meta-training, each on freshly sampled episodes."""
    inner_lr: float = 0.1
    """Inner SGD step size α of the policy."""
    first_order: bool = False
    """Treat the inner gradients as constants (first-order MAML)."""
    gamma: float = 0.99
    """Discount factor."""
    gae_lambda: float = 1.0
    """GAE's λ (1.0: Monte-Carlo returns minus the baseline)."""
    normalize_advantages: bool = True
    """Standardise each task's advantages over its alive steps."""
    baseline: Literal["linear", "mlp"] = "linear"
    """State-value baseline: the paper's per-task linear feature baseline, or a shared small MLP."""
    hidden_sizes: tuple[int, ...] = (100, 100)
    """Widths of the policy's hidden layers."""
    activation: Literal["relu", "tanh"] = "relu"
    """Hidden activation of the policy."""
    init_log_std: float = 0.0
    """Initial log standard deviation of a Gaussian policy."""
    output_init_scale: float = 0.01
    """Factor on the policy's output-layer initial weights (0.01: near-zero first actions, as
    ProMP and garage; 1.0: plain Glorot, as the MAML paper's rllab policy)."""
    bootstrap_truncated: bool = True
    """Add the baseline's value of an episode's last observation at the horizon (False: 0, as
    rllab's and the MAML paper's sampler)."""
    backend: Literal["serial", "process", "ray"] = "serial"
    """Rollout backend."""
    num_workers: int = 1
    """Rollout worker processes or actors (process and ray backends)."""
    envs_per_worker: int = 0
    """Environments each worker keeps; 0 keeps one per episode of its share."""
    horizon: int = 0
    """Steps per episode; 0 uses the task distribution's horizon."""
    eval_adapt_steps: int = 3
    """Inner steps scored at evaluation (each on episodes sampled with the latest parameters)."""
    eval_episodes_per_task: int = 20
    """Episodes per held-out task for each evaluation step."""
    eval_later_lr: float = 0.0
    """Step size of every evaluation inner step after the first (0: ``inner_lr``). The MAML
    paper scores steps 2 and 3 with half its step size (0.1, then 0.05)."""

    def __post_init__(self) -> None:
        positive = (
            "meta_batch_size",
            "episodes_per_task",
            "adapt_steps",
            "num_workers",
            "eval_episodes_per_task",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("horizon", "envs_per_worker", "eval_adapt_steps"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"{name} must be >= 0 (0 means the default), got {getattr(self, name)}"
                )
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        if not (self.eval_later_lr >= 0 and math.isfinite(self.eval_later_lr)):
            raise ValueError(f"eval_later_lr must be >= 0 (0: inner_lr), got {self.eval_later_lr}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.gae_lambda <= 1.0:
            raise ValueError(
                f"gamma and gae_lambda must lie in [0, 1], got {self.gamma}, {self.gae_lambda}"
            )
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(
                f"hidden_sizes must be positive widths, e.g. [100, 100], got {self.hidden_sizes}"
            )
        if not math.isfinite(self.init_log_std):
            raise ValueError(f"init_log_std must be finite, got {self.init_log_std}")
        if not (self.output_init_scale > 0 and math.isfinite(self.output_init_scale)):
            raise ValueError(
                f"output_init_scale must be a positive factor (0.01 or 1.0), got {self.output_init_scale}"
            )
