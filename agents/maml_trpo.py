"""MAML-TRPO: model-agnostic meta-learning for RL with a TRPO outer loop.

Finn, Abbeel, Levine 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks"
(arXiv 1703.03400), §5.3; TRPO: Schulman et al. 2015 (arXiv 1502.05477).

One meta-iteration on ``N`` tasks:

1. Inner loop (:mod:`metarl.meta_pg`): sample ``E`` episodes per task with the meta-parameters
   θ, fit the linear baseline per task, take ``adapt_steps`` REINFORCE steps θ'_i = θ − α ∇L_i(θ)
   (fresh episodes for every step), then sample ``E`` post-update episodes with θ'_i.
2. Outer loop: maximise the surrogate ``mean_i E[π_θ'_i(θ)(a|s) / π_old(a|s) · A]`` on the
   post-update episodes subject to ``mean_i KL(π_old || π_θ'_i(θ)) ≤ max_kl``: conjugate gradient
   on Hessian-vector products of the KL through the inner update, then a backtracking line search.

The KL Hessian-vector products run through the inner steps without third derivatives
(:mod:`metarl.trust_region`), written out by hand for Gaussian MLP policies
(:mod:`metarl.closed_form`, ``products``); ``hvp_subsample`` < 1 estimates the post-update
policies' Fisher on the first fraction of each task's post-update episodes (TRPO's subsampled
curvature, rllab's ``subsample_factor``). The inner steps' Jacobians in the same products always
use all pre-update episodes: thinning those too adds a few-episode Hessian's noise to them, which
made the predicted KL of a step three times the one reached (and the step a ninth as long) on
halfcheetah-dir.

Defaults follow the MAML paper and its reference implementations (rllab's conjugate-gradient
optimiser, pytorch-maml-rl): inner lr 0.1, max KL 0.01, 10 CG iterations, damping 1e-5,
backtracking ratio 0.8 with up to 15 steps, γ 0.99, λ 1.0, policy (100, 100) ReLU, 20 episodes
per task.

Profile one iteration: ``python -m agents.maml_trpo --profile`` (see :func:`profile`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from envs.base import TaskDistribution
from metarl import closed_form, meta_pg, trust_region
from metarl.agent import Params
from metarl.meta_pg import MetaBatch, PGBatch
from metarl.meta_pg_agent import MetaPolicyGradient
from metarl.meta_pg_config import MetaPGConfig
from metarl.runtime import check_device


@dataclass(frozen=True)
class MAMLTRPOConfig(MetaPGConfig):
    max_kl: float = 0.01
    """Trust-region size: the mean KL between old and new post-update policies may not exceed it."""
    cg_iters: int = 10
    """Conjugate-gradient iterations."""
    cg_damping: float = 1e-5
    """Added to the diagonal of the KL Hessian in conjugate gradient."""
    ls_backtrack_ratio: float = 0.8
    """Line search: step shrink factor per try."""
    ls_max_steps: int = 15
    """Line search: tries before the update is rejected."""
    hvp_subsample: float = 1.0
    """Fraction of each task's post-update episodes on which the KL curvature's Fisher is
    estimated (TRPO's subsampling); the inner steps' Jacobians always use every episode."""
    fisher: str = "gauss-newton"
    """KL curvature products: 'gauss-newton' (Jacobian products of the policy outputs, no double
    backward) or 'hessian' (double backward of the KL); the same products, see trust_region."""
    products: str = "auto"
    """How the inner steps and the curvature products are computed: 'closed-form' (written out
    for Gaussian MLP policies, metarl.closed_form), 'autograd' (a double backward through the
    inner step per product) or 'auto' (the closed form where the policy allows it); the same
    products either way. With fisher = 'hessian' the Fisher stays a double backward; with
    first_order the inner steps' (identity) Jacobians are autograd's and 'closed-form' is refused."""
    device: str = "cpu"
    """Where the meta-update runs ('cpu' or 'cuda'); rollout workers always act on the CPU."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_device(self.device)
        closed_form.chosen(self.products, covered=True)
        if not self.max_kl > 0 or self.cg_damping < 0:
            raise ValueError(
                f"need max_kl > 0 and cg_damping >= 0, got {self.max_kl}, {self.cg_damping}"
            )
        if self.cg_iters < 1 or self.ls_max_steps < 1:
            raise ValueError(
                f"cg_iters and ls_max_steps must be >= 1, got {self.cg_iters}, {self.ls_max_steps}"
            )
        if not 0.0 < self.ls_backtrack_ratio < 1.0:
            raise ValueError(
                f"ls_backtrack_ratio must lie in (0, 1), got {self.ls_backtrack_ratio}"
            )
        if not 0.0 < self.hvp_subsample <= 1.0:
            raise ValueError(f"hvp_subsample must lie in (0, 1], got {self.hvp_subsample}")
        if self.fisher not in ("gauss-newton", "hessian"):
            raise ValueError(f"fisher must be 'gauss-newton' or 'hessian', got {self.fisher!r}")


class TrustRegionTerms(NamedTuple):
    """What one TRPO meta-update is computed from (see :meth:`MAMLTRPO.trust_region_terms`)."""

    adapted: Params
    """Post-update parameters per task, ``[N, *P]``."""
    old_log_probs: torch.Tensor
    """Log-probabilities of the post-update actions under ``adapted``, detached, ``[N, E, T]``."""
    surrogate: torch.Tensor
    """The surrogate objective at the current parameters (a scalar)."""
    grad: torch.Tensor
    """Its gradient through the inner step, flat ``[D]``."""
    hvp: Callable[[torch.Tensor], torch.Tensor]
    """``v [D] -> (H + damping I) v`` with ``H`` the mean KL's Hessian through the inner step."""


class MAMLTRPO(MetaPolicyGradient):
    """MAML with a TRPO meta-update; see the module docstring.

    Args:
        config: the agent's settings.
        distribution: the task family; the policy and sampler are built for its spaces.
        seed: seeds the initial parameters and every rollout.
    """

    Config = MAMLTRPOConfig

    def __init__(self, config: MAMLTRPOConfig, distribution: TaskDistribution, seed: int) -> None:
        # θ as plain tensors on the update's device: the TRPO step writes them itself.
        super().__init__(config, distribution, seed, device=config.device, trainable=False)
        self.closed_form = closed_form.chosen(
            config.products,
            closed_form.supported(self.policy, self.inner.lr, self.inner.first_order),
        )

    def trust_region_terms(self, batch: MetaBatch) -> TrustRegionTerms:
        """The surrogate, its meta-gradient and the KL Hessian-vector product at the parameters.

        Everything the TRPO step is made of, through the inner step; ``grad`` is flat ``[D]``
        and ``hvp(v)`` maps a flat ``[D]`` vector to ``[D]`` (damping included).
        """
        cfg, policy, post = self.config, self.policy, batch.post
        num_curvature = max(1, math.ceil(cfg.hvp_subsample * post.mask.shape[1]))
        lin = trust_region.linearize_steps(
            self.inner, self.params, batch.pre, "closed-form" if self.closed_form else "autograd"
        )
        adapted = lin.adapted
        old_log_probs = meta_pg.post_log_probs(policy, adapted, post).detach()
        old_surrogate, grad = trust_region.surrogate_gradient(
            policy, adapted, old_log_probs, post, lin.vjps
        )
        curvature_post = PGBatch(*(t[:, :num_curvature] for t in post))
        if cfg.fisher == "gauss-newton":
            hvp = trust_region.kl_fvp(
                policy, self.inner, lin, curvature_post, cfg.cg_damping, products=cfg.products
            )
        else:
            hvp = trust_region.kl_hvp(
                policy, adapted, curvature_post, lin.vjps, cfg.cg_damping
            )
        return TrustRegionTerms(adapted, old_log_probs, old_surrogate, grad, hvp)

    def _update(self, batch: MetaBatch) -> dict[str, float]:
        """The TRPO meta-update; parameters change only if the line search accepts a step."""
        cfg = self.config
        hint = "lower inner_lr or max_kl, or check the rewards for NaN"
        clock = time.perf_counter()
        adapted, old_log_probs, old_surrogate, grad, hvp = self.trust_region_terms(batch)
        meta_pg.check_finite("surrogate", old_surrogate, hint)
        meta_pg.check_finite("meta-gradient", grad, hint)
        # gradient_s holds the meta-gradient and the KL gradient graph; the Hessian-vector
        # products themselves run inside conjugate gradient and count as cg_s.
        gradient_s, clock = time.perf_counter() - clock, time.perf_counter()
        direction = trust_region.conjugate_gradient(hvp, grad, cfg.cg_iters)
        curvature = direction.dot(hvp(direction))
        meta_pg.check_finite("step curvature", curvature, hint)
        full_step = direction * torch.sqrt(2.0 * cfg.max_kl / curvature.clamp(min=1e-12))
        cg_s, clock = time.perf_counter() - clock, time.perf_counter()
        metrics = self._line_search(batch, adapted, old_log_probs, float(old_surrogate), full_step)
        return metrics | {
            "train/surrogate_before": float(old_surrogate),
            "train/grad_norm": float(grad.norm()),
            "time/gradient_s": gradient_s,
            "time/cg_s": cg_s,
            "time/line_search_s": time.perf_counter() - clock,
        }

    def _line_search(
        self,
        batch: MetaBatch,
        old: Params,
        old_log_probs: torch.Tensor,
        old_surrogate: float,
        full_step: torch.Tensor,
    ) -> dict[str, float]:
        """Backtracks from ``full_step`` until the surrogate improves and the KL is within bounds."""
        cfg, policy, post = self.config, self.policy, batch.post
        steps = trust_region.unflatten(full_step, self.params)
        inner = self.inner._replace(first_order=True)
        new_surrogate, kl = old_surrogate, 0.0
        for i in range(cfg.ls_max_steps):
            fraction = cfg.ls_backtrack_ratio**i
            candidate = {k: v + fraction * steps[k] for k, v in self.params.items()}
            with torch.no_grad():
                # The closed-form inner steps where the old point took them, so that the
                # surrogate and the KL compare like with like (autograd's steps differ from them
                # by rounding); the autograd route's first-order steps equal its own.
                if self.closed_form:
                    adapted = trust_region.linearize_steps(
                        self.inner, candidate, batch.pre, "closed-form"
                    ).adapted
                else:
                    adapted = meta_pg.adapt_tasks(inner, candidate, batch.pre)
                value = float(trust_region.surrogate(policy, adapted, old_log_probs, post))
                kl_value = float(meta_pg.mean_kl(policy, old, adapted, post))
            if (
                math.isfinite(value)
                and math.isfinite(kl_value)
                and value > old_surrogate
                and kl_value <= cfg.max_kl
            ):
                self.params = {k: v.detach() for k, v in candidate.items()}
                new_surrogate, kl = value, kl_value
                return {
                    "train/surrogate": new_surrogate,
                    "train/kl": kl,
                    "train/ls_steps": float(i),
                    "train/accepted": 1.0,
                    "train/step_fraction": fraction,
                }
        return {
            "train/surrogate": new_surrogate,
            "train/kl": kl,
            "train/ls_steps": float(cfg.ls_max_steps),
            "train/accepted": 0.0,
            "train/step_fraction": 0.0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = {k: v.to(self.device).clone() for k, v in state["params"].items()}
        self.sampler.load_state_dict(state["sampler"])
        self.baseline.load_state_dict(state["baseline"])


def profile(
    task_name: str = "halfcheetah-vel",
    num_iterations: int = 2,
    **overrides: Any,
) -> dict[str, Any]:
    """Times sampling against optimisation for MAML-TRPO iterations (paper-sized by default).

    Args:
        task_name: the task family (``envs.make`` name).
        num_iterations: iterations to run; the first includes building workers and environments,
            so the summary reports the last one.
        **overrides: :class:`MAMLTRPOConfig` fields (default: 40 tasks × 20 episodes, process
            backend with 2 workers).

    Returns:
        Per-iteration ``sampling_s``, ``optimization_s`` (everything outside the sampler),
        ``update_s`` (the TRPO step alone) and the last iteration's optimisation / sampling ratio.
    """
    import envs

    settings: dict[str, Any] = {
        "meta_batch_size": 40,
        "episodes_per_task": 20,
        "backend": "process",
        "num_workers": 2,
        "envs_per_worker": 20,
    }
    config = MAMLTRPOConfig(**(settings | overrides))
    distribution = envs.make(task_name)
    agent = MAMLTRPO(config, distribution, seed=0)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for _ in range(num_iterations):
            m = agent.step(distribution.sample(config.meta_batch_size, rng))
            rows.append(
                {
                    k.removeprefix("time/"): round(v, 3)
                    for k, v in m.items()
                    if k.startswith("time/")
                }
            )
    finally:
        agent.close()
    last = rows[-1]
    return {
        "task": task_name,
        "config": {k: getattr(config, k) for k in settings | overrides},
        "iterations": rows,
        "optimization_over_sampling": round(last["optimization_s"] / last["sampling_s"], 4),
        "torch_threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="MAML-TRPO utilities.")
    parser.add_argument(
        "--profile", action="store_true", help="time sampling vs optimisation; prints JSON"
    )
    parser.add_argument("--task", default="halfcheetah-vel")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--meta-batch-size", type=int, default=40)
    parser.add_argument("--episodes-per-task", type=int, default=20)
    parser.add_argument("--hvp-subsample", type=float, default=1.0)
    args = parser.parse_args()
    if not args.profile:
        parser.error("nothing to do: pass --profile")
    print(
        json.dumps(
            profile(
                args.task,
                args.iterations,
                meta_batch_size=args.meta_batch_size,
                episodes_per_task=args.episodes_per_task,
                envs_per_worker=args.episodes_per_task,
                hvp_subsample=args.hvp_subsample,
            )
        )
    )
