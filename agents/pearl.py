# Over 400 lines: the equations, each deviation from the paper with its reason, and full state round-tripping; SAC's parts are in latent_sac.py and the config in pearl_config.py.
"""PEARL: probabilistic embeddings for actor-critic meta-RL (Rakelly et al. 2019, arXiv 1903.08254).

A context encoder maps each transition ``c_n = (s, a, r)`` of a task (``(s, a, r, s')`` with
``use_next_obs_in_context``) to a Gaussian factor ``N(μ_n, σ²_n)`` over a latent ``z``; the
posterior is the product of those factors with the unit-Gaussian prior, in closed form::

    1/σ² = 1 + Σ_n 1/σ²_n,        μ = σ² Σ_n μ_n/σ²_n.

SAC is conditioned on ``z``: a tanh-Gaussian policy π(a|s,z) and twin critics Q_1,2(s,a,z) with
Polyak-averaged target critics (SAC v2; the paper's code learns a separate V and its target
instead; the twin-target form needs one network fewer and is the common SAC form now). The
entropy temperature α is fixed (``alpha``, 1.0 as the paper, where ``reward_scale`` sets the
trade-off) unless ``auto_entropy`` tunes it towards the entropy −act_dim. Per gradient step, for
each of ``meta_batch_size`` stored tasks::

    z ~ q(z|c),  c: ``context_batch_size`` transitions of the task's encoder buffer
    y = reward_scale·r + γ(1 − done)(min_i Q̄_i(s', a', z̄) − α log π(a'|s', z̄)),  a' ~ π(·|s', z̄)
    L_Q = Σ_i mean (Q_i(s, a, z) − y)²  + kl_weight · Σ_tasks KL(q(z|c) || N(0, I))
    L_π = mean (α log π(ã|s, z̄) − min_i Q_i(s, ã, z̄)) + policy_reg · mean(μ_a² + log σ_a²)

with z̄ = z detached: the critic loss trains the encoder, the policy does not. The KL is summed
over the meta-batch, as the authors' code (oyster) and garage do, so ``kl_weight`` means what it
means there. All losses are taken at the same parameters, checked for NaN/Inf, then every
optimiser steps.

Data collection runs through the repository's vectorised sampler. :class:`LatentTanhPolicy` keeps
the worker's ``act``/``sample_noise`` protocol: each task's parameter set carries its posterior
as two entries, ``z_mean`` and ``z_std`` (prior: 0 and 1), and every episode draws its own
``z = z_mean + z_std·ε`` from a standard-normal ε drawn once per episode from the episode's noise
stream. So each episode samples z afresh (the paper's ``resample_z_rate = 1``), reproducibly on
every backend. Per iteration, each of the first ``num_collect_tasks`` tasks given to :meth:`step`
runs ``num_prior_episodes`` with z from the prior (stored in the task's replay buffer and, replacing
its previous content, in its encoder buffer: recent data only, as the paper) and
``num_posterior_episodes`` with z from the posterior on its encoder buffer (replay buffer only: the
paper's ``num_extra_rl_steps_posterior``). With ``num_initial_episodes``, the first step first
runs that many prior episodes on every one of the distribution's ``train_tasks()`` (both buffers;
the paper's ``num_initial_steps``), so the first gradient steps see more than the first few tasks.

Evaluation on a held-out task: episode 0 acts with z from the prior, episode k with z drawn from
the posterior on all transitions of episodes 0..k−1 (the paper's online adaptation), the policy
acting with its mean action unless ``eval_deterministic`` is off.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from typing import Any

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from agents.latent_sac import (
    LatentTanhPolicy,
    Params,
    TaskReplay,
    kl_to_standard_normal,
    product_of_gaussians,
    sac_q_target,
    transitions,
)
from agents.pearl_config import PEARLConfig
from envs.base import Task, TaskDistribution
from metarl import meta_pg
from metarl.nn import FunctionalMLP, init_mlp
from metarl.policies import diagonal_gaussian_kl
from metarl.types import Trajectories

_NAN_HINT = "lower the learning rates or reward_scale, or check the environment's rewards"


class PEARL:
    """PEARL on a task distribution with a ``Box`` action space; see the module docstring.

    Args:
        config: the agent's settings.
        distribution: the task family; the networks and sampler are built for its spaces.
        seed: seeds the initial parameters, the replay sampling and every rollout.
    """

    Config = PEARLConfig
    family = "Bayesian"
    adaptation_unit = "episode"
    scores_tasks_independently = False

    def __init__(self, config: PEARLConfig, distribution: TaskDistribution, seed: int) -> None:
        space = distribution.action_space
        if not isinstance(space, gym.spaces.Box) or not np.all(
            np.isfinite([space.low, space.high])
        ):
            raise TypeError(
                f"PEARL needs a bounded Box action space (the tanh policy maps onto it), got {space}"
            )
        cfg = self.config = config
        self.distribution = distribution
        self.device = torch.device(cfg.device)
        obs_dim, act_dim, latent = (
            int(np.prod(distribution.observation_space.shape or ())),
            int(np.prod(space.shape)),
            cfg.latent_dim,
        )
        self.policy = LatentTanhPolicy(
            obs_dim, act_dim, latent, cfg.hidden_sizes, space.low, space.high
        )
        # Context rows are (s, a, r, s'); the encoder reads their first context_width columns.
        self.context_width = obs_dim + act_dim + 1 + (obs_dim if cfg.use_next_obs_in_context else 0)
        self.encoder = FunctionalMLP(
            [self.context_width, *cfg.encoder_hidden_sizes, 2 * latent], "relu"
        )
        if cfg.num_initial_episodes:
            self._check_initial_tasks()
        self.critic = FunctionalMLP([obs_dim + act_dim + latent, *cfg.hidden_sizes, 1], "relu")
        initial: dict[str, Params] = {
            "policy": self.policy.init_params(seed),
            "q": {
                k: torch.stack([init_mlp(self.critic.sizes, seed + i, 1.0)[k] for i in (1, 2)])
                for k in init_mlp(self.critic.sizes, 0, 1.0)
            },
            "encoder": init_mlp(self.encoder.sizes, seed + 3, 0.1),
            "alpha": {"log_alpha": torch.tensor(math.log(cfg.alpha) if cfg.alpha > 0 else 0.0)},
        }
        # Initialised on the CPU (the same draws on every device), then moved.
        self.nets: dict[str, Params] = {
            name: {k: v.to(self.device).requires_grad_() for k, v in params.items()}
            for name, params in initial.items()
        }
        self.q_target = {k: v.detach().clone() for k, v in self.nets["q"].items()}
        lrs = {
            "policy": cfg.policy_lr,
            "q": cfg.q_lr,
            "encoder": cfg.encoder_lr,
            "alpha": cfg.policy_lr,
        }
        self.optimizers = {
            name: torch.optim.Adam(list(self.nets[name].values()), lr=lrs[name])
            for name in self.nets
        }
        self.replay: OrderedDict[Task, TaskReplay] = OrderedDict()
        self.context: dict[Task, np.ndarray] = {}
        # Set by loading a portable state: (task, transitions) the replay held, refilled next step.
        self._refill: list[tuple[Task, int]] = []
        self._recollect = False  # set by loading a portable state of a run that had collected data
        self.rng = np.random.default_rng([seed, 11])
        self.generator = torch.Generator().manual_seed(seed + 12)
        self.sampler = meta_pg.make_agent_sampler(cfg, distribution, seed)

    # ------------------------------------------------------------------ inference

    def posterior(
        self, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [..., C, 2·obs + act + 1]`` rows ``(s, a, r, s')`` -> posterior ``(mean, variance)`` ``[..., L]``.

        The encoder reads the rows' first ``context_width`` columns: ``(s, a, r)``, or all four
        parts with ``use_next_obs_in_context``. Inputs on any device; the posterior is on the
        agent's device.
        """
        context = context[..., : self.context_width].to(self.device)
        mask = None if mask is None else mask.to(self.device)
        means, raw = self.encoder(self.nets["encoder"], context).chunk(2, -1)
        return product_of_gaussians(means, F.softplus(raw).clamp(min=1e-7), mask)

    def _actor_params(self, mean: torch.Tensor, variance: torch.Tensor) -> Params:
        """The rollout workers' parameters (on the CPU): the policy and z's posterior."""
        policy = {k: v.detach().cpu() for k, v in self.nets["policy"].items()}
        return {**policy, "z_mean": mean.detach().cpu(), "z_std": variance.detach().sqrt().cpu()}

    def _prior(self) -> Params:
        return self._actor_params(
            torch.zeros(self.config.latent_dim), torch.ones(self.config.latent_dim)
        )

    def adapt(self, task: Task, trajectories: Trajectories) -> Params:
        """The actor's parameters with z's posterior on all transitions of ``trajectories`` ``[1, E, T, ...]``."""
        del task  # the context carries everything
        rows, mask = transitions(self.policy, trajectories)
        with torch.no_grad():
            mean, variance = self.posterior(rows[0, :, :-1], mask[0])
        return self._actor_params(mean, variance)

    # ------------------------------------------------------------------ data

    def _check_initial_tasks(self) -> None:
        try:
            count = len(self.distribution.train_tasks())
        except NotImplementedError:
            raise ValueError(
                "num_initial_episodes collects on the task family's train_tasks(), which "
                f"{type(self.distribution).__name__} does not define; set num_initial_episodes = 0"
            ) from None
        if count > self.config.max_replay_tasks:
            raise ValueError(
                f"num_initial_episodes fills {count} training tasks' buffers but max_replay_tasks="
                f"{self.config.max_replay_tasks} keeps fewer; raise max_replay_tasks to {count}"
            )

    def _episodes(self, tasks: list[Task], prior: bool, episodes: int) -> Trajectories:
        """``episodes`` per task with z from the prior (stored in both buffers: the encoder's
        keeps the latest) or from each task's posterior on its encoder buffer (replay only)."""
        params: Params | list[Params] = self._prior()
        if not prior:
            context = torch.from_numpy(np.stack([self._context_batch(t)[:, :-1] for t in tasks]))
            with torch.no_grad():
                mean, variance = self.posterior(context)
            params = [self._actor_params(m, v) for m, v in zip(mean, variance, strict=True)]
        traj = self.sampler.sample(self.policy, params, tasks, episodes)
        rows, mask = transitions(self.policy, traj)
        for i, task in enumerate(tasks):
            self._store(task, rows[i][mask[i] > 0], encoder=prior)
        return traj

    def _collect_initial(self) -> float:
        """Prior episodes on every training task into both buffers; returns the env steps."""
        traj = self._episodes(self.distribution.train_tasks(), True, self.config.num_initial_episodes)
        return float(traj.mask.sum())

    def _collect_refill(self) -> float:
        """After a resume from :meth:`portable_state_dict`: episodes with the current policy on
        every task the replay held, until each holds at least as many transitions as it did
        (less than one episode more), alternating prior and posterior episodes as training
        collects them (the prior's first, which also fill the encoder buffers); the replay's
        task order is restored. Returns the env steps."""
        targets, self._refill = dict(self._refill), []
        env_steps, prior = 0.0, True
        while short := [t for t, n in targets.items() if (self.replay[t].size if t in self.replay else 0) < n]:
            steps = float(self._episodes(short, prior, 1).mask.sum())
            if not steps:
                raise RuntimeError("refilling PEARL's replay: the episodes collected no transitions")
            env_steps, prior = env_steps + steps, not prior
        for task in targets:  # the order the replay had (the oldest task is dropped first)
            if task in self.replay:
                self.replay.move_to_end(task)
        return env_steps

    def _store(self, task: Task, rows: torch.Tensor, encoder: bool) -> None:
        array = rows.numpy()
        if task not in self.replay:
            self.replay[task] = TaskReplay(array.shape[1], self.config.replay_capacity)
        self.replay.move_to_end(task)
        self.replay[task].add(array)
        if encoder:
            self.context[task] = array
        while len(self.replay) > self.config.max_replay_tasks:
            dropped, _ = self.replay.popitem(last=False)
            self.context.pop(dropped, None)

    def _collect(self, tasks: list[Task]) -> dict[str, float]:
        cfg, metrics = self.config, {}
        runs = [("prior", cfg.num_prior_episodes), ("posterior", cfg.num_posterior_episodes)]
        env_steps = 0.0
        for name, episodes in runs:
            if episodes == 0:
                continue
            traj = self._episodes(tasks, name == "prior", episodes)
            metrics[f"train/{name}_return"] = float(traj.episode_returns().mean())
            if not torch.isnan(traj.success).all():
                metrics[f"train/{name}_success"] = float(np.nanmean(traj.success.numpy()))
            env_steps += float(traj.mask.sum())
        metrics["train/env_steps"] = env_steps
        if "train/posterior_return" in metrics:
            # What the posterior's z buys over the prior's on the same tasks (the adaptation).
            gain = metrics["train/posterior_return"] - metrics["train/prior_return"]
            metrics["adapt/return_gain"] = gain
        return metrics

    def _context_batch(self, task: Task) -> np.ndarray:
        rows = self.context[task]
        return rows[self.rng.integers(0, len(rows), self.config.context_batch_size)]

    def _sample_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``context [B, C, W − 1]`` and SAC rows ``[B, M, W]`` of ``meta_batch_size`` stored tasks."""
        tasks = list(self.replay)
        chosen = [tasks[i] for i in self.rng.integers(0, len(tasks), self.config.meta_batch_size)]
        context = np.stack([self._context_batch(t)[:, :-1] for t in chosen])
        rows = np.stack([self.replay[t].sample(self.rng, self.config.batch_size) for t in chosen])
        return torch.from_numpy(context).to(self.device), torch.from_numpy(rows).to(self.device)

    def _randn(self, *shape: int) -> torch.Tensor:
        """Standard normal draws from the agent's CPU generator, on its device (the same on any device)."""
        return torch.randn(shape, generator=self.generator).to(self.device)

    # ------------------------------------------------------------------ learning

    def q_values(
        self, params: Params, obs: torch.Tensor, actions: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        """Both critics: ``[R, ·]`` inputs -> ``[2, R]``."""
        x = torch.cat([obs, actions, z], -1)
        # A loop over the two critics measured faster on CPU than vmap or batched matmuls.
        critics = [self.critic({k: v[i] for k, v in params.items()}, x) for i in range(2)]
        return torch.stack(critics).squeeze(-1)

    def losses(self, context: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Critic (+ KL), policy and temperature losses on one batch; see the module docstring.

        Args:
            context: ``[B, C, W − 1]`` transitions ``(s, a, r, s')`` per task.
            rows: ``[B, M, W]`` SAC transitions ``(s, a, r, s', terminated)`` per task.
        """
        cfg, obs_dim, act_dim = self.config, self.policy.obs_dim, self.policy.act_dim
        num_tasks, num_rows = rows.shape[:2]
        flat = rows.reshape(num_tasks * num_rows, -1)
        obs, actions = flat[:, :obs_dim], flat[:, obs_dim : obs_dim + act_dim]
        rewards, next_obs, terminated = (
            flat[:, obs_dim + act_dim],
            flat[:, obs_dim + act_dim + 1 : -1],
            flat[:, -1],
        )
        mean, variance = self.posterior(context)
        z_task = mean + variance.sqrt() * self._randn(*mean.shape)
        z = z_task.repeat_interleave(num_rows, 0)
        z_bar = z.detach()
        log_alpha = self.nets["alpha"]["log_alpha"]
        alpha = log_alpha.exp().detach() if cfg.auto_entropy else cfg.alpha
        noise = self._randn(2, len(flat), act_dim)
        with torch.no_grad():
            next_actions, next_log_prob, _, _ = self.policy.sample(
                self.nets["policy"], next_obs, z_bar, noise[0]
            )
            next_q = self.q_values(self.q_target, next_obs, next_actions, z_bar)
            target = sac_q_target(
                rewards, terminated, next_q, next_log_prob, cfg.gamma, alpha, cfg.reward_scale
            )
        q = self.q_values(self.nets["q"], obs, actions, z)
        kl = kl_to_standard_normal(mean, variance).sum()  # summed over tasks, as oyster and garage
        new_actions, log_prob, action_mean, log_std = self.policy.sample(
            self.nets["policy"], obs, z_bar, noise[1]
        )
        q_new = self.q_values(self.nets["q"], obs, new_actions, z_bar).min(0).values
        regulariser = cfg.policy_reg * (action_mean.pow(2).mean() + log_std.pow(2).mean())
        return {
            "q": (q - target).pow(2).mean(1).sum(),
            "kl": kl,
            "policy": (alpha * log_prob - q_new).mean() + regulariser,
            "alpha": -(log_alpha * (log_prob.detach() - act_dim).mean()),
            "q_mean": q.detach().mean(),
            "z_std": variance.detach().sqrt().mean(),
            "entropy": -log_prob.detach().mean(),
        }

    def posterior_effect(self, context: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
        """How much the posterior changes the policy, on a batch's tasks and states (no gradients).

        ``adapt/policy_kl``: the mean over tasks and states of ``KL(π(·|s, 0) || π(·|s, μ_q))``,
        the policy at the prior's mean z against the task's posterior mean (pre-tanh Gaussians;
        tanh is invertible, so the squashed actions have the same KL); ``adapt/mean_shift``: the
        mean Euclidean change of the mean action in (−1, 1)^A. Near 0 the policy ignores z: PEARL
        then trains a multi-task policy however much the posterior knows (``adapt/posterior_kl``).
        """
        num_tasks, num_rows = rows.shape[:2]
        # In float64: early in training the KL is near 1e-9, below float32's cancellation error.
        obs = rows[..., : self.policy.obs_dim].reshape(num_tasks * num_rows, -1).double()
        params = {k: v.detach().double() for k, v in self.nets["policy"].items()}
        with torch.no_grad():
            z = self.posterior(context)[0].double().repeat_interleave(num_rows, 0)
            mean_prior, log_std_prior = self.policy.distribution_params(params, obs, torch.zeros_like(z))
            mean_post, log_std_post = self.policy.distribution_params(params, obs, z)
            kl = diagonal_gaussian_kl(mean_prior, log_std_prior, mean_post, log_std_post)
            shift = (torch.tanh(mean_post) - torch.tanh(mean_prior)).norm(dim=-1)
        return {"adapt/policy_kl": float(kl.mean()), "adapt/mean_shift": float(shift.mean())}

    def _gradient_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step of every optimiser on ``(context, rows)``; raises before any parameter changes
        if a loss or gradient is not finite."""
        cfg = self.config
        losses = self.losses(*batch)
        objectives = {
            ("q", "encoder"): losses["q"] + cfg.kl_weight * losses["kl"],
            ("policy",): losses["policy"],
        }
        if cfg.auto_entropy:
            objectives[("alpha",)] = losses["alpha"]
        grads: dict[str, list[torch.Tensor]] = {}
        for names, objective in objectives.items():
            meta_pg.check_finite(f"PEARL {'+'.join(names)} loss", objective.detach(), _NAN_HINT)
            params = [v for n in names for v in self.nets[n].values()]
            raw = torch.autograd.grad(objective, params, allow_unused=True)
            flat = [
                torch.zeros_like(p) if g is None else g for p, g in zip(params, raw, strict=True)
            ]
            for n in names:
                grads[n], flat = flat[: len(self.nets[n])], flat[len(self.nets[n]) :]
        norms = torch.stack([g.abs().max() for gs in grads.values() for g in gs])
        meta_pg.check_finite("PEARL gradient", norms.max().unsqueeze(0), _NAN_HINT)
        for name, gs in grads.items():
            for p, g in zip(self.nets[name].values(), gs, strict=True):
                p.grad = g
            self.optimizers[name].step()
        with torch.no_grad():
            for k, target in self.q_target.items():
                target.lerp_(self.nets["q"][k], cfg.tau)
        return losses

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """Collects on the first ``num_collect_tasks`` of ``tasks``, then ``num_train_steps`` gradient steps."""
        cfg = self.config
        start = time.perf_counter()
        collect = list(tasks)[: cfg.num_collect_tasks or len(tasks)]
        if not collect:
            raise ValueError("step needs at least one task to collect data on")
        # Once per run: the replay is empty only before the first step (a resume restores it),
        # or after a resume from portable_state_dict, which refills it to the size it had (or,
        # from a state that did not record the sizes, collects the initial episodes again).
        initial = recollected = 0.0
        if self._refill:
            recollected = self._collect_refill()
        elif cfg.num_initial_episodes and not self.replay:
            initial = self._collect_initial()
            if self._recollect:
                initial, recollected = 0.0, initial
        self._recollect = False
        metrics = self._collect(collect)
        metrics["train/env_steps"] += initial + recollected
        metrics["train/initial_env_steps"] = initial
        metrics["train/recollected_env_steps"] = recollected  # data the run had, collected again
        sampling_s = time.perf_counter() - start
        totals: dict[str, torch.Tensor] = {}
        for _ in range(cfg.num_train_steps):
            batch = self._sample_batch()
            for k, v in self._gradient_step(batch).items():  # summed on the device: no sync per step
                totals[k] = totals[k] + v.detach() if k in totals else v.detach()
        if cfg.num_train_steps:
            metrics.update(self.posterior_effect(*batch))
        names = {"q": "q_loss", "policy": "policy_loss", "alpha": "alpha_loss"}
        for k, v in totals.items():
            metrics[f"train/{names.get(k, k)}"] = float(v) / cfg.num_train_steps
        metrics["train/alpha"] = (
            float(self.nets["alpha"]["log_alpha"].exp()) if cfg.auto_entropy else cfg.alpha
        )
        metrics["train/replay_tasks"] = float(len(self.replay))
        metrics["adapt/posterior_kl"] = metrics["train/kl"] / cfg.meta_batch_size  # nats per task
        optimization_s = time.perf_counter() - start - sampling_s
        metrics["time/sampling_s"] = sampling_s
        metrics["time/optimization_s"] = optimization_s
        metrics["time/env_steps_per_s"] = metrics["train/env_steps"] / max(sampling_s, 1e-9)
        metrics["time/grad_steps_per_s"] = cfg.num_train_steps / max(optimization_s, 1e-9)
        return metrics

    # ------------------------------------------------------------------ evaluation and state

    def evaluation_sampler(self, seed: int) -> Any:
        """The sampler :meth:`evaluate` runs held-out episodes with: no more environments per worker
        than the per-iteration training call (collecting tasks × the larger episode count)."""
        cfg = self.config
        collecting = cfg.num_collect_tasks or cfg.meta_batch_size
        call = collecting * max(cfg.num_prior_episodes, cfg.num_posterior_episodes, 1)
        return meta_pg.make_agent_sampler(cfg, self.distribution, seed, call)

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Return and success per held-out task of episodes 0..``eval_adapt_steps``.

        Episode 0 acts with z from the prior, episode k with z from the posterior on episodes
        0..k−1 of its own run; each task runs ``eval_episodes_per_task`` independent runs.

        Returns:
            ``{"adaptation_steps": [0..N], "return": [num_tasks, N + 1], "success": same or None}``.
        """
        cfg, tasks = self.config, list(tasks)
        repeats = cfg.eval_episodes_per_task
        runs = [t for t in tasks for _ in range(repeats)]
        actor = copy.copy(self.policy)
        actor.deterministic = cfg.eval_deterministic
        context: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        returns, successes = [], []
        with (
            self.evaluation_sampler(meta_pg.eval_seed(rng)) as sampler,
            torch.no_grad(),
        ):
            for _ in range(cfg.eval_adapt_steps + 1):
                if context:
                    mean, variance = self.posterior(
                        torch.cat(context, 1)[..., :-1], torch.cat(masks, 1)
                    )
                    params: Params | list[Params] = [
                        self._actor_params(m, v) for m, v in zip(mean, variance, strict=True)
                    ]
                else:
                    params = self._prior()
                traj = sampler.sample(actor, params, runs, 1)
                rows, mask = transitions(self.policy, traj)
                context.append(rows)
                masks.append(mask)
                returns.append(
                    traj.episode_returns()[:, 0].reshape(len(tasks), repeats).mean(1).numpy()
                )
                successes.append(traj.success[:, 0].reshape(len(tasks), repeats).numpy())
        success = np.stack(successes, 2).astype(np.float64)  # [num_tasks, repeats, N + 1]
        return {
            "adaptation_steps": list(range(cfg.eval_adapt_steps + 1)),
            "return": np.stack(returns, 1).astype(np.float64),
            "success": None if np.isnan(success).all() else np.nanmean(success, 1),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.portable_state_dict(),
            "replay": [(t, b.state_dict()) for t, b in self.replay.items()],
            "context": {t: c.copy() for t, c in self.context.items()},
        }

    def portable_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` without the replay and encoder buffers (on ML1 about 10 MB against
        hundreds), with the number of transitions each task's replay held: loaded, the agent's
        next step first refills every one of those tasks to that size with the current policy
        (:meth:`_collect_refill`), then goes on. (A state saved without the sizes collects the
        initial episodes on every training task instead, as a new run's first step.)"""
        return {
            "replay_sizes": [(t, b.size) for t, b in self.replay.items()],
            "nets": {
                n: {k: v.detach().cpu().clone() for k, v in p.items()} for n, p in self.nets.items()
            },
            "q_target": {k: v.cpu().clone() for k, v in self.q_target.items()},
            "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes :meth:`state_dict`'s state, or :meth:`portable_state_dict`'s (buffers left empty)."""
        width = state["nets"]["encoder"]["fc0.weight"].shape[1]
        if width != self.context_width:
            raise ValueError(
                f"the checkpoint's context encoder reads {width} numbers per transition, this "
                f"config's {self.context_width}: set agent.use_next_obs_in_context = "
                f"{str(width > self.context_width).lower()} as the run was trained"
            )
        with torch.no_grad():
            for name, params in self.nets.items():
                for k, v in params.items():
                    v.copy_(state["nets"][name][k])
            for k, v in self.q_target.items():
                v.copy_(state["q_target"][k])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        self.replay = OrderedDict()
        for task, buffer_state in state.get("replay", []):
            self.replay[task] = TaskReplay(
                buffer_state["data"].shape[1], self.config.replay_capacity
            )
            self.replay[task].load_state_dict(buffer_state)
        self.context = {t: c.copy() for t, c in state.get("context", {}).items()}
        self._refill = [] if "replay" in state else list(state.get("replay_sizes", []))
        self._recollect = "replay" not in state and bool(state.get("replay_sizes", True))
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        """Stops the rollout workers."""
        self.sampler.close()
