"""MAML-PPO: model-agnostic meta-learning for RL with a clipped-surrogate (PPO) outer loop.

The inner loop is MAML-TRPO's (:mod:`metarl.meta_pg`): ``adapt_steps`` REINFORCE steps with the
linear baseline's advantages, each on fresh episodes. The outer loop replaces TRPO's constrained
step with ``num_epochs`` Adam steps on PPO's clipped objective (Schulman et al. 2017, arXiv
1707.06347) over every task's post-update episodes:

    L(θ) = mean_i E[min(r_i(θ) A, clip(r_i(θ), 1 − ε, 1 + ε) A)],
    r_i(θ) = π_θ'_i(θ)(a|s) / π_old(a|s),

re-running the (differentiable) inner steps from the current θ at every epoch, on the same
pre-update episodes. The meta-gradient through them is written out by hand for Gaussian MLP
policies (:mod:`metarl.closed_form`, ``products``) instead of autograd's double backward.

Defaults: inner lr 0.1, outer lr 1e-3 (Adam) and clip range 0.5 as garage's ``MAMLPPO``
(``lr_clip_range=5e-1``); 5 outer epochs as ProMP's PPO steps (Rothfuss et al. 2019, arXiv
1810.06784; garage takes a single Adam step per iteration).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from envs.base import TaskDistribution
from metarl import closed_form, meta_pg, trust_region
from metarl.agent import Params
from metarl.meta_pg import MetaBatch, clipped_objective
from metarl.meta_pg_agent import MetaPolicyGradient
from metarl.meta_pg_config import MetaPGConfig


@dataclass(frozen=True)
class MAMLPPOConfig(MetaPGConfig):
    outer_lr: float = 1e-3
    """Adam step size of the outer loop."""
    clip_range: float = 0.5
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]."""
    num_epochs: int = 5
    """Full-batch Adam steps on the clipped objective per meta-iteration."""
    products: str = "auto"
    """How the meta-gradient passes through the inner steps: 'closed-form' (written out for
    Gaussian MLP policies, metarl.closed_form), 'autograd' (a double backward) or 'auto' (the
    closed form where the policy allows it); the same gradient either way."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.outer_lr > 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if not 0.0 < self.clip_range < 1.0:
            raise ValueError(
                f"clip_range must lie in (0, 1), got {self.clip_range} (garage uses 0.5, PPO 0.2)"
            )
        if self.num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {self.num_epochs}")
        closed_form.chosen(self.products, covered=True)


class MAMLPPO(MetaPolicyGradient):
    """MAML with a clipped-surrogate meta-update; see the module docstring.

    Args:
        config: the agent's settings.
        distribution: the task family; the policy and sampler are built for its spaces.
        seed: seeds the initial parameters and every rollout.
    """

    Config = MAMLPPOConfig

    def __init__(self, config: MAMLPPOConfig, distribution: TaskDistribution, seed: int) -> None:
        super().__init__(config, distribution, seed)
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.outer_lr)
        self.closed_form = closed_form.chosen(
            config.products,
            closed_form.supported(self.policy, self.inner.lr, self.inner.first_order),
        )

    def _update(self, batch: MetaBatch) -> dict[str, float]:
        """``num_epochs`` Adam steps; on a NaN the parameters and optimiser are put back, then it raises."""
        cfg, policy, post = self.config, self.policy, batch.post
        detached = {k: v.detach() for k, v in self.params.items()}
        with torch.no_grad():
            old = meta_pg.adapt_tasks(self.inner._replace(first_order=True), detached, batch.pre)
            old_log_probs = meta_pg.post_log_probs(policy, old, post)
        snapshot = (
            {k: v.clone() for k, v in detached.items()},
            copy.deepcopy(self.optimizer.state_dict()),
        )
        clip_fraction = torch.zeros(())
        for _ in range(cfg.num_epochs):
            objective, clip_fraction, grads = self.objective_gradient(batch, old_log_probs)
            if not bool(torch.isfinite(objective)):
                self._restore(*snapshot)
                meta_pg.check_finite("clipped objective", objective, "lower inner_lr or outer_lr")
            for k, v in self.params.items():
                v.grad = grads[k]
            self.optimizer.step()
        with torch.no_grad():
            new = meta_pg.adapt_tasks(self.inner._replace(first_order=True), self.params, batch.pre)
            final, _ = clipped_objective(
                meta_pg.post_log_probs(policy, new, post), old_log_probs, post, cfg.clip_range
            )
            kl = meta_pg.mean_kl(policy, old, new, post)
        return {
            "train/surrogate": float(final),
            "train/kl": float(kl),
            "train/clip_fraction": float(clip_fraction),
        }

    def objective_gradient(
        self, batch: MetaBatch, old_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Params]:
        """The clipped objective at the current parameters (detached), its clip fraction, and
        the gradient of its negative in the parameters through the inner steps."""
        cfg, policy, post = self.config, self.policy, batch.post
        if not self.closed_form:
            adapted = meta_pg.adapt_tasks(self.inner, self.params, batch.pre)
            log_probs = meta_pg.post_log_probs(policy, adapted, post)
            objective, fraction = clipped_objective(log_probs, old_log_probs, post, cfg.clip_range)
            grads = torch.autograd.grad(-objective, list(self.params.values()))
            return objective.detach(), fraction, dict(zip(self.params, grads, strict=True))
        detached = {k: v.detach() for k, v in self.params.items()}
        lin = trust_region.linearize_steps(self.inner, detached, batch.pre, "closed-form")

        def loss(leaf: Params) -> tuple[torch.Tensor, torch.Tensor]:
            log_probs = meta_pg.post_log_probs(policy, leaf, post)
            objective, fraction = clipped_objective(log_probs, old_log_probs, post, cfg.clip_range)
            return -objective, fraction

        negative, fraction, grads = trust_region.gradient_through(lin.vjps, lin.adapted, loss)
        return -negative, fraction, grads

    def _restore(self, params: Params, optimizer_state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(params[k])
        self.optimizer.load_state_dict(optimizer_state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restore(state["params"], state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.baseline.load_state_dict(state["baseline"])
