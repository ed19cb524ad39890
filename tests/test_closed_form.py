"""The closed-form products of :mod:`metarl.closed_form` against autograd, in float64: the
inner step's adapted parameters against :func:`metarl.meta_pg.inner_step` and its
Jacobian-vector products against the step's explicit Jacobian
(``torch.autograd.functional.jacobian``); the Fisher products against the explicit Hessian of the
mean KL at the old policy; for ReLU and tanh networks of one and two hidden layers; and which
policies they cover."""

from __future__ import annotations

import pytest
import torch

from agents.maml_trpo import MAMLTRPOConfig
from metarl import meta_pg
from metarl.closed_form import GaussianMLPFisher, GaussianMLPStep, supported, supported_policy
from metarl.meta_pg import InnerLoop, PGBatch
from metarl.policies import CategoricalMLPPolicy, GaussianMLPPolicy
from metarl.trust_region import flatten, linearize_steps, unflatten


def _problem(policy, num_tasks: int = 2, seed: int = 0):
    """Float64 per-task parameters off their initialisation and one batch, some steps masked."""
    gen = torch.Generator().manual_seed(seed)
    params = {
        k: v.double() + 0.3 * torch.randn((num_tasks, *v.shape), generator=gen, dtype=torch.float64)
        for k, v in policy.init_params(seed).items()
    }
    mask = torch.ones(num_tasks, 3, 5, dtype=torch.float64)
    mask[0, 1, 3:] = 0.0
    mask[-1, 2, 1:] = 0.0
    obs = torch.randn(num_tasks, 3, 5, policy.obs_dim, generator=gen, dtype=torch.float64)
    actions = torch.randn(num_tasks, 3, 5, policy.act_dim, generator=gen, dtype=torch.float64)
    advantages = torch.randn(num_tasks, 3, 5, generator=gen, dtype=torch.float64) * mask
    return params, PGBatch(obs, actions, advantages, mask)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("hidden", [(5,), (4, 3)])
def test_step_and_jacobian_products_match_autograd(activation, hidden):
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=hidden, activation=activation, output_init_scale=1.0)
    params, batch = _problem(policy, seed=len(hidden))
    inner = InnerLoop(policy, 0.7, first_order=False)
    step = GaussianMLPStep(policy, params, batch, inner.lr)
    reference = meta_pg.inner_step(inner, params, batch, shared=False)
    for k, v in reference.items():
        torch.testing.assert_close(step.adapted[k], v, rtol=1e-12, atol=1e-12, msg=k)
    like = {k: v[0] for k, v in params.items()}
    for task in range(2):
        one = PGBatch(*(t[task : task + 1] for t in batch))

        def adapted(flat: torch.Tensor, one: PGBatch = one) -> torch.Tensor:
            p = {k: v[None] for k, v in unflatten(flat, like).items()}
            return flatten([v[0] for v in meta_pg.inner_step(inner, p, one, shared=False).values()])

        point = flatten([v[task] for v in params.values()])
        jacobian = torch.autograd.functional.jacobian(adapted, point)
        # The step must move the parameters nonlinearly for the products to test anything.
        assert (jacobian - torch.eye(point.numel(), dtype=torch.float64)).abs().max() > 1e-3
        gen = torch.Generator().manual_seed(task)
        for _ in range(3):
            u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
            (ju,) = step(u)
            flat_u = flatten([v[task] for v in u.values()])
            torch.testing.assert_close(
                flatten([v[task] for v in ju.values()]), jacobian @ flat_u, rtol=1e-10, atol=1e-12
            )


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("hidden", [(5,), (4, 3)])
def test_fisher_products_equal_the_explicit_kl_hessian(activation, hidden):
    """At the old policy the mean KL's Hessian in each task's parameters is its Gauss-Newton
    form; the products must equal autograd's explicit Hessian, masked steps left out."""
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=hidden, activation=activation, output_init_scale=1.0)
    params, batch = _problem(policy, seed=3)
    fisher = GaussianMLPFisher(policy, params, batch)
    like = {k: v[0] for k, v in params.items()}
    for task in range(2):
        old = {k: v[task : task + 1] for k, v in params.items()}
        one = PGBatch(*(t[task : task + 1] for t in batch))

        def kl(flat: torch.Tensor, old: dict = old, one: PGBatch = one) -> torch.Tensor:
            new = {k: v[None] for k, v in unflatten(flat, like).items()}
            return meta_pg.mean_kl(policy, old, new, one) / 2  # mean over the 2 tasks

        hessian = torch.autograd.functional.hessian(kl, flatten([v[task] for v in params.values()]))
        assert hessian.abs().max() > 1e-3
        gen = torch.Generator().manual_seed(task)
        for _ in range(3):
            u = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in params.items()}
            got = flatten([v[task] for v in fisher(u).values()])
            torch.testing.assert_close(got, hessian @ flatten([v[task] for v in u.values()]), rtol=1e-10, atol=1e-12)


def test_masked_steps_and_their_data_do_not_count():
    """Garbage observations and actions on masked steps change nothing (the loss weights them 0)."""
    policy = GaussianMLPPolicy(3, 2, hidden_sizes=(4,), activation="relu")
    params, batch = _problem(policy)
    dead = batch.mask == 0
    noisy = PGBatch(
        batch.obs.masked_fill(dead[..., None], 1e3), batch.actions.masked_fill(dead[..., None], -1e3),
        batch.advantages, batch.mask,
    )
    u = {k: torch.ones_like(v) for k, v in params.items()}
    a, b = GaussianMLPStep(policy, params, batch, 0.5), GaussianMLPStep(policy, params, noisy, 0.5)
    fa, fb = GaussianMLPFisher(policy, params, batch)(u), GaussianMLPFisher(policy, params, noisy)(u)
    for k in params:
        torch.testing.assert_close(a.adapted[k], b.adapted[k], msg=k)
        torch.testing.assert_close(a(u)[0][k], b(u)[0][k], msg=k)
        torch.testing.assert_close(fa[k], fb[k], msg=k)


def test_which_inner_loops_the_closed_form_covers():
    gaussian = GaussianMLPPolicy(3, 2, hidden_sizes=(4,))
    assert supported(gaussian, 0.1, first_order=False)
    assert not supported(gaussian, 0.1, first_order=True)
    assert not supported(gaussian, {"out.bias": torch.tensor(0.1)}, first_order=False)
    assert not supported(CategoricalMLPPolicy(3, 2, hidden_sizes=(4,)), 0.1, first_order=False)
    categorical = CategoricalMLPPolicy(3, 2, hidden_sizes=(4,))
    params = {k: v[None] for k, v in categorical.init_params(0).items()}
    batch = PGBatch(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, dtype=torch.long), torch.zeros(1, 1, 2), torch.ones(1, 1, 2))
    with pytest.raises(ValueError, match="use products='autograd'"):
        linearize_steps(InnerLoop(categorical, 0.1, False), params, [batch], "closed-form")
    with pytest.raises(ValueError, match="products must be one of"):
        linearize_steps(InnerLoop(categorical, 0.1, False), params, [batch], "forward")
    with pytest.raises(ValueError, match="products must be one of"):
        MAMLTRPOConfig(products="double-backward")
    assert supported_policy(gaussian) and not supported_policy(categorical)

    class Squashed(GaussianMLPPolicy):
        """A subclass may change the likelihood the products assume: not covered."""

    assert not supported_policy(Squashed(3, 2, hidden_sizes=(4,)))
    # 'auto' takes autograd's products where the closed form does not apply.
    lin = linearize_steps(InnerLoop(categorical, 0.1, False), categorical.init_params(0), [batch], "auto")
    assert not isinstance(lin.vjps[0], GaussianMLPStep)
    extra = {k: v[None] for k, v in gaussian.init_params(0).items()} | {"scale": torch.ones(1, 1)}
    with pytest.raises(ValueError, match="need exactly the parameters"):
        GaussianMLPStep(gaussian, extra, batch, 0.1)


@pytest.mark.parametrize("adapt_steps", [1, 2])
def test_maml_ppo_takes_the_same_meta_gradient_with_either_products(adapt_steps):
    """Float32 MAML-PPO agents on the same rollouts of 2D navigation: the clipped objective and
    its gradient through the inner steps agree to rounding, closed form against autograd."""
    import numpy as np

    import envs
    from agents.maml_ppo import MAMLPPO, MAMLPPOConfig

    distribution = envs.make("navigation-2d", horizon=10, num_test=3)
    agents = [
        MAMLPPO(
            MAMLPPOConfig(
                meta_batch_size=3, episodes_per_task=6, hidden_sizes=(8, 8), adapt_steps=adapt_steps,
                backend="serial", products=products,
            ),
            distribution,
            seed=0,
        )
        for products in ("closed-form", "autograd")
    ]
    try:
        closed, auto = agents
        assert closed.closed_form and not auto.closed_form
        tasks = distribution.sample(3, np.random.default_rng(0))
        batch = meta_pg.collect(
            closed.sampler, closed.inner, closed.params, tasks, 6, adapt_steps,
            closed._advantages, closed.device,
        )
        with torch.no_grad():
            first = closed.inner._replace(first_order=True)
            # Old log-probabilities off the sampling policy, so the ratios move and some clip.
            gen = torch.Generator().manual_seed(0)
            shifted = {k: v.detach() + 0.3 * torch.randn(v.shape, generator=gen) for k, v in closed.params.items()}
            old = meta_pg.post_log_probs(closed.policy, meta_pg.adapt_tasks(first, shifted, batch.pre), batch.post)
        got, want = closed.objective_gradient(batch, old), auto.objective_gradient(batch, old)
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
        assert 0.0 < float(want[1]) < 1.0, "some ratios must clip for the test to mean anything"
        for k, g in want[2].items():
            assert g.abs().max() > 1e-4, k
            torch.testing.assert_close(got[2][k], g, rtol=1e-4, atol=1e-6, msg=k)
    finally:
        for agent in agents:
            agent.close()
