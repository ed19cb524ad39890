"""Gauss-Newton KL curvature products of the MAML-TRPO meta-update against the double-backward
Hessian-vector products and against autograd's explicit Hessian of the mean KL through the inner
steps, for Gaussian and categorical policies; and the same TRPO step either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs
from agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig
from metarl import meta_pg
from metarl.meta_pg import InnerLoop, PGBatch
from metarl.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl.trust_region import (
    conjugate_gradient,
    flatten,
    kl_fvp,
    kl_hvp,
    linearize_steps,
    unflatten,
)


def _problem(policy, num_steps: int, seed: int = 0):
    """Float64 parameters off their initialisation, 2 tasks, 3 episodes of 4 steps, some masked."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        k: v.double() + 0.3 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in policy.init_params(seed).items()
    }

    def batch() -> PGBatch:
        mask = torch.ones(2, 3, 4, dtype=torch.float64)
        mask[0, 1, 2:] = 0.0
        mask[1, 2, 1:] = 0.0
        obs = torch.randn(2, 3, 4, 2, generator=gen, dtype=torch.float64)
        if policy.discrete:
            actions = torch.randint(0, 3, (2, 3, 4), generator=gen)
        else:
            actions = torch.randn(2, 3, 4, 2, generator=gen, dtype=torch.float64)
        advantages = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64) * mask
        return PGBatch(obs, actions, advantages, mask)

    return params, [batch() for _ in range(num_steps)], batch()


POLICIES = {
    "gaussian": lambda: GaussianMLPPolicy(2, 2, hidden_sizes=(4,), activation="tanh"),
    "categorical": lambda: CategoricalMLPPolicy(2, 3, hidden_sizes=(4,), activation="tanh"),
}


@pytest.mark.parametrize(
    ("kind", "products"),
    [("gaussian", "closed-form"), ("gaussian", "autograd"), ("categorical", "autograd")],
)
@pytest.mark.parametrize("num_steps", [1, 2])
def test_gauss_newton_products_equal_the_explicit_kl_hessian(kind, products, num_steps):
    policy = POLICIES[kind]()
    params, pre, post = _problem(policy, num_steps, seed=1)
    inner = InnerLoop(policy, 0.5, first_order=False)
    lin = linearize_steps(inner, params, pre, products)
    old = {k: v.detach() for k, v in lin.adapted.items()}

    def mean_kl(vector: torch.Tensor) -> torch.Tensor:
        new = meta_pg.adapt_tasks(inner, unflatten(vector, params), pre)
        return meta_pg.mean_kl(policy, old, new, post)

    flat = flatten(list(params.values()))
    hessian = torch.autograd.functional.hessian(mean_kl, flat)
    assert hessian.abs().max() > 1e-3
    eye = torch.eye(flat.numel(), dtype=torch.float64)
    for inner_jacobian in ("vjp", "jvp"):
        fvp = kl_fvp(policy, inner, lin, post, 0.0, inner_jacobian, products)
        matrix = torch.stack([fvp(e) for e in eye], dim=1)
        torch.testing.assert_close(matrix, hessian, rtol=1e-7, atol=1e-10, msg=inner_jacobian)


@pytest.mark.parametrize(
    ("first_order", "products"), [(False, "closed-form"), (False, "autograd"), (True, "auto")]
)
@pytest.mark.parametrize("num_curvature", [3, 2])
def test_gauss_newton_products_equal_the_double_backward_ones(first_order, products, num_curvature):
    policy = POLICIES["gaussian"]()
    params, pre, post = _problem(policy, num_steps=2, seed=2)
    inner = InnerLoop(policy, 0.5, first_order=first_order)
    lin = linearize_steps(inner, params, pre, products)
    sub = PGBatch(*(t[:, :num_curvature] for t in post))
    hvp = kl_hvp(policy, lin.adapted, sub, lin.vjps, damping=0.1)
    gen = torch.Generator().manual_seed(0)
    for inner_jacobian in ("vjp", "jvp"):
        fvp = kl_fvp(policy, inner, lin, sub, 0.1, inner_jacobian, products)
        for _ in range(3):
            v = torch.randn(
                flatten(list(params.values())).numel(), generator=gen, dtype=torch.float64
            )
            torch.testing.assert_close(fvp(v), hvp(v), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="inner_jacobian must be"):
        kl_fvp(policy, inner, lin, sub, 0.0, inner_jacobian="reverse")


def _terms(fisher: str, products: str = "auto"):
    """One MAML-TRPO batch on 2D navigation, its trust-region terms, and the CG direction."""
    config = MAMLTRPOConfig(
        meta_batch_size=3,
        episodes_per_task=8,
        hidden_sizes=(4,),
        activation="tanh",
        cg_damping=1e-2,
        backend="serial",
        fisher=fisher,
        products=products,
    )
    _, _, terms = _agent_terms(config, horizon=10)
    direction = conjugate_gradient(terms.hvp, terms.grad, config.cg_iters)
    v = torch.randn(terms.grad.shape, generator=torch.Generator().manual_seed(1))
    return terms, terms.hvp(v), direction


def _agent_terms(config: MAMLTRPOConfig, horizon: int):
    """A MAML-TRPO agent's one batch on 2D navigation and its trust-region terms there:
    ``(agent, batch, terms)`` (the agent's workers already stopped)."""
    distribution = envs.make("navigation-2d", horizon=horizon, num_test=3)
    agent = MAMLTRPO(config, distribution, seed=0)
    try:
        tasks = distribution.sample(config.meta_batch_size, np.random.default_rng(0))
        batch = meta_pg.collect(
            agent.sampler, agent.inner, agent.params, tasks, config.episodes_per_task, 1,
            agent._advantages, agent.device,
        )
        return agent, batch, agent.trust_region_terms(batch)
    finally:
        agent.close()


def test_maml_trpo_takes_the_same_step_with_either_fisher():
    """Float32 agents on the same rollouts: the products agree to rounding, and so does the
    conjugate-gradient direction. The damping keeps the system well conditioned: with the
    default 1e-5 a tiny policy's Fisher is singular and conjugate gradient amplifies float32
    rounding into visibly different directions whichever products it is given."""
    gauss_newton, hessian = _terms("gauss-newton"), _terms("hessian")
    torch.testing.assert_close(gauss_newton[0].grad, hessian[0].grad)
    torch.testing.assert_close(gauss_newton[1], hessian[1], rtol=1e-4, atol=1e-7)
    error = (gauss_newton[2] - hessian[2]).norm() / hessian[2].norm()
    assert error < 1e-3, float(error)


def test_maml_trpo_takes_the_same_step_with_either_products():
    """The closed-form inner step and products and autograd's, in the float32 agent on the same
    rollouts: adapted parameters, surrogate, meta-gradient, products and direction agree to
    rounding."""
    closed, auto = _terms("gauss-newton", "closed-form"), _terms("gauss-newton", "autograd")
    for k, v in auto[0].adapted.items():
        torch.testing.assert_close(closed[0].adapted[k], v, msg=k)
    torch.testing.assert_close(closed[0].surrogate, auto[0].surrogate)
    torch.testing.assert_close(closed[0].grad, auto[0].grad)
    torch.testing.assert_close(closed[1], auto[1], rtol=1e-4, atol=1e-7)
    error = (closed[2] - auto[2]).norm() / auto[2].norm()
    assert error < 1e-3, float(error)


@pytest.mark.parametrize("fisher", ["gauss-newton", "hessian"])
def test_subsampled_curvature_is_the_kl_hessian_of_the_steps_taken_on_fewer_post_episodes(fisher):
    """``hvp_subsample = 0.5``: autograd's explicit Hessian of the mean KL, with the inner step
    on all pre-update episodes and the KL on the first half of the post-update ones. (Taking the
    inner step's Jacobian on half the pre-update episodes too gives another matrix: a noisier
    curvature that overestimated the KL of the step it chose on halfcheetah-dir.)"""
    config = MAMLTRPOConfig(
        meta_batch_size=2, episodes_per_task=4, hidden_sizes=(3,), activation="tanh",
        cg_damping=0.0, backend="serial", fisher=fisher, hvp_subsample=0.5,
    )
    agent, batch, terms = _agent_terms(config, horizon=6)
    old = {k: v.detach().double() for k, v in terms.adapted.items()}
    inner = agent.inner._replace(first_order=False)
    pre = [PGBatch(*(t.double() for t in b)) for b in batch.pre]
    half = PGBatch(*(t[:, :2].double() for t in batch.post))
    params = {k: v.detach().double() for k, v in agent.params.items()}

    def mean_kl(vector: torch.Tensor) -> torch.Tensor:
        new = meta_pg.adapt_tasks(inner, unflatten(vector, params), pre)
        return meta_pg.mean_kl(agent.policy, old, new, half)

    flat = flatten(list(params.values()))
    hessian = torch.autograd.functional.hessian(mean_kl, flat)
    eye = torch.eye(flat.numel())
    products = torch.stack([terms.hvp(e) for e in eye], dim=1).double()
    scale = hessian.abs().max()
    assert scale > 1e-4
    torch.testing.assert_close(products, hessian, rtol=1e-4, atol=1e-5 * scale)
    # The thinned products: the inner step's Jacobian on the first 2 pre-update episodes, the
    # Fisher at the policy adapted on all of them. They must differ for this test to mean anything.
    two = [PGBatch(*(t[:, :2] for t in b)) for b in pre]
    thinned_hvp = kl_hvp(agent.policy, old, half, linearize_steps(inner, params, two).vjps, damping=0.0)
    thinned = torch.stack([thinned_hvp(e) for e in torch.eye(flat.numel(), dtype=torch.float64)], dim=1)
    assert (thinned - hessian).abs().max() > 0.05 * scale, "the test must tell the two apart"


def test_fisher_setting_is_checked():
    with pytest.raises(ValueError, match="fisher must be 'gauss-newton' or 'hessian'"):
        MAMLTRPOConfig(fisher="kfac")
    assert MAMLTRPOConfig().fisher == "gauss-newton"
