"""Adversarial task generator around a gradient-based meta-learner (MAML-TRPO by default).

A generator G, a distribution over task parameters (goals, wind, target velocity), proposes
tasks on which the meta-policy does badly *after adaptation*; a discriminator D tells G's tasks
from tasks of the nominal distribution, and G is paid D's logit so its tasks stay plausible.
Each meta-batch mixes nominal tasks and G's tasks (``generated_fraction``). Related: RoML's
cross-entropy task sampler (arXiv 2301.11147) and Goal GAN (arXiv 1705.06366); PAIRED (arXiv
2012.02096) shows why a pure minimax generator needs a plausibility term.

G: ``u ~ N(μ, diag σ²)`` in an unconstrained space, mapped into its box by
``c = low + (high − low) · sigmoid(u)``, so every sample lies inside the declared bounds. Its box
is the nominal box scaled by ``bounds_scale`` about its centre (1: the nominal box itself).
G is trained by the score-function gradient of ``E[−R_post(c)] + β · E[plausibility(c)]``, the
return standardised over the generated tasks of the batch and the plausibility term estimated on
fresh draws of G (it needs no rollouts):

* ``plausibility = "discriminator"``: D's logit (label 1: nominal tasks, 0: G's).
* ``plausibility = "kl"``: the exact log density ratio ``log p_nominal(c) − log q(c)``, whose
  expectation is ``−KL(q || p_nominal)``; needs ``bounds_scale = 1`` (the KL is infinite once G
  puts mass outside the nominal box).
* ``plausibility = "none"``: G without D (an ablation: its tasks drift off the nominal box).

``proposal = "uniform"`` replaces G by a fixed uniform distribution over G's box and trains
neither G nor D: with ``generated_fraction = 1`` and ``bounds_scale > 1`` that is wide domain
randomisation, the non-adversarial baseline of the generator.

Task vectors are standardised by the nominal box (centre 0, half-width 1) before D sees them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from envs.base import Task, TaskDistribution
from metarl import discriminator
from metarl.config import build
from metarl.discriminator import DiscData, Discriminator
from metarl.registry import resolve_agent
from metarl.runtime import tune_allocator


@dataclass(frozen=True)
class TaskGeneratorConfig:
    meta_agent: str = "agents.maml_trpo:MAMLTRPO"
    """The meta-learner trained on the mixed batches (import path, as in [run] agent)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """The meta-learner's own settings (its config's fields), e.g. {meta_batch_size = 20}."""
    generated_fraction: float = 0.5
    """Fraction of each meta-batch drawn from G (the rest from the nominal distribution)."""
    proposal: Literal["generator", "uniform"] = "generator"
    """Where the generated share comes from: the learned G, or uniform over G's box (wide domain
    randomisation; G and D are not trained)."""
    plausibility: Literal["discriminator", "kl", "none"] = "discriminator"
    """What keeps G's tasks plausible: D's logit, the exact KL to the nominal box, or nothing."""
    plausibility_weight: float = 1.0
    """β: weight of the plausibility term against the standardised post-adaptation return."""
    bounds_scale: float = 1.5
    """G's box: the nominal box scaled by this about its centre (>= 1)."""
    generator_lr: float = 0.05
    """Adam step size of G's mean and log standard deviation."""
    init_log_std: float = 0.0
    """Initial log standard deviation of G in the unconstrained space."""
    disc_hidden_sizes: tuple[int, ...] = (32, 32)
    """D's hidden widths."""
    disc_lr: float = 1e-2
    """Adam step size of D."""
    disc_steps: int = 10
    """D's Adam steps per meta-iteration."""
    gradient_penalty: float = 1.0
    """λ of D's zero-centred gradient penalty on nominal tasks."""
    num_disc_samples: int = 64
    """Nominal and generated tasks per D step."""
    shifted_scale: float = 1.5
    """Evaluation also scores tasks from the nominal box scaled by this (outside the training range)."""
    eval_perturbations: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Evaluation also scores the held-out tasks under these robustness wrappers (``*_perturbed``),
    e.g. {observation_noise = {std = 0.05}, non_stationary = {mode = "steps", period = 50}}."""

    @property
    def meta_batch_size(self) -> int:
        """Tasks per meta-iteration: the meta-learner's setting (the runner samples that many)."""
        if "meta_batch_size" in self.meta:
            return int(self.meta["meta_batch_size"])
        return int(resolve_agent(self.meta_agent).Config().meta_batch_size)

    def __post_init__(self) -> None:
        if not 0.0 <= self.generated_fraction <= 1.0:
            raise ValueError(
                f"generated_fraction must lie in [0, 1], got {self.generated_fraction}"
            )
        if self.bounds_scale < 1.0 or self.shifted_scale < 1.0:
            raise ValueError(
                f"bounds_scale and shifted_scale must be >= 1, got {self.bounds_scale}, {self.shifted_scale}"
            )
        if self.proposal not in ("generator", "uniform"):
            raise ValueError(f"proposal must be 'generator' or 'uniform', got {self.proposal!r}")
        if self.plausibility == "kl" and self.bounds_scale != 1.0:
            raise ValueError(
                "plausibility='kl' needs bounds_scale=1: the KL to the nominal box is infinite once "
                f"G can leave it (bounds_scale={self.bounds_scale})"
            )
        for name in ("generator_lr", "disc_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.disc_steps < 0 or self.num_disc_samples < 1 or self.plausibility_weight < 0:
            raise ValueError(
                "need disc_steps >= 0, num_disc_samples >= 1, plausibility_weight >= 0"
            )


class TaskBox:
    """A box of task fields flattened to one vector (field order fixed by the box's dict)."""

    def __init__(self, box: dict[str, tuple[list[float], list[float]]]) -> None:
        self.fields = list(box)
        self.sizes = [len(box[k][0]) for k in self.fields]
        self.low = torch.tensor([x for k in self.fields for x in box[k][0]], dtype=torch.float64)
        self.high = torch.tensor([x for k in self.fields for x in box[k][1]], dtype=torch.float64)

    @property
    def dim(self) -> int:
        return int(self.low.numel())

    def scaled(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        centre, half = (self.low + self.high) / 2, (self.high - self.low) / 2
        return centre - scale * half, centre + scale * half

    def standardise(self, c: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> centre 0, half-width 1 of the nominal box."""
        return (c - (self.low + self.high) / 2) / ((self.high - self.low) / 2)

    def uniform(self, n: int, rng: np.random.Generator, scale: float = 1.0) -> torch.Tensor:
        low, high = self.scaled(scale)
        return low + (high - low) * torch.from_numpy(rng.uniform(size=(n, self.dim)))

    def tasks(self, distribution: Any, c: torch.Tensor) -> list[Task]:
        out = []
        for row in c.tolist():
            fields, i = {}, 0
            for name, size in zip(self.fields, self.sizes, strict=True):
                fields[name], i = row[i : i + size], i + size
            out.append(distribution.make_task(**fields))
        return out


class TaskGenerator:
    """G and D around a meta-learner; see the module docstring.

    Args:
        config: the generator's settings (the meta-learner's in ``config.meta``).
        distribution: a family with ``parameter_box()`` and ``make_task(**fields)``.
        seed: seeds the meta-learner, G, D and their samples.
    """

    Config = TaskGeneratorConfig
    family = "gradient"
    adaptation_unit = "policy-gradient step"
    scores_tasks_independently = False

    def __init__(
        self, config: TaskGeneratorConfig, distribution: TaskDistribution, seed: int
    ) -> None:
        tune_allocator()
        if not hasattr(distribution, "parameter_box"):
            raise ValueError(
                f"{type(distribution).__name__} declares no parameter box; the task generator needs "
                "a family with parameter_box() and make_task(), e.g. navigation-2d-wind"
            )
        self.config, self.distribution = config, distribution
        meta_cls = resolve_agent(config.meta_agent)
        self.meta = meta_cls(
            build(meta_cls.Config, dict(config.meta), "agent.meta"), distribution, seed
        )
        self.box = TaskBox(distribution.parameter_box())
        self.g_low, self.g_high = self.box.scaled(config.bounds_scale)
        self.g_params = {
            "mean": torch.zeros(self.box.dim, dtype=torch.float64, requires_grad=True),
            "log_std": torch.full(
                (self.box.dim,), config.init_log_std, dtype=torch.float64, requires_grad=True
            ),
        }
        self.g_optimizer = torch.optim.Adam(list(self.g_params.values()), lr=config.generator_lr)
        self.disc = Discriminator(self.box.dim, config.disc_hidden_sizes, "tanh")
        self.disc_params = {
            k: v.requires_grad_() for k, v in self.disc.init_params(seed + 7).items()
        }
        self.disc_optimizer = torch.optim.Adam(list(self.disc_params.values()), lr=config.disc_lr)
        self.rng = np.random.default_rng(seed + 11)

    # ------------------------------------------------------------------ G and D

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` task vectors from G ``[n, dim]`` (inside G's box) and their latent draws ``u``."""
        with torch.no_grad():
            noise = torch.from_numpy(self.rng.standard_normal((n, self.box.dim)))
            u = self.g_params["mean"] + self.g_params["log_std"].exp() * noise
        return self.squash(u), u

    def squash(self, u: torch.Tensor) -> torch.Tensor:
        c = self.g_low + (self.g_high - self.g_low) * torch.sigmoid(u)
        return torch.minimum(torch.maximum(c, self.g_low), self.g_high)  # no rounding past the box

    def log_density(self, c_u: torch.Tensor) -> torch.Tensor:
        """``log q(c)`` of task vectors given by their latents ``u`` ``[n, dim]`` (change of variables)."""
        mean, log_std = self.g_params["mean"], self.g_params["log_std"]
        z = (c_u - mean) / log_std.exp()
        log_u = (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
        s = torch.sigmoid(c_u)
        return log_u - torch.log((self.g_high - self.g_low) * s * (1 - s)).sum(-1)

    def plausibility(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """``[n]`` the plausibility term of generated tasks (detached)."""
        cfg = self.config
        with torch.no_grad():
            if cfg.plausibility == "discriminator":
                x = self.box.standardise(c).float()
                return self.disc.logits(
                    {k: v.detach() for k, v in self.disc_params.items()}, x
                ).double()
            if cfg.plausibility == "kl":
                log_nominal = -torch.log(self.box.high - self.box.low).sum()
                return log_nominal - self.log_density(u)
            return torch.zeros(c.shape[0], dtype=torch.float64)

    def _update_generator(self, u: torch.Tensor, returns: torch.Tensor) -> dict[str, float]:
        """One score-function step on ``E[−standardised return] + β · E[plausibility]``.

        The return term is estimated on the batch's generated tasks (they cost rollouts); the
        plausibility term needs none, so it is estimated on ``num_disc_samples`` fresh draws.
        """
        cfg = self.config
        if returns.numel() > 1:
            difficulty = -(returns - returns.mean()) / (returns.std() + 1e-8)
        else:
            difficulty = torch.zeros_like(returns)
        loss = -(difficulty.detach() * self.log_density(u)).mean()
        plausible = torch.zeros(())
        if cfg.plausibility != "none" and cfg.plausibility_weight > 0:
            c_many, u_many = self.sample(cfg.num_disc_samples)
            plausible = self.plausibility(c_many, u_many)
            centred = plausible - plausible.mean()
            loss = loss - cfg.plausibility_weight * (centred * self.log_density(u_many)).mean()
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.g_optimizer.step()
        return {"train/generator_plausibility": float(plausible.mean())}

    def _update_disc(self) -> dict[str, float]:
        cfg, n = self.config, self.config.num_disc_samples
        loss = torch.zeros(())
        for _ in range(cfg.disc_steps):
            nominal = self.box.standardise(self.box.uniform(n, self.rng)).float()
            generated = self.box.standardise(self.sample(n)[0]).float()
            ones = torch.ones(n)
            loss = discriminator.loss(
                self.disc,
                self.disc_params,
                DiscData(nominal, ones),
                DiscData(generated, ones),
                cfg.gradient_penalty,
            )
            self.disc_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.disc_optimizer.step()
        return {"train/disc_loss": float(loss.detach())}

    # ------------------------------------------------------------------ agent API

    @property
    def meta_batch_size(self) -> int:
        """One task per step: the generator proposes the rest of its batch itself."""
        return 1

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks`` with a ``generated_fraction`` of them replaced by G's."""
        num_generated = int(round(self.config.generated_fraction * len(tasks)))
        if self.config.proposal == "uniform":
            c = self.box.uniform(num_generated, self.rng, self.config.bounds_scale)
        else:
            c, u = self.sample(num_generated)
        batch = list(tasks[: len(tasks) - num_generated]) + self.box.tasks(self.distribution, c)
        metrics = self.meta.step(batch)
        if num_generated and self.config.proposal == "uniform":
            returns = self.meta.last_post_returns[-num_generated:].double()
            metrics["train/generated_post_return"] = float(returns.mean())
            return metrics
        if num_generated:
            returns = self.meta.last_post_returns[-num_generated:].double()
            metrics |= self._update_generator(u, returns)
            metrics["train/generated_post_return"] = float(returns.mean())
            distance = self.box.standardise(c).abs().amax(-1)
            metrics["train/generated_outside_nominal"] = float((distance > 1).double().mean())
        if self.config.plausibility == "discriminator" and num_generated:
            metrics |= self._update_disc()
        metrics["train/generator_std"] = float(self.g_params["log_std"].detach().exp().mean())
        return metrics

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """The meta-learner's curves on ``tasks``, on as many shifted tasks (``*_shifted``) and, with
        ``eval_perturbations``, on ``tasks`` under robustness wrappers (``*_perturbed``)."""
        result = dict(self.meta.evaluate(tasks, rng))
        shifted = self.box.tasks(
            self.distribution, self.box.uniform(len(tasks), rng, self.config.shifted_scale)
        )
        for key, value in self.meta.evaluate(shifted, rng).items():
            if key != "adaptation_steps":
                result[f"{key}_shifted"] = value
        if self.config.eval_perturbations:
            from envs.wrappers import Perturbed

            perturbed = Perturbed(self.distribution, list(self.config.eval_perturbations.items()))
            for key, value in self.meta.evaluate(tasks, rng, distribution=perturbed).items():
                if key != "adaptation_steps":
                    result[f"{key}_perturbed"] = value
        return result

    def adapt(self, task: Task, trajectories: Any, params: Any = None) -> Any:
        return self.meta.adapt(task, trajectories, params)

    def state_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.state_dict(),
            "g_params": {k: v.detach().clone() for k, v in self.g_params.items()},
            "g_optimizer": self.g_optimizer.state_dict(),
            "disc_params": {k: v.detach().clone() for k, v in self.disc_params.items()},
            "disc_optimizer": self.disc_optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        with torch.no_grad():
            for k, v in self.g_params.items():
                v.copy_(state["g_params"][k])
            for k, v in self.disc_params.items():
                v.copy_(state["disc_params"][k])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        self.meta.close()
