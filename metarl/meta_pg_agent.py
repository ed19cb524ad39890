"""The loop MAML-TRPO, MAML-PPO and meta-adversarial imitation share; each differs in its update.

:class:`MetaPolicyGradient` holds the policy, the meta-parameters θ, the inner loop (one
policy-gradient step per adaptation step, :class:`~metarl.meta_pg.InnerLoop`), the baseline and
the rollout sampler, and gives the agents of ``agents/`` their advantages, one meta-iteration
(sample pre-update episodes, adapt, sample post-update episodes, then the subclass's
:meth:`MetaPolicyGradient._update`), adaptation to one task, held-out evaluation, timing and
closing. A subclass sets ``Config`` and writes ``_update(batch) -> metrics`` (TRPO's trust-region
step, PPO's clipped epochs); meta-imitation, whose inner step first adapts a discriminator,
overrides the loop too and keeps the rest. One level of inheritance, no agent imports another.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl import meta_pg
from metarl.agent import EvalResult, Params
from metarl.baselines import make_baseline
from metarl.meta_pg import InnerLoop, MetaBatch, PGBatch
from metarl.runtime import on_device, tune_allocator
from metarl.types import Trajectories


class MetaPolicyGradient:
    """θ, the inner loop, the sampler and the meta-iteration of MAML-style policy-gradient agents.

    Args:
        config: a :class:`~metarl.meta_pg_config.MetaPGConfig` (or an extension of it).
        distribution: the task family; the policy and sampler are built for its spaces.
        seed: seeds the initial parameters, the baseline and every rollout.
        device: where θ, the adapted parameters and the update live (rollouts stay on the CPU).
        trainable: θ as leaf tensors that require grad (for a torch optimiser) rather than
            plain tensors updated in place by the subclass (TRPO).
        first_order: the inner loop's setting; the config's ``first_order`` by default.
    """

    family = "gradient"
    adaptation_unit = "policy-gradient step"
    scores_tasks_independently = False

    def __init__(
        self,
        config: Any,
        distribution: TaskDistribution,
        seed: int,
        device: str = "cpu",
        trainable: bool = True,
        first_order: bool | None = None,
    ) -> None:
        tune_allocator()  # large activations are reused instead of re-faulted every update
        self.config = config
        self.distribution = distribution
        self.seed = seed
        self.device = torch.device(device)
        self.policy = meta_pg.make_agent_policy(config, distribution)
        initial = self.policy.init_params(seed)
        self.params: Params = (
            {k: v.requires_grad_() for k, v in initial.items()}
            if trainable
            else {k: v.to(self.device) for k, v in initial.items()}
        )
        self.inner = InnerLoop(
            self.policy, config.inner_lr, config.first_order if first_order is None else first_order
        )
        self.baseline = make_baseline(config.baseline, self.policy.obs_dim, seed)
        self.sampler = meta_pg.make_agent_sampler(config, distribution, seed)

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def _advantages(self, trajectories: Trajectories, baseline: Any = None) -> PGBatch:
        """GAE advantages of ``trajectories`` ``[N, E, T, ...]`` under ``baseline`` (the agent's)."""
        cfg = self.config
        return meta_pg.pg_batch(
            trajectories,
            self.baseline if baseline is None else baseline,
            cfg.gamma,
            cfg.gae_lambda,
            cfg.normalize_advantages,
            cfg.bootstrap_truncated,
        )

    def _update(self, batch: MetaBatch) -> dict[str, float]:
        """The outer update of θ from a meta-batch; returns ``train/*`` metrics."""
        raise NotImplementedError(f"{type(self).__name__} must define its outer update _update(batch)")

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns ``train/*``, ``adapt/*`` and ``time/*`` metrics."""
        start = time.perf_counter()
        batch = meta_pg.collect(
            self.sampler,
            self.inner,
            self.params,
            tasks,
            self.config.episodes_per_task,
            self.config.adapt_steps,
            self._advantages,
            self.device,
        )
        # Per-task post-update returns [N], for wrappers that choose tasks (the task generator).
        self.last_post_returns = batch.trajectories[-1].episode_returns().mean(1)
        update_start = time.perf_counter()
        metrics = meta_pg.trajectory_metrics(batch)
        metrics |= meta_pg.adaptation_metrics(self.policy, self.params, batch)
        metrics |= self._update(batch)
        metrics["time/update_s"] = time.perf_counter() - update_start
        metrics |= step_timing(start, batch.sampling_s, metrics["train/env_steps"])
        metrics["time/inner_s"] = metrics["time/optimization_s"] - metrics["time/update_s"]
        return metrics

    def adapt(self, task: Task, trajectories: Trajectories, params: Params | None = None) -> Params:
        """One inner step on one task's ``trajectories`` (``[1, E, T, ...]``) from ``params`` (θ by default)."""
        del task  # the data carries everything the inner step needs
        source = self.params if params is None else params
        start = {k: v.detach().to(self.device) for k, v in source.items()}
        batch = on_device(self._advantages(trajectories), self.device)
        adapted = meta_pg.inner_step(self.inner._replace(first_order=True), start, batch, shared=True)
        return {k: v[0].detach().cpu() for k, v in adapted.items()}

    def training_call_episodes(self) -> int:
        """Episodes of one training sampler call: the meta-batch's tasks × ``episodes_per_task``."""
        return self.config.meta_batch_size * self.config.episodes_per_task

    def evaluate(
        self,
        tasks: list[Task],
        rng: np.random.Generator,
        distribution: TaskDistribution | None = None,
    ) -> EvalResult:
        """Return and success per held-out task after 0..``eval_adapt_steps`` inner steps.

        ``distribution`` replaces the training family's environments (e.g. the same family under
        robustness wrappers, :class:`envs.wrappers.Perturbed`).
        """
        cfg = self.config
        baseline = copy.deepcopy(self.baseline)  # evaluation fits a copy, never the agent's own

        def advantages(t: Trajectories) -> PGBatch:
            return self._advantages(t, baseline)

        params = {k: v.detach() for k, v in self.params.items()}
        family = self.distribution if distribution is None else distribution
        call = self.training_call_episodes()  # bounds the environments kept
        with meta_pg.make_agent_sampler(cfg, family, meta_pg.eval_seed(rng), call) as sampler:
            return meta_pg.evaluate_adaptation(
                sampler,
                self.inner,
                params,
                list(tasks),
                cfg.eval_adapt_steps,
                cfg.eval_episodes_per_task,
                advantages,
                self.device,
                cfg.eval_later_lr or None,
            )

    def close(self) -> None:
        """Stops the rollout workers."""
        self.sampler.close()


def step_timing(start: float, sampling_s: float, env_steps: float) -> dict[str, float]:
    """``time/sampling_s``, ``time/optimization_s`` (the rest since ``start``) and env steps/s."""
    return {
        "time/sampling_s": sampling_s,
        "time/optimization_s": time.perf_counter() - start - sampling_s,
        "time/env_steps_per_s": env_steps / max(sampling_s, 1e-9),
    }
