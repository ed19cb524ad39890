"""MAML-PPO: model-agnostic meta-learning for RL with a clipped-surrogate (PPO) outer loop.

The inner loop is MAML-TRPO's (:mod:`metarl.meta_pg`): ``adapt_steps`` REINFORCE steps with the
linear baseline's advantages, each on fresh episodes. The outer loop replaces TRPO's constrained
step with ``num_epochs`` Adam steps on PPO's clipped objective (Schulman et al. 2017, arXiv
1707.06347) over every task's post-update episodes:

    L(θ) = mean_i E[min(r_i(θ) A, clip(r_i(θ), 1 − ε, 1 + ε) A)],
    r_i(θ) = π_θ'_i(θ)(a|s) / π_old(a|s),

re-running the (differentiable) inner steps from the current θ at every epoch, on the same
pre-update episodes.

Defaults: inner lr 0.1, outer lr 1e-3 (Adam) and clip range 0.5 as garage's ``MAMLPPO``
(``lr_clip_range=5e-1``); 5 outer epochs as ProMP's PPO steps (Rothfuss et al. 2019, arXiv
1810.06784; garage takes a single Adam step per iteration).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl import meta_pg
from metarl.adaptation import Params
from metarl.baselines import make_baseline
from metarl.meta_pg import InnerLoop, MetaBatch, PGBatch
from metarl.meta_pg_config import MetaPGConfig
from metarl.runtime import tune_allocator
from metarl.types import Trajectories


@dataclass(frozen=True)
class MAMLPPOConfig(MetaPGConfig):
    outer_lr: float = 1e-3
    """Adam step size of the outer loop."""
    clip_range: float = 0.5
    """PPO's ε: the probability ratio is clipped to [1 − ε, 1 + ε]."""
    num_epochs: int = 5
    """Full-batch Adam steps on the clipped objective per meta-iteration."""

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


def clipped_objective(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, batch: PGBatch, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate and the fraction of alive steps whose ratio was clipped.

    Args:
        log_probs: ``[N, E, T]`` under the current post-update parameters.
        old_log_probs: ``[N, E, T]`` under the sampling parameters.
        batch: the post-update batch (advantages and mask ``[N, E, T]``).
        clip_range: ε.

    Returns:
        ``(objective, clip_fraction)``, scalars; the objective is a mean over tasks.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    objective = torch.minimum(ratio * batch.advantages, clipped * batch.advantages)
    fraction = meta_pg.task_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), batch.mask)
    return meta_pg.task_mean(objective, batch.mask), fraction.detach()


class MAMLPPO:
    """MAML with a clipped-surrogate meta-update; see the module docstring.

    Args:
        config: the agent's settings.
        distribution: the task family; the policy and sampler are built for its spaces.
        seed: seeds the initial parameters and every rollout.
    """

    Config = MAMLPPOConfig
    family = "gradient"
    adaptation_unit = "policy-gradient step"
    scores_tasks_independently = False

    def __init__(self, config: MAMLPPOConfig, distribution: TaskDistribution, seed: int) -> None:
        tune_allocator()  # large activations are reused instead of re-faulted every update
        self.config = config
        self.distribution = distribution
        self.policy = meta_pg.make_agent_policy(config, distribution)
        self.params: Params = {
            k: v.requires_grad_() for k, v in self.policy.init_params(seed).items()
        }
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.outer_lr)
        self.inner = InnerLoop(self.policy, config.inner_lr, config.first_order)
        self.baseline = make_baseline(config.baseline, self.policy.obs_dim, seed)
        self.sampler = meta_pg.make_agent_sampler(config, distribution, seed)

    def _advantages(self, trajectories: Trajectories) -> PGBatch:
        cfg = self.config
        return meta_pg.pg_batch(
            trajectories, self.baseline, cfg.gamma, cfg.gae_lambda, cfg.normalize_advantages
        )

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns ``train/*`` and ``time/*`` metrics."""
        start = time.perf_counter()
        batch = meta_pg.collect(
            self.sampler,
            self.inner,
            self.params,
            tasks,
            self.config.episodes_per_task,
            self.config.adapt_steps,
            self._advantages,
        )
        metrics = meta_pg.trajectory_metrics(batch)
        metrics |= meta_pg.adaptation_metrics(self.policy, self.params, batch)
        metrics |= self._update(batch)
        total = time.perf_counter() - start
        metrics["time/sampling_s"] = batch.sampling_s
        metrics["time/optimization_s"] = total - batch.sampling_s
        metrics["time/env_steps_per_s"] = metrics["train/env_steps"] / max(batch.sampling_s, 1e-9)
        return metrics

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
            adapted = meta_pg.adapt_tasks(self.inner, self.params, batch.pre)
            log_probs = meta_pg.post_log_probs(policy, adapted, post)
            objective, clip_fraction = clipped_objective(
                log_probs, old_log_probs, post, cfg.clip_range
            )
            if not bool(torch.isfinite(objective)):
                self._restore(*snapshot)
                meta_pg.check_finite(
                    "clipped objective", objective.detach(), "lower inner_lr or outer_lr"
                )
            self.optimizer.zero_grad(set_to_none=True)
            (-objective).backward()
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

    def _restore(self, params: Params, optimizer_state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(params[k])
        self.optimizer.load_state_dict(optimizer_state)

    def adapt(self, task: Task, trajectories: Trajectories, params: Params | None = None) -> Params:
        """One inner step on one task's ``trajectories`` (``[1, E, T, ...]``) from ``params`` (θ by default)."""
        del task  # the data carries everything the inner step needs
        start = {k: v.detach() for k, v in (self.params if params is None else params).items()}
        batch = self._advantages(trajectories)
        adapted = meta_pg.inner_step(
            self.inner._replace(first_order=True), start, batch, shared=True
        )
        return {k: v[0].detach() for k, v in adapted.items()}

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Return and success per held-out task after 0..``eval_adapt_steps`` inner steps."""
        cfg = self.config
        baseline = copy.deepcopy(self.baseline)

        def advantages(t: Trajectories) -> PGBatch:
            return meta_pg.pg_batch(
                t, baseline, cfg.gamma, cfg.gae_lambda, cfg.normalize_advantages
            )

        params = {k: v.detach() for k, v in self.params.items()}
        with meta_pg.make_agent_sampler(cfg, self.distribution, meta_pg.eval_seed(rng)) as sampler:
            return meta_pg.evaluate_adaptation(
                sampler,
                self.inner,
                params,
                list(tasks),
                cfg.eval_adapt_steps,
                cfg.eval_episodes_per_task,
                advantages,
            )

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

    def close(self) -> None:
        """Stops the rollout workers."""
        self.sampler.close()
