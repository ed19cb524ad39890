"""Memory-augmented neural network (MANN; Santoro, Bartunov, Botvinick, Wierstra and Lillicrap
2016, "One-shot learning with memory-augmented neural networks", arXiv 1605.06065).

An LSTM controller reads an episode as a sequence and stores what it needs in an external memory
``M [slots, width]`` with least-recently-used access (LRUA). At each time step ``t`` the controller
emits one key ``k_t`` and one write gate ``α`` per read head, then:

* write: ``w_w = σ(α) w_r_{t-1} + (1 − σ(α)) w_lu_{t-1}``, where ``w_lu`` marks the ``n`` slots of
  least usage (``n`` = number of read heads); the single least-used slot is zeroed first, then
  ``M_t = M_{t-1} + w_wᵀ k_t`` (:func:`~metarl.fewshot.mann_memory.lru_write`);
* read: ``w_r_t = softmax(cos(k_t, M_t(i)))`` over the slots and ``r_t = w_r_t M_t``
  (:func:`~metarl.fewshot.mann_memory.cosine_read`);
* usage: ``u_t = γ u_{t-1} + w_r_t + w_w`` summed over heads (:func:`~metarl.fewshot.mann_memory.update_usage`);
* output: class logits or a regression value from ``[h_t, r_t]``.

The input at step ``t`` is the item ``x_t`` (an image embedding, or the sinusoid's ``x``)
concatenated with the label of the previous item (one-hot for classification, the scalar target
for regression; zero at ``t = 0``) and the previous reads. The support set, shuffled per task, is
read first. Each query is then one further step from the state after the support, run in
parallel over the queries, so a prediction depends on the support alone, not on the other queries,
their order or their number (training may use fewer queries than evaluation). The input at a query
step carries the label of the item before it, the last support item; a query's own label is never
fed. Without that, one support label of every episode would never be seen (in 5-way 1-shot, a
whole class).

Deviations from the paper, by choice: images go through the conv4 encoder of ProtoNets and MAML by
default (``encoder="conv4"``, trained end to end; ``"flat"`` feeds the 784 pixels as the paper
does); the optimiser is Adam with gradient-norm clipping (the paper: RMSProp); the loss is taken at
the query steps only (``support_loss=True`` adds, as the paper does, the support steps whose class
was already seen, or every support step after the first for regression). Paper settings: 128 slots
of width 40, 4 read heads, 200 LSTM units, ``γ = 0.95``.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from envs.base import Task
from metarl.errors import NonFiniteLossError
from metarl.fewshot.mann_config import MANNConfig
from metarl.fewshot.mann_memory import MANNNetwork, MemoryState
from metarl.runtime import on_device

MAX_EVAL_BRANCHES = 4096  # query branches per evaluation chunk: bounds memory copies to ~80 MB


def offset_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels shifted by one step: row ``t`` holds the label of item ``t-1``, row 0 is zero.

    Args:
        labels: ``[B, S, D]`` labels of the support sequence (one-hot or scalar targets).

    Returns:
        ``[B, S, D]``.
    """
    return torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)


class MemoryAugmentedNetwork:
    """MANN few-shot learner (module docstring) on sinusoid regression or Omniglot classification.

    Args:
        config: the learner's settings.
        distribution: the few-shot distribution; one with ``num_ways`` (Omniglot) is classification.
        seed: seeds the initial weights and the learner's data stream.
    """

    Config = MANNConfig
    family = "model-based"
    adaptation_unit = "memory read"
    scores_tasks_independently = False

    def __init__(self, config: MANNConfig, distribution: Any, seed: int):
        self.config = config
        self.distribution = distribution
        self.device = torch.device(config.device)
        self.num_ways: int | None = getattr(distribution, "num_ways", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.network = self._build_network().to(self.device)
        self.optimizer = torch.optim.Adam(self.network.parameters(), lr=config.outer_lr)
        self.rng = np.random.default_rng([seed, 1])
        self.model = self.predict  # (state from adapt, x) -> outputs, as the fit plots expect

    def _build_network(self) -> MANNNetwork:
        if self.num_ways is None:  # regression: the item is x itself, the label the target y
            return MANNNetwork(self.config, nn.Identity(), 1, 1, 1)
        if getattr(self.distribution, "train_ways", self.num_ways) != self.num_ways:
            raise ValueError(
                f"train_ways={self.distribution.train_ways} differs from num_ways={self.num_ways}, "
                "but MANN's label input and output have one width; leave train_ways unset"
            )
        if self.config.encoder == "conv4":
            encoder = self.distribution.make_encoder().module
            size = int(self.distribution.channels)
        else:
            encoder, size = nn.Flatten(), 28 * 28
        return MANNNetwork(self.config, encoder, size, self.num_ways, self.num_ways)

    def _encode(
        self, support_x: torch.Tensor, query_x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``[B, S, F]``, ``[B, Q, F]``; conv4 embeds each episode in one pass (batch norm)."""
        if self.num_ways is None:
            return support_x, query_x
        num_support = support_x.shape[1]
        features = torch.stack(
            [
                self.network.encoder(torch.cat([s, q]))
                for s, q in zip(support_x, query_x, strict=True)
            ]
        )
        return features[:, :num_support], features[:, num_support:]

    def _labels(self, y: torch.Tensor) -> torch.Tensor:
        """Labels as fed back: one-hot ``[B, S, N]`` or the targets ``[B, S, 1]``."""
        return y if self.num_ways is None else F.one_hot(y, self.num_ways).to(torch.float32)

    def _per_item_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy or squared error of each item, ``[B, P]``."""
        if self.num_ways is None:
            return (output - y).pow(2).mean(-1)
        return F.cross_entropy(output.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)

    def _seen_before(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, S]`` mask of support steps whose class appeared earlier (regression: t >= 1)."""
        if self.num_ways is None:
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
            mask[:, 0] = False
            return mask
        one_hot = F.one_hot(y, self.num_ways)
        return (offset_labels(one_hot).cumsum(1) * one_hot).sum(-1) > 0

    def _prepare(
        self, support: Any, query: Any, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support features ``[B, S, F]`` and labels ``[B, S]`` (or ``[B, S, 1]``), shuffled per task
        with ``rng``, and query features ``[B, Q, F]``."""
        order = torch.as_tensor(np.argsort(rng.random(support.y.shape[:2]), axis=1))
        rows, tasks = order.to(self.device), torch.arange(len(order), device=self.device)[:, None]
        support_y = support.y[tasks, rows]
        support_f, query_f = self._encode(support.x[tasks, rows], query.x)
        return support_f, support_y, query_f

    def _episode(
        self, support_f: torch.Tensor, support_y: torch.Tensor, query_f: torch.Tensor, read: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Query outputs ``[B, Q, O]`` after reading the support (``read``) or from the empty
        memory, and the support outputs ``[B, S, O]`` (None unless ``read``)."""
        state = self.network.initial_state(len(support_f), self.device)
        support_out = None
        if read:
            support_out, state = self.network.read_support(
                state, support_f, self._labels(support_y)
            )
        return self.network.answer(state, query_f), support_out

    @property
    def meta_batch_size(self) -> int:
        """Tasks sampled for each :meth:`step`."""
        return int(self.config.meta_batch_size)

    def step(self, tasks: list[Task]) -> dict[str, float]:
        """One Adam step on the episodes of ``tasks``; returns ``train/*`` metrics."""
        cfg = self.config
        support, query = self.distribution.episodes(tasks, cfg.num_shots, cfg.num_queries, self.rng)
        support, query = on_device(support, self.device), on_device(query, self.device)
        support_f, support_y, query_f = self._prepare(support, query, self.rng)
        output, support_out = self._episode(support_f, support_y, query_f, read=True)
        query_loss = self._per_item_loss(output, query.y)
        loss = query_loss.mean()
        metrics = {"train/query_loss": loss.item()}
        if cfg.support_loss and support_out is not None:
            seen = self._seen_before(support_y)
            support_loss = (self._per_item_loss(support_out, support_y) * seen).sum()
            loss = (query_loss.sum() + support_loss) / (query_loss.numel() + seen.sum())
            metrics["train/loss"] = loss.item()
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"MANN loss is {loss.item()}; parameters unchanged")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            norm = nn.utils.clip_grad_norm_(self.network.parameters(), cfg.max_grad_norm)
            metrics["train/grad_norm"] = float(norm)
        self.optimizer.step()
        if self.num_ways is not None:
            metrics["train/query_accuracy"] = (output.argmax(-1) == query.y).float().mean().item()
        return metrics

    def _scores(self, output: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query loss and accuracy (NaN for regression) of each task, ``[B]`` each."""
        loss = self._per_item_loss(output, y).mean(1)
        if self.num_ways is None:
            return loss, torch.full_like(loss, float("nan"))
        return loss, (output.argmax(-1) == y).float().mean(1)

    def evaluate(self, tasks: list[Task], rng: np.random.Generator) -> dict[str, Any]:
        """Scores held-out ``tasks`` from an empty memory (step 0) and after reading the support (1).

        Tasks are batched in chunks (at most ``MAX_EVAL_BRANCHES`` query branches, and the
        distribution's ``eval_chunk_size``); the support is shuffled with ``rng``. Step 0 is never
        trained: it is a reference, about chance (1/N) for classification; for regression its MSE
        can exceed that of predicting zero.

        Returns:
            ``{"adaptation_steps": [0, 1], "loss": [num_tasks, 2], "accuracy": same or None}``.
        """
        cfg = self.config
        per_task = cfg.num_eval_queries * (self.num_ways or 1)
        limit = int(getattr(self.distribution, "eval_chunk_size", 0) or len(tasks))
        chunk = max(1, min(MAX_EVAL_BRANCHES // per_task, limit))
        losses, accs = [], []
        with torch.no_grad():
            for start in range(0, len(tasks), chunk):
                support, query = self.distribution.episodes(
                    tasks[start : start + chunk], cfg.num_shots, cfg.num_eval_queries, rng
                )
                support, query = on_device(support, self.device), on_device(query, self.device)
                features = self._prepare(support, query, rng)  # encoded once for both columns
                empty, full = (
                    self._scores(self._episode(*features, read=read)[0], query.y)
                    for read in (False, True)
                )
                losses.append(torch.stack([empty[0], full[0]], dim=1))
                accs.append(torch.stack([empty[1], full[1]], dim=1))
        return {
            "adaptation_steps": [0, 1],
            "loss": torch.cat(losses).cpu().numpy(),
            "accuracy": None if self.num_ways is None else torch.cat(accs).cpu().numpy(),
        }

    def _check_items(self, x: torch.Tensor, where: str) -> None:
        expected = (1,) if self.num_ways is None else (1, 28, 28)
        if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{where} has shape {tuple(x.shape)}; expected [num_items, "
                f"{', '.join(map(str, expected))}] (one task, no task axis)"
            )

    def adapt(self, task: Task | None, data: Any, steps: int = 1) -> MemoryState:
        """State after reading one task's support ``data`` in the given order.

        Args:
            task: unused (the support defines the task); kept for the learner interface.
            data: ``x [S, 1]`` and ``y [S, 1]`` (regression) or ``x [S, 1, 28, 28]``, ``y [S]``.
            steps: 0 gives the empty memory; any count >= 1 reads the support once.
        """
        self._check_items(data.x, "support x")
        data = on_device(data, self.device)
        with torch.no_grad():
            state = self.network.initial_state(1, self.device)
            if steps == 0:
                return state
            features = data.x[None] if self.num_ways is None else self.network.encoder(data.x)[None]
            return self.network.read_support(state, features, self._labels(data.y[None]))[1]

    def predict(self, state: MemoryState, x: torch.Tensor) -> torch.Tensor:
        """Outputs ``[Q, O]`` for queries ``x [Q, ...]`` of the single episode in ``state``.

        Each query is answered from ``state`` alone. With conv4, batch norm sees the items of each
        call (``adapt``'s support, ``predict``'s queries), not the episode as in training.
        """
        self._check_items(x, "query x")
        with torch.no_grad():
            x = x.to(self.device)
            features = x if self.num_ways is None else self.network.encoder(x)
            return self.network.answer(state, features[None])[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "network": {k: v.detach().cpu().clone() for k, v in self.network.state_dict().items()},
            # a deep copy: Adam updates its moment tensors in place after this returns
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]

    def close(self) -> None:
        """Holds no worker processes or files: nothing to release."""
