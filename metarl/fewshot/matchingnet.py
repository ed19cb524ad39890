"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016, arXiv 1606.04080).

A query's label distribution is an attention-weighted sum of the support labels,
``p(y | x̂) = Σ_i a(x̂, x_i) y_i`` with ``a`` the softmax over the support of the cosine similarities
between the embeddings ``f(x̂)`` and ``g(x_i)``. Here ``f = g`` is the conv4 encoder shared with
ProtoNets; the full-context embeddings (the LSTMs that condition ``f`` and ``g`` on the whole
support set) are omitted, as in Vinyals et al.'s Omniglot results. Training minimises
``-log p(y | x̂)`` on the query images of episodes of ``train_ways`` classes (the paper trains with
the N and K it tests with); optimiser and schedule are those of :mod:`metarl.fewshot.protonet`.

Metric scaling (Oreshkin, Rodríguez and Lacoste 2018, TADAM, section 2.1): cosine similarities lie
in [-1, 1], so the attention softmax over them can never be sharp (5-way 1-shot: at most
e/(e + 4/e) = 0.65 on the right class), and the cross-entropy keeps pushing every embedding long
after the episode is classified. ``cosine_scale`` multiplies the similarities before the softmax
(1 is the paper's rule); ``learn_scale`` makes its logarithm a trained parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from metarl.fewshot.protonet import MetricLearner, MetricLearnerConfig


def cosine_attention(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Attention ``a(x̂_q, x_i)``: softmax over the support of cosine similarities.

    Args:
        support: ``[S, D]`` support embeddings.
        query: ``[Q, D]`` query embeddings.

    Returns:
        ``[Q, S]``, each row non-negative and summing to 1.
    """
    return torch.softmax(_cosine(support, query), dim=-1)


def _cosine(support: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    return F.normalize(query, dim=-1, eps=1e-8) @ F.normalize(support, dim=-1, eps=1e-8).T


def matching_logits(
    support: torch.Tensor,
    support_y: torch.Tensor,
    query: torch.Tensor,
    num_ways: int,
    scale: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """Log class probabilities ``log Σ_{i: y_i = n} a(x̂_q, x_i)`` of each query.

    Computed with log-sum-exp over each class's support similarities, so it stays finite.

    Args:
        support: ``[S, D]`` support embeddings.
        support_y: ``[S]`` labels in ``0..num_ways-1``; every class needs at least one example.
        query: ``[Q, D]`` query embeddings.
        num_ways: N.
        scale: multiplies the cosine similarities before the softmax (1: the paper's attention).

    Returns:
        ``[Q, N]`` log-probabilities (their exponentials sum to 1 over N).
    """
    members = F.one_hot(support_y, num_ways).T.to(torch.bool)  # [N, S]
    if not bool(members.any(1).all()):
        raise ValueError(
            f"classes {torch.nonzero(~members.any(1)).flatten().tolist()} have no support example"
        )
    similarity = scale * _cosine(support, query)  # [Q, S]
    masked = similarity[:, None, :].masked_fill(~members[None], float("-inf"))  # [Q, N, S]
    return torch.logsumexp(masked, dim=-1) - torch.logsumexp(similarity, dim=-1, keepdim=True)


@dataclass(frozen=True)
class MatchingNetworkConfig(MetricLearnerConfig):
    cosine_scale: float = 1.0
    """Factor on the cosine similarities before the attention softmax (1: Vinyals et al.; TADAM
    finds a factor near 10 better); its initial value when learn_scale is true."""
    learn_scale: bool = False
    """Train log(cosine_scale) with the encoder (same optimiser and step size)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.cosine_scale) and self.cosine_scale > 0):
            raise ValueError(f"cosine_scale must be a finite number > 0, got {self.cosine_scale}")


class MatchingNetwork(MetricLearner):
    """Matching Networks without full-context embeddings: cosine attention over the support set."""

    Config = MatchingNetworkConfig

    def __init__(self, config: MatchingNetworkConfig, distribution: Any, seed: int):
        super().__init__(config, distribution, seed)
        self.log_scale = torch.tensor(
            math.log(config.cosine_scale), device=self.device, requires_grad=config.learn_scale
        )
        if config.learn_scale:
            self.optimizer.add_param_group({"params": [self.log_scale]})

    @property
    def scale(self) -> float:
        """The current factor on the cosine similarities."""
        return math.exp(self.log_scale.item())

    def scores(
        self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, num_ways: int
    ) -> torch.Tensor:
        return matching_logits(support, support_y, query, num_ways, self.log_scale.exp())

    def step(self, tasks: list[Any]) -> dict[str, float]:
        return {**super().step(tasks), "train/cosine_scale": self.scale}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_scale": self.log_scale.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "log_scale" in state:
            with torch.no_grad():
                self.log_scale.copy_(state["log_scale"])
