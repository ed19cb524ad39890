# Over 400 lines: the adversarial inner loop (discriminator first, then the policy step on its reward), the evaluation against its BC and GAIL baselines and the demonstrations; the policy-gradient loop it shares is metarl/meta_pg_agent.py, the config meta_imitation_config.py.
"""Meta-adversarial imitation: a policy G and a discriminator D, both meta-learned to adapt fast.

The objective is ``min_θ max_φ Σ_i L(G_θ_i, D_φ_i)`` with ``θ_i, φ_i`` adapted to task ``i``
from ``K`` demonstrations and the policy's own rollouts; no environment reward is used during
adaptation. In the spirit of Meta-AIRL (arXiv 2103.12694), on the one adaptation core.

One meta-iteration on ``N`` tasks (each step vmapped over tasks):

1. Sample ``E`` episodes per task with θ (the pre-update rollouts).
2. Adapt D: ``φ_i = adapt(φ)`` by ``disc_adapt_steps`` SGD steps on the binary cross-entropy of
   the ``K`` support demonstrations (label 1) against the pre-update rollouts (label 0), with a
   gradient penalty (:mod:`metarl.discriminator`).
3. Adapt G: one REINFORCE step on the reward ``log D_φ_i − log(1 − D_φ_i)`` (absorbing states
   handled as in DAC, so ending an episode early is neither free nor punished); repeat 1–3
   ``adapt_steps`` times.
4. Sample post-update episodes with θ_i.
5. Outer loop (first order by default): θ takes ``num_epochs`` Adam steps on PPO's clipped
   surrogate of the post-update episodes scored by D_φ_i; φ takes as many Adam steps on the
   cross-entropy of D_φ_i on held-back query demonstrations against the post-update episodes.
   With ``first_order=False`` both go through their inner updates.

Evaluation on a held-out task with ``K`` demonstrations repeats steps 1–3 ``eval_adapt_steps``
times, reporting the environment's return and success after each; the environment's reward
is read for scoring only.

A GAIL + BC hybrid (both off by default): ``bc_init_steps`` starts G from multi-task behaviour
cloning on training-task demonstrations (the ``bc_multitask`` baseline's pretraining), and
``adapt_bc_steps`` begins every adaptation with a behaviour-cloning fit to the task's ``K``
demonstrations, so the adversarial steps refine that fit. A BC-fitted policy has a narrow
action distribution, so its policy-gradient steps want a much smaller ``inner_lr``.

Demonstrations: the analytic expert of ``navigation-2d`` and Meta-World's scripted experts
(:mod:`metarl.demos`).
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from agents.meta_imitation_config import MetaImitationConfig
from envs.base import Task, TaskDistribution
from metarl import demos, discriminator, imitation_baselines, meta_pg
from metarl.adaptation import Params, adapt
from metarl.discriminator import DiscData, Discriminator
from metarl.meta_pg import PGBatch, clipped_objective
from metarl.meta_pg_agent import MetaPolicyGradient, step_timing
from metarl.types import Trajectories


class MetaImitation(MetaPolicyGradient):
    """Meta-adversarial imitation; see the module docstring.

    The policy side (θ, the first-order inner loop, advantages, sampler, timing) is the shared
    :class:`~metarl.meta_pg_agent.MetaPolicyGradient`; the inner step adapts the discriminator
    first and takes its policy-gradient step on D's reward, so this agent writes its own loop.

    Args:
        config: the agent's settings.
        distribution: a family with an expert (navigation-2d, Meta-World).
        seed: seeds parameters, rollouts and demonstration resets.
    """

    Config = MetaImitationConfig

    def __init__(
        self, config: MetaImitationConfig, distribution: TaskDistribution, seed: int
    ) -> None:
        super().__init__(config, distribution, seed, first_order=True)
        space = distribution.action_space
        self.action_low = torch.as_tensor(space.low, dtype=torch.float32)
        self.action_high = torch.as_tensor(space.high, dtype=torch.float32)
        second = self.policy.obs_dim if config.state_only else self.policy.act_dim
        self.disc = Discriminator(
            self.policy.obs_dim + second + 1, config.disc_hidden_sizes, config.disc_activation
        )
        self.disc_params = {
            k: v.requires_grad_() for k, v in self.disc.init_params(seed + 1).items()
        }
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.outer_lr)
        self.disc_optimizer = torch.optim.Adam(
            list(self.disc_params.values()), lr=config.disc_outer_lr
        )
        self.horizon = self.sampler.horizon
        self.num_demo_calls = 0
        self.bc_initialised = False

    def demonstrations(self, tasks: list[Task], num: int) -> Trajectories:
        """``num`` fresh expert episodes per task (new reset seeds at every call)."""
        self.num_demo_calls += 1
        seed = self.seed * 1_000_003 + self.num_demo_calls * 100_003
        return demos.record(self.distribution, tasks, num, self.horizon, seed)

    def _second(self, t: Trajectories) -> torch.Tensor:
        if self.config.state_only:
            return t.next_obs
        return torch.maximum(torch.minimum(t.actions, self.action_high), self.action_low)

    def disc_data(self, t: Trajectories) -> DiscData:
        """``[N, M, F]`` discriminator samples of trajectories ``[N, E, T, ...]``."""
        return discriminator.transition_inputs(t.obs, self._second(t), t.mask, t.terminated)

    def adapt_disc(
        self, phi: Params, reference: DiscData, generated: DiscData, first_order: bool = True
    ) -> Params:
        """``[N, *P]`` per-task discriminators after ``disc_adapt_steps`` SGD steps from ``phi``."""
        cfg = self.config

        def loss_fn(p: Params, data: tuple[DiscData, DiscData]) -> torch.Tensor:
            return discriminator.loss(self.disc, p, data[0], data[1], cfg.gradient_penalty)

        def one(ref: DiscData, gen: DiscData) -> Params:
            return adapt(
                loss_fn, phi, (ref, gen), cfg.disc_adapt_steps, cfg.disc_inner_lr, first_order
            )

        return vmap(one)(reference, generated)

    def scored(self, t: Trajectories, disc_params: Params) -> Trajectories:
        """``t`` with its rewards replaced by the per-task discriminators' rewards."""
        gamma = self.config.gamma

        def one(
            p: Params,
            obs: torch.Tensor,
            second: torch.Tensor,
            mask: torch.Tensor,
            terminated: torch.Tensor,
        ) -> torch.Tensor:
            return discriminator.rewards(self.disc, p, obs, second, mask, terminated, gamma)

        detached = {k: v.detach() for k, v in disc_params.items()}
        r = vmap(one)(detached, t.obs, self._second(t), t.mask, t.terminated)
        return t._replace(rewards=r)

    def _adapt_once(
        self,
        start: Params,
        shared: bool,
        traj: Trajectories,
        support: DiscData,
        baseline: Any,
        phi: Params | None = None,
    ) -> tuple[Params, Params, PGBatch]:
        """Adapt D (from ``phi``, the meta-learned φ by default) on the support demos against
        ``traj``, then one policy step on D's reward."""
        phi = {k: v.detach() for k, v in (phi or self.disc_params).items()}
        disc_i = {
            k: v.detach() for k, v in self.adapt_disc(phi, support, self.disc_data(traj)).items()
        }
        batch = self._advantages(self.scored(traj, disc_i), baseline)
        detached = {k: v.detach() for k, v in start.items()}
        adapted = meta_pg.inner_step(self.inner, detached, batch, shared)
        return {k: v.detach() for k, v in adapted.items()}, disc_i, batch

    def bc_start(self, theta: Params, demo: Trajectories) -> tuple[Params, bool]:
        """Where adaptation starts: per-task ``[N, *P]`` fits of ``theta`` to each task's demos
        ``[N, K, ...]`` (``adapt_bc_steps`` Adam steps), or ``theta`` itself shared (with none)."""
        cfg = self.config
        theta = {k: v.detach() for k, v in theta.items()}
        if not cfg.adapt_bc_steps:
            return theta, True
        data = imitation_baselines.demo_data(demo)
        fits = [
            imitation_baselines.fit(
                self.policy, theta, tuple(x[i] for x in data), cfg.adapt_bc_steps, cfg.bc_lr  # type: ignore[arg-type]
            )
            for i in range(demo.obs.shape[0])
        ]
        return {k: torch.stack([f[k] for f in fits]) for k in theta}, False

    def training_demos(self, rng: np.random.Generator, seed: int | None = None) -> Trajectories:
        """``K + K_query`` expert episodes of each of ``num_pretrain_tasks`` training tasks (the
        split's own, else drawn with ``rng``), reset from ``seed`` (else one drawn from ``rng``
        after the tasks): what the BC baselines and ``bc_init_steps`` fit."""
        cfg = self.config
        train = self.distribution.train_tasks() or self.distribution.sample(
            cfg.num_pretrain_tasks, rng
        )
        train = list(train)[: cfg.num_pretrain_tasks]
        seed = meta_pg.eval_seed(rng) if seed is None else seed
        return demos.record(
            self.distribution, train, cfg.num_demos + cfg.num_query_demos, self.horizon, seed
        )

    def _bc_initialise(self) -> None:
        """θ <- multi-task behaviour cloning on the training tasks' demonstrations (once)."""
        cfg = self.config
        both = imitation_baselines.demo_data(
            self.training_demos(np.random.default_rng(self.seed), self.seed * 1_000_003 + 7)
        )
        fitted = imitation_baselines.fit(
            self.policy,
            self.params,
            imitation_baselines.pooled(both),
            cfg.bc_init_steps,
            cfg.bc_lr,
        )
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(fitted[k])
        self.bc_initialised = True

    # ------------------------------------------------------------------ training

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration; returns ``train/*`` and ``time/*`` metrics."""
        cfg, start = self.config, time.perf_counter()
        if cfg.bc_init_steps and not self.bc_initialised:
            self._bc_initialise()
        sampling = 0.0
        demo = self.demonstrations(tasks, cfg.num_demos + cfg.num_query_demos)
        support = self.disc_data(_episodes(demo, 0, cfg.num_demos))
        query = self.disc_data(_episodes(demo, cfg.num_demos, None))
        current, shared = self.bc_start(self.params, _episodes(demo, 0, cfg.num_demos))
        pre_batches, sampled = [], []
        for _ in range(cfg.adapt_steps):
            clock = time.perf_counter()
            traj = self.sampler.sample(
                self.policy,
                current if shared else meta_pg.unstack(current),
                tasks,
                cfg.episodes_per_task,
            )
            sampling += time.perf_counter() - clock
            sampled.append(traj)
            current, disc_i, batch = self._adapt_once(current, shared, traj, support, None)
            pre_batches.append(batch)
            shared = False
        clock = time.perf_counter()
        post = self.sampler.sample(
            self.policy, meta_pg.unstack(current), tasks, cfg.episodes_per_task
        )
        sampling += time.perf_counter() - clock
        post_scored = self.scored(post, disc_i)
        metrics = self._update_policy(current, pre_batches, self._advantages(post_scored))
        metrics |= self._update_disc(
            support, self.disc_data(sampled[-1]), query, self.disc_data(post)
        )
        env_steps = sum(float(t.mask.sum()) for t in [*sampled, post])
        first_traj = sampled[0]
        metrics |= {
            "train/pre_return": float(first_traj.episode_returns().mean()),
            "train/post_return": float(post.episode_returns().mean()),
            "train/disc_return_post": float(post_scored.episode_returns().mean()),
            "train/env_steps": env_steps,
        }
        metrics |= step_timing(start, sampling, env_steps)
        for name, t in (("pre", first_traj), ("post", post)):
            if not torch.isnan(t.success).all():
                metrics[f"train/success_{name}"] = float(torch.nanmean(t.success))
        return metrics

    def _update_policy(
        self, adapted: Params, pre_batches: list[PGBatch], post: PGBatch
    ) -> dict[str, float]:
        """PPO's clipped surrogate of the post-update episodes, through θ_i(θ)."""
        cfg, policy = self.config, self.policy
        with torch.no_grad():
            old_log_probs = meta_pg.post_log_probs(policy, adapted, post)
            delta = {k: adapted[k] - self.params[k].detach() for k in adapted}
        second_order = self.inner._replace(first_order=False)
        clip_fraction = torch.zeros(())
        for _ in range(cfg.num_epochs):
            if cfg.first_order:
                theta_i = {k: v + delta[k] for k, v in self.params.items()}
            else:
                theta_i = meta_pg.adapt_tasks(second_order, self.params, pre_batches)
            objective, clip_fraction = clipped_objective(
                meta_pg.post_log_probs(policy, theta_i, post), old_log_probs, post, cfg.clip_range
            )
            meta_pg.check_finite(
                "policy objective", objective.detach(), "lower inner_lr or outer_lr"
            )
            self.optimizer.zero_grad(set_to_none=True)
            (-objective).backward()
            self.optimizer.step()
        return {
            "train/surrogate": float(objective.detach()),
            "train/clip_fraction": float(clip_fraction),
        }

    def _update_disc(
        self, support: DiscData, pre: DiscData, query: DiscData, post: DiscData
    ) -> dict[str, float]:
        """Cross-entropy of φ_i(φ) on query demonstrations against the post-update episodes."""
        cfg = self.config
        with torch.no_grad():
            phi = {k: v.detach() for k, v in self.disc_params.items()}
            adapted = self.adapt_disc(phi, support, pre)
            delta = {k: adapted[k] - phi[k] for k in phi}
            inner_loss = discriminator.task_losses(self.disc, adapted, support, pre, 0.0).mean()
        for _ in range(cfg.num_epochs):
            if cfg.first_order:
                phi_i = {k: v + delta[k] for k, v in self.disc_params.items()}
            else:
                phi_i = self.adapt_disc(self.disc_params, support, pre, first_order=False)
            loss = discriminator.task_losses(
                self.disc, phi_i, query, post, cfg.gradient_penalty
            ).mean()
            meta_pg.check_finite(
                "discriminator loss", loss.detach(), "lower disc_inner_lr or disc_outer_lr"
            )
            self.disc_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.disc_optimizer.step()
        return {
            "train/disc_loss_inner": float(inner_loss),
            "train/disc_loss_outer": float(loss.detach()),
        }

    # ------------------------------------------------------------------ evaluation

    def _curve(
        self,
        sampler: Any,
        tasks: list[Task],
        demo: Trajectories,
        theta: Params,
        phi: Params,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Environment return and success ``[N, S + 1]`` along ``eval_adapt_steps`` adaptation
        steps (with ``adapt_bc_steps``, step 1 is the BC fit to ``demo`` and one adversarial step)."""
        cfg, baseline = self.config, copy.deepcopy(self.baseline)
        support = self.disc_data(demo)
        current: Params = {k: v.detach() for k, v in theta.items()}
        shared, returns, successes = True, [], []

        def sample(scored: bool = True) -> Trajectories:
            params = current if shared else meta_pg.unstack(current)
            traj = sampler.sample(self.policy, params, tasks, cfg.eval_episodes_per_task)
            if scored:
                returns.append(traj.episode_returns().mean(1).numpy())
                successes.append(traj.success.mean(1).numpy())
            return traj

        traj = sample()
        if cfg.adapt_bc_steps and cfg.eval_adapt_steps:
            current, shared = self.bc_start(theta, demo)
            traj = sample(scored=False)  # the adversarial step's on-policy data; not a curve point
        for _ in range(cfg.eval_adapt_steps):
            current, _, _ = self._adapt_once(current, shared, traj, support, baseline, phi)
            shared = False
            traj = sample()
        return np.stack(returns, axis=1).astype(np.float64), np.stack(successes, axis=1)

    def _bc_scores(
        self, sampler: Any, tasks: list[Task], demo: Trajectories, rng: np.random.Generator
    ) -> dict[str, dict[str, np.ndarray]]:
        """Return and success ``[N]`` of the behaviour-cloning baselines on the same demos."""
        cfg = self.config
        train_demos = self.training_demos(rng)
        settings = {
            "bc_steps": cfg.bc_steps,
            "bc_lr": cfg.bc_lr,
            "pretrain_steps": cfg.bc_pretrain_steps,
            "meta_steps": cfg.maml_bc_meta_steps,
            "meta_batch_size": cfg.meta_batch_size,
            "inner_lr": cfg.inner_lr,
        }
        per_task = imitation_baselines.adapted_params(
            self.policy,
            self.policy.init_params(self.seed + 2),
            _episodes(train_demos, 0, cfg.num_demos),
            _episodes(train_demos, cfg.num_demos, None),
            demo,
            settings,
            meta_pg.eval_seed(rng),
        )
        out = {}
        for name, params in per_task.items():
            traj = sampler.sample(self.policy, params, tasks, cfg.eval_episodes_per_task)
            out[name] = {
                "return": traj.episode_returns().mean(1).numpy().astype(np.float64),
                "success": traj.success.mean(1).numpy(),
            }
        return out

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Environment return and success per held-out task after 0..``eval_adapt_steps`` steps.

        With ``eval_ablations``, the same curves for GAIL from scratch (``*_gail_scratch``), a
        meta-trained G with a fresh D (``*_meta_g_fresh_d``) and a fresh G with the meta-trained
        D (``*_fresh_g_meta_d``); with ``eval_bc_baselines``, ``baselines`` holds the BC
        learners' scores. Every learner sees the same ``K`` demonstrations per task.
        """
        cfg = self.config
        demo = demos.record(
            self.distribution, tasks, cfg.num_demos, self.horizon, meta_pg.eval_seed(rng)
        )
        call = self.training_call_episodes()  # bounds the environments kept
        sampler = meta_pg.make_agent_sampler(cfg, self.distribution, meta_pg.eval_seed(rng), call)
        fresh_theta = self.policy.init_params(self.seed + 2)
        fresh_phi = self.disc.init_params(self.seed + 3)
        curves = {"": (self.params, self.disc_params)}
        if cfg.eval_ablations:
            curves |= {
                "_gail_scratch": (fresh_theta, fresh_phi),
                "_meta_g_fresh_d": (self.params, fresh_phi),
                "_fresh_g_meta_d": (fresh_theta, self.disc_params),
            }
        result: dict[str, Any] = {"adaptation_steps": list(range(cfg.eval_adapt_steps + 1))}
        with sampler:
            for suffix, (theta, phi) in curves.items():
                returns, success = self._curve(sampler, tasks, demo, theta, phi)
                result[f"return{suffix}"] = returns
                result[f"success{suffix}"] = None if np.isnan(success).all() else success
            if cfg.eval_bc_baselines:
                result["baselines"] = self._bc_scores(sampler, tasks, demo, rng)
        result["demo_return"] = demo.episode_returns().mean(1).numpy().astype(np.float64)
        return result

    def adapt(self, task: Task, trajectories: Trajectories, params: Params | None = None) -> Params:
        """One adaptation step on one task from ``trajectories`` ``[1, E, T, ...]`` and fresh demos."""
        support = self.disc_data(self.demonstrations([task], self.config.num_demos))
        start = {k: v.detach() for k, v in (self.params if params is None else params).items()}
        adapted, _, _ = self._adapt_once(
            start, True, trajectories, support, copy.deepcopy(self.baseline)
        )
        return {k: v[0] for k, v in adapted.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "disc_params": {k: v.detach().clone() for k, v in self.disc_params.items()},
            "optimizer": self.optimizer.state_dict(),
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "baseline": self.baseline.state_dict(),
            "num_demo_calls": self.num_demo_calls,
            "bc_initialised": self.bc_initialised,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            for k, v in self.disc_params.items():
                v.copy_(state["disc_params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.baseline.load_state_dict(state["baseline"])
        self.num_demo_calls = int(state["num_demo_calls"])
        self.bc_initialised = bool(state.get("bc_initialised", False))


def _episodes(t: Trajectories, start: int, stop: int | None) -> Trajectories:
    """Episodes ``start:stop`` of every task (the task vectors are kept whole)."""
    return Trajectories(
        *(x if name == "task" else x[:, start:stop] for name, x in zip(t._fields, t, strict=True))
    )
