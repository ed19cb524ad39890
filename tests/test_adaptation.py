"""The adaptation core against finite differences, hand arithmetic and reference loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import mse, task_data, tiny_mlp

from metarl.adaptation import adapt, meta_objective, reptile_update
from metarl.fewshot.maml import GradientLearner, GradientLearnerConfig
from metarl.fewshot.sinusoid import RegressionBatch, SinusoidDistribution


def meta_loss_of(model, params, steps, lr=0.3):
    xs, ys = task_data(0)
    xq, yq = task_data(1)
    return meta_objective(mse(model), params, (xs, ys), (xq, yq), steps=steps, lr=lr).mean()


@pytest.mark.parametrize("steps", [1, 2])
def test_maml_meta_gradient_matches_central_finite_differences(steps):
    model, params = tiny_mlp()
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    (grad_w,) = torch.autograd.grad(meta_loss_of(model, leaves, steps), [leaves["fc0.weight"]])
    eps = 1e-6
    numeric = torch.zeros_like(grad_w)
    for i in range(grad_w.numel()):
        plus = {k: v.clone() for k, v in params.items()}
        minus = {k: v.clone() for k, v in params.items()}
        plus["fc0.weight"].view(-1)[i] += eps
        minus["fc0.weight"].view(-1)[i] -= eps
        numeric.view(-1)[i] = (meta_loss_of(model, plus, steps) - meta_loss_of(model, minus, steps)) / (2 * eps)
    torch.testing.assert_close(grad_w, numeric, rtol=1e-6, atol=1e-8)


def test_vmapped_and_looped_meta_objectives_agree_in_value_and_gradient():
    model, params = tiny_mlp()
    support, query = task_data(0), task_data(1)
    results = []
    for batch in ("vmap", "loop"):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        losses = meta_objective(mse(model), leaves, support, query, steps=2, lr=0.1, batch=batch)
        grads = torch.autograd.grad(losses.mean(), list(leaves.values()))
        results.append((losses, grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_fomaml_equals_maml_with_detached_inner_gradient():
    model, params = tiny_mlp()
    loss_fn = mse(model)
    (xs, ys), (xq, yq) = task_data(0, num_tasks=1), task_data(1, num_tasks=1)
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    # Reference: plain autograd, inner gradient computed without a graph.
    ref_leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    inner = torch.autograd.grad(loss_fn(ref_leaves, support), list(ref_leaves.values()))
    adapted_ref = {k: v - 0.2 * g.detach() for (k, v), g in zip(ref_leaves.items(), inner, strict=True)}
    ref = torch.autograd.grad(loss_fn(adapted_ref, query), list(ref_leaves.values()))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    adapted = adapt(loss_fn, leaves, support, steps=1, lr=0.2, first_order=True)
    got = torch.autograd.grad(loss_fn(adapted, query), list(leaves.values()))
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    # And it differs from the second-order gradient (the test can tell them apart).
    full = torch.autograd.grad(loss_fn(adapt(loss_fn, leaves, support, 1, 0.2), query), list(leaves.values()))
    assert any(not torch.allclose(a, b) for a, b in zip(full, ref, strict=True))


def test_inner_step_is_plain_sgd_by_hand():
    # Linear model y = w x, loss mean((w x - y)^2): gradient 2 mean(x (w x - y)).
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    params = {"w": torch.tensor(0.5)}
    out = adapt(lambda p, d: ((p["w"] * d[0] - d[1]) ** 2).mean(), params, (x, y), steps=1, lr=0.1)
    grad = 2 * ((0.5 * 1 - 3) * 1 + (0.5 * 2 - 1) * 2) / 2  # = -2.5
    assert out["w"].item() == pytest.approx(0.5 - 0.1 * grad)
    assert params["w"].item() == 0.5


def test_metasgd_inner_rates_receive_gradients_and_change():
    dist = SinusoidDistribution(num_test_tasks=4)
    learner = GradientLearner(GradientLearnerConfig(method="metasgd", meta_batch_size=4), dist, seed=0)
    before = {k: v.detach().clone() for k, v in learner.lrs.items()}
    learner.step(dist.sample(4, np.random.default_rng(0)))
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in learner.lrs.values())
    assert all(not torch.equal(before[k], v) for k, v in learner.lrs.items())


def test_anil_changes_only_the_named_head():
    model, params = tiny_mlp()
    head = model.head_names(params)
    assert head == ["out.weight", "out.bias"]
    xs, ys = task_data(0, num_tasks=1)
    out = adapt(mse(model), params, (xs[0], ys[0]), steps=3, lr=0.5, names=head)
    for k in params:
        assert torch.equal(out[k], params[k]) != (k in head), k


def test_reptile_update_equals_hand_interpolation():
    # Two tasks, linear model, two SGD steps each, computed by hand.
    params = {"w": torch.tensor(1.0)}

    def loss(p, d):
        return ((p["w"] * d[0] - d[1]) ** 2).mean()

    def sgd_by_hand(w, x, y, lr, steps):
        for _ in range(steps):
            w = w - lr * 2 * x * (w * x - y)
        return w

    tasks = [(torch.tensor([2.0]), torch.tensor([1.0])), (torch.tensor([1.0]), torch.tensor([3.0]))]
    adapted = [adapt(loss, params, d, steps=2, lr=0.1, first_order=True) for d in tasks]
    by_hand = [sgd_by_hand(1.0, d[0].item(), d[1].item(), 0.1, 2) for d in tasks]
    for a, h in zip(adapted, by_hand, strict=True):
        assert a["w"].item() == pytest.approx(h)
    new = reptile_update(params, adapted, outer_lr=0.5)
    expected = 1.0 + 0.5 * (np.mean(by_hand) - 1.0)
    assert new["w"].item() == pytest.approx(expected)


def test_learners_reduce_the_sinusoid_loss():
    dist = SinusoidDistribution(num_test_tasks=50)
    for method in ("maml", "pretrained"):
        learner = GradientLearner(GradientLearnerConfig(method=method, outer_lr=0.01), dist, seed=0)
        rng = np.random.default_rng(0)
        before = learner.evaluate(dist.test_tasks(), np.random.default_rng(1))["loss"].mean()
        for _ in range(60):
            learner.step(dist.sample(25, rng))
        after = learner.evaluate(dist.test_tasks(), np.random.default_rng(1))["loss"].mean()
        assert after < before, method


def test_adapt_rejects_unknown_parameter_names():
    model, params = tiny_mlp()
    with pytest.raises(KeyError, match="unknown parameters"):
        adapt(mse(model), params, task_data(0), names=["nope"])


def test_sinusoid_points_follow_the_published_function():
    dist = SinusoidDistribution()
    tasks = dist.sample(50, np.random.default_rng(0))
    amps = np.array([t["amplitude"] for t in tasks])
    phases = np.array([t["phase"] for t in tasks])
    assert amps.min() >= 0.1 and amps.max() <= 5.0 and phases.min() >= 0 and phases.max() <= np.pi
    batch: RegressionBatch = dist.points(tasks, 7, np.random.default_rng(1))
    x = batch.x.numpy()[..., 0]
    assert x.min() >= -5 and x.max() <= 5
    expected = amps[:, None] * np.sin(x - phases[:, None])
    np.testing.assert_allclose(batch.y.numpy()[..., 0], expected, rtol=1e-5, atol=1e-5)
