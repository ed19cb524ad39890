"""Gradient-based few-shot learners on the adaptation core: MAML, FOMAML, Meta-SGD, ANIL, Reptile,
and the pretrained baseline of the MAML paper.

One learner class serves every method; ``method`` selects the inner and outer rules:

* ``maml``: second-order meta-gradient through ``adapt_steps`` inner SGD steps (Finn et al. 2017).
* ``fomaml``: the same with inner gradients treated as constants.
* ``metasgd``: per-parameter inner rates learned with the initialisation (Li et al. 2017).
* ``anil``: only the head adapts in the inner loop (Raghu et al. 2020). On a model that splits
  into body and head (conv4, the MLP) the body runs once per set of images and the inner steps
  run on the head alone: the same values, about 3× faster to train and 7× faster to score a
  20-way 5-shot conv4 (``metarl bench anil``).
* ``reptile``: SGD on each task, then ``θ ← θ + ε · mean(θ̃ − θ)`` (Nichol et al. 2018).
* ``pretrained``: one network trained on all tasks jointly, fine-tuned at test time (MAML's baseline).

The learner works on any few-shot distribution with ``episodes``, ``make_model``, ``loss`` and
``accuracy`` (sinusoid regression, Omniglot classification).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.func import vmap

from envs.base import Task
from metarl.adaptation import (
    Params,
    adapt,
    map_task_chunks,
    meta_backward,
    reptile_update,
    task_objective,
)
from metarl.config import require_at_least
from metarl.errors import NonFiniteLossError
from metarl.runtime import check_device, on_device, task_batching

METHODS = ("maml", "fomaml", "metasgd", "anil", "reptile", "pretrained")
# Held-out tasks evaluated together under vmap: 8 Omniglot 20-way episodes (2,560 images with
# their 15 queries per class) keep a conv4 adaptation near 1 GiB of activations.
VMAP_EVAL_CHUNK = 8


@dataclass(frozen=True)
class EpisodicConfig:
    """Settings every gradient-based few-shot learner shares: episodes, inner loop, outer loop."""

    meta_batch_size: int = 25
    """Tasks per meta-iteration."""
    num_shots: int = 10
    """Support examples per task (per class for classification): the K of K-shot."""
    num_queries: int = 10
    """Query examples per task (per class for classification) for the outer loss."""
    num_eval_queries: int = 100
    """Query examples per held-out task at evaluation."""
    inner_lr: float = 0.01
    """Inner SGD step size α (the initial value of Meta-SGD's learned rates)."""
    adapt_steps: int = 1
    """Inner steps during meta-training."""
    eval_adapt_steps: tuple[int, ...] = (0, 1, 10)
    """Adaptation steps after which held-out tasks are scored."""
    outer_lr: float = 0.001
    """Adam step size of the outer loop (Reptile: the interpolation rate ε)."""
    batch: Literal["auto", "vmap", "loop"] = "auto"
    """Batch tasks with vmap or a loop; auto takes the faster one measured for the model."""
    device: str = "cpu"
    """Where parameters and episodes live ('cpu' or 'cuda'); data is sampled on the CPU."""
    backward_chunk: int = 0
    """Tasks backpropagated together, their meta-gradients accumulated (bounds memory, same
    gradient); 0: one task at a time with loop batching, the whole meta-batch with vmap."""

    def _min_adapt_steps(self) -> int:
        return 1

    def __post_init__(self) -> None:
        check_device(self.device)
        require_at_least(self, ("meta_batch_size", "num_shots", "num_queries", "num_eval_queries"))
        if self.adapt_steps < self._min_adapt_steps():
            raise ValueError(
                f"adapt_steps must be >= {self._min_adapt_steps()}, got {self.adapt_steps}"
            )
        if self.inner_lr <= 0 or self.outer_lr <= 0:
            raise ValueError(
                f"learning rates must be > 0, got inner {self.inner_lr}, outer {self.outer_lr}"
            )
        if not self.eval_adapt_steps or min(self.eval_adapt_steps) < 0:
            raise ValueError(
                f"eval_adapt_steps must be non-negative step counts, got {self.eval_adapt_steps}"
            )
        if self.batch not in ("auto", "vmap", "loop"):
            raise ValueError(f"batch must be 'auto', 'vmap' or 'loop', got {self.batch!r}")
        if self.backward_chunk < 0:
            raise ValueError(
                f"backward_chunk must be >= 0 tasks (0 picks one per batching), got "
                f"{self.backward_chunk}"
            )


@dataclass(frozen=True)
class GradientLearnerConfig(EpisodicConfig):
    method: Literal["maml", "fomaml", "metasgd", "anil", "reptile", "pretrained"] = "maml"
    """Which learner: maml, fomaml, metasgd, anil, reptile or pretrained."""

    def _min_adapt_steps(self) -> int:
        return 0 if self.method == "pretrained" else 1


def trainable_params(model: Any, seed: int, device: torch.device) -> Params:
    """The model's seeded initial parameters on ``device``, as leaves that require gradients."""
    return {k: v.to(device).requires_grad_() for k, v in model.init_params(seed).items()}


def _cat_points(a: Any, b: Any) -> Any:
    return type(a)(*(torch.cat([x, y], dim=1) for x, y in zip(a, b, strict=True)))


class GradientLearner:
    """A gradient-based few-shot learner; see the module docstring for the methods.

    Args:
        config: the learner's settings.
        distribution: the few-shot task distribution (provides data, model and loss).
        seed: seeds the initial parameters and the learner's data stream.
    """

    Config = GradientLearnerConfig
    family = "gradient"
    adaptation_unit = "gradient step"
    # ``evaluate`` scores each task on its own, with no randomness of its own, so held-out tasks
    # whose episodes the tasks fix (Omniglot's) can be scored a chunk at a time, each chunk saved
    # (``experiments.tables.omniglot_cells.score_held_out``), with the values of one call on them all.
    scores_tasks_independently = True

    def __init__(self, config: GradientLearnerConfig, distribution: Any, seed: int):
        self.config = config
        self.distribution = distribution
        self.model = distribution.make_model()
        self.device = torch.device(config.device)
        self.params = trainable_params(self.model, seed, self.device)
        self.lrs: Params | None = None
        if config.method == "metasgd":
            self.lrs = {
                k: torch.full_like(v, config.inner_lr).requires_grad_()
                for k, v in self.params.items()
            }
        self.names = self.model.head_names(self.params) if config.method == "anil" else None
        # ANIL on a model that runs as head(features(x)): the features are computed once per task
        # and the inner steps run on the head alone (same values, see `_anil_task`).
        self.split = self.model.split(self.params) if config.method == "anil" else None
        self.batch = (
            task_batching(distribution, config.device) if config.batch == "auto" else config.batch
        )
        trainable = list(self.params.values()) + list((self.lrs or {}).values())
        self.optimizer = torch.optim.Adam(trainable, lr=config.outer_lr)
        self.rng = np.random.default_rng([seed, 1])

    def loss_fn(self, params: Params, data: Any) -> torch.Tensor:
        """Inner and outer loss of one task: ``data`` holds ``x [P, ...]`` and targets ``[P, ...]``."""
        return self.distribution.loss(self.model(params, data.x), data)

    @property
    def inner_rate(self) -> float | Params:
        return self.lrs if self.lrs is not None else self.config.inner_lr

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns ``train/*`` metrics."""
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_queries, self.rng)
        support, query = on_device(support, self.device), on_device(query, self.device)
        if cfg.method == "reptile":
            return self._reptile_step(support, query)
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.method == "pretrained":
            both = _cat_points(support, query)
            losses = vmap(self.loss_fn, in_dims=(None, 0))(self.params, both)
            losses.mean().backward()
        else:
            one_task = task_objective(
                self.loss_fn,
                cfg.adapt_steps,
                self.inner_rate,
                first_order=cfg.method == "fomaml",
                names=self.names,
            )
            if self.split is not None:  # ANIL on a split model: the body once per set
                one_task = self._anil_task
            # Task by task with loop batching: one task's second-order graph in memory at a time.
            losses = meta_backward(
                one_task, (self.params,), (support, query), self.batch, cfg.backward_chunk or None
            )
        loss = losses.mean()
        if not torch.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"meta-loss is {loss.item()} (method {cfg.method}); parameters unchanged"
            )
        self.optimizer.step()
        metrics = {"train/query_loss": loss.item()}
        if self.lrs is not None:
            metrics["train/mean_inner_lr"] = float(
                np.mean([v.mean().item() for v in self.lrs.values()])
            )
        return metrics

    def _head_loss(self, head: Params, data: Any) -> torch.Tensor:
        """The task loss of the head alone on features ``data.x`` (ANIL with a split model)."""
        assert self.split is not None
        return self.distribution.loss(self.split.head(head, data.x), data)

    def _on_features(self, params: Params, data: Any) -> Any:
        assert self.split is not None
        return data._replace(x=self.split.features(params, data.x))

    def _anil_task(self, params: Params, support: Any, query: Any) -> torch.Tensor:
        """One task's ANIL query loss, the body run once on each set: the same value (and
        gradients) as :func:`meta_objective` with ``names`` set to the head, whose every inner
        step runs the whole model though only the head changes (batch statistics included: each
        set is still normalised over itself)."""
        assert self.split is not None
        head = {k: params[k] for k in self.split.names}
        adapted = adapt(
            self._head_loss, head, self._on_features(params, support), self.config.adapt_steps,
            self.config.inner_lr,
        )
        return self._head_loss(adapted, self._on_features(params, query))

    def _reptile_step(self, support: Any, query: Any) -> dict[str, float]:
        both = _cat_points(support, query)
        detached = {k: v.detach() for k, v in self.params.items()}

        def one(data: Any) -> Params:
            return adapt(
                self.loss_fn, detached, data, self.config.adapt_steps, self.config.inner_lr, True
            )

        if self.batch == "loop":  # conv4 on CPU: a loop beats vmap (see metarl.adaptation)
            tasks = [type(both)(*(t[i] for t in both)) for i in range(len(both[0]))]
            per_task = [one(data) for data in tasks]
            adapted = {k: torch.stack([a[k] for a in per_task]) for k in detached}
            post = torch.stack(
                [self.loss_fn(a, data) for a, data in zip(per_task, tasks, strict=True)]
            ).mean()
        else:
            adapted = vmap(one, randomness="different")(both)
            post = vmap(self.loss_fn)(adapted, both).mean()
        if not torch.isfinite(post):
            raise NonFiniteLossError(
                f"Reptile post-adaptation loss is {post.item()}; parameters unchanged"
            )
        new = reptile_update(detached, adapted, self.config.outer_lr)
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(new[k])
        return {"train/query_loss": post.item()}

    def adapt(self, task: Task, data: Any, steps: int | None = None) -> Params:
        """Parameters adapted to one task on its support ``data`` (``x [P, ...]``, targets)."""
        steps = self.config.adapt_steps if steps is None else steps
        data = on_device(data, self.device)
        return adapt(
            self.loss_fn,
            self.params,
            data,
            steps,
            self.inner_rate,
            names=self.names,
            first_order=True,
        )

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Scores held-out ``tasks`` after each count in ``eval_adapt_steps`` of inner steps.

        Returns:
            ``{"adaptation_steps": [...], "loss": [num_tasks, num_steps], "accuracy": ... or None}``.
        """
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_eval_queries, rng)
        steps = sorted(set(cfg.eval_adapt_steps))
        params = {k: v.detach() for k, v in self.params.items()}
        lr = {k: v.detach() for k, v in self.lrs.items()} if self.lrs is not None else cfg.inner_lr

        def scores(p: Params, s: Any, q: Any) -> tuple[torch.Tensor, torch.Tensor]:
            loss_fn: Callable[[Params, Any], torch.Tensor] = self.loss_fn
            model: Callable[[Params, torch.Tensor], torch.Tensor] = self.model
            names = self.names
            if self.split is not None:  # ANIL: the body once per set, the steps on the head
                s, q = self._on_features(p, s), self._on_features(p, q)
                p = {k: p[k] for k in self.split.names}
                loss_fn, model, names = self._head_loss, self.split.head, None
            losses, accs, done = [], [], 0
            for target in steps:
                p = adapt(loss_fn, p, s, target - done, lr, first_order=True, names=names)
                done = target
                pred = model(p, q.x)
                losses.append(self.distribution.loss(pred, q))
                acc = self.distribution.accuracy(pred, q)
                accs.append(
                    acc if acc is not None else torch.tensor(float("nan"), device=pred.device)
                )
            return torch.stack(losses), torch.stack(accs)

        # vmap holds every task of a chunk in memory at once; the loop holds one task anyway.
        chunk = len(tasks) if self.batch == "loop" else VMAP_EVAL_CHUNK
        loss, acc = map_task_chunks(
            scores, (params,), (support, query), self.batch, chunk, self.device
        )
        accuracy = None if torch.isnan(acc).all() else acc.numpy()
        return {
            "adaptation_steps": steps,
            "loss": loss.numpy(),
            "accuracy": accuracy,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "lrs": None
            if self.lrs is None
            else {k: v.detach().cpu().clone() for k, v in self.lrs.items()},
            "optimizer": self.optimizer.state_dict(),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
            if self.lrs is not None:
                for k, v in self.lrs.items():
                    v.copy_(state["lrs"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        """Holds no worker processes or files: nothing to release."""
