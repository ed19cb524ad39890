"""Prototypical Networks (Snell, Swersky and Zemel 2017, arXiv 1703.05175) and the episodic
machinery shared with the other metric learners (:mod:`metarl.fewshot.matchingnet`).

A metric learner has no inner loop: an encoder embeds the support and query images of an episode
in one forward pass (batch norm uses the episode's statistics), a fixed rule turns the embeddings
into class scores, and the encoder is trained with cross-entropy on the query images. For
ProtoNets the scores are negative squared Euclidean distances to the class means of the support
embeddings (the prototypes). Snell et al.'s Omniglot settings: conv4 with 64 filters, training
episodes of 60 classes with 5 query images per class, Adam at 1e-3 halved every 2,000 episodes,
one episode per step; a model trained with K shots is tested with K shots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from envs.base import Task
from metarl.adaptation import Params
from metarl.config import require_at_least
from metarl.errors import NonFiniteLossError
from metarl.fewshot.episodes import affine_images
from metarl.runtime import check_device, on_device

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def prototype_logits(
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, num_ways: int
) -> torch.Tensor:
    """Negative squared Euclidean distances from each query embedding to each class mean.

    Args:
        support: ``[S, D]`` support embeddings.
        support_y: ``[S]`` labels in ``0..num_ways-1``; every class needs at least one example.
        query: ``[Q, D]`` query embeddings.
        num_ways: N, the number of classes.

    Returns:
        ``[Q, N]`` logits ``-||query_q - c_n||²`` with ``c_n`` the mean of class ``n``'s support.
    """
    one_hot = F.one_hot(support_y, num_ways).to(support.dtype)  # [S, N]
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(
            f"classes {torch.nonzero(counts == 0).flatten().tolist()} have no support example"
        )
    prototypes = one_hot.T @ support / counts[:, None]  # [N, D]
    return -torch.cdist(query, prototypes).pow(2)


@dataclass(frozen=True)
class MetricLearnerConfig:
    meta_batch_size: int = 1
    """Episodes per training step (ProtoNets: 1)."""
    num_shots: int = 1
    """Support images per class, in training and in evaluation: the K of K-shot."""
    num_queries: int = 5
    """Query images per class in training episodes (ProtoNets on Omniglot: 5)."""
    num_eval_queries: int = 15
    """Query images per class in held-out episodes (num_shots + this <= 20)."""
    outer_lr: float = 0.001
    """Initial Adam step size of the encoder."""
    lr_decay_every: int = 2000
    """Multiply the step size by lr_decay every this many steps (0: constant)."""
    lr_decay: float = 0.5
    """Factor of each step-size decay (ProtoNets: halved every 2,000 episodes)."""
    official_run_shift: int = 0
    """Official one-shot runs only: a test-time average of each image's embedding over its copies
    shifted by every offset in {-s..s}² pixels ((2s+1)² views; 0: the image alone)."""
    device: str = "cpu"
    """Where parameters and episodes live ('cpu' or 'cuda'); data is sampled on the CPU."""

    def __post_init__(self) -> None:
        check_device(self.device)
        require_at_least(self, ("meta_batch_size", "num_shots", "num_queries", "num_eval_queries"))
        if not 0 <= self.official_run_shift <= 4:
            raise ValueError(
                f"official_run_shift must be in 0..4 pixels (of 28), got {self.official_run_shift}"
            )
        if self.outer_lr <= 0:
            raise ValueError(f"outer_lr must be > 0, got {self.outer_lr}")
        if self.lr_decay_every < 0 or not 0 < self.lr_decay <= 1:
            raise ValueError(
                f"lr_decay_every must be >= 0 and lr_decay in (0, 1], got {self.lr_decay_every}, {self.lr_decay}"
            )


IDENTITY_VIEW: tuple[tuple[float, float], ...] = ((0.0, 1.0),)
"""The (angle, scale) views of an image seen as it is: no turn, no scaling."""


def shifted(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``images [B, C, H, W]`` moved ``dy`` rows down and ``dx`` columns right, zero-filled."""
    height, width = images.shape[-2:]
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return images
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy : pad - dy + height, pad - dx : pad - dx + width]


class MetricLearner:
    """Episodic training and evaluation of an encoder with a fixed scoring rule ``score_fn``.

    Subclasses set ``score_fn(support [S, D], support_y [S], query [Q, D], num_ways) -> [Q, N]``
    class log-scores (logits), or override :meth:`scores` (Matching Nets: a learned scale). The
    distribution provides ``episodes`` and ``make_encoder``.

    Args:
        config: the learner's settings.
        distribution: the few-shot distribution (Omniglot).
        seed: seeds the encoder's initial parameters.
    """

    score_fn: ScoreFn  # no Config here: only the concrete learners below are agents
    family = "metric"
    adaptation_unit = "support set"
    scores_tasks_independently = False

    def __init__(self, config: MetricLearnerConfig, distribution: Any, seed: int):
        self.config = config
        self.distribution = distribution
        self.model = distribution.make_encoder()
        self.device = torch.device(config.device)
        self.params: Params = {
            k: v.to(self.device).requires_grad_() for k, v in self.model.init_params(seed).items()
        }
        self.optimizer = torch.optim.Adam(list(self.params.values()), lr=config.outer_lr)
        self.num_steps = 0
        self.rng = np.random.default_rng([seed, 1])

    def logits(
        self,
        params: Params,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        num_ways: int,
    ) -> torch.Tensor:
        """Class logits ``[Q, N]`` of one episode: ``support_x [S, 1, H, W]``, ``query_x [Q, 1, H, W]``.

        Support and query are embedded in one pass, so batch norm sees the whole episode.
        """
        embeddings = self.model(params, torch.cat([support_x, query_x]))
        return self.scores(
            embeddings[: len(support_x)], support_y, embeddings[len(support_x) :], num_ways
        )

    def scores(
        self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, num_ways: int
    ) -> torch.Tensor:
        """Class logits ``[Q, N]`` from support embeddings ``[S, D]`` and query embeddings ``[Q, D]``."""
        return type(self).score_fn(support, support_y, query, num_ways)

    def class_scores(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        shift: int = 0,
        affine: Sequence[tuple[float, float]] = IDENTITY_VIEW,
    ) -> torch.Tensor:
        """Class logits ``[Q, N]`` (on the CPU, no gradient) of ``query_x`` given labelled
        ``support_x`` (classes ``0..max(y)``).

        Each image's embedding is the mean over its views: every ``(angle, scale)`` of ``affine``
        (degrees counter-clockwise and size factor about the centre, as in
        :func:`~metarl.fewshot.episodes.affine_images`) combined with every shift by an offset in
        ``{-shift..shift}²`` pixels. The default is the image alone. Each view of the episode is
        embedded in one pass.
        """
        if not affine:
            raise ValueError("affine needs at least one (angle, scale) view, e.g. ((0.0, 1.0),)")
        with torch.no_grad():
            params = {k: v.detach() for k, v in self.params.items()}
            images = torch.cat([support_x, query_x]).float().cpu()
            offsets = range(-shift, shift + 1)
            embeddings = []
            for angle, scale in affine:
                turned = images
                if (angle, scale) not in IDENTITY_VIEW:
                    flat = images.reshape(-1, *images.shape[-2:]).numpy()
                    moved = affine_images(
                        flat, np.full(len(flat), angle), np.full(len(flat), scale)
                    )
                    turned = torch.from_numpy(moved).reshape(images.shape)
                turned = turned.to(self.device)
                embeddings += [
                    self.model(params, shifted(turned, dy, dx)) for dy in offsets for dx in offsets
                ]
            mean = torch.stack(embeddings).mean(0)
            return self.scores(
                mean[: len(support_x)],
                support_y.to(self.device),
                mean[len(support_x) :],
                int(support_y.max()) + 1,
            ).cpu()

    def classify(
        self,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
        query_x: torch.Tensor,
        shift: int = 0,
    ) -> torch.Tensor:
        """Predicted labels ``[Q]``: the arg-max of :meth:`class_scores`."""
        return self.class_scores(support_x, support_y, query_x, shift).argmax(-1)

    def _episode_losses(
        self, params: Params, support: Any, query: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-task query cross-entropy and accuracy, ``[B]`` each."""
        num_ways = int(support.y.max()) + 1
        losses, accs = [], []
        for i in range(len(support.x)):
            logits = self.logits(params, support.x[i], support.y[i], query.x[i], num_ways)
            losses.append(F.cross_entropy(logits, query.y[i]))
            accs.append((logits.argmax(-1) == query.y[i]).to(torch.float32).mean())
        return torch.stack(losses), torch.stack(accs)

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One training step on the episodes ``tasks``; returns ``train/*`` metrics."""
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_queries, self.rng)
        support, query = on_device(support, self.device), on_device(query, self.device)
        losses, accs = self._episode_losses(self.params, support, query)
        loss = losses.mean()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"episode loss is {loss.item()} ({type(self).__name__}); parameters unchanged"
            )
        lr = cfg.outer_lr * cfg.lr_decay ** (
            self.num_steps // cfg.lr_decay_every if cfg.lr_decay_every else 0
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.num_steps += 1
        return {
            "train/query_loss": loss.item(),
            "train/query_accuracy": accs.mean().item(),
            "train/lr": lr,
        }

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Scores held-out ``tasks`` (no adaptation step: ``adaptation_steps = [0]``).

        Returns:
            ``{"adaptation_steps": [0], "loss": [num_tasks, 1], "accuracy": [num_tasks, 1]}``.
        """
        cfg = self.config
        chunk = int(getattr(self.distribution, "eval_chunk_size", len(tasks)) or len(tasks))
        params = {k: v.detach() for k, v in self.params.items()}
        losses, accs = [], []
        with torch.no_grad():
            for start in range(0, len(tasks), chunk):
                support, query = self.distribution.episodes(
                    tasks[start : start + chunk], cfg.num_shots, cfg.num_eval_queries, rng
                )
                support, query = on_device(support, self.device), on_device(query, self.device)
                loss, acc = self._episode_losses(params, support, query)
                losses.append(loss)
                accs.append(acc)
        return {
            "adaptation_steps": [0],
            "loss": torch.cat(losses)[:, None].cpu().numpy(),
            "accuracy": torch.cat(accs)[:, None].cpu().numpy(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": {k: v.detach().cpu().clone() for k, v in self.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "num_steps": self.num_steps,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in self.params.items():
                v.copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.num_steps = int(state["num_steps"])
        self.rng.bit_generator.state = state["rng"]

    def adapt(self, task: Task, data: Any) -> dict[str, torch.Tensor]:
        """What a metric learner adapts to a task: nothing but the support set it keeps.

        Scoring embeds the support with the queries in one pass (batch norm sees the whole
        episode, :meth:`logits`, :meth:`class_scores`), so the support images are kept as they
        are rather than embedded alone.

        Args:
            task: the episode (unused: the support set is the task).
            data: ``(x [S, 1, H, W], y [S])``, the support set of one task.

        Returns:
            ``{"support_x": [S, 1, H, W], "support_y": [S]}`` on the learner's device; pass them
            to :meth:`class_scores` with the queries. The parameters do not change.
        """
        x, y = data
        return {"support_x": x.to(self.device), "support_y": y.to(self.device)}

    def close(self) -> None:
        """Holds no worker processes or files: nothing to release."""


class PrototypicalNetwork(MetricLearner):
    """Prototypical Networks: a query's class is the nearest class mean in embedding space
    (squared Euclidean distance). Train with ``train_ways`` > ``num_ways`` in ``[tasks]``."""

    Config = MetricLearnerConfig
    score_fn = staticmethod(prototype_logits)
