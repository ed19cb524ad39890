"""Settings of the memory-augmented network (:mod:`metarl.fewshot.mann`, whose docstring gives the
model); here so that the network (:mod:`metarl.fewshot.mann_memory`) and the learner both import it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metarl.config import require_at_least
from metarl.runtime import check_device


@dataclass(frozen=True)
class MANNConfig:
    meta_batch_size: int = 16
    """Episodes per training step (the paper: 16)."""
    num_shots: int = 1
    """Support examples per task (per class for classification): the K of K-shot."""
    num_queries: int = 1
    """Query examples per task (per class for classification) in training episodes."""
    num_eval_queries: int = 15
    """Query examples per held-out task (per class for classification)."""
    memory_slots: int = 128
    """Rows of the external memory (the paper: 128)."""
    memory_width: int = 40
    """Width of each memory row and key (the paper: 40)."""
    num_reads: int = 4
    """Read heads, each with its own key and write gate (the paper: 4)."""
    controller_size: int = 200
    """Units of the LSTM controller (the paper: 200)."""
    usage_decay: float = 0.95
    """γ, decay of the usage weights per step (the paper: 0.95)."""
    encoder: Literal["conv4", "flat"] = "conv4"
    """Image encoder for classification: conv4 (as ProtoNets/MAML) or the flat 784 pixels (paper)."""
    support_loss: bool = False
    """Also train on support steps whose class was seen before (every step after the first for
    regression), as the paper does; False: query steps only."""
    outer_lr: float = 0.001
    """Adam step size."""
    max_grad_norm: float = 10.0
    """Clip the gradient to this global norm (0: no clipping)."""
    device: str = "cpu"
    """Where parameters and episodes live ('cpu' or 'cuda'); data is sampled on the CPU."""

    def __post_init__(self) -> None:
        check_device(self.device)
        sizes = "meta_batch_size num_shots num_queries num_eval_queries memory_slots memory_width"
        require_at_least(self, (*sizes.split(), "num_reads", "controller_size"))
        if self.num_reads > self.memory_slots:
            raise ValueError(
                f"num_reads={self.num_reads} exceeds memory_slots={self.memory_slots}; the "
                "least-used weights mark num_reads slots, so raise memory_slots or lower num_reads"
            )
        if not 0 <= self.usage_decay <= 1:
            raise ValueError(f"usage_decay must be in [0, 1] (paper: 0.95), got {self.usage_decay}")
        if self.encoder not in ("conv4", "flat"):
            raise ValueError(f"encoder must be 'conv4' or 'flat', got {self.encoder!r}")
        if self.outer_lr <= 0 or self.max_grad_norm < 0:
            raise ValueError(
                f"outer_lr must be > 0 and max_grad_norm >= 0, got {self.outer_lr}, {self.max_grad_norm}"
            )
