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

The clip bounds nothing once a step has pushed the ratios out of the clip range: there the
clipped objective has no gradient, so a policy thrown far off cannot come back. On
halfcheetah-vel one meta-update did that after 387 good iterations (the adapted policies' mean KL
to the sampling ones 1294 where it is usually 0.02 to 0.05; clip fraction near 1.0 from then on,
the held-out return down to about a random policy's). ``max_update_kl`` undoes such an update: a
meta-update whose adapted policies end further than it from the sampling ones (mean KL over
tasks and steps) is taken again epoch by epoch and stops before the epoch that crosses it.
"""

from __future__ import annotations

import copy
import warnings
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

    max_update_kl: float | None = 1.0
    """Largest mean KL of the adapted policies to the sampling ones that a meta-update may reach;
    an update past it keeps only its epochs before the crossing (none: the iteration changes
    nothing). The usual update moves them by about 0.02 to 0.05. None: no limit."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_update_kl is not None and not self.max_update_kl > 0:
            raise ValueError(f"max_update_kl must be > 0 or None, got {self.max_update_kl}")
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
        self._warned_kl = False
        self.closed_form = closed_form.chosen(
            config.products,
            closed_form.supported(self.policy, self.inner.lr, self.inner.first_order),
        )

    def _update(self, batch: MetaBatch) -> dict[str, float]:
        """``num_epochs`` Adam steps; on a NaN the parameters and optimiser are put back, then it
        raises. An update past ``max_update_kl`` is taken again epoch by epoch and stops before
        the epoch that crosses it (``train/epochs_kept``)."""
        cfg, policy, post = self.config, self.policy, batch.post
        detached = {k: v.detach() for k, v in self.params.items()}
        with torch.no_grad():
            old = meta_pg.adapt_tasks(self.inner._replace(first_order=True), detached, batch.pre)
            old_log_probs = meta_pg.post_log_probs(policy, old, post)
        snapshot = self._snapshot()
        clip_fraction = torch.zeros(())
        for _ in range(cfg.num_epochs):
            clip_fraction = self._epoch(batch, old_log_probs, snapshot)
        final, kl = self._measure(batch, old, old_log_probs)
        kept = cfg.num_epochs
        limit = cfg.max_update_kl
        if limit is not None and not float(kl) <= limit:
            crossed = float(kl)
            self._restore(*snapshot)
            final, kl = self._measure(batch, old, old_log_probs)
            kept, clip_fraction = 0, torch.zeros(())  # no epoch kept: every ratio is 1
            for _ in range(cfg.num_epochs):
                before = self._snapshot()
                fraction = self._epoch(batch, old_log_probs, snapshot)
                objective, reached = self._measure(batch, old, old_log_probs)
                if not float(reached) <= limit:
                    self._restore(*before)
                    break
                final, kl, kept, clip_fraction = objective, reached, kept + 1, fraction
            if not self._warned_kl:
                self._warned_kl = True
                warnings.warn(
                    f"a meta-update moved the adapted policies by a mean KL of {crossed:.3g}, past "
                    f"agent.max_update_kl={limit}; it kept {kept} of {cfg.num_epochs} epochs "
                    f"(train/epochs_kept in metrics.jsonl). If this repeats, lower agent.outer_lr.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return {
            "train/surrogate": float(final),
            "train/kl": float(kl),
            "train/clip_fraction": float(clip_fraction),
            "train/epochs_kept": float(kept),
        }

    def _snapshot(self) -> tuple[Params, dict[str, Any]]:
        params = {k: v.detach().clone() for k, v in self.params.items()}
        return params, copy.deepcopy(self.optimizer.state_dict())

    def _epoch(
        self, batch: MetaBatch, old_log_probs: torch.Tensor, snapshot: tuple[Params, dict[str, Any]]
    ) -> torch.Tensor:
        """One Adam step on the clipped objective; its clip fraction. On a NaN objective the
        update's ``snapshot`` is put back, then it raises."""
        objective, clip_fraction, grads = self.objective_gradient(batch, old_log_probs)
        if not bool(torch.isfinite(objective)):
            self._restore(*snapshot)
            meta_pg.check_finite("clipped objective", objective, "lower inner_lr or outer_lr")
        for k, v in self.params.items():
            v.grad = grads[k]
        self.optimizer.step()
        return clip_fraction

    def _measure(
        self, batch: MetaBatch, old: Params, old_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipped objective at the current parameters and the mean KL of their adapted
        policies to the sampling ones ``old``."""
        with torch.no_grad():
            new = meta_pg.adapt_tasks(self.inner._replace(first_order=True), self.params, batch.pre)
            final, _ = clipped_objective(
                meta_pg.post_log_probs(self.policy, new, batch.post), old_log_probs, batch.post,
                self.config.clip_range,
            )
            return final, meta_pg.mean_kl(self.policy, old, new, batch.post)

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
