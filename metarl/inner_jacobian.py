"""The inner step of MAML-TRPO and its Jacobian in closed form, for Gaussian MLP policies.

One inner step on task ``i`` maps the parameters to ``θ'_i = θ − α ∇L_i(θ)`` with ``L_i`` the
REINFORCE loss ``−Σ_t w_t log π(a_t | s_t)`` (``w_t = mask_t A_t / alive steps``). Conjugate
gradient in the TRPO meta-update multiplies by its Jacobian ``J_i = I − α ∇²L_i`` twice per
curvature product, which autograd does as a double backward through the saved inner step: its
elementwise bookkeeping (ReLU's backward of a backward, gradient accumulation, zero fills) took
about two thirds of the time on a 2-core CPU, the matrix products a third.

:class:`GaussianMLPStep` writes the Hessian-vector product ``∇²L_i u`` out by hand (Pearlmutter's
R-operator): a forward pass of the direction's tangents through the network and a backward pass
of their cotangents, on activations, activation derivatives and backpropagated errors kept from
the step itself. Biases ride along as a column of ones on each layer's input, so every product
is one batched matrix multiply over tasks. The arithmetic is the same as autograd's (six large
matrix products per Jacobian for two hidden layers); what goes is the elementwise traffic.

Gaussian log-likelihood, with ``r = a − μ`` and ``s`` the log standard deviation:
``∂ log π/∂μ = r e^{−2s}``, ``∂ log π/∂s = r² e^{−2s} − 1``; their tangents along ``(Rμ, Rs)``
are ``e^{−2s}(−Rμ − 2 r Rs)`` and ``−2 r e^{−2s}(Rμ + r Rs)``.

Shapes: ``N`` tasks, ``n`` steps per task (episodes × horizon, flattened), ``H`` a layer's width.
"""

from __future__ import annotations

from typing import Any

import torch

from metarl.adaptation import Params
from metarl.nn import mlp_layer_names

ACTIVATIONS = ("relu", "tanh")


def supported(policy: Any, lr: Any, first_order: bool) -> bool:
    """Whether :class:`GaussianMLPStep` covers this inner loop: a Gaussian MLP policy with a ReLU
    or tanh network (:class:`metarl.policies.GaussianMLPPolicy`), one scalar inner learning rate,
    second order."""
    mlp = getattr(policy, "mlp", None)
    return (
        not first_order
        and not getattr(policy, "discrete", True)
        and getattr(policy, "noise_kind", None) == "normal"
        and getattr(mlp, "activation", None) in ACTIVATIONS
        and isinstance(lr, int | float)
        and not isinstance(lr, bool)
    )


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
        names = mlp_layer_names(len(policy.mlp.sizes) - 1)
        self.keys = [(f"{n}.weight", f"{n}.bias") for n in names]
        expected = {k for pair in self.keys for k in pair} | {"log_std"}
        if set(params) != expected:
            raise ValueError(
                f"GaussianMLPStep needs exactly the parameters {sorted(expected)}, got "
                f"{sorted(params)}; use the autograd inner Jacobian for this policy"
            )
        self.tanh = policy.mlp.activation == "tanh"
        self.lr = float(lr)
        num_tasks = batch.obs.shape[0]
        with torch.no_grad():
            obs = batch.obs.reshape(num_tasks, -1, batch.obs.shape[-1])
            actions = batch.actions.reshape(num_tasks, -1, batch.actions.shape[-1])
            mask = batch.mask.reshape(num_tasks, -1)
            count = mask.sum(1).clamp(min=1.0)
            w = (batch.advantages.reshape(num_tasks, -1) * mask / count[:, None])[..., None]
            self.weights = [params[k].detach() for k, _ in self.keys]
            inputs, derivs, h = [], [], obs
            for layer, (wk, bk) in enumerate(self.keys):
                inputs.append(_with_ones(h))
                z = torch.bmm(inputs[-1], _augmented(params[wk], params[bk]).transpose(1, 2))
                if layer == len(self.keys) - 1:
                    mean = z
                elif self.tanh:
                    h = torch.tanh(z)
                    derivs.append(1.0 - h * h)
                else:
                    derivs.append((z > 0).to(z.dtype))
                    h = z * derivs[-1]
            log_std = params["log_std"].detach()
            self.r = actions - mean
            self.w_iv = w * torch.exp(-2.0 * log_std)[:, None, :]
            # Backpropagated errors δ_l = ∂L/∂z_l, and for tanh the curvature gates
            # (δ_{l+1} W_{l+1}) ⊙ σ''(z_l) that multiply a layer's own tangent.
            delta = -self.w_iv * self.r
            deltas, gates = [delta], list[torch.Tensor]()
            for layer in range(len(self.keys) - 1, 0, -1):
                back = torch.bmm(delta, self.weights[layer])
                h = inputs[layer][..., :-1]
                if self.tanh:
                    gates.insert(0, back * (-2.0 * h * derivs[layer - 1]))
                delta = back * derivs[layer - 1]
                deltas.insert(0, delta)
            grads: Params = {
                "log_std": -(self.w_iv * self.r * self.r - w).sum(1),
            }
            for (wk, bk), x, d in zip(self.keys, inputs, deltas, strict=True):
                grads[wk], grads[bk] = _split(torch.bmm(d.transpose(1, 2), x))
            self.adapted = {k: (v - self.lr * grads[k]).detach() for k, v in params.items()}
        self.inputs, self.derivs, self.deltas, self.gates = inputs, derivs, deltas, gates

    def __call__(self, u: Params) -> tuple[Params]:
        """``u [N, *P]`` -> ``(J u,)`` with ``J = I − α ∇²L`` per task."""
        curvature = self.hvp(u)
        return ({k: v - self.lr * curvature[k] for k, v in u.items()},)

    @torch.no_grad()
    def hvp(self, u: Params) -> Params:
        """``∇²L u`` per task, keyed as ``u``."""
        last = len(self.keys) - 1
        tangents, hidden = [], None  # R z_l, and R h_l = σ'(z_l) R z_l
        hiddens = []
        for layer, (wk, bk) in enumerate(self.keys):
            rz = torch.bmm(self.inputs[layer], _augmented(u[wk], u[bk]).transpose(1, 2))
            if hidden is not None:
                rz.baddbmm_(hidden, self.weights[layer].transpose(1, 2))
            if layer < last:
                tangents.append(rz)
                hidden = rz * self.derivs[layer]
                hiddens.append(hidden)
        rs = u["log_std"][:, None, :]
        # rz is now R μ. R(∂L/∂μ) and R(∂L/∂s):
        scaled = self.w_iv * (rz + self.r * rs)
        out: Params = {"log_std": 2.0 * (self.r * scaled).sum(1)}
        r_delta = scaled + self.w_iv * self.r * rs
        for layer in range(last, -1, -1):
            wk, bk = self.keys[layer]
            g = torch.bmm(r_delta.transpose(1, 2), self.inputs[layer])
            if layer > 0:
                g[..., :-1] += torch.bmm(self.deltas[layer].transpose(1, 2), hiddens[layer - 1])
            out[wk], out[bk] = _split(g)
            if layer > 0:
                nxt = torch.bmm(self.deltas[layer], u[wk])
                nxt.baddbmm_(r_delta, self.weights[layer]).mul_(self.derivs[layer - 1])
                if self.tanh:
                    nxt.addcmul_(self.gates[layer - 1], tangents[layer - 1])
                r_delta = nxt
        return {k: out[k] for k in u}


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[N, n, H]`` -> ``[N, n, H + 1]`` with a last column of ones (the bias's input)."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _augmented(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[N, out, in]``, ``[N, out]`` -> ``[N, out, in + 1]``."""
    return torch.cat([weight.detach(), bias.detach()[..., None]], dim=-1)


def _split(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, out, in + 1]`` -> weight part ``[N, out, in]``, bias part ``[N, out]``."""
    return g[..., :-1].contiguous(), g[..., -1].contiguous()
