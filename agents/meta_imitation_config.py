"""Settings of the meta-adversarial imitation agent (:mod:`agents.meta_imitation`), with their
defaults and checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metarl.config import require_at_least
from metarl.meta_pg_config import MetaPGConfig


@dataclass(frozen=True)
class MetaImitationConfig(MetaPGConfig):
    meta_batch_size: int = 20
    """Tasks per meta-iteration."""
    num_demos: int = 1
    """K: expert demonstrations per task that adaptation sees."""
    num_query_demos: int = 1
    """Held-back demonstrations per task for the discriminator's outer update."""
    disc_adapt_steps: int = 5
    """Discriminator SGD steps per inner step (from the meta-learned φ each time)."""
    disc_inner_lr: float = 0.1
    """Discriminator inner SGD step size."""
    first_order: bool = True
    """Outer updates treat both inner updates as constants (first-order MAML)."""
    disc_hidden_sizes: tuple[int, ...] = (64, 64)
    """Discriminator hidden widths."""
    disc_activation: Literal["relu", "tanh"] = "tanh"
    """Discriminator hidden activation (tanh keeps the gradient penalty smooth)."""
    state_only: bool = False
    """Discriminate (s, s') pairs instead of (s, a): imitation from observation."""
    gradient_penalty: float = 1.0
    """λ of the zero-centred gradient penalty on demonstrations (0 turns it off)."""
    outer_lr: float = 1e-3
    """Adam step size of the policy's outer loop."""
    disc_outer_lr: float = 1e-3
    """Adam step size of the discriminator's outer loop."""
    clip_range: float = 0.2
    """PPO's ε in the policy's outer objective."""
    num_epochs: int = 5
    """Outer Adam steps per meta-iteration, for each of G and D."""
    eval_adapt_steps: int = 5
    """Adaptation steps scored at evaluation."""
    eval_ablations: bool = True
    """Also score GAIL from scratch (fresh G, fresh D), meta G + fresh D, and fresh G + meta D."""
    eval_bc_baselines: bool = True
    """Also score BC from scratch, multi-task BC fine-tuned and MAML-BC on the same demonstrations."""
    bc_steps: int = 200
    """Adam steps of behaviour cloning on a held-out task's demonstrations."""
    bc_lr: float = 1e-3
    """Adam step size of the BC baselines (also MAML-BC's outer step)."""
    bc_pretrain_steps: int = 1000
    """Adam steps of the multi-task BC policy on the training tasks' demonstrations."""
    maml_bc_meta_steps: int = 500
    """MAML-BC meta-iterations on the training tasks' demonstrations."""
    num_pretrain_tasks: int = 50
    """Training tasks whose demonstrations train the multi-task BC and MAML-BC baselines."""
    bc_init_steps: int = 0
    """Adam steps (at ``bc_lr``) of multi-task behaviour cloning on the demonstrations of
    ``num_pretrain_tasks`` training tasks that initialise G before meta-training (the pretraining
    of the ``bc_multitask`` baseline); 0 keeps PyTorch's initialisation."""
    adapt_bc_steps: int = 0
    """Adam steps (at ``bc_lr``) of behaviour cloning on the task's ``K`` demonstrations that begin
    every adaptation, before the first adversarial step (a GAIL + BC hybrid); 0: adversarial steps
    only. Needs ``first_order``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_later_lr:
            raise ValueError(
                f"eval_later_lr={self.eval_later_lr}: meta-imitation evaluates with its own inner "
                "steps and does not use it; leave it at 0"
            )
        require_at_least(
            self,
            (
                "num_demos",
                "num_query_demos",
                "disc_adapt_steps",
                "num_epochs",
                "bc_steps",
                "bc_pretrain_steps",
                "maml_bc_meta_steps",
                "num_pretrain_tasks",
            ),
        )
        for name in ("disc_inner_lr", "outer_lr", "disc_outer_lr", "bc_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("bc_init_steps", "adapt_bc_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.adapt_bc_steps and not self.first_order:
            raise ValueError(
                "adapt_bc_steps > 0 needs first_order = true: the second-order outer update "
                "differentiates through the policy-gradient steps alone"
            )
        if self.gradient_penalty < 0:
            raise ValueError(f"gradient_penalty must be >= 0, got {self.gradient_penalty}")
        if not 0.0 < self.clip_range < 1.0:
            raise ValueError(f"clip_range must lie in (0, 1), got {self.clip_range}")
        if not self.disc_hidden_sizes or min(self.disc_hidden_sizes) < 1:
            raise ValueError(
                f"disc_hidden_sizes must be positive widths, got {self.disc_hidden_sizes}"
            )
