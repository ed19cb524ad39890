"""Behaviour-cloning baselines for few-shot imitation, on the same demonstrations as the meta-learner.

* ``bc_scratch``: a fresh policy fit by maximum likelihood to the task's ``K`` demonstrations.
* ``bc_multitask``: one policy fit to demonstrations of the training tasks, then fine-tuned on
  the task's ``K`` demonstrations (competitive with meta-learning for few-shot imitation,
  arXiv 2306.13554).
* ``maml_bc``: MAML with the behaviour-cloning loss (inner step on support demonstrations,
  outer loss on held-back ones of the same task), adapted on the task's ``K`` demonstrations.

Every learner is the same functional Gaussian policy as the meta-learner's; the BC loss is the
negative log-likelihood of the expert's (clipped, executed) actions over alive steps. MAML-BC
runs on :func:`metarl.adaptation.meta_objective`, vmapped over tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metarl.adaptation import Params, adapt, meta_objective
from metarl.types import Trajectories

DemoData = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]  # obs [K, T, o], actions [K, T, a], mask [K, T]


def demo_data(demos: Trajectories) -> DemoData:
    """``(obs, actions, mask)`` of demonstrations ``[N, K, T, ...]`` (or one task's ``[K, T, ...]``)."""
    return demos.obs, demos.actions, demos.mask


def bc_loss(policy: Any, params: Params, data: DemoData) -> torch.Tensor:
    """``-mean_alive log π(a | s)`` of one task's demonstrations."""
    obs, actions, mask = data
    log_probs = policy.log_prob(params, obs, actions)
    return -(log_probs * mask).sum() / mask.sum().clamp(min=1.0)


def fit(policy: Any, params: Params, data: DemoData, steps: int, lr: float) -> Params:
    """``steps`` full-batch Adam steps of behaviour cloning from ``params`` (left untouched)."""
    leaf = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.Adam(list(leaf.values()), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        bc_loss(policy, leaf, data).backward()
        optimizer.step()
    return {k: v.detach() for k, v in leaf.items()}


def pooled(data: DemoData) -> DemoData:
    """All tasks' demonstrations ``[N, K, ...]`` as one task's ``[N·K, ...]``."""
    return tuple(x.flatten(0, 1) for x in data)  # type: ignore[return-value]


def maml_bc(
    policy: Any,
    params: Params,
    support: DemoData,
    query: DemoData,
    meta_steps: int,
    meta_batch_size: int,
    inner_lr: float,
    outer_lr: float,
    seed: int,
) -> Params:
    """Meta-trains an initialisation for one BC step; tasks ``[N, ...]`` drawn in meta-batches."""
    leaf = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    optimizer = torch.optim.Adam(list(leaf.values()), lr=outer_lr)
    rng = np.random.default_rng(seed)
    num_tasks = support[0].shape[0]

    def loss_fn(p: Params, data: DemoData) -> torch.Tensor:
        return bc_loss(policy, p, data)

    for _ in range(meta_steps):
        idx = torch.from_numpy(
            rng.choice(num_tasks, size=min(meta_batch_size, num_tasks), replace=False)
        )
        s = tuple(x[idx] for x in support)
        q = tuple(x[idx] for x in query)
        loss = meta_objective(loss_fn, leaf, s, q, steps=1, lr=inner_lr).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {k: v.detach() for k, v in leaf.items()}


def adapted_params(
    policy: Any,
    init: Params,
    train_support: Trajectories,
    train_query: Trajectories,
    task_demos: Trajectories,
    settings: dict[str, Any],
    seed: int,
) -> dict[str, list[Params]]:
    """Each baseline's parameters for each held-out task.

    Args:
        policy: the functional policy.
        init: fresh parameters (the common starting point).
        train_support, train_query: demonstrations of training tasks ``[M, K, ...]`` (MAML-BC's
            support and query; both together train the multi-task policy).
        task_demos: the ``K`` demonstrations of each held-out task ``[N, K, ...]``.
        settings: ``bc_steps``, ``bc_lr``, ``pretrain_steps``, ``meta_steps``,
            ``meta_batch_size``, ``inner_lr``.
        seed: seeds MAML-BC's task draws.

    Returns:
        ``{"bc_scratch" | "bc_multitask" | "maml_bc": [params of task 0, ...]}``.
    """
    s = settings
    support, query = demo_data(train_support), demo_data(train_query)
    both = tuple(torch.cat([a, b], dim=1) for a, b in zip(support, query, strict=True))
    multitask = fit(policy, init, pooled(both), s["pretrain_steps"], s["bc_lr"])  # type: ignore[arg-type]
    meta = maml_bc(
        policy,
        init,
        support,
        query,
        s["meta_steps"],
        s["meta_batch_size"],
        s["inner_lr"],
        s["bc_lr"],
        seed,
    )
    out: dict[str, list[Params]] = {"bc_scratch": [], "bc_multitask": [], "maml_bc": []}
    for i in range(task_demos.obs.shape[0]):
        data = tuple(x[i] for x in demo_data(task_demos))
        out["bc_scratch"].append(fit(policy, init, data, s["bc_steps"], s["bc_lr"]))  # type: ignore[arg-type]
        out["bc_multitask"].append(fit(policy, multitask, data, s["bc_steps"], s["bc_lr"]))  # type: ignore[arg-type]
        one_step = adapt(lambda p, d: bc_loss(policy, p, d), meta, data, steps=1, lr=s["inner_lr"])
        out["maml_bc"].append({k: v.detach() for k, v in one_step.items()})
    return out
