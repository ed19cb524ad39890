"""Trust-region machinery through an inner adaptation: conjugate gradient, the meta-gradient and
the KL Hessian-vector products of MAML-TRPO.

With ``θ'_i(θ)`` the parameters after the inner steps on task ``i`` and ``J_i = ∂θ'_i/∂θ``, the
Hessian of the mean KL between old and new post-update policies, at the old parameters, is
exactly ``Σ_i J_iᵀ F_i J_i / N`` (the KL's gradient in ``θ'_i`` is zero there) with ``F_i`` the
Fisher matrix of task ``i``'s post-update policy. :func:`kl_hvp` multiplies by it without third
derivatives: a vector-Jacobian product through each inner step (``J_k = I − α ∇²L_k`` is
symmetric, so the same product gives ``J_k u``), a Fisher-vector product on the post-update data
(double backward of the KL on a graph built once), and the transposed chain. Each inner step's
product is built once per meta-update (:func:`linearize`) and reused by every conjugate-gradient
iteration.

Shapes: ``N`` tasks, ``P`` any parameter's shape, ``D`` the number of policy parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import vjp

from metarl import meta_pg
from metarl.adaptation import Params
from metarl.meta_pg import InnerLoop, PGBatch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenates tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Params) -> Params:
    """Splits a flat vector into tensors shaped like ``like``'s values."""
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = vector[offset : offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def conjugate_gradient(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    num_iters: int,
    tol: float = 1e-10,
) -> torch.Tensor:
    """Approximately solves ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec``.

    Args:
        matvec: ``x [D] -> A x [D]``.
        b: ``[D]``.
        num_iters: at most this many iterations (exact after ``D`` in exact arithmetic).
        tol: stop once the squared residual norm falls below it.

    Returns:
        ``[D]`` the solution estimate, starting from 0.
    """
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r.dot(r)
    for _ in range(num_iters):
        if rr < tol:
            break
        ap = matvec(p)
        alpha = rr / p.dot(ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r.dot(r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


VJP = Callable[[Params], tuple[Params]]


def linearize(
    inner: InnerLoop, params: Params, pre: list[PGBatch], num_curvature: int
) -> tuple[Params, list[VJP], list[VJP]]:
    """Runs the inner steps from ``params`` and keeps each step's vector-Jacobian product.

    Args:
        inner: the inner loop's settings.
        params: meta-parameters ``[*P]``.
        pre: one batch per inner step, ``[N, E, T, ...]``.
        num_curvature: episodes per task for the curvature products (``E``: the same products).

    Returns:
        ``(adapted [N, *P] detached, grad_vjps, curvature_vjps)``: per step, the product
        ``u ↦ J_kᵀ u`` with per-task cotangents ``[N, *P]`` on all episodes and on the first
        ``num_curvature`` (both at the full-data point).
    """
    num_tasks = pre[0].mask.shape[0]
    current = {k: v.detach().expand(num_tasks, *v.shape).clone() for k, v in params.items()}
    grad_vjps, curvature_vjps = [], []
    for batch in pre:
        # vjp returns (output, vjp_fn); indexing keeps mypy off its has_aux overload.
        linear = vjp(lambda p, b=batch: meta_pg.inner_step(inner, p, b, shared=False), current)
        out, grad_vjp = linear[0], linear[1]
        grad_vjps.append(grad_vjp)
        if num_curvature < batch.mask.shape[1]:
            sub = PGBatch(*(t[:, :num_curvature] for t in batch))
            curvature_vjp = vjp(
                lambda p, b=sub: meta_pg.inner_step(inner, p, b, shared=False), current
            )[1]
            curvature_vjps.append(curvature_vjp)
        else:
            curvature_vjps.append(grad_vjp)
        current = {k: v.detach() for k, v in out.items()}
    return current, grad_vjps, curvature_vjps


def through(vjps: list[VJP], u: Params, transposed: bool) -> Params:
    """Applies the inner steps' Jacobians: ``J u`` (first step first) or ``Jᵀ u`` (last step first).

    Every one-step Jacobian ``I − α ∇²L`` is symmetric, so its VJP also gives ``J_k u``.
    """
    for fn in reversed(vjps) if transposed else vjps:
        (u,) = fn(u)
    return u


def kl_hvp(
    policy: Any, adapted: Params, post: PGBatch, vjps: list[VJP], damping: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v [D] -> (Σ_i J_iᵀ F_i J_i / N + damping I) v``: the mean KL's Hessian through the inner steps."""
    leaf = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    old = {k: v.detach() for k, v in adapted.items()}
    kl = meta_pg.mean_kl(policy, old, leaf, post)
    kl_grads = torch.autograd.grad(kl, list(leaf.values()), create_graph=True)
    like = {k: v[0] for k, v in old.items()}
    num_tasks = post.mask.shape[0]

    def fisher(u: Params) -> Params:
        products = torch.autograd.grad(
            kl_grads, list(leaf.values()), list(u.values()), retain_graph=True
        )
        return dict(zip(leaf, products, strict=True))

    def product(v: torch.Tensor) -> torch.Tensor:
        per_task = {k: t.expand(num_tasks, *t.shape) for k, t in unflatten(v, like).items()}
        w = through(vjps, fisher(through(vjps, per_task, transposed=False)), transposed=True)
        return flatten([t.sum(0) for t in w.values()]) + damping * v

    return product


def surrogate(
    policy: Any, adapted: Params, old_log_probs: torch.Tensor, post: PGBatch
) -> torch.Tensor:
    """``mean_i E[ratio · A]`` on the post-update batch (per-task ``adapted [N, *P]``)."""
    ratio = torch.exp(meta_pg.post_log_probs(policy, adapted, post) - old_log_probs)
    return meta_pg.task_mean(ratio * post.advantages, post.mask)


def surrogate_gradient(
    policy: Any, adapted: Params, old_log_probs: torch.Tensor, post: PGBatch, vjps: list[VJP]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The surrogate at the old parameters and its gradient in θ through the inner steps.

    Returns:
        ``(surrogate, gradient [D])``, both detached; ``D`` is the number of policy parameters.
    """
    leaf = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    value = surrogate(policy, leaf, old_log_probs, post)
    leaf_grads = torch.autograd.grad(value, list(leaf.values()))
    grads = through(vjps, dict(zip(leaf, leaf_grads, strict=True)), transposed=True)
    return value.detach(), flatten([g.sum(0) for g in grads.values()])
