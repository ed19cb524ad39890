"""Discounted returns and generalised advantage estimation over fixed-horizon, masked batches.

Every function works on tensors shaped ``[..., T]`` (any leading axes, e.g. ``[tasks, episodes]``)
where each row along the last axis holds one episode from its first step: ``mask`` is 1.0 while
the episode is alive and 0.0 after it ended, ``terminated`` is 1.0 at the step that ended it by
reaching a terminal state. An episode that is alive at its last recorded step was *truncated*
(by the horizon or a time limit), not terminated.

How the end of an episode is bootstrapped:

* termination: the value after the last step is 0;
* truncation: the value after the last step is ``next_values`` at that step (the baseline's value
  of ``next_obs``), or 0 when ``next_values`` is not given (the Monte-Carlo return, as the
  linear-baseline papers compute it).

References: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation" (arXiv 1506.02438), eq. 16; Pardo et al. 2018, "Time Limits in
Reinforcement Learning" (arXiv 1712.00378) for bootstrapping at truncation.
"""

from __future__ import annotations

import torch


def discount_cumsum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """``y_t = sum_{k >= 0} discount^k x_{t+k}`` along the last axis.

    Computed as one product with an upper-triangular matrix of powers of ``discount`` (float64,
    then cast), which vectorises over every leading axis and works inside ``torch.func.vmap``.

    Args:
        x: ``[..., T]``.
        discount: the factor per step, in ``[0, 1]``.

    Returns:
        ``[..., T]`` with the dtype of ``x``.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount={discount} must lie in [0, 1]")
    horizon = x.shape[-1]
    steps = torch.arange(horizon, dtype=torch.float64)
    lag = steps[:, None] - steps[None, :]  # lag[s, t] = s - t: how far step s lies after step t
    powers = torch.where(lag >= 0, discount ** lag.clamp(min=0), torch.zeros(()))
    return x @ powers.to(x.dtype)


def continuing(mask: torch.Tensor) -> torch.Tensor:
    """``[..., T]`` 1.0 where the episode is alive at the next step (always 0.0 at the last step)."""
    return torch.cat([mask[..., 1:], torch.zeros_like(mask[..., :1])], dim=-1)


def _bootstrap(
    mask: torch.Tensor, terminated: torch.Tensor, next_values: torch.Tensor | None
) -> torch.Tensor:
    """``[..., T]`` the value after each episode's last step: 0 at termination, else ``next_values``."""
    if next_values is None:
        return torch.zeros_like(mask)
    last = mask * (1.0 - continuing(mask))
    return last * (1.0 - terminated) * next_values


def discounted_returns(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    next_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Discounted return-to-go of every step, 0 after the episode ended.

    Args:
        rewards: ``[..., T]``.
        mask: ``[..., T]`` 1.0 while the episode is alive.
        terminated: ``[..., T]`` 1.0 at a step that ended the episode by termination.
        gamma: discount factor.
        next_values: ``[..., T]`` value of the observation after each step, read only at a
            truncated episode's last step; ``None`` bootstraps 0 there.

    Returns:
        ``[..., T]`` returns ``G_t = r_t + gamma * G_{t+1}``.
    """
    tail = gamma * _bootstrap(mask, terminated, next_values)
    return discount_cumsum((rewards + tail) * mask, gamma) * mask


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
    lam: float,
    next_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalised advantage estimates ``A_t = sum_k (gamma lam)^k delta_{t+k}``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` where ``V_{t+1}`` is ``values`` at the next step
    while the episode continues, and the bootstrap value (see the module docstring) at its last
    step.

    Args:
        rewards: ``[..., T]``.
        values: ``[..., T]`` baseline value of each step's observation.
        mask: ``[..., T]`` 1.0 while the episode is alive.
        terminated: ``[..., T]`` 1.0 at a step that ended the episode by termination.
        gamma: discount factor.
        lam: GAE's lambda in ``[0, 1]`` (1.0: Monte-Carlo return minus the baseline).
        next_values: ``[..., T]`` value of the observation after each step (read at truncation).

    Returns:
        ``[..., T]`` advantages, 0 after the episode ended.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam={lam} must lie in [0, 1]")
    following = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    next_v = continuing(mask) * following + _bootstrap(mask, terminated, next_values)
    deltas = (rewards + gamma * next_v - values) * mask
    return discount_cumsum(deltas, gamma * lam) * mask


def normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Standardises ``x`` over its alive entries (mean 0, std 1); masked entries become 0.

    Args:
        x: ``[..., T]``.
        mask: ``[..., T]`` weights (1.0 alive, 0.0 padding).
        eps: added to the standard deviation.

    Returns:
        ``[..., T]``.
    """
    count = mask.sum().clamp(min=1.0)
    mean = (x * mask).sum() / count
    var = ((x - mean).pow(2) * mask).sum() / count
    return (x - mean) / (var.sqrt() + eps) * mask
