"""The external memory of a MANN (Santoro et al. 2016) with least-recently-used access, and the
network that drives it: encoder, LSTM controller, key and gate heads, output layer. The equations
are those of :mod:`metarl.fewshot.mann`, whose learner trains this network on episodes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from metarl.fewshot.mann_config import MANNConfig


def cosine_read(memory: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Content-based read: softmax over slots of the cosine similarity between key and row.

    Args:
        memory: ``[B, N, W]``, N slots of width W (an all-zero row has similarity 0).
        keys: ``[B, H, W]``, one key per read head.

    Returns:
        ``(weights [B, H, N], reads [B, H, W])`` with ``reads = weights @ memory``.
    """
    similarity = F.normalize(keys, dim=-1, eps=1e-8) @ F.normalize(memory, dim=-1, eps=1e-8).mT
    weights = torch.softmax(similarity, dim=-1)
    return weights, weights @ memory


def least_used(usage: torch.Tensor, num_reads: int) -> torch.Tensor:
    """``w_lu``: 1 at the ``num_reads`` slots of smallest usage, 0 elsewhere.

    Args:
        usage: ``[B, N]`` usage weights.
        num_reads: n, how many slots to mark (ties broken by ``torch.topk``).

    Returns:
        ``[B, N]`` with exactly ``num_reads`` ones per row.
    """
    index = torch.topk(usage, num_reads, dim=-1, largest=False).indices
    return torch.zeros_like(usage).scatter_(-1, index, 1.0)


def lru_write(
    memory: torch.Tensor,
    usage: torch.Tensor,
    prev_read_weights: torch.Tensor,
    keys: torch.Tensor,
    gates: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-recently-used write: zero the least-used slot, then add each head's key.

    Args:
        memory: ``[B, N, W]``, ``M_{t-1}``.
        usage: ``[B, N]``, ``u_{t-1}``.
        prev_read_weights: ``[B, H, N]``, ``w_r_{t-1}``.
        keys: ``[B, H, W]``, the vectors written (one per head).
        gates: ``[B, H]``, the logits ``α`` interpolating last-read and least-used slots.

    Returns:
        ``(M_t [B, N, W], w_w [B, H, N])`` with ``w_w = σ(α) w_r_{t-1} + (1 − σ(α)) w_lu_{t-1}``
        and ``M_t = M_{t-1} ⊙ (1 − e_lu) + w_wᵀ keys`` (``e_lu`` one-hot at ``argmin u_{t-1}``).
    """
    num_reads = keys.shape[1]
    gate = torch.sigmoid(gates)[..., None]  # [B, H, 1]
    write_weights = gate * prev_read_weights + (1 - gate) * least_used(usage, num_reads)[:, None]
    keep = 1 - F.one_hot(usage.argmin(-1), usage.shape[-1]).to(memory.dtype)  # [B, N]
    return memory * keep[..., None] + write_weights.mT @ keys, write_weights


def update_usage(
    usage: torch.Tensor, read_weights: torch.Tensor, write_weights: torch.Tensor, decay: float
) -> torch.Tensor:
    """``u_t = γ u_{t-1} + Σ_heads w_r_t + Σ_heads w_w``: ``[B, N]`` from ``[B, N]``, ``[B, H, N]`` x2."""
    return decay * usage + read_weights.sum(1) + write_weights.sum(1)


class MemoryState(NamedTuple):
    """Recurrent state of a batch of episodes: ``h, c [B, C]``, ``memory [B, N, W]``, ``usage
    [B, N]``, ``read_weights [B, H, N]``, ``reads [B, H, W]``, ``last_label [B, D]`` (the label of
    the last item read, fed with the next item)."""

    h: torch.Tensor
    c: torch.Tensor
    memory: torch.Tensor
    usage: torch.Tensor
    read_weights: torch.Tensor
    reads: torch.Tensor
    last_label: torch.Tensor


class MANNNetwork(nn.Module):
    """Encoder, LSTM controller, key/gate heads and output layer of a MANN.

    Args:
        config: sizes of memory and controller.
        encoder: maps items ``[P, ...]`` to features ``[P, F]``.
        feature_size: F.
        label_size: D, the width of the label fed back (N ways, or 1 for regression).
        output_size: N logits, or 1 regression value.
    """

    def __init__(
        self,
        config: MANNConfig,
        encoder: nn.Module,
        feature_size: int,
        label_size: int,
        output_size: int,
    ):
        super().__init__()
        self.cfg = config
        self.label_size = label_size
        self.encoder = encoder
        reads = config.num_reads * config.memory_width
        self.controller = nn.LSTMCell(feature_size + label_size + reads, config.controller_size)
        self.keys = nn.Linear(config.controller_size, reads)
        self.gates = nn.Linear(config.controller_size, config.num_reads)
        self.output = nn.Linear(config.controller_size + reads, output_size)

    def initial_state(self, batch: int, device: torch.device) -> MemoryState:
        """Empty memory, zero usage, reads and labels, for ``batch`` episodes."""
        cfg = self.cfg
        zeros = lambda *shape: torch.zeros(batch, *shape, device=device)  # noqa: E731
        return MemoryState(
            h=zeros(cfg.controller_size),
            c=zeros(cfg.controller_size),
            memory=zeros(cfg.memory_slots, cfg.memory_width),
            usage=zeros(cfg.memory_slots),
            read_weights=zeros(cfg.num_reads, cfg.memory_slots),
            reads=zeros(cfg.num_reads, cfg.memory_width),
            last_label=zeros(self.label_size),
        )

    def step(
        self, state: MemoryState, features: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, MemoryState]:
        """One time step: item ``features [B, F]`` with its own ``label [B, D]`` (zeros for a query).

        The controller sees ``state.last_label``, never ``label``; ``label`` only becomes the
        ``last_label`` of the returned state. Returns ``(output [B, O], next state)``.
        """
        batch = features.shape[0]
        inputs = torch.cat([features, state.last_label, state.reads.flatten(1)], dim=-1)
        h, c = self.controller(inputs, (state.h, state.c))
        keys = torch.tanh(self.keys(h)).view(batch, self.cfg.num_reads, self.cfg.memory_width)
        memory, write_weights = lru_write(
            state.memory, state.usage, state.read_weights, keys, self.gates(h)
        )
        read_weights, reads = cosine_read(memory, keys)
        usage = update_usage(state.usage, read_weights, write_weights, self.cfg.usage_decay)
        output = self.output(torch.cat([h, reads.flatten(1)], dim=-1))
        return output, MemoryState(h, c, memory, usage, read_weights, reads, label)

    def read_support(
        self, state: MemoryState, features: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, MemoryState]:
        """Reads a sequence ``features [B, S, F]``, ``labels [B, S, D]``; outputs ``[B, S, O]``."""
        outputs = []
        for t in range(features.shape[1]):
            out, state = self.step(state, features[:, t], labels[:, t])
            outputs.append(out)
        return torch.stack(outputs, dim=1), state

    def answer(self, state: MemoryState, features: torch.Tensor) -> torch.Tensor:
        """Outputs ``[B, Q, O]`` for queries ``[B, Q, F]``, each one step from ``state`` alone."""
        batch, num_queries = features.shape[:2]
        branched = MemoryState(
            *(t.unsqueeze(1).expand(batch, num_queries, *t.shape[1:]).flatten(0, 1) for t in state)
        )
        no_label = torch.zeros(batch * num_queries, self.label_size, device=features.device)
        out, _ = self.step(branched, features.flatten(0, 1), no_label)
        return out.view(batch, num_queries, -1)
