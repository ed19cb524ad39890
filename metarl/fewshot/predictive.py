"""The diagonal Gaussian prior of probabilistic MAML and the scores of its predictive distributions:
a mixture of Gaussians for regression (coverage and width of the central interval, NLL), the mean
of the samples' softmax for classification (accuracy, NLL).
"""

from __future__ import annotations

import math

import torch

from metarl.adaptation import Params

LEVEL = 0.9
"""Mass of the central predictive interval whose coverage is reported."""


def neg_log_prior(params: Params, mean: Params, log_std: Params) -> torch.Tensor:
    """``−log N(θ; μ, diag σ²)`` without the constant: ``Σ (θ − μ)² / (2σ²) + log σ`` (a scalar)."""
    return sum(  # type: ignore[return-value]
        ((params[k] - mean[k]) ** 2 * torch.exp(-2 * log_std[k]) / 2 + log_std[k]).sum()
        for k in mean
    )


def mahalanobis(params: Params, mean: Params, log_std: Params) -> torch.Tensor:
    """``Σ (θ − μ)² / (2σ²)``: the KL between two Gaussians of one diagonal scale σ."""
    return sum(  # type: ignore[return-value]
        ((params[k] - mean[k]) ** 2 * torch.exp(-2 * log_std[k]) / 2).sum() for k in mean
    )


def _mixture_cdf(y: torch.Tensor, means: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr((y.unsqueeze(0) - means) / std).mean(0)


def gaussian_mixture_scores(
    means: torch.Tensor, std: torch.Tensor | float, targets: torch.Tensor, level: float = LEVEL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores the predictive ``mean_s N(means[s], std²)`` of each point against its target.

    Args:
        means: ``[S, Q]`` sample predictions.
        std: observation noise σ_y (scalar).
        targets: ``[Q]``.
        level: mass of the central interval.

    Returns:
        ``(coverage, width, nll)``: the fraction of targets inside the central ``level`` interval,
        the interval's mean width and the mean negative log predictive density (scalars).
    """
    std = torch.as_tensor(std, dtype=means.dtype, device=means.device)
    lo_p, hi_p = (1 - level) / 2, (1 + level) / 2
    cdf = _mixture_cdf(targets, means, std)
    coverage = ((cdf >= lo_p) & (cdf <= hi_p)).to(means.dtype).mean()
    # Bisection on the mixture CDF; the bracket holds both quantiles (|z| < 10 for every part).
    lo = means.min(0).values - 10 * std
    hi = means.max(0).values + 10 * std
    bounds = []
    for p in (lo_p, hi_p):
        a, b = lo, hi
        for _ in range(60):
            mid = (a + b) / 2
            below = _mixture_cdf(mid, means, std) < p
            a, b = torch.where(below, mid, a), torch.where(below, b, mid)
        bounds.append((a + b) / 2)
    width = (bounds[1] - bounds[0]).mean()
    log_density = (
        -((targets.unsqueeze(0) - means) ** 2) / (2 * std**2)
        - torch.log(std)
        - math.log(2 * math.pi) / 2
    )
    nll = -(torch.logsumexp(log_density, 0) - math.log(means.shape[0])).mean()
    return coverage, width, nll


def categorical_scores(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy and NLL of the mean of the samples' softmax; ``logits [S, Q, N]``, ``labels [Q]``."""
    log_probs = torch.logsumexp(torch.log_softmax(logits, -1), 0) - math.log(logits.shape[0])
    accuracy = (log_probs.argmax(-1) == labels).to(logits.dtype).mean()
    nll = -log_probs.gather(-1, labels.unsqueeze(-1)).mean()
    return accuracy, nll
