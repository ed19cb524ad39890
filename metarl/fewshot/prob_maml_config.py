"""Settings of probabilistic MAML (:mod:`metarl.fewshot.prob_maml`, whose docstring gives the model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from metarl.config import require_at_least
from metarl.fewshot.maml import EpisodicConfig

UNCERTAINTIES = ("laplace", "prior")


@dataclass(frozen=True)
class ProbabilisticMAMLConfig(EpisodicConfig):
    inner_lr: float = 0.01
    """Inner SGD step size of the MAP search."""
    outer_lr: float = 0.001
    """Adam step size for μ, log σ and the observation noise."""
    first_order: bool = False
    """Treat inner gradients as constants (then log σ learns only from outer_samples)."""
    prior_weight: float = 1.0
    """Weight of −log prior in the inner loss, divided by the number of support points P."""
    init_prior_std: float = 0.1
    """Initial prior standard deviation σ of every parameter element."""
    outer_samples: int = 0
    """Posterior samples θ_MAP + σ·ε averaged in the outer loss (0: query loss at the MAP only)."""
    kl_weight: float = 1.0
    """Weight of the KL term (divided by the query points) when outer_samples > 0."""
    uncertainty: Literal["laplace", "prior"] = "laplace"
    """Test-time parameter spread: 'laplace' (diagonal Laplace at the MAP) or 'prior' (σ)."""
    num_samples: int = 20
    """Parameter samples of the predictive distribution at evaluation."""
    num_fisher_samples: int = 8
    """Sampled-target gradients estimating the Fisher diagonal (uncertainty='laplace')."""
    init_noise_std: float = 0.5
    """Regression only: initial observation noise σ_y."""
    learn_noise: bool = True
    """Regression only: meta-learn σ_y (otherwise it stays at init_noise_std)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require_at_least(self, ("num_fisher_samples",))
        if self.num_samples < 2:
            raise ValueError(
                f"num_samples must be >= 2 to form a predictive, got {self.num_samples}"
            )
        for name in ("init_prior_std", "init_noise_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.prior_weight >= 0 or not self.kl_weight >= 0:
            raise ValueError(
                f"prior_weight and kl_weight must be >= 0, got {self.prior_weight}, {self.kl_weight}"
            )
        if self.outer_samples < 0:
            raise ValueError(f"outer_samples must be >= 0, got {self.outer_samples}")
        if self.outer_samples > 0 and self.kl_weight == 0:
            raise ValueError(
                "outer_samples > 0 with kl_weight = 0 would shrink σ towards zero (weight noise only "
                "raises the query loss); set kl_weight > 0 (1.0 is the untempered bound) or "
                "outer_samples = 0"
            )
        if self.uncertainty not in UNCERTAINTIES:
            raise ValueError(
                f"uncertainty must be one of {UNCERTAINTIES}, got {self.uncertainty!r}"
            )
        if self.uncertainty == "laplace" and self.prior_weight == 0:
            raise ValueError(
                "uncertainty='laplace' needs prior_weight > 0 (the prior bounds the posterior "
                "precision from below); raise prior_weight or use uncertainty='prior'"
            )
