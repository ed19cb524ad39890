"""Trust-region machinery through an inner adaptation: conjugate gradient, the meta-gradient and
the KL Hessian-vector products of MAML-TRPO.

With ``θ'_i(θ)`` the parameters after the inner steps on task ``i`` and ``J_i = ∂θ'_i/∂θ``, the
Hessian of the mean KL between old and new post-update policies, at the old parameters, is
exactly ``Σ_i J_iᵀ F_i J_i / N`` (the KL's gradient in ``θ'_i`` is zero there) with ``F_i`` the
Fisher matrix of task ``i``'s post-update policy. :func:`kl_hvp` multiplies by it without third
derivatives: a vector-Jacobian product through each inner step (``J_k = I − α ∇²L_k`` is
symmetric, so the same product gives ``J_k u``), a Fisher-vector product on the post-update data
(double backward of the KL on a graph built once), and the transposed chain. Each inner step's
product is built once per meta-update (:func:`linearize_steps`) and reused by every conjugate-gradient
iteration.

Gauss-Newton products (:func:`kl_fvp`, the default). At the old parameters the KL between old and
new policies has zero gradient in the policy's distribution parameters (a Gaussian's mean and
log std, a categorical's log-probabilities), so its Hessian in the network parameters is exactly
``Jᵀ M J``: ``J`` the Jacobian of those outputs, ``M`` the KL's Hessian in them (``exp(-2 log σ)``
for the mean, 2 for the log std, ``p`` for the log-probabilities), no second derivative of the
network. One product applies the inner steps' Jacobians, runs the outputs' ``J`` forward
(``torch.func.jvp``), weighs by ``M`` and runs one vector-Jacobian product back through a graph
built once, all vmapped over tasks. :func:`kl_hvp` (double backward of the KL) gives the same
products and stays as the reference (``fisher = "hessian"`` in MAML-TRPO).

For Gaussian MLP policies both the inner steps' Jacobians and the Fisher products are written
out by hand (:mod:`metarl.closed_form`, ``products="closed-form"``; ``"auto"`` picks it where the
policy allows): plain forward and backward passes without autograd's double backward and its
elementwise bookkeeping (on a 2-core CPU with 40 tasks × 20 episodes × 200 steps and the
(100, 100) policy, one inner Jacobian product took 0.4 of the double backward's time). Otherwise
the inner steps' Jacobians ``I − α ∇²L_k`` (symmetric) are applied as saved ``torch.func.vjp``
products of the step, or in forward mode (a forward-over-reverse product,
:func:`through_forward`). Forward mode recomputes the inner step's
forward and backward pass at every product while the saved product only runs back through a
graph built once; on a 2-core CPU (10 tasks × 10 episodes × 100 steps, policy (100, 100)) it
took 1.3 to 2.6 times as long as the saved products.

Shapes: ``N`` tasks, ``P`` any parameter's shape, ``D`` the number of policy parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.func import jvp, vjp, vmap

from metarl import closed_form, meta_pg
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


class Linearization(NamedTuple):
    """The inner steps run once, with what the products through them need."""

    adapted: Params
    """Post-update parameters ``[N, *P]``, detached."""
    vjps: list[VJP]
    """Per step, ``u ↦ J_kᵀ u`` (all of the step's episodes)."""
    points: list[Params]
    """Per step, the per-task parameters ``[N, *P]`` it starts from (detached)."""
    batches: list[PGBatch]
    """Per step, its episodes ``[N, E, T, ...]``."""


def linearize_steps(
    inner: InnerLoop, params: Params, pre: list[PGBatch], products: str = "auto"
) -> Linearization:
    """Runs the inner steps from ``params`` and keeps each step's vector-Jacobian product.

    The products always use every pre-update episode: the Jacobian ``I − α ∇²L_k`` of a step is
    that of the step actually taken. (Estimating it on a fraction of the episodes, as a
    subsampled Fisher would suggest, adds the noise of a few-episode Hessian to ``J``: on
    halfcheetah-dir with 2 of 20 episodes the predicted KL of the step was three times the one
    reached and the step a ninth as long.)

    Args:
        inner: the inner loop's settings.
        params: meta-parameters ``[*P]``.
        pre: one batch per inner step, ``[N, E, T, ...]``.
        products: ``"closed-form"`` writes the steps and their products out by hand
            (:class:`metarl.closed_form.GaussianMLPStep`, Gaussian MLP policies only),
            ``"autograd"`` saves each step's ``torch.func.vjp`` (a double backward per product),
            ``"auto"`` the closed form where it applies. Both give the same products.

    Returns:
        A :class:`Linearization`; its products ``u ↦ J_kᵀ u`` take per-task cotangents ``[N, *P]``.
    """
    closed = closed_form.chosen(
        products, closed_form.supported(inner.policy, inner.lr, inner.first_order)
    )
    num_tasks = pre[0].mask.shape[0]
    current = {k: v.detach().expand(num_tasks, *v.shape).clone() for k, v in params.items()}
    vjps: list[VJP] = []
    points = []
    for batch in pre:
        points.append(current)
        if closed:
            step = closed_form.GaussianMLPStep(inner.policy, current, batch, inner.lr)
            vjps.append(step)
            current = step.adapted
            continue
        # vjp returns (output, vjp_fn); indexing keeps mypy off its has_aux overload.
        linear = vjp(lambda p, b=batch: meta_pg.inner_step(inner, p, b, shared=False), current)
        vjps.append(linear[1])
        current = {k: v.detach() for k, v in linear[0].items()}
    return Linearization(current, vjps, points, list(pre))


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


def output_metric(policy: Any, outputs: Any, tangents: Any) -> Any:
    """``M t``: the KL's Hessian in the policy's distribution parameters at the old policy.

    Gaussian ``(mean, log_std)``: ``(exp(-2 log_std) t_mean, 2 t_log_std)``; categorical
    log-probabilities ``log p``: ``p t`` (with ``t`` a log-softmax tangent, ``tᵀ diag(p) t`` is
    the logits' ``diag(p) − p pᵀ`` form).
    """
    if policy.discrete:
        return torch.exp(outputs) * tangents
    (_, log_std), (t_mean, t_log_std) = outputs, tangents
    return t_mean * torch.exp(-2.0 * log_std), 2.0 * t_log_std


def through_forward(inner: InnerLoop, lin: Linearization, u: Params) -> Params:
    """``J u`` through the inner steps, first step first, in forward mode: each step's Jacobian
    ``I − α ∇²L_k`` as a forward-over-reverse product."""
    for point, batch in zip(lin.points, lin.batches, strict=True):

        def step(p: Params, b: PGBatch = batch) -> Params:
            return meta_pg.inner_step(inner, p, b, shared=False)

        u = jvp(step, (point,), (u,))[1]
    return u


def kl_fvp(
    policy: Any,
    inner: InnerLoop,
    lin: Linearization,
    post: PGBatch,
    damping: float,
    inner_jacobian: str = "vjp",
    products: str = "auto",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v [D] -> (Σ_i J_iᵀ F_i J_i / N + damping I) v`` as Gauss-Newton products (no double
    backward): the same products as :func:`kl_hvp`, see the module docstring.

    Args:
        policy: a Gaussian or categorical policy of :mod:`metarl.policies`.
        inner: the inner loop's settings.
        lin: the inner steps from :func:`linearize_steps`.
        post: the post-update curvature batch ``[N, E_c, T, ...]``.
        damping: added times ``v``.
        inner_jacobian: ``"vjp"`` applies the inner steps' Jacobians as their saved
            vector-Jacobian products, ``"jvp"`` in forward mode (see the module docstring).
        products: the Fisher products ``F_i u`` written out by hand
            (:class:`metarl.closed_form.GaussianMLPFisher`, ``"closed-form"``), or as autograd's
            forward- and reverse-mode products of the policy's outputs (``"autograd"``);
            ``"auto"``: the closed form for Gaussian MLP policies.
    """
    if inner_jacobian not in ("vjp", "jvp"):
        raise ValueError(f"inner_jacobian must be 'vjp' or 'jvp', got {inner_jacobian!r}")
    adapted = lin.adapted
    num_tasks = post.mask.shape[0]
    like = {k: v[0] for k, v in adapted.items()}

    def inner_products(u: Params) -> Params:
        if inner_jacobian == "jvp":
            return through_forward(inner, lin, u)
        return through(lin.vjps, u, transposed=False)

    if closed_form.chosen(products, closed_form.supported_policy(policy)):
        fisher = closed_form.GaussianMLPFisher(policy, adapted, post)

        def closed(v: torch.Tensor) -> torch.Tensor:
            per_task = {k: t.expand(num_tasks, *t.shape) for k, t in unflatten(v, like).items()}
            w = through(lin.vjps, fisher(inner_products(per_task)), transposed=True)
            return flatten([t.sum(0) for t in w.values()]) + damping * v

        return closed

    def outputs(p: Params) -> Any:
        return vmap(policy.distribution_params)(p, post.obs)

    linear = vjp(outputs, adapted)  # (outputs, vjp_fn); indexing keeps mypy off has_aux
    old, outputs_vjp = torch.utils._pytree.tree_map(torch.Tensor.detach, linear[0]), linear[1]
    # d(mean KL) = Σ_i Σ_(e,t) mask / (count_i N) · d(KL at that step)
    weight = meta_pg.step_weights(post.mask, num_tasks)[..., None]

    def product(v: torch.Tensor) -> torch.Tensor:
        per_task = {k: t.expand(num_tasks, *t.shape) for k, t in unflatten(v, like).items()}
        u = inner_products(per_task)
        tangents = jvp(outputs, (adapted,), (u,))[1]
        metric = output_metric(policy, old, tangents)
        (g,) = outputs_vjp(torch.utils._pytree.tree_map(lambda m: m * weight, metric))
        w = through(lin.vjps, g, transposed=True)
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
    value, _, grads = gradient_through(
        vjps, adapted, lambda leaf: (surrogate(policy, leaf, old_log_probs, post), None)
    )
    return value, flatten(list(grads.values()))


def gradient_through(
    vjps: list[VJP], adapted: Params, objective: Callable[[Params], tuple[torch.Tensor, Any]]
) -> tuple[torch.Tensor, Any, Params]:
    """A scalar of the per-task adapted parameters and its gradient in θ through the inner steps.

    Args:
        vjps: the inner steps' vector-Jacobian products (:attr:`Linearization.vjps`).
        adapted: per-task parameters after the steps ``[N, *P]``.
        objective: ``params [N, *P] -> (scalar, aux)``.

    Returns:
        ``(scalar, aux, gradient)``: the scalar detached, ``aux`` as returned, and the gradient
        keyed as ``adapted`` with the tasks' shares summed (``[*P]``).
    """
    leaf = {k: v.detach().requires_grad_() for k, v in adapted.items()}
    value, aux = objective(leaf)
    leaf_grads = torch.autograd.grad(value, list(leaf.values()))
    grads = through(vjps, dict(zip(leaf, leaf_grads, strict=True)), transposed=True)
    return value.detach(), aux, {k: g.sum(0) for k, g in grads.items()}
