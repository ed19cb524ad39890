"""The one adaptation core shared by the supervised learners and the RL agents.

Parameters are plain ``dict[str, Tensor]``; models run them with
``torch.func.functional_call``. :func:`adapt` takes inner gradient steps with
``torch.func.grad``, so it works both on its own and inside ``torch.func.vmap``
over a batch of tasks, and its result stays differentiable with respect to the
initial parameters (and to learned per-parameter rates) unless
``first_order``.

Modes, all through :func:`adapt`:

* MAML: ``first_order=False`` (second-order meta-gradient).
* FOMAML: ``first_order=True`` (inner gradients treated as constants).
* Meta-SGD: ``lr`` is a dict of tensors with ``requires_grad`` (one rate per
  parameter element), meta-trained with the initial parameters.
* ANIL: ``names`` lists the head parameters; the rest are not adapted.
* Reptile: plain first-order adaptation, then :func:`reptile_update`.
* Learned optimizer: ``update`` is an :class:`UpdateRule` that replaces the SGD step, e.g. the
  coordinate-wise LSTM of :mod:`metarl.fewshot.learned_opt`; the result is differentiable with
  respect to the rule's own meta-parameters too.

Batching over tasks. :func:`meta_objective` runs adaptation plus the query
loss for every task of a meta-batch either with ``vmap`` or with a Python loop.
Measured on a 2-core CPU (``metarl bench adapt``): vmap wins for small MLPs,
where per-task kernels are tiny and Python overhead dominates; a loop wins for
the conv4 Omniglot model, where vmapped convolutions and batch norm fall back
to slower batched kernels. Learners pick the faster one per model by default.

Memory. A meta-loss built for the whole meta-batch and backpropagated once keeps every task's
graph (inner-step activations and their second-order terms) alive until that one backward pass.
:func:`meta_backward` backpropagates a chunk of tasks at a time and lets autograd accumulate the
meta-gradient in ``.grad``: the same gradient and the same FLOPs, one chunk's graph at a time.
The learners use one task per chunk with loop batching and the whole batch with vmap, unless
their ``backward_chunk`` says otherwise.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch.func import grad, grad_and_value, vmap

from metarl.types import Params

LossFn = Callable[[Params, Any], torch.Tensor]
LearningRate = float | Mapping[str, torch.Tensor]


class UpdateRule(Protocol):
    """An inner update that replaces SGD in :func:`adapt`; a pure function of its inputs.

    Called once per inner step with the parameters being adapted, their gradients, the inner loss
    (a scalar tensor), the step index (0, 1, ...) and the rule's state from the previous step
    (``None`` at step 0). Returns the new parameters (same keys and shapes) and the new state, any
    pytree of tensors. Under ``vmap`` every tensor it sees belongs to one task.
    """

    def __call__(
        self, params: Params, grads: Params, loss: torch.Tensor, step: int, state: Any
    ) -> tuple[Params, Any]: ...


def _rate(lr: LearningRate, name: str) -> float | torch.Tensor:
    if isinstance(lr, Mapping):
        if name not in lr:
            raise KeyError(
                f"per-parameter learning rates have no entry for {name!r}; have {sorted(lr)}"
            )
        return lr[name]
    return lr


def _check_rates(lr: LearningRate, params: Params, keys: list[str]) -> None:
    """A learning rate must be a finite number, or a tensor (one, or one per parameter)
    broadcastable to its parameter without changing its shape (a wrong shape would silently
    reshape the parameter). Tensors are checked for shape only: their values may be traced."""
    for k in keys:
        rate = _rate(lr, k)
        if isinstance(rate, torch.Tensor):
            try:
                shape = torch.broadcast_shapes(rate.shape, params[k].shape)
            except RuntimeError:
                shape = None
            if shape != params[k].shape:
                raise ValueError(
                    f"learning rate of {k!r} has shape {tuple(rate.shape)}, which does not broadcast to "
                    f"the parameter's {tuple(params[k].shape)}; give one rate, or one per element of that shape"
                )
        elif isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate):
            raise ValueError(f"lr must be a finite number or per-parameter tensors, got {rate!r} for {k!r}")


def _check_names(params: Params, names: Iterable[str] | None) -> list[str]:
    if names is None:
        return list(params)
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"cannot adapt unknown parameters {unknown}; the model has {sorted(params)}")
    if not names:
        raise ValueError("names is empty: at least one parameter must adapt")
    return names


def adapt(
    loss_fn: LossFn,
    params: Params,
    data: Any,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
    names: Iterable[str] | None = None,
    update: UpdateRule | None = None,
) -> Params:
    """Takes ``steps`` gradient steps on ``loss_fn(params, data)`` and returns the adapted params.

    Args:
        loss_fn: ``loss_fn(params, data) -> scalar tensor``; must be a pure function of its inputs.
        params: initial parameters, left untouched.
        data: the task's support data, any pytree of tensors.
        steps: number of inner gradient steps (0 returns ``params`` unchanged).
        lr: one inner learning rate, or a dict of per-parameter rates (Meta-SGD), each a tensor
            broadcastable to its parameter.
        first_order: treat inner gradients as constants (FOMAML, Reptile).
        names: the parameters to adapt (ANIL adapts only the head); all when ``None``.
        update: a learned rule replacing the step ``θ ← θ − lr · g`` (``lr`` is then unused); its
            state is carried across the ``steps`` and dropped at the end. ``first_order`` detaches
            the gradients and the loss it is given.

    Returns:
        A new dict with every key of ``params``; adapted entries differentiable with respect to
        ``params`` and ``lr`` or the rule's meta-parameters (through the inner gradients too,
        unless ``first_order``).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {steps!r}")
    keys = _check_names(params, names)
    if update is None:
        _check_rates(lr, params, keys)
    adapted = dict(params)
    state = None
    for step in range(steps):
        frozen = {k: v for k, v in adapted.items() if k not in keys}

        def inner_loss(sub: Params, frozen: Params = frozen) -> torch.Tensor:
            return loss_fn({**frozen, **sub}, data)

        if update is None:
            grads = grad(inner_loss)({k: adapted[k] for k in keys})
            for k in keys:
                g = grads[k].detach() if first_order else grads[k]
                adapted[k] = adapted[k] - _rate(lr, k) * g
        else:
            adapted, state = _rule_step(update, inner_loss, adapted, keys, step, state, first_order)
    return adapted


def _rule_step(
    update: UpdateRule,
    inner_loss: Callable[[Params], torch.Tensor],
    adapted: Params,
    keys: list[str],
    step: int,
    state: Any,
    first_order: bool,
) -> tuple[Params, Any]:
    grads, loss = grad_and_value(inner_loss)({k: adapted[k] for k in keys})
    if first_order:
        grads, loss = {k: g.detach() for k, g in grads.items()}, loss.detach()
    new, state = update({k: adapted[k] for k in keys}, grads, loss, step, state)
    missing = [k for k in keys if k not in new]
    if missing:
        raise KeyError(
            f"the update rule returned no new value for {missing}; return every key it is given"
        )
    return {**adapted, **{k: new[k] for k in keys}}, state


def task_index(batch: Any, i: int | slice) -> Any:
    """Task ``i`` (or a slice of tasks) of a pytree of tensors with a leading task axis."""
    return torch.utils._pytree.tree_map(lambda t: t[i], batch)


def map_tasks(
    fn: Callable[..., Any], shared: tuple, batched: tuple, batch: Literal["vmap", "loop"]
) -> Any:
    """``fn(*shared, *task_i)`` for every task of ``batched``, outputs stacked on a task axis.

    ``batch = "vmap"`` vectorises over the leading task axis of every ``batched`` pytree, ``"loop"``
    calls ``fn`` once per task; both give the same values (see the module docstring for which is
    faster). ``fn`` may return a tensor or any pytree of tensors.
    """
    if batch == "vmap":
        in_dims = (None,) * len(shared) + (0,) * len(batched)
        return vmap(fn, in_dims=in_dims, randomness="different")(*shared, *batched)
    if batch == "loop":
        outputs = [
            fn(*shared, *(task_index(b, i) for b in batched)) for i in range(_num_tasks(batched))
        ]
        return torch.utils._pytree.tree_map(lambda *ts: torch.stack(ts), *outputs)
    raise ValueError(f"batch must be 'vmap' or 'loop', got {batch!r}")


def map_task_chunks(
    fn: Callable[..., Any],
    shared: tuple,
    batched: tuple,
    batch: Literal["vmap", "loop"],
    chunk: int,
    device: torch.device | None = None,
) -> Any:
    """:func:`map_tasks` over ``chunk`` tasks at a time, each chunk moved to ``device``.

    Bounds the memory of a held-out evaluation over many tasks; outputs are detached and
    concatenated on the CPU along the task axis.
    """
    parts = []
    for start in range(0, _num_tasks(batched), chunk):
        part = tuple(
            torch.utils._pytree.tree_map(
                lambda t: t.to(device) if device is not None else t,
                task_index(b, slice(start, start + chunk)),
            )
            for b in batched
        )
        parts.append(map_tasks(fn, shared, part, batch))
    return torch.utils._pytree.tree_map(
        lambda *ts: torch.cat([t.detach().cpu() for t in ts]), *parts
    )


def meta_objective(
    loss_fn: LossFn,
    params: Params,
    support: Any,
    query: Any,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
    names: Iterable[str] | None = None,
    batch: Literal["vmap", "loop"] = "vmap",
    query_loss_fn: LossFn | None = None,
    update: UpdateRule | None = None,
) -> torch.Tensor:
    """Per-task query losses after adaptation on each task's support data.

    Args:
        loss_fn: inner loss, ``loss_fn(params, data) -> scalar``.
        params: shared initial parameters.
        support: pytree of tensors with a leading task axis ``[B, ...]``.
        query: pytree of tensors with a leading task axis ``[B, ...]``.
        steps, lr, first_order, names, update: as in :func:`adapt`.
        batch: ``"vmap"`` to vectorise over tasks, ``"loop"`` for a per-task Python loop.
            Both give the same values (tested); pick the faster one for the model.
        query_loss_fn: outer loss on the query data; ``loss_fn`` when ``None``.

    Returns:
        ``[B]`` tensor of post-adaptation query losses; its mean is the meta-loss.
    """
    one_task = task_objective(loss_fn, steps, lr, first_order, names, query_loss_fn, update)
    return map_tasks(one_task, (params,), (support, query), batch)


def meta_backward(
    fn: Callable[..., torch.Tensor],
    shared: tuple,
    batched: tuple,
    batch: Literal["vmap", "loop"],
    chunk: int | None = None,
    objective: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Backpropagates ``mean_i objective(fn(*shared, *task_i))`` a chunk of tasks at a time.

    The gradient reaching the leaves ``shared`` depends on is that of :func:`map_tasks` followed by
    ``objective(out).mean().backward()``, but only one chunk's graph exists at a time (see the
    module docstring). Like ``backward()`` it adds to ``.grad``: zero the gradients first.

    Args:
        fn: one task's output, a tensor ``[...]`` (e.g. the query loss after adaptation).
        shared: arguments common to every task (the meta-parameters); leaves, not tensors computed
            from them, since every chunk's backward frees its graph.
        batched: pytrees of tensors with a leading task axis ``[B, ...]``.
        batch: ``"vmap"`` or ``"loop"`` within a chunk, as in :func:`map_tasks`.
        chunk: tasks per backward pass; ``None`` takes 1 with ``"loop"`` and ``B`` with ``"vmap"``.
        objective: maps a chunk's outputs ``[C, ...]`` to per-task scalars ``[C]``; the outputs
            themselves when ``None`` (then ``fn`` must return a scalar).

    Returns:
        The detached outputs of every task, ``[B, ...]``.
    """
    num_tasks = _num_tasks(batched)
    if chunk is None:
        chunk = 1 if batch == "loop" else num_tasks
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 task (or None for the default), got {chunk}")
    outputs = []
    for start in range(0, num_tasks, chunk):
        part = tuple(task_index(b, slice(start, start + chunk)) for b in batched)
        out = map_tasks(fn, shared, part, batch)
        value = out if objective is None else objective(out)
        if value.dim() != 1:
            raise ValueError(
                f"the per-task objective must have shape [tasks], got {tuple(value.shape)}; "
                "pass objective= to reduce each task's output to a scalar"
            )
        if value.requires_grad:
            (value.sum() / num_tasks).backward()
        outputs.append(out.detach())
    return torch.cat(outputs)


def task_objective(
    loss_fn: LossFn,
    steps: int = 1,
    lr: LearningRate = 0.01,
    first_order: bool = False,
    names: Iterable[str] | None = None,
    query_loss_fn: LossFn | None = None,
    update: UpdateRule | None = None,
) -> Callable[[Params, Any, Any], torch.Tensor]:
    """``(params, support, query) -> query loss after adaptation`` of one task, as in
    :func:`meta_objective` (arguments as there); the ``fn`` of :func:`meta_backward`."""
    outer = query_loss_fn or loss_fn

    def one_task(p: Params, s: Any, q: Any) -> torch.Tensor:
        return outer(adapt(loss_fn, p, s, steps, lr, first_order, names, update), q)

    return one_task


def _num_tasks(batch: Any) -> int:
    leaves = torch.utils._pytree.tree_leaves(batch)
    if not leaves:
        raise ValueError("support data holds no tensors")
    return int(leaves[0].shape[0])


@torch.no_grad()
def reptile_update(params: Params, adapted: Sequence[Params] | Params, outer_lr: float) -> Params:
    """Reptile's outer rule: ``θ ← θ + ε · mean_i(θ̃_i − θ)``.

    Args:
        params: current initial parameters.
        adapted: per-task adapted parameters, either a list of dicts or one dict whose tensors
            carry a leading task axis ``[B, ...]``.
        outer_lr: the interpolation rate ε.

    Returns:
        New parameters (detached).
    """
    if isinstance(adapted, Mapping):
        mean = {k: adapted[k].mean(0) for k in params}
    else:
        mean = {k: torch.stack([a[k] for a in adapted]).mean(0) for k in params}
    return {k: params[k] + outer_lr * (mean[k] - params[k]) for k in params}
