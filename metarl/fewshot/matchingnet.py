"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra 2016, arXiv 1606.04080).

A query's label distribution is an attention-weighted sum of the support labels,
``p(y | x̂) = Σ_i a(x̂, x_i) y_i`` with ``a`` the softmax over the support of the cosine similarities
between the embeddings ``f(x̂)`` and ``g(x_i)``. Here ``f = g`` is the conv4 encoder shared with
ProtoNets; the full-context embeddings (the LSTMs that condition ``f`` and ``g`` on the whole
support set) are omitted, as in Vinyals et al.'s Omniglot results. Training minimises
``-log p(y | x̂)`` on the query images of episodes of ``train_ways`` classes (the paper trains with
the N and K it tests with); optimiser and schedule are those of :mod:`metarl.fewshot.protonet`.
"""

from __future__ import annotations

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
    support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, num_ways: int
) -> torch.Tensor:
    """Log class probabilities ``log Σ_{i: y_i = n} a(x̂_q, x_i)`` of each query.

    Computed with log-sum-exp over each class's support similarities, so it stays finite.

    Args:
        support: ``[S, D]`` support embeddings.
        support_y: ``[S]`` labels in ``0..num_ways-1``; every class needs at least one example.
        query: ``[Q, D]`` query embeddings.
        num_ways: N.

    Returns:
        ``[Q, N]`` log-probabilities (their exponentials sum to 1 over N).
    """
    members = F.one_hot(support_y, num_ways).T.to(torch.bool)  # [N, S]
    if not bool(members.any(1).all()):
        raise ValueError(
            f"classes {torch.nonzero(~members.any(1)).flatten().tolist()} have no support example"
        )
    similarity = _cosine(support, query)  # [Q, S]
    masked = similarity[:, None, :].masked_fill(~members[None], float("-inf"))  # [Q, N, S]
    return torch.logsumexp(masked, dim=-1) - torch.logsumexp(similarity, dim=-1, keepdim=True)


class MatchingNetwork(MetricLearner):
    """Matching Networks without full-context embeddings: cosine attention over the support set."""

    Config = MetricLearnerConfig
    score_fn = staticmethod(matching_logits)
