"""The memory-lean meta-step: backpropagating task by task (or a chunk at a time) gives the
gradient of the all-at-once meta-loss, in the core and in every gradient learner's step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import mse, task_data, tiny_mlp

from metarl.adaptation import map_tasks, meta_backward, meta_objective, task_objective
from metarl.fewshot.learned_opt import LearnedOptimizerConfig, LearnedOptimizerLearner
from metarl.fewshot.maml import GradientLearner, GradientLearnerConfig
from metarl.fewshot.prob_maml import ProbabilisticMAML, ProbabilisticMAMLConfig
from metarl.fewshot.sinusoid import SinusoidDistribution


@pytest.mark.parametrize(
    "batch, chunk", [("loop", None), ("loop", 3), ("vmap", None), ("vmap", 1), ("vmap", 3)]
)
def test_chunked_backward_gives_the_all_at_once_meta_gradient(batch, chunk):
    model, params = tiny_mlp()
    support, query = task_data(0), task_data(1)
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    losses = meta_objective(mse(model), reference, support, query, steps=2, lr=0.3, batch="vmap")
    expected = torch.autograd.grad(losses.mean(), list(reference.values()))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    one_task = task_objective(mse(model), steps=2, lr=0.3)
    found = meta_backward(one_task, (leaves,), (support, query), batch, chunk)
    torch.testing.assert_close(found, losses.detach(), rtol=1e-12, atol=0)
    for (name, leaf), grad in zip(leaves.items(), expected, strict=True):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-10, atol=1e-14, msg=name)


def test_an_objective_reduces_each_tasks_outputs_and_bad_shapes_are_refused():
    model, params = tiny_mlp()
    support, query = task_data(0), task_data(1)
    inner = task_objective(mse(model), steps=1, lr=0.3)

    def two(p, s, q):  # a task's [query loss, support loss]
        return torch.stack([inner(p, s, q), mse(model)(p, s)])

    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    terms = map_tasks(two, (reference,), (support, query), "vmap")
    expected = torch.autograd.grad((terms[:, 0] + 2 * terms[:, 1]).mean(), list(reference.values()))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    found = meta_backward(
        two, (leaves,), (support, query), "loop", objective=lambda t: t[:, 0] + 2 * t[:, 1]
    )
    assert found.shape == (4, 2)
    for leaf, grad in zip(leaves.values(), expected, strict=True):
        torch.testing.assert_close(leaf.grad, grad)
    with pytest.raises(ValueError, match="shape \\[tasks\\]"):
        meta_backward(two, (leaves,), (support, query), "loop")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        meta_backward(inner, (leaves,), (support, query), "loop", chunk=0)


def _grads(learner, names=("params",)) -> dict[str, torch.Tensor]:
    out = {}
    for attr in names:
        for k, v in (getattr(learner, attr) or {}).items():
            out[f"{attr}.{k}"] = v.grad.clone()
    return out


def _assert_same(found: dict, expected: dict) -> None:
    """Equal up to float32 rounding of the same sums taken in another order: relative to the
    largest gradient, 1e-5 (the learned optimizer's LSTM-rule gradients differed by up to 3e-5
    of their own largest entry on one CPU, 5e-6 of the largest overall; a lost task or term
    moves them by whole percents)."""
    assert found.keys() == expected.keys()
    scale = max(g.abs().max().item() for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(found[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


SMALL = dict(meta_batch_size=5, num_shots=4, num_queries=6, adapt_steps=2, inner_lr=0.05)


@pytest.mark.parametrize("method", ["maml", "fomaml", "metasgd", "anil"])
@pytest.mark.parametrize("batch, chunk", [("loop", 0), ("vmap", 2)])
def test_gradient_learner_step_accumulates_the_all_at_once_gradient(method, batch, chunk):
    dist = SinusoidDistribution(num_test_tasks=4)
    config = GradientLearnerConfig(method=method, batch=batch, backward_chunk=chunk, **SMALL)
    learner, reference = GradientLearner(config, dist, 3), GradientLearner(config, dist, 3)
    tasks = dist.sample(5, np.random.default_rng(0))
    support, query = dist.episodes(tasks, config.num_shots, config.num_queries, reference.rng)
    if reference.split is not None:  # ANIL on the split model: the path step takes
        losses = map_tasks(reference._anil_task, (reference.params,), (support, query), "vmap")
    else:
        losses = meta_objective(
            reference.loss_fn,
            reference.params,
            support,
            query,
            config.adapt_steps,
            reference.inner_rate,
            method == "fomaml",
            reference.names,
            batch="vmap",
        )
    losses.mean().backward()
    metrics = learner.step(tasks)
    assert metrics["train/query_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    _assert_same(_grads(learner, ("params", "lrs")), _grads(reference, ("params", "lrs")))


def test_learned_optimizer_step_accumulates_the_all_at_once_gradient():
    dist = SinusoidDistribution(num_test_tasks=4)
    config = LearnedOptimizerConfig(hidden_size=8, num_layers=1, batch="loop", **SMALL)
    learner, reference = (
        LearnedOptimizerLearner(config, dist, 0),
        LearnedOptimizerLearner(config, dist, 0),
    )
    # A rule that is not plain SGD, so that the LSTM's weights get a gradient of their own.
    for agent in (learner, reference):
        with torch.no_grad():
            agent.rule_params["out.weight"].normal_(
                0.0, 0.3, generator=torch.Generator().manual_seed(1)
            )
    tasks = dist.sample(5, np.random.default_rng(0))
    support, query = dist.episodes(tasks, config.num_shots, config.num_queries, reference.rng)
    losses = meta_objective(
        reference.loss_fn,
        reference.params,
        support,
        query,
        config.adapt_steps,
        batch="vmap",
        update=reference.rule(),
    )
    losses.mean().backward()
    learner.step(tasks)
    names = ("params", "rule_params")
    _assert_same(_grads(learner, names), _grads(reference, names))


@pytest.mark.parametrize("outer_samples", [0, 2])
def test_probabilistic_maml_step_accumulates_the_all_at_once_gradient(outer_samples):
    dist = SinusoidDistribution(num_test_tasks=4)
    config = ProbabilisticMAMLConfig(
        batch="loop", outer_samples=outer_samples, kl_weight=0.5, init_prior_std=0.3, **SMALL
    )
    learner, reference = ProbabilisticMAML(config, dist, 0), ProbabilisticMAML(config, dist, 0)
    tasks = dist.sample(5, np.random.default_rng(0))
    support, query = dist.episodes(tasks, config.num_shots, config.num_queries, reference.rng)
    eps = (
        {  # drawn as step draws them, from the same generator state
            k: reference._normal((len(tasks), outer_samples, *v.shape))
            for k, v in reference.params.items()
        }
        if outer_samples
        else {}
    )
    reference.batch = "vmap"
    loss, _ = reference.meta_loss(support, query, eps)
    loss.backward()
    metrics = learner.step(tasks)
    assert metrics["train/meta_loss"] == pytest.approx(loss.item(), rel=1e-5)
    found = _grads(learner, ("params", "log_std")) | {"log_noise": learner.log_noise.grad}
    expected = _grads(reference, ("params", "log_std")) | {"log_noise": reference.log_noise.grad}
    _assert_same(found, expected)


def test_backward_chunk_is_checked():
    with pytest.raises(ValueError, match="backward_chunk must be >= 0"):
        dataclasses.replace(GradientLearnerConfig(), backward_chunk=-1)


