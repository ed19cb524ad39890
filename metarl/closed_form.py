"""The meta-gradient's and MAML-TRPO's curvature products written out by hand for Gaussian MLP
policies (MAML-TRPO and MAML-PPO, ``products``).

Conjugate gradient in the TRPO meta-update multiplies by ``Σ_i J_iᵀ F_i J_i / N`` (see
:mod:`metarl.trust_region`): ``J_i = I − α ∇²L_i`` the Jacobian of the inner step
``θ'_i = θ − α ∇L_i(θ)`` on task ``i``, ``L_i`` the REINFORCE loss ``−Σ_t w_t log π(a_t | s_t)``
(``w_t = mask_t A_t / alive steps``), and ``F_i`` the post-update policy's Fisher. Autograd
applies ``J_i`` as a double backward through the saved inner step and ``F_i`` as a
forward-mode product of the policy's outputs followed by a backward one; on a 2-core CPU the
elementwise bookkeeping of those passes (ReLU's backward of a backward, gradient accumulation,
zero fills, the primal recomputed by forward mode) took about two thirds of the time, the matrix
products a third.

Here both are plain forward and backward passes over activations, activation derivatives and
backpropagated errors kept from one pass of the network: :class:`GaussianMLPStep` takes the
inner step and multiplies by ``J_i`` (the loss's Hessian-vector product by Pearlmutter's
R-operator: the direction's tangents forward through the network, their cotangents back), and
:class:`GaussianMLPFisher` multiplies by ``F_i`` (Gauss-Newton: tangents forward, the KL's
metric, cotangents back). Biases ride along as a column of ones on each layer's input, so every
product over tasks is one batched matrix multiply; the arithmetic is autograd's, the elementwise
traffic is what goes.

Gaussian log-likelihood, with ``r = a − μ`` and ``s`` the log standard deviation:
``∂ log π/∂μ = r e^{−2s}``, ``∂ log π/∂s = r² e^{−2s} − 1``; their tangents along ``(Rμ, Rs)``
are ``e^{−2s}(−Rμ − 2 r Rs)`` and ``−2 r e^{−2s}(Rμ + r Rs)``. The KL's metric in ``(μ, s)`` at
the old policy is ``(e^{−2s}, 2)``.

Shapes: ``N`` tasks, ``n`` steps per task (episodes × horizon, flattened), ``P`` any parameter's
shape.
"""

from __future__ import annotations

from typing import Any

import torch

from metarl.adaptation import Params
from metarl.meta_pg import step_weights
from metarl.nn import FunctionalMLP, mlp_layer_names
from metarl.policies import GaussianMLPPolicy

ACTIVATIONS = ("relu", "tanh")
PRODUCTS = ("auto", "closed-form", "autograd")
"""The agents' ``products`` settings: these products, autograd's, or these where they apply."""


def chosen(products: str, covered: bool) -> bool:
    """Whether a ``products`` setting takes these products where ``covered`` says whether they
    apply; asking for them where they do not is an error."""
    if products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    if products == "closed-form" and not covered:
        raise ValueError(
            "closed-form products cover Gaussian MLP policies (ReLU or tanh) and, through the "
            "inner steps, second-order steps of one scalar lr; use products='autograd' here"
        )
    return covered and products != "autograd"


def supported_policy(policy: Any) -> bool:
    """Whether the products cover the policy: exactly a
    :class:`metarl.policies.GaussianMLPPolicy` on a plain :class:`metarl.nn.FunctionalMLP` with
    ReLU or tanh (a subclass may change the log-likelihood, squash the actions or add
    parameters, which these products would not see)."""
    return (
        type(policy) is GaussianMLPPolicy
        and type(policy.mlp) is FunctionalMLP
        and policy.mlp.activation in ACTIVATIONS
    )


def supported(policy: Any, lr: Any, first_order: bool) -> bool:
    """Whether :class:`GaussianMLPStep` covers the inner loop: a policy of
    :func:`supported_policy`, one scalar inner learning rate, second order."""
    return (
        supported_policy(policy)
        and not first_order
        and isinstance(lr, int | float)
        and not isinstance(lr, bool)
    )


class MLPTrace:
    """One forward pass of the policy's network at per-task parameters, kept for products.

    Args:
        policy: a :class:`metarl.policies.GaussianMLPPolicy` (see :func:`supported`).
        params: per-task parameters ``[N, *P]`` (not differentiated).
        obs: ``[N, ..., obs_dim]``, flattened to ``[N, n, obs_dim]``.

    Attributes:
        mean: the network's output ``[N, n, act_dim]``.
    """

    def __init__(self, policy: Any, params: Params, obs: torch.Tensor) -> None:
        names = mlp_layer_names(len(policy.mlp.sizes) - 1)
        self.keys = [(f"{n}.weight", f"{n}.bias") for n in names]
        expected = {k for pair in self.keys for k in pair} | {"log_std"}
        if set(params) != expected:
            raise ValueError(
                f"closed-form products need exactly the parameters {sorted(expected)}, got "
                f"{sorted(params)}; use the autograd products for this policy"
            )
        self.tanh = policy.mlp.activation == "tanh"
        with torch.no_grad():
            self.weights = [params[k].detach() for k, _ in self.keys]
            self.inputs: list[torch.Tensor] = []  # each layer's input with a column of ones
            self.derivs: list[torch.Tensor] = []  # σ'(z) of each hidden layer
            h = obs.reshape(obs.shape[0], -1, obs.shape[-1])
            for layer, (wk, bk) in enumerate(self.keys):
                self.inputs.append(torch.cat([h, h.new_ones(*h.shape[:-1], 1)], dim=-1))
                z = torch.bmm(self.inputs[-1], _augmented(params[wk], params[bk]).transpose(1, 2))
                if layer == len(self.keys) - 1:
                    self.mean = z
                elif self.tanh:
                    h = torch.tanh(z)
                    self.derivs.append(1.0 - h * h)
                else:
                    self.derivs.append((z > 0).to(z.dtype))
                    h = torch.relu(z)

    def tangents(self, u: Params) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Forward mode along ``u [N, *P]``: per hidden layer ``R z`` and ``R h = σ'(z) R z``,
        and the output's ``R μ``."""
        last = len(self.keys) - 1
        pre: list[torch.Tensor] = []
        post: list[torch.Tensor] = []
        hidden = None
        for layer, (wk, bk) in enumerate(self.keys):
            rz = torch.bmm(self.inputs[layer], _augmented(u[wk], u[bk]).transpose(1, 2))
            if hidden is not None:
                rz.baddbmm_(hidden, self.weights[layer].transpose(1, 2))
            if layer == last:
                return pre, post, rz
            hidden = rz * self.derivs[layer]
            pre.append(rz)
            post.append(hidden)
        raise AssertionError("unreachable: the network has an output layer")

    def backward(self, cotangent: torch.Tensor) -> Params:
        """Reverse mode: the weights' and biases' gradients ``[N, *P]`` of ``Σ cotangent · μ``
        (``cotangent [N, n, act_dim]``)."""
        out: Params = {}
        delta = cotangent
        for layer in range(len(self.keys) - 1, -1, -1):
            wk, bk = self.keys[layer]
            out[wk], out[bk] = _split(torch.bmm(delta.transpose(1, 2), self.inputs[layer]))
            if layer > 0:
                delta = torch.bmm(delta, self.weights[layer]).mul_(self.derivs[layer - 1])
        return out


class GaussianMLPFisher:
    """``u ↦ F_i u / N`` per task: the Gauss-Newton form of the mean KL's Hessian at the policy
    ``params`` on the episodes ``batch``, each task's steps weighted by its mask over its alive
    steps and over the ``N`` tasks (``metarl.meta_pg.mean_kl``'s weights).

    Args:
        policy: a :class:`metarl.policies.GaussianMLPPolicy` (see :func:`supported`).
        params: the per-task post-update parameters ``[N, *P]``.
        batch: the curvature episodes (:class:`metarl.meta_pg.PGBatch`), ``[N, E, T, ...]``.
    """

    def __init__(self, policy: Any, params: Params, batch: Any) -> None:
        self.trace = MLPTrace(policy, params, batch.obs)
        num_tasks = batch.mask.shape[0]
        weight = step_weights(batch.mask, num_tasks).reshape(num_tasks, -1)
        self.metric = weight[..., None] * torch.exp(-2.0 * params["log_std"].detach())[:, None, :]
        self.log_std_weight = 2.0 * weight.sum(1, keepdim=True)  # [N, 1]

    @torch.no_grad()
    def __call__(self, u: Params) -> Params:
        """``u [N, *P]`` -> ``F u / N`` per task, keyed as ``u``."""
        _, _, r_mean = self.trace.tangents(u)
        out = self.trace.backward(self.metric * r_mean)
        out["log_std"] = self.log_std_weight * u["log_std"]
        return {k: out[k] for k in u}


class GaussianMLPStep:
    """One inner REINFORCE step on ``N`` tasks at once, with its Jacobian-vector product.

    Args:
        policy: a :class:`metarl.policies.GaussianMLPPolicy` (see :func:`supported`).
        params: per-task parameters ``[N, *P]`` the step starts from (not differentiated).
        batch: the step's data (:class:`metarl.meta_pg.PGBatch`), fields ``[N, E, T, ...]``.
        lr: the inner step size ``α``.

    Attributes:
        adapted: ``θ − α ∇L`` per task, ``[N, *P]``, detached.

    Calling it with per-task directions ``u [N, *P]`` returns ``(J u,)``, ``J = I − α ∇²L``
    (symmetric, so also ``Jᵀ u``): the same contract as a ``torch.func.vjp`` function of the
    inner step.
    """

    def __init__(self, policy: Any, params: Params, batch: Any, lr: float) -> None:
        self.trace = trace = MLPTrace(policy, params, batch.obs)
        self.lr = float(lr)
        num_tasks = batch.obs.shape[0]
        with torch.no_grad():
            actions = batch.actions.reshape(num_tasks, -1, batch.actions.shape[-1])
            mask = batch.mask.reshape(num_tasks, -1)
            count = mask.sum(1).clamp(min=1.0)
            w = (batch.advantages.reshape(num_tasks, -1) * mask / count[:, None])[..., None]
            self.r = actions - trace.mean
            self.w_iv = w * torch.exp(-2.0 * params["log_std"].detach())[:, None, :]
            # Backpropagated errors δ_l = ∂L/∂z_l, and for tanh the curvature gates
            # (δ_{l+1} W_{l+1}) ⊙ σ''(z_l) that multiply a layer's own tangent.
            delta = -self.w_iv * self.r
            self.deltas, self.gates = [delta], list[torch.Tensor]()
            for layer in range(len(trace.keys) - 1, 0, -1):
                back = torch.bmm(delta, trace.weights[layer])
                if trace.tanh:
                    h = trace.inputs[layer][..., :-1]
                    self.gates.insert(0, back * (-2.0 * h * trace.derivs[layer - 1]))
                delta = back * trace.derivs[layer - 1]
                self.deltas.insert(0, delta)
            grads: Params = {}
            for (wk, bk), x, d in zip(trace.keys, trace.inputs, self.deltas, strict=True):
                grads[wk], grads[bk] = _split(torch.bmm(d.transpose(1, 2), x))
            grads["log_std"] = -(self.w_iv * self.r * self.r - w).sum(1)
            self.adapted = {k: (v - self.lr * grads[k]).detach() for k, v in params.items()}

    def __call__(self, u: Params) -> tuple[Params]:
        """``u [N, *P]`` -> ``(J u,)`` with ``J = I − α ∇²L`` per task."""
        curvature = self.hvp(u)
        return ({k: v - self.lr * curvature[k] for k, v in u.items()},)

    @torch.no_grad()
    def hvp(self, u: Params) -> Params:
        """``∇²L u`` per task, keyed as ``u``."""
        trace = self.trace
        tangents, hiddens, r_mean = trace.tangents(u)
        rs = u["log_std"][:, None, :]
        # R(∂L/∂μ) and R(∂L/∂s):
        scaled = self.w_iv * (r_mean + self.r * rs)
        out: Params = {"log_std": 2.0 * (self.r * scaled).sum(1)}
        r_delta = scaled + self.w_iv * self.r * rs
        for layer in range(len(trace.keys) - 1, -1, -1):
            wk, bk = trace.keys[layer]
            g = torch.bmm(r_delta.transpose(1, 2), trace.inputs[layer])
            if layer > 0:
                g[..., :-1] += torch.bmm(self.deltas[layer].transpose(1, 2), hiddens[layer - 1])
            out[wk], out[bk] = _split(g)
            if layer > 0:
                nxt = torch.bmm(self.deltas[layer], u[wk])
                nxt.baddbmm_(r_delta, trace.weights[layer]).mul_(trace.derivs[layer - 1])
                if trace.tanh:
                    nxt.addcmul_(self.gates[layer - 1], tangents[layer - 1])
                r_delta = nxt
        return {k: out[k] for k in u}


def _augmented(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[N, out, in]``, ``[N, out]`` -> ``[N, out, in + 1]``."""
    return torch.cat([weight.detach(), bias.detach()[..., None]], dim=-1)


def _split(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, out, in + 1]`` -> weight part ``[N, out, in]``, bias part ``[N, out]``."""
    return g[..., :-1].contiguous(), g[..., -1].contiguous()
