"""Functional policies: parameters are a plain ``dict[str, Tensor]``, every method is a pure function.

A policy object holds only its architecture (sizes, activation), never tensors, so it pickles in a
few bytes and is sent to rollout workers once. All methods take the parameters explicitly and are
vmappable with ``torch.func``.

Parameter names: ``fc0.weight``, ``fc0.bias``, ... for the hidden layers, ``out.weight`` and
``out.bias`` for the output layer, and ``log_std`` for the Gaussian policy's state-independent
log standard deviation.

Sampling is a deterministic function of pre-drawn noise (:meth:`act`), and each row of a batch is
computed bit for bit the same whatever else is in the batch, so a rollout gives the same actions
whether its environment is stepped alone or beside hundreds of others.
"""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metarl.nn import FunctionalMLP, init_mlp
from metarl.types import Params

_LOG_2PI = math.log(2.0 * math.pi)
_UNIFORM_EPS = 1e-6


def diagonal_gaussian_kl(
    mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor, log_std_q: torch.Tensor
) -> torch.Tensor:
    """``KL(N(mean_p, exp(log_std_p)²) || N(mean_q, exp(log_std_q)²))`` summed over the last axis."""
    var_ratio = torch.exp(2.0 * (log_std_p - log_std_q))
    mahalanobis = (mean_p - mean_q).pow(2) * torch.exp(-2.0 * log_std_q)
    return (log_std_q - log_std_p + 0.5 * (var_ratio + mahalanobis - 1.0)).sum(-1)


class GaussianMLPPolicy:
    """Diagonal Gaussian policy: an MLP mean and a state-independent log standard deviation.

    Actions are not squashed (as in the MAML paper); the sampler clips them to the action bounds
    before stepping the environment and stores the unclipped action.

    Args:
        obs_dim: size of the flat observation.
        act_dim: size of the flat action.
        hidden_sizes: widths of the hidden layers.
        activation: ``"relu"`` or ``"tanh"``.
        init_log_std: initial value of every entry of ``log_std``.
        output_init_scale: factor on the output layer's Glorot-uniform initial weights (0.01:
            near-zero first actions, as ProMP and garage; 1.0: plain Glorot, as the MAML paper's
            rllab policy).
    """

    discrete = False
    noise_kind = "normal"

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden_sizes: tuple[int, ...] = (100, 100),
        activation: str = "relu",
        init_log_std: float = 0.0,
        output_init_scale: float = 0.01,
    ) -> None:
        self.obs_dim = int(obs_dim)
        self.act_dim = int(act_dim)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.init_log_std = float(init_log_std)
        self.output_init_scale = float(output_init_scale)
        self.mlp = FunctionalMLP([self.obs_dim, *self.hidden_sizes, self.act_dim], activation)
        self.noise_shape: tuple[int, ...] = (self.act_dim,)

    def init_params(self, seed: int) -> Params:
        """Fresh parameters, a deterministic function of ``seed``."""
        params = init_mlp(self.mlp.sizes, seed, output_scale=self.output_init_scale)
        params["log_std"] = torch.full((self.act_dim,), self.init_log_std)
        return params

    def distribution_params(
        self, params: Params, obs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``obs [..., obs_dim]`` -> ``(mean [..., act_dim], log_std [..., act_dim])``."""
        mean = self.mlp(params, obs)
        return mean, params["log_std"].expand_as(mean)

    def log_prob(self, params: Params, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``obs [..., obs_dim]``, ``actions [..., act_dim]`` -> ``[...]``."""
        mean, log_std = self.distribution_params(params, obs)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)

    def entropy(self, params: Params, obs: torch.Tensor) -> torch.Tensor:
        """``obs [..., obs_dim]`` -> ``[...]``."""
        _, log_std = self.distribution_params(params, obs)
        return (log_std + 0.5 * (1.0 + _LOG_2PI)).sum(-1)

    def kl(self, params_p: Params, params_q: Params, obs: torch.Tensor) -> torch.Tensor:
        """Analytic ``KL(p || q)`` at each observation: ``obs [..., obs_dim]`` -> ``[...]``."""
        return diagonal_gaussian_kl(
            *self.distribution_params(params_p, obs), *self.distribution_params(params_q, obs)
        )

    def act(
        self, params: Params, obs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterised sample ``mean + exp(log_std) * noise``.

        Args:
            params: the policy parameters.
            obs: ``[B, obs_dim]``.
            noise: ``[B, act_dim]`` standard-normal draws.

        Returns:
            ``(actions [B, act_dim], log_probs [B])``. Each row depends only on its own obs and noise.
        """
        log_std = params["log_std"]
        actions = torch.addcmul(self.mlp.rows(params, obs), log_std.exp(), noise)
        # log N(a; mean, std) at a = mean + std * noise, written with as few tensor ops as possible:
        # this runs once per environment step in every rollout worker.
        const = log_std.sum() + 0.5 * _LOG_2PI * self.act_dim
        log_probs = torch.sub(-const, torch.linalg.vecdot(noise, noise), alpha=0.5)
        return actions, log_probs

    def sample_noise(self, rng: np.random.Generator, num_steps: int) -> np.ndarray:
        """``[num_steps, act_dim]`` float32 standard-normal draws for one episode."""
        return rng.standard_normal((num_steps, *self.noise_shape), dtype=np.float32)

    def __repr__(self) -> str:
        return (
            f"GaussianMLPPolicy(obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
            f"hidden_sizes={self.hidden_sizes}, activation={self.mlp.activation!r})"
        )


class CategoricalMLPPolicy:
    """Categorical policy over ``num_actions`` discrete actions with MLP logits.

    Args:
        obs_dim: size of the flat observation.
        num_actions: number of discrete actions.
        hidden_sizes: widths of the hidden layers.
        activation: ``"relu"`` or ``"tanh"``.
        output_init_scale: factor on the output layer's Glorot-uniform initial weights.
    """

    discrete = True
    noise_kind = "uniform"

    def __init__(
        self,
        obs_dim: int,
        num_actions: int,
        hidden_sizes: tuple[int, ...] = (100, 100),
        activation: str = "relu",
        output_init_scale: float = 0.01,
    ) -> None:
        self.obs_dim = int(obs_dim)
        self.num_actions = int(num_actions)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        self.output_init_scale = float(output_init_scale)
        self.mlp = FunctionalMLP([self.obs_dim, *self.hidden_sizes, self.num_actions], activation)
        self.noise_shape: tuple[int, ...] = (self.num_actions,)

    def init_params(self, seed: int) -> Params:
        """Fresh parameters, a deterministic function of ``seed``."""
        return init_mlp(self.mlp.sizes, seed, output_scale=self.output_init_scale)

    def distribution_params(self, params: Params, obs: torch.Tensor) -> torch.Tensor:
        """``obs [..., obs_dim]`` -> normalised log-probabilities ``[..., num_actions]``."""
        return torch.log_softmax(self.mlp(params, obs), dim=-1)

    def log_prob(self, params: Params, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """``obs [..., obs_dim]``, integer ``actions [...]`` -> ``[...]``."""
        logp = self.distribution_params(params, obs)
        return logp.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, params: Params, obs: torch.Tensor) -> torch.Tensor:
        """``obs [..., obs_dim]`` -> ``[...]``."""
        logp = self.distribution_params(params, obs)
        return -(logp.exp() * logp).sum(-1)

    def kl(self, params_p: Params, params_q: Params, obs: torch.Tensor) -> torch.Tensor:
        """Analytic ``KL(p || q)`` at each observation: ``obs [..., obs_dim]`` -> ``[...]``."""
        logp = self.distribution_params(params_p, obs)
        logq = self.distribution_params(params_q, obs)
        return (logp.exp() * (logp - logq)).sum(-1)

    def act(
        self, params: Params, obs: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gumbel-max sample: ``argmax(logits - log(-log(noise)))``.

        Args:
            params: the policy parameters.
            obs: ``[B, obs_dim]``.
            noise: ``[B, num_actions]`` uniform draws in (0, 1); a constant row gives the mode.

        Returns:
            ``(actions [B] int64, log_probs [B])``. Each row depends only on its own obs and noise.
        """
        logp = torch.log_softmax(self.mlp.rows(params, obs), dim=-1)
        gumbel = -torch.log(-torch.log(noise.clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)))
        actions = torch.argmax(logp + gumbel, dim=-1)
        return actions, logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def sample_noise(self, rng: np.random.Generator, num_steps: int) -> np.ndarray:
        """``[num_steps, num_actions]`` float32 uniform draws for one episode."""
        return rng.random((num_steps, *self.noise_shape), dtype=np.float32)

    def __repr__(self) -> str:
        return (
            f"CategoricalMLPPolicy(obs_dim={self.obs_dim}, num_actions={self.num_actions}, "
            f"hidden_sizes={self.hidden_sizes}, activation={self.mlp.activation!r})"
        )


Policy = GaussianMLPPolicy | CategoricalMLPPolicy


def make_policy(observation_space: gym.Space, action_space: gym.Space, **kwargs: Any) -> Policy:
    """The policy for a pair of spaces: Gaussian for a ``Box`` action, categorical for ``Discrete``.

    Args:
        observation_space: a ``Box`` (flattened to ``obs_dim``).
        action_space: a ``Box`` or a ``Discrete``.
        **kwargs: passed to the policy (``hidden_sizes``, ``activation``, ``output_init_scale``,
            ``init_log_std``).
    """
    if not isinstance(observation_space, gym.spaces.Box):
        raise TypeError(
            f"observation space {observation_space} is not a Box; flatten it in the environment "
            "(gymnasium.wrappers.FlattenObservation) before building a policy"
        )
    obs_dim = int(np.prod(observation_space.shape))
    if isinstance(action_space, gym.spaces.Box):
        return GaussianMLPPolicy(obs_dim, int(np.prod(action_space.shape)), **kwargs)
    if isinstance(action_space, gym.spaces.Discrete):
        return CategoricalMLPPolicy(obs_dim, int(action_space.n), **kwargs)
    raise TypeError(
        f"action space {action_space} is not supported; expected a Box or a Discrete space"
    )


