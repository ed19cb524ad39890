"""SAC conditioned on a latent task variable z: the pieces PEARL trains and samples with.

The posterior over z (a product of Gaussian factors with the unit-Gaussian prior) and its KL to
the prior, the tanh-Gaussian log density, the twin-critic soft target, the policy π(a|s, z) in the
rollout workers' parameter-dict protocol (z drawn once per episode), a per-task replay ring
buffer, and the conversion of sampled trajectories into replay rows. See ``agents/pearl.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from metarl.nn import FunctionalMLP, init_mlp
from metarl.types import Params, Trajectories

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0
_LOG_2PI = math.log(2.0 * math.pi)

def product_of_gaussians(
    means: torch.Tensor, variances: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior: the product of the factors ``N(μ_n, σ²_n)`` and the prior ``N(0, I)``.

    Args:
        means: ``[..., C, L]`` per-transition means.
        variances: ``[..., C, L]`` per-transition variances (> 0).
        mask: ``[..., C]`` 1.0 for real transitions, 0.0 for padding (``None``: all real).

    Returns:
        ``(mean [..., L], variance [..., L])``; with no real transition, the prior.
    """
    precisions = 1.0 / variances
    if mask is not None:
        precisions = precisions * mask.unsqueeze(-1)
    variance = 1.0 / (1.0 + precisions.sum(-2))
    return variance * (precisions * means).sum(-2), variance


def kl_to_standard_normal(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, diag variance) || N(0, I))`` summed over the last axis: ``[..., L] -> [...]``."""
    return 0.5 * (variance + mean.pow(2) - 1.0 - variance.log()).sum(-1)


def tanh_gaussian_log_prob(
    pre_tanh: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor
) -> torch.Tensor:
    """``log π(tanh u)`` for ``u ~ N(mean, exp(log_std)²)``: ``[..., A] -> [...]``.

    Change of variables: ``log N(u) − Σ log(1 − tanh² u)``, with
    ``log(1 − tanh² u) = 2 (log 2 − u − softplus(−2u))`` (stable for large ``|u|``).
    """
    normal = -0.5 * ((pre_tanh - mean) * torch.exp(-log_std)).pow(2) - log_std - 0.5 * _LOG_2PI
    log_jacobian = 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))
    return (normal - log_jacobian).sum(-1)


def sac_q_target(
    rewards: torch.Tensor,
    terminated: torch.Tensor,
    next_q: torch.Tensor,
    next_log_prob: torch.Tensor,
    gamma: float,
    alpha: float | torch.Tensor,
    reward_scale: float,
) -> torch.Tensor:
    """``reward_scale·r + γ(1 − terminated)(min_i Q̄_i(s', a') − α log π(a'|s'))``.

    Args:
        rewards, terminated, next_log_prob: ``[R]``.
        next_q: ``[2, R]`` the target critics at ``(s', a')``.
    """
    soft_value = next_q.min(0).values - alpha * next_log_prob
    return reward_scale * rewards + gamma * (1.0 - terminated) * soft_value


class LatentTanhPolicy:
    """Tanh-Gaussian policy π(a|s,z) run on a parameter dict, in the rollout workers' protocol.

    The parameter dict holds the MLP (``fc*``, ``out``: ``[s, z] -> [mean, log_std]``) and the
    posterior to draw z from, ``z_mean`` and ``z_std`` ``[latent_dim]``. Actions are tanh-squashed
    to (−1, 1) and mapped affinely onto the action box.

    Args:
        obs_dim, act_dim, latent_dim: sizes.
        hidden_sizes: hidden widths.
        low, high: the action box bounds (finite), ``[act_dim]``.
        deterministic: act with ``tanh(mean)`` (z is still sampled).
    """

    discrete = False
    noise_kind = "normal"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden_sizes: tuple[int, ...],
        low: np.ndarray,
        high: np.ndarray,
        deterministic: bool = False,
    ) -> None:
        self.obs_dim, self.act_dim, self.latent_dim = int(obs_dim), int(act_dim), int(latent_dim)
        self.hidden_sizes = tuple(hidden_sizes)
        self.mlp = FunctionalMLP(
            [self.obs_dim + self.latent_dim, *hidden_sizes, 2 * act_dim], "relu"
        )
        self.low, self.high = np.asarray(low, np.float32), np.asarray(high, np.float32)
        self.center = torch.from_numpy((self.high + self.low) / 2.0)
        self.half = torch.from_numpy((self.high - self.low) / 2.0)
        self.deterministic = bool(deterministic)
        self.noise_shape: tuple[int, ...] = (self.act_dim + self.latent_dim,)

    def init_params(self, seed: int) -> Params:
        return init_mlp(self.mlp.sizes, seed, output_scale=0.01)

    def distribution_params(
        self, params: Params, obs: torch.Tensor, z: torch.Tensor, rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``obs [..., obs_dim]``, ``z [..., latent_dim]`` -> ``(mean, log_std)`` ``[..., act_dim]``."""
        x = torch.cat([obs, z], -1)
        mean, log_std = (self.mlp.rows(params, x) if rows else self.mlp(params, x)).chunk(2, -1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def sample(
        self,
        params: Params,
        obs: torch.Tensor,
        z: torch.Tensor,
        noise: torch.Tensor,
        rows: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Reparameterised ``(tanh action in (−1, 1), log π, mean, log_std)``; ``noise`` ``[..., act_dim]``."""
        mean, log_std = self.distribution_params(params, obs, z, rows)
        pre_tanh = mean if self.deterministic else mean + log_std.exp() * noise
        return torch.tanh(pre_tanh), tanh_gaussian_log_prob(pre_tanh, mean, log_std), mean, log_std

    def act(
        self, params: Params, obs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``obs [B, obs_dim]``, ``noise [B, act_dim + latent_dim]`` -> ``(actions in the box [B, A], log π [B])``."""
        z = params["z_mean"] + params["z_std"] * noise[:, self.act_dim :]
        action, log_prob, _, _ = self.sample(params, obs, z, noise[:, : self.act_dim], rows=True)
        return self.center + self.half * action, log_prob

    def sample_noise(self, rng: np.random.Generator, num_steps: int) -> np.ndarray:
        """``[num_steps, act_dim + latent_dim]``: fresh action noise per step, one z-noise per episode."""
        action_noise = rng.standard_normal((num_steps, self.act_dim), dtype=np.float32)
        z_noise = rng.standard_normal(self.latent_dim, dtype=np.float32)
        return np.concatenate(
            [action_noise, np.broadcast_to(z_noise, (num_steps, self.latent_dim))], 1
        )

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Box actions -> (−1, 1), the critics' and the context's action scale."""
        return (actions - self.center) / self.half

    def __repr__(self) -> str:
        return (
            f"LatentTanhPolicy(obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
            f"latent_dim={self.latent_dim}, hidden_sizes={self.hidden_sizes})"
        )


class TaskReplay:
    """One task's transitions as rows ``[s, a, r, s', terminated]`` in a ring buffer that grows on demand."""

    def __init__(self, width: int, capacity: int) -> None:
        self.data = np.zeros((0, width), np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, rows: np.ndarray) -> None:
        rows = rows[-self.capacity :]
        if self.size + len(rows) > len(self.data) and len(self.data) < self.capacity:
            grown = min(self.capacity, max(2 * len(self.data), self.size + len(rows), 1024))
            self.data = np.concatenate(
                [self.data, np.zeros((grown - len(self.data), rows.shape[1]), np.float32)]
            )
        index = (self.pos + np.arange(len(rows))) % self.capacity
        self.data[index] = rows
        self.pos = int((self.pos + len(rows)) % self.capacity)
        self.size = min(self.capacity, self.size + len(rows))

    def sample(self, rng: np.random.Generator, num: int) -> np.ndarray:
        return self.data[rng.integers(0, self.size, num)]

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.data[: self.size].copy(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data, self.pos = state["data"].copy(), int(state["pos"])
        self.size = len(self.data)


def transitions(policy: LatentTanhPolicy, traj: Trajectories) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[s, a, r, s', terminated]`` ``[N, E·T, W]`` (actions in (−1, 1)) and their mask ``[N, E·T]``."""
    rows = torch.cat(
        [
            traj.obs,
            policy.normalize(traj.actions),
            traj.rewards.unsqueeze(-1),
            traj.next_obs,
            traj.terminated.unsqueeze(-1),
        ],
        -1,
    )
    return rows.flatten(1, 2), traj.mask.flatten(1)
