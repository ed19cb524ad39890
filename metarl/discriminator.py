"""A functional discriminator for adversarial imitation and task generation.

``D(x) = σ(z(x))`` with ``z`` an MLP logit on a parameter dict, so it adapts through
:func:`metarl.adaptation.adapt` and vmaps over tasks like the policies do. Label 1 is the
reference data (expert transitions, nominal tasks), label 0 the generated data (policy
transitions, generated tasks).

* Loss: weighted binary cross-entropy, each side averaged over its own weight, plus the
  zero-centred gradient penalty on the reference side (R1, Mescheder et al. 2018, arXiv
  1801.04406): ``λ/2 · E_ref ‖∇_x z(x)‖²``.
* Reward: ``log D − log(1 − D)``, which is exactly the logit ``z`` (GAIL's and AIRL's
  symmetric reward; positive where D takes a transition for the expert's).
* Absorbing states (DAC, Kostrikov et al. 2019, arXiv 1809.02925): an episode that terminates
  before the horizon continues in an absorbing state. Transitions carry an indicator feature;
  each terminated episode adds one absorbing sample (features 0, indicator 1) on its side, as
  DAC adds one absorbing transition per episode to its buffer, and the policy is paid the
  discounted absorbing reward of the remaining steps at its terminal step. Without this, a
  reward of fixed sign biases the policy towards ending episodes early (negative) or never
  ending them (positive).

Shapes: ``E`` episodes, ``T`` horizon, ``F`` input features (``obs_dim + act_dim + 1``, or
``2 obs_dim + 1`` for state-only inputs), ``M = E·T + E`` samples per task.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from metarl.nn import FunctionalMLP, init_mlp
from metarl.types import Params


class DiscData(NamedTuple):
    """Discriminator samples of one task (or ``[N, ...]`` for several).

    Attributes:
        inputs: ``[M, F]`` features; the last column is the absorbing-state indicator.
        weights: ``[M]`` how many steps each sample stands for (0: padding).
    """

    inputs: torch.Tensor
    weights: torch.Tensor


class Discriminator:
    """Architecture of ``z(x)``: an MLP from ``num_features`` to one logit.

    Args:
        num_features: input size ``F``, the absorbing indicator included.
        hidden_sizes: widths of the hidden layers.
        activation: ``"relu"`` or ``"tanh"``.
    """

    def __init__(
        self, num_features: int, hidden_sizes: tuple[int, ...] = (64, 64), activation: str = "tanh"
    ) -> None:
        self.num_features = int(num_features)
        self.mlp = FunctionalMLP([self.num_features, *hidden_sizes, 1], activation)

    def init_params(self, seed: int) -> Params:
        """Fresh parameters, a deterministic function of ``seed``."""
        return init_mlp(self.mlp.sizes, seed, output_scale=1.0)

    def logits(self, params: Params, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs [..., F] -> [...]`` logits ``z``."""
        return self.mlp(params, inputs).squeeze(-1)


def transition_inputs(
    obs: torch.Tensor,
    second: torch.Tensor,
    mask: torch.Tensor,
    terminated: torch.Tensor,
) -> DiscData:
    """Discriminator samples of episodes, absorbing states included.

    Args:
        obs: ``[..., E, T, obs_dim]``.
        second: ``[..., E, T, k]`` the executed action (``k = act_dim``) or the next observation.
        mask: ``[..., E, T]`` 1.0 while alive.
        terminated: ``[..., E, T]`` 1.0 at a terminal step.

    Returns:
        ``inputs [..., E·T + E, obs_dim + k + 1]`` and ``weights [..., E·T + E]``: every alive
        step with weight 1, then per episode one absorbing sample (features 0, indicator 1)
        with weight 1 if the episode terminated before the horizon, else 0.
    """
    horizon = mask.shape[-1]
    steps = torch.cat([obs, second, torch.zeros_like(obs[..., :1])], dim=-1)
    steps = steps * mask.unsqueeze(-1)
    absorbing_weight = terminated.amax(-1) * (mask.sum(-1) < horizon).to(mask.dtype)
    absorbing = torch.zeros(*steps.shape[:-2], steps.shape[-1], dtype=steps.dtype)
    absorbing[..., -1] = 1.0
    inputs = torch.cat([steps.flatten(-3, -2), absorbing], dim=-2)
    weights = torch.cat([mask.flatten(-2), absorbing_weight], dim=-1)
    return DiscData(inputs, weights)


def _weighted_mean(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (x * weights).sum() / weights.sum().clamp(min=1e-8)


def loss(
    disc: Discriminator,
    params: Params,
    reference: DiscData,
    generated: DiscData,
    penalty: float,
) -> torch.Tensor:
    """Binary cross-entropy (reference = 1, generated = 0) plus ``penalty/2 · E_ref ‖∇_x z‖²``.

    Args:
        disc: the architecture.
        params: its parameters.
        reference: one task's reference samples ``[M_r, F]``.
        generated: one task's generated samples ``[M_g, F]``.
        penalty: the gradient-penalty weight ``λ`` (0 turns it off).

    Returns:
        A scalar; differentiable in ``params`` (twice, penalty included) and vmappable.
    """
    z_ref = disc.logits(params, reference.inputs)
    z_gen = disc.logits(params, generated.inputs)
    bce = _weighted_mean(F.softplus(-z_ref), reference.weights) + _weighted_mean(
        F.softplus(z_gen), generated.weights
    )
    if penalty == 0:
        return bce

    def logit_sum(x: torch.Tensor) -> torch.Tensor:
        return disc.logits(params, x).sum()

    input_grads = grad(logit_sum)(reference.inputs)
    return bce + 0.5 * penalty * _weighted_mean(input_grads.pow(2).sum(-1), reference.weights)


def rewards(
    disc: Discriminator,
    params: Params,
    obs: torch.Tensor,
    second: torch.Tensor,
    mask: torch.Tensor,
    terminated: torch.Tensor,
    gamma: float,
) -> torch.Tensor:
    """``log D − log(1 − D)`` of each step, with the absorbing tail paid at the terminal step.

    Args:
        disc, params: one task's discriminator.
        obs, second, mask, terminated: that task's episodes, as in :func:`transition_inputs`
            (``[E, T, ...]``).
        gamma: the policy's discount; the terminal step of an episode of length ``L`` gains
            ``z_abs · Σ_{k=1}^{T−L} γ^k``.

    Returns:
        ``[E, T]`` rewards, 0 after the episode ended. Detached.
    """
    with torch.no_grad():
        horizon = mask.shape[-1]
        steps = torch.cat([obs, second, torch.zeros_like(obs[..., :1])], dim=-1)
        r = disc.logits(params, steps) * mask
        absorbing = torch.zeros(steps.shape[-1], dtype=steps.dtype)
        absorbing[-1] = 1.0
        z_abs = disc.logits(params, absorbing)
        tail = horizon - mask.sum(-1)  # absorbing steps after each episode
        if gamma == 1.0:
            discounted = tail
        else:
            discounted = gamma * (1.0 - gamma**tail) / (1.0 - gamma)
        bonus = z_abs * discounted * terminated.amax(-1)
        return r + terminated * mask * bonus.unsqueeze(-1)


def task_losses(
    disc: Discriminator, params: Params, reference: DiscData, generated: DiscData, penalty: float
) -> torch.Tensor:
    """``[N]`` per-task losses of per-task parameters ``[N, *P]`` on ``[N, M, F]`` samples."""

    def one(p: Params, ref: DiscData, gen: DiscData) -> torch.Tensor:
        return loss(disc, p, ref, gen, penalty)

    return vmap(one)(params, reference, generated)
