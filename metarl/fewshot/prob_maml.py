# Over 400 lines: the model's equations, its MAP inner loop and Laplace predictive, and full state round-tripping; its config is already in prob_maml_config.py.
"""Probabilistic MAML: a meta-learned diagonal Gaussian prior, MAP adaptation, predictive uncertainty.

Model. Every parameter tensor has a prior ``N(μ, diag σ²)``: ``μ`` is the initialisation (the
model's parameters) and ``log σ`` one tensor per parameter, both meta-learned. Adapting to a task
finds the MAP estimate by ``adapt_steps`` gradient steps from ``μ`` on::

    inner(θ) = L_support(θ) + (prior_weight / P) · Σ_i [(θ_i − μ_i)² / (2σ_i²) + log σ_i]

with ``L_support`` the distribution's loss (mean over the ``P`` support points) and the constant
``½ log 2π`` per element dropped (it moves neither the MAP nor any gradient). With
``prior_weight = 1``, ``P · inner`` is the task's negative log posterior: cross-entropy is a
negative log-likelihood, and a squared error ``(y − f)²`` is one of a Gaussian of variance 1/2.
The prior term closes over ``μ`` and ``log σ``, so the (second-order by default) meta-gradient
reaches both. Plain gradient steps of size ``α = inner_lr`` cannot follow a stiff prior: at a curvature
``prior_weight / (P σ²)`` of ``1 / α`` one step lands back on ``μ``, beyond ``2 / α`` the search
oscillates. The inner loss alone therefore uses ``max(σ, √(2α · prior_weight / P))`` (each step
removes at most half of the deviation from ``μ``); the KL term, the samples and the Laplace
precision below use the learned ``σ`` itself. One fact to know: at ``θ = μ`` the prior's gradient is zero for every ``σ``, so
with a single inner step the MAP does not depend on ``σ`` at all, and without ``outer_samples``
``log σ`` then gets no gradient and stays at ``init_prior_std``.

Outer loss per task (``Q`` query points):

* ``outer_samples = 0``: the query loss at the MAP (MAML with a learned proximal prior).
* ``outer_samples = S > 0``: the query loss averaged over ``θ_s = θ_MAP + σ ⊙ ε_s`` with
  ``ε_s ~ N(0, I)`` (reparameterised, so ``σ`` learns from it), plus
  ``kl_weight / Q · KL(N(θ_MAP, σ²) ‖ N(μ, σ²)) = kl_weight / Q · Σ (θ_MAP − μ)² / (2σ²)``.
  This is a tempered variational bound whose posterior keeps the prior's scale, the family
  ``uncertainty = "prior"`` samples at test time. The two terms pull ``σ`` in opposite directions:
  noise on the weights raises the query loss (``σ`` shrinks where the task tolerates little
  spread), while the KL term charges adaptation that moves far in units of ``σ`` (``σ`` grows
  along the directions tasks move). Without the KL term the noise alone would shrink ``σ``
  towards zero, so ``kl_weight`` must be positive when ``outer_samples > 0``.

Measured on the sinusoid protocol (experiments/sinusoid_probmaml.toml, 1500 iterations, 600
held-out tasks): without samples the MSE after 1 step equals MAML's (1.01), after 10 steps the
prior's pull leaves 0.57 (MAML 0.46); with ``outer_samples = 2`` the weight noise cost MSE
(1.44 after 1 step) while ``σ`` settled near 0.05.

Regression also meta-learns a homoscedastic observation noise ``σ_y``: it maximises the query
predictive likelihood ``mean_s N(y; f_s(x), σ_y²)`` of the same parameter samples (the MAP alone
without ``outer_samples``), with the predictions ``f_s`` detached so that ``σ_y`` only fits the
spread of the residuals and leaves the parameters' objective as above. ``σ_y`` is fitted at
``adapt_steps`` inner steps; after more steps residuals shrink and intervals get conservative.

Predictive uncertainty at evaluation (``num_samples`` parameter samples around the MAP):

* ``"prior"``: ``θ_s = θ_MAP + σ ⊙ ε_s``.
* ``"laplace"``: a diagonal Laplace posterior at the MAP with precision
  ``prior_weight / σ² + diag F``, where ``F`` is the Fisher (Gauss-Newton) matrix of
  ``P · L_support``. Its diagonal is estimated from ``num_fisher_samples`` gradients of the loss
  on targets drawn from the model's own predictive (Gumbel-max labels, or ``f + ε/√2`` for squared
  error): per-point score gradients have mean zero and are independent across points, so the
  squared gradient of the sum is an unbiased estimate of the diagonal even with batch norm.

Regression predictions are the mixture ``mean_s N(f_s(x), σ_y²)``: the 90% interval is its exact
central interval, coverage the fraction of targets inside it, NLL its negative log density.
Classification predictions are the mean of the samples' softmax probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.func import grad, vmap

from envs.base import Task
from metarl.adaptation import Params, adapt, map_tasks, meta_backward, task_index
from metarl.errors import NonFiniteLossError
from metarl.fewshot.maml import trainable_params
from metarl.fewshot.predictive import (
    categorical_scores,
    gaussian_mixture_scores,
    mahalanobis,
    neg_log_prior,
)
from metarl.fewshot.prob_maml_config import ProbabilisticMAMLConfig
from metarl.runtime import on_device, task_batching


def _perturb(params: Params, std: Params, eps: Params) -> Params:
    return {k: params[k] + std[k] * eps[k] for k in params}


def _expand(batch: Any, num: int) -> Any:
    """Each tensor repeated on a new leading axis of size ``num`` (a view).

    Nested vmaps need it: some batching rules (``mse_loss``) fail when one operand is batched over
    tasks only and the other over tasks and samples.
    """
    return torch.utils._pytree.tree_map(lambda t: t.expand(num, *t.shape), batch)


class ProbabilisticMAML:
    """MAML with a meta-learned Gaussian prior, MAP adaptation and predictive uncertainty.

    Args:
        config: the learner's settings.
        distribution: a few-shot task distribution (``episodes``, ``make_model``, ``loss``,
            ``accuracy``); regression when its targets are floats, classification otherwise.
        seed: seeds the initial parameters and the learner's data and noise streams.
    """

    Config = ProbabilisticMAMLConfig
    family = "Bayesian"
    adaptation_unit = "gradient step"
    scores_tasks_independently = False

    def __init__(self, config: ProbabilisticMAMLConfig, distribution: Any, seed: int):
        self.config = config
        self.distribution = distribution
        self.model = distribution.make_model()
        self.device = torch.device(config.device)
        self.params = trainable_params(self.model, seed, self.device)
        self.log_std: Params = {
            k: torch.full_like(v, math.log(config.init_prior_std)).requires_grad_()
            for k, v in self.params.items()
        }
        # A throwaway stream leaves self.rng alone; training's episode sizes reuse cached samplers.
        probe_rng = np.random.default_rng(0)
        probe, _ = distribution.episodes(
            distribution.sample(1, probe_rng), config.num_shots, config.num_queries, probe_rng
        )
        self.regression = bool(probe.y.is_floating_point())
        with torch.no_grad():
            self.num_outputs = self.model(self.params, probe.x[0].to(self.device)).shape[-1]
        self.log_noise = torch.tensor(
            math.log(config.init_noise_std),
            device=self.device,
            requires_grad=self.regression and config.learn_noise,
        )
        self.batch = (
            task_batching(distribution, config.device) if config.batch == "auto" else config.batch
        )
        trainable = [*self.params.values(), *self.log_std.values()]
        if self.log_noise.requires_grad:
            trainable.append(self.log_noise)
        self.optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)
        self.rng = np.random.default_rng([seed, 1])
        self.generator = torch.Generator().manual_seed(
            int(np.random.default_rng([seed, 2]).integers(2**62))
        )

    def loss_fn(self, params: Params, data: Any) -> torch.Tensor:
        """The distribution's loss of one task: ``data`` holds ``x [P, ...]`` and targets."""
        return self.distribution.loss(self.model(params, data.x), data)

    def _inner_loss(self, mean: Params, log_std: Params) -> Any:
        def inner(params: Params, data: Any) -> torch.Tensor:
            weight = self.config.prior_weight / data.x.shape[0]
            # Keep the prior's curvature weight / σ² at most 1 / (2 inner_lr): a stiffer prior makes
            # a gradient step jump back to μ or past it (the search oscillates). Floored here only.
            floor = 0.5 * math.log(2 * self.config.inner_lr * weight) if weight > 0 else -math.inf
            stable = {k: v.clamp(min=floor) for k, v in log_std.items()}
            return self.loss_fn(params, data) + weight * neg_log_prior(params, mean, stable)

        return inner

    def _map(
        self, mean: Params, log_std: Params, data: Any, steps: int, first_order: bool
    ) -> Params:
        return adapt(
            self._inner_loss(mean, log_std), mean, data, steps, self.config.inner_lr, first_order
        )

    def _task_terms(
        self,
        mean: Params,
        log_std: Params,
        log_noise: torch.Tensor,
        support: Any,
        query: Any,
        eps: Params,
    ) -> torch.Tensor:
        """``[parameter objective, query loss at the MAP, KL, noise NLL]`` of one task.

        ``eps`` holds ``[S, ...]`` noise per parameter. The noise NLL sees detached predictions: its
        value moves with μ and log σ but only σ_y gets its gradient.
        """
        cfg = self.config
        theta = self._map(mean, log_std, support, cfg.adapt_steps, cfg.first_order)
        pred = self.model(theta, query.x)
        map_loss = self.distribution.loss(pred, query)
        kl = mahalanobis(theta, mean, log_std)
        if cfg.outer_samples > 0:
            std = {k: torch.exp(v) for k, v in log_std.items()}
            preds = self._sample_predictions(theta, std, query.x, eps)
            sample_loss = vmap(self.distribution.loss)(preds, _expand(query, len(preds))).mean()
            objective = sample_loss + cfg.kl_weight / query.x.shape[0] * kl
        else:
            preds, objective = pred.unsqueeze(0), map_loss
        noise_nll = torch.zeros_like(map_loss)
        if self.regression:
            noise_nll = gaussian_mixture_scores(
                preds.detach().flatten(1), torch.exp(log_noise), query.y.flatten()
            )[2]
        return torch.stack([objective, map_loss, kl, noise_nll])

    def _sample_predictions(
        self, theta: Params, std: Params, x: torch.Tensor, eps: Params
    ) -> torch.Tensor:
        """``[S, P, ...]`` predictions of ``θ + std ⊙ ε_s`` for ``eps`` ``{name: [S, ...]}``."""
        num_samples = len(next(iter(eps.values())))

        def predict(e: Params, x: torch.Tensor) -> torch.Tensor:
            return self.model(_perturb(theta, std, e), x)

        # Samples are mapped like tasks: one at a time on loop batching, where vmapped batch norm
        # and pooling are slow (CPUs).
        return map_tasks(predict, (), (eps, _expand(x, num_samples)), self.batch)

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(self.device)

    def meta_loss(self, support: Any, query: Any, eps: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta-loss of a task batch and its per-task terms.

        Args:
            support, query: batches with a task axis, ``x [B, P, ...]``.
            eps: standard normal noise ``{name: [B, outer_samples, *shape]}`` (empty without samples).

        Returns:
            ``(loss, terms)``: the scalar meta-loss, the mean over tasks of objective plus noise
            NLL, and the ``[B, 4]`` per-task terms: the parameters' objective (query loss, sampled
            or at the MAP, plus the KL term), the query loss at the MAP, the KL (Mahalanobis)
            term and the observation-noise NLL.
        """
        terms = map_tasks(
            self._task_terms, (self.params, self.log_std, self.log_noise), (support, query, eps),
            self.batch,
        )
        return (terms[:, 0] + terms[:, 3]).mean(), terms

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns ``train/*`` metrics."""
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_queries, self.rng)
        support, query = on_device(support, self.device), on_device(query, self.device)
        eps = {}
        if cfg.outer_samples > 0:
            eps = {
                k: self._normal((len(tasks), cfg.outer_samples, *v.shape))
                for k, v in self.params.items()
            }
        self.optimizer.zero_grad(set_to_none=True)
        # The gradient of meta_loss, task by task with loop batching (one graph at a time).
        terms = meta_backward(
            self._task_terms,
            (self.params, self.log_std, self.log_noise),
            (support, query, eps),
            self.batch,
            cfg.backward_chunk or None,
            objective=lambda t: t[:, 0] + t[:, 3],
        )
        loss = (terms[:, 0] + terms[:, 3]).mean()
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"meta-loss is {loss.item()} (query loss at the MAP {terms[:, 1].mean().item()}); "
                "parameters unchanged. Lower inner_lr or outer_lr, or raise init_prior_std"
            )
        self.optimizer.step()
        means = terms.mean(0)
        metrics = {
            "train/meta_loss": loss.item(),
            "train/query_loss": means[1].item(),
            "train/kl": means[2].item(),
            "train/mean_prior_std": float(
                np.mean([torch.exp(v).mean().item() for v in self.log_std.values()])
            ),
        }
        if self.regression:
            metrics["train/noise_nll"] = means[3].item()
            metrics["train/noise_std"] = math.exp(self.log_noise.item())
        return metrics

    def _detached(self) -> tuple[Params, Params]:
        return (
            {k: v.detach() for k, v in self.params.items()},
            {k: v.detach() for k, v in self.log_std.items()},
        )

    def adapt(self, task: Task | None, data: Any, steps: int | None = None) -> Params:
        """The MAP parameters of one task from its support ``data`` (``x [P, ...]``, targets)."""
        steps = self.config.adapt_steps if steps is None else steps
        mean, log_std = self._detached()
        return self._map(mean, log_std, on_device(data, self.device), steps, first_order=True)

    def _fisher_diagonal(self, theta: Params, data: Any, eps: torch.Tensor) -> Params:
        """Monte Carlo diagonal Fisher of ``P · loss`` at ``theta``; ``eps [F, P, ...]`` noise."""
        pred = self.model(theta, data.x).detach()
        num_points = data.x.shape[0]

        def sampled_loss(params: Params, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
            # A squared error is a Gaussian NLL of variance 1/2; cross-entropy samples by Gumbel-max.
            targets = pred + e * math.sqrt(0.5) if self.regression else (pred + e).argmax(-1)
            return num_points * self.loss_fn(params, type(data)(x, targets))

        grads = map_tasks(grad(sampled_loss), (theta,), (_expand(data.x, len(eps)), eps), self.batch)
        return {k: g.pow(2).mean(0) for k, g in grads.items()}

    def posterior_std(
        self, theta: Params, log_std: Params, data: Any, fisher_eps: torch.Tensor
    ) -> Params:
        """Per-element standard deviation of the test-time parameter samples around ``theta``."""
        if self.config.uncertainty == "prior":
            return {k: torch.exp(v) for k, v in log_std.items()}
        fisher = self._fisher_diagonal(theta, data, fisher_eps)
        return {
            k: torch.rsqrt(self.config.prior_weight * torch.exp(-2 * log_std[k]) + fisher[k])
            for k in theta
        }

    def _task_scores(
        self,
        mean: Params,
        log_std: Params,
        noise_std: torch.Tensor,
        support: Any,
        query: Any,
        eps: Params,
        fisher_eps: torch.Tensor,
    ) -> torch.Tensor:
        """``[num_steps, num_metrics]`` scores of one held-out task (columns: :meth:`_columns`)."""
        rows, theta, done = [], mean, 0
        for target in sorted(set(self.config.eval_adapt_steps)):
            theta = adapt(
                self._inner_loss(mean, log_std),
                theta,
                support,
                target - done,
                self.config.inner_lr,
                first_order=True,
            )
            done = target
            pred = self.model(theta, query.x)
            std = self.posterior_std(theta, log_std, support, fisher_eps)
            preds = self._sample_predictions(theta, std, query.x, eps)
            row = [self.distribution.loss(pred, query)]
            if self.regression:
                row += list(gaussian_mixture_scores(preds.flatten(1), noise_std, query.y.flatten()))
            else:
                row += [
                    self.distribution.accuracy(pred, query),
                    *categorical_scores(preds, query.y),
                ]
            rows.append(torch.stack(row))
        return torch.stack(rows)

    def _columns(self) -> list[str]:
        if self.regression:
            return ["loss", "coverage90", "interval_width90", "nll"]
        return ["loss", "accuracy", "predictive_accuracy", "nll"]

    def _eval_noise(self, support: Any, generator: torch.Generator) -> tuple[Params, torch.Tensor]:
        cfg = self.config
        num_tasks, num_points = support.x.shape[:2]
        eps = {
            k: torch.randn((num_tasks, cfg.num_samples, *v.shape), generator=generator).to(
                self.device
            )
            for k, v in self.params.items()
        }
        tail = tuple(support.y.shape[2:]) if self.regression else (self.num_outputs,)
        fisher_eps = torch.randn(
            (num_tasks, cfg.num_fisher_samples, num_points, *tail), generator=generator
        )
        if not self.regression:  # Gumbel noise for Gumbel-max label sampling
            uniform = torch.rand(fisher_eps.shape, generator=generator).clamp(1e-10, 1 - 1e-7)
            fisher_eps = -torch.log(-torch.log(uniform))
        return eps, fisher_eps.to(self.device)

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Scores held-out ``tasks`` after each count in ``eval_adapt_steps`` of MAP steps.

        Returns:
            ``{"adaptation_steps": [...], "loss": [num_tasks, num_steps], "accuracy": ... or None,
            "nll": ...}`` plus ``coverage90`` and ``interval_width90`` (regression) or
            ``predictive_accuracy`` (classification, arg-max of the mean predictive probabilities).
        """
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_eval_queries, rng)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        mean, log_std = self._detached()
        noise_std = torch.exp(self.log_noise.detach())
        chunk = 1 if self.batch == "loop" else getattr(self.distribution, "eval_chunk_size", 50)
        parts = []
        for start in range(0, len(tasks), chunk):
            s = on_device(task_index(support, slice(start, start + chunk)), self.device)
            q = on_device(task_index(query, slice(start, start + chunk)), self.device)
            eps, fisher_eps = self._eval_noise(s, generator)
            scores = map_tasks(
                self._task_scores, (mean, log_std, noise_std), (s, q, eps, fisher_eps), self.batch
            )
            parts.append(scores.detach().cpu().numpy())
        scores = np.concatenate(parts)
        result: dict[str, Any] = {
            "adaptation_steps": sorted(set(cfg.eval_adapt_steps)),
            "accuracy": None,
        }
        for j, name in enumerate(self._columns()):
            result[name] = scores[:, :, j]
        return result

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "log_std": {k: v.detach().cpu().clone() for k, v in self.log_std.items()},
            "log_noise": self.log_noise.detach().cpu().clone(),
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            for k, v in self.log_std.items():
                v.copy_(state["log_std"][k])
            self.log_noise.copy_(state["log_noise"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.generator.set_state(state["generator"])

    def close(self) -> None:
        """Holds no worker processes or files: nothing to release."""
