# Over 400 lines: the two meta-adversarial agents' tests against hand arithmetic share their tiny fixtures; the table's tests are in tests/study/.
"""Meta-adversarial imitation: the discriminator's loss, reward and absorbing states by hand, the
first-order outer update of D by hand, demonstrations from the analytic expert, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import envs
from agents.meta_imitation import MetaImitation, MetaImitationConfig
from metarl import demos, discriminator
from metarl.discriminator import DiscData, Discriminator
from metarl.meta_pg import unstack


def _linear_disc(w: list[float], b: float) -> tuple[Discriminator, dict[str, torch.Tensor]]:
    """A discriminator with no hidden layer: z(x) = w·x + b."""
    disc = Discriminator(len(w), hidden_sizes=())
    return disc, {"out.weight": torch.tensor([w]), "out.bias": torch.tensor([b])}


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_loss_is_weighted_cross_entropy_plus_the_gradient_penalty_by_hand():
    w, b, lam = [0.5, -1.0, 2.0], 0.1, 3.0
    disc, params = _linear_disc(w, b)
    ref_x = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 0.0], [0.0, 0.0, 1.0]])
    ref_w = np.array([1.0, 1.0, 2.0])  # weights need not be 0 or 1
    gen_x = np.array([[-1.0, 0.5, 0.0], [2.0, 2.0, 0.0]])
    gen_w = np.array([1.0, 0.0])  # padding
    z_ref, z_gen = ref_x @ np.array(w) + b, gen_x @ np.array(w) + b
    bce = (
        -(ref_w * np.log(_sigmoid(z_ref))).sum() / ref_w.sum()
        - (gen_w * np.log(1.0 - _sigmoid(z_gen))).sum() / gen_w.sum()
    )
    penalty = 0.5 * lam * float(np.sum(np.square(w)))  # ∇_x z = w everywhere for a linear D
    value = discriminator.loss(
        disc,
        params,
        DiscData(
            torch.tensor(ref_x, dtype=torch.float32), torch.tensor(ref_w, dtype=torch.float32)
        ),
        DiscData(
            torch.tensor(gen_x, dtype=torch.float32), torch.tensor(gen_w, dtype=torch.float32)
        ),
        penalty=lam,
    )
    assert float(value) == pytest.approx(bce + penalty, rel=1e-5)


def test_transition_inputs_add_one_absorbing_sample_per_terminated_episode():
    obs = torch.tensor([[[[1.0], [2.0], [3.0]], [[4.0], [5.0], [6.0]]]])  # [N=1, E=2, T=3, 1]
    actions = obs * 10
    mask = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]])
    terminated = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])  # episode 0 ends at t=0
    data = discriminator.transition_inputs(obs, actions, mask, terminated)
    assert data.inputs.shape == (1, 2 * 3 + 2, 3)
    assert data.weights.tolist() == [[1, 0, 0, 1, 1, 1, 1, 0]]  # only episode 0 terminated
    assert data.inputs[0, 0].tolist() == [1.0, 10.0, 0.0]
    assert data.inputs[0, 6].tolist() == [0.0, 0.0, 1.0]  # the absorbing sample
    assert data.inputs[0, 1].tolist() == [0.0, 0.0, 0.0]  # a padded step carries nothing


def test_reward_is_log_d_minus_log_one_minus_d_with_the_absorbing_tail_at_termination():
    w, b, gamma = [0.3, -0.2, 1.5], -0.4, 0.9
    disc, params = _linear_disc(w, b)
    obs = torch.tensor([[[0.2], [0.4], [0.6], [0.8]]])  # [E=1, T=4, 1]
    actions = torch.tensor([[[1.0], [-1.0], [0.0], [0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    terminated = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    r = discriminator.rewards(disc, params, obs, actions, mask, terminated, gamma)
    d = _sigmoid(np.array([0.3 * 0.2 - 0.2 * 1.0 + b, 0.3 * 0.4 + 0.2 + b]))
    by_hand = np.log(d) - np.log(1.0 - d)
    z_abs = 1.5 + b  # indicator 1, features 0
    tail = gamma * z_abs + gamma**2 * z_abs  # two absorbing steps after the terminal one
    expected = [by_hand[0], by_hand[1] + tail, 0.0, 0.0]
    assert r[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_first_order_outer_update_of_d_matches_the_hand_computed_adam_step():
    """One task, one inner SGD step and one outer Adam step on a linear D, all by hand."""
    config = MetaImitationConfig(
        meta_batch_size=1,
        episodes_per_task=1,
        disc_hidden_sizes=(1,),
        disc_adapt_steps=1,
        disc_inner_lr=0.5,
        disc_outer_lr=0.01,
        num_epochs=1,
        gradient_penalty=0.0,
        hidden_sizes=(4,),
    )
    agent = MetaImitation(config, envs.make("navigation-2d", horizon=5), seed=0)
    try:
        agent.disc, agent.disc_params = _linear_disc([0.2, -0.1, 0.4, 0.3, 0.0, -0.5], 0.05)
        agent.disc_params = {k: v.requires_grad_() for k, v in agent.disc_params.items()}
        agent.disc_optimizer = torch.optim.Adam(list(agent.disc_params.values()), lr=0.01)
        rng = np.random.default_rng(0)

        def data(num: int) -> DiscData:
            x = rng.normal(size=(1, num, 6)).astype(np.float32)
            return DiscData(torch.from_numpy(x), torch.ones(1, num))

        support, pre, query, post = data(3), data(4), data(2), data(5)
        phi = np.concatenate([agent.disc_params["out.weight"].detach().numpy()[0], [0.05]])

        def bce_grad(p: np.ndarray, ref: DiscData, gen: DiscData) -> np.ndarray:
            xr = np.hstack([ref.inputs[0].numpy(), np.ones((ref.inputs.shape[1], 1))])
            xg = np.hstack([gen.inputs[0].numpy(), np.ones((gen.inputs.shape[1], 1))])
            # d/dp of mean softplus(-z_ref) + mean softplus(z_gen)
            return -((1 - _sigmoid(xr @ p))[:, None] * xr).mean(0) + (
                _sigmoid(xg @ p)[:, None] * xg
            ).mean(0)

        adapted = phi - 0.5 * bce_grad(phi, support, pre)
        g = bce_grad(adapted, query, post)  # first order: the gradient at φ_1, applied to φ
        expected = phi - 0.01 * g / (np.abs(g) + 1e-8)  # Adam's first step
        agent._update_disc(support, pre, query, post)
        got = np.concatenate(
            [
                agent.disc_params["out.weight"].detach().numpy()[0],
                agent.disc_params["out.bias"].detach().numpy(),
            ]
        )
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    finally:
        agent.close()


def test_analytic_expert_reaches_the_goal_and_ends_the_episode():
    distribution = envs.make("navigation-2d", horizon=100)
    tasks = distribution.sample(3, np.random.default_rng(0))
    demo = demos.record(distribution, tasks, num_episodes=2, horizon=100, seed=0)
    lengths = demo.mask.sum(-1)
    for i, task in enumerate(tasks):
        steps = math.ceil(max(abs(g) for g in task["goal"]) / 0.1 - 1e-9)
        assert lengths[i].tolist() == [steps, steps]
        assert demo.terminated[i, :, steps - 1].tolist() == [1.0, 1.0]
        final = demo.next_obs[i, 0, steps - 1].numpy()
        assert np.abs(final - np.asarray(task["goal"])).max() < 0.01
    with pytest.raises(ValueError, match="no expert for task family"):
        demos.expert_for(envs.make("halfcheetah-vel").sample(1, np.random.default_rng(0))[0])


def test_bad_settings_fail_early_with_the_value():
    with pytest.raises(ValueError, match="num_demos must be >= 1, got 0"):
        MetaImitationConfig(num_demos=0)
    with pytest.raises(ValueError, match="gradient_penalty must be >= 0"):
        MetaImitationConfig(gradient_penalty=-1.0)


def _final_distance(traj, tasks) -> float:
    """Mean distance between each episode's last position and its task's goal."""
    last = (traj.mask.sum(-1).long() - 1).clamp(min=0)  # [N, E]
    final = torch.gather(traj.next_obs, 2, last[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]
    goals = torch.tensor([t["goal"] for t in tasks], dtype=torch.float32)[:, None]
    return float((final - goals).norm(dim=-1).mean())


@pytest.mark.slow
def test_adapted_imitation_policy_ends_closer_to_the_demonstrated_goal():
    """Hidden goal, one demonstration, no environment reward in adaptation (about a minute)."""
    distribution = envs.make("navigation-2d", horizon=100)
    config = MetaImitationConfig(
        meta_batch_size=10, episodes_per_task=10, eval_episodes_per_task=10
    )
    agent = MetaImitation(config, distribution, seed=0)
    rng = np.random.default_rng(0)
    try:
        for _ in range(30):
            agent.step(distribution.sample(config.meta_batch_size, rng))
        tasks = distribution.test_tasks()[:10]
        support = agent.disc_data(agent.demonstrations(tasks, 1))
        params = {k: v.detach() for k, v in agent.params.items()}
        before = agent.sampler.sample(agent.policy, params, tasks, 20)
        adapted, _, _ = agent._adapt_once(params, True, before, support, None)
        for _ in range(2):
            traj = agent.sampler.sample(agent.policy, unstack(adapted), tasks, 10)
            adapted, _, _ = agent._adapt_once(adapted, False, traj, support, None)
        after = agent.sampler.sample(agent.policy, unstack(adapted), tasks, 20)
        # Measured 0.78 and 0.79 of the unadapted distance (seeds 0 and 1); 0.9 leaves room for noise.
        assert _final_distance(after, tasks) < 0.9 * _final_distance(before, tasks)
    finally:
        agent.close()


def test_bc_loss_is_the_gaussian_negative_log_likelihood_by_hand():
    from metarl.imitation_baselines import bc_loss, fit
    from metarl.policies import GaussianMLPPolicy

    policy = GaussianMLPPolicy(1, 1, hidden_sizes=())
    params = {
        "out.weight": torch.tensor([[2.0]]),
        "out.bias": torch.tensor([0.5]),
        "log_std": torch.tensor([math.log(0.5)]),
    }
    obs = torch.tensor([[[1.0], [-1.0], [3.0]]])  # [K=1, T=3, 1]
    actions = torch.tensor([[[2.0], [-2.0], [0.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third step is padding
    means, std = np.array([2.5, -1.5]), 0.5
    nll = (
        0.5 * ((np.array([2.0, -2.0]) - means) / std) ** 2
        + math.log(std)
        + 0.5 * math.log(2 * math.pi)
    )
    assert float(bc_loss(policy, params, (obs, actions, mask))) == pytest.approx(
        nll.mean(), rel=1e-6
    )
    fitted = fit(policy, params, (obs, actions, mask), steps=100, lr=0.05)
    assert float(bc_loss(policy, fitted, (obs, actions, mask))) < nll.mean() - 0.5


def _tiny_imitation(**overrides) -> MetaImitation:
    config = MetaImitationConfig(
        meta_batch_size=3, episodes_per_task=2, hidden_sizes=(8,), eval_adapt_steps=2,
        eval_episodes_per_task=2, eval_ablations=False, eval_bc_baselines=False,
        num_pretrain_tasks=4, **overrides,
    )
    return MetaImitation(config, envs.make("navigation-2d", horizon=15), seed=0)


def test_bc_initialisation_is_adam_on_the_pooled_training_demonstrations():
    agent = _tiny_imitation(bc_init_steps=4, bc_lr=0.01)
    try:
        start = {k: v.detach().clone() for k, v in agent.params.items()}
        agent._bc_initialise()
        # Reference: a plain Adam loop on the Gaussian NLL of every recorded expert step.
        train = agent.distribution.train_tasks()[:4] or agent.distribution.sample(
            4, np.random.default_rng(0)
        )
        demo = demos.record(agent.distribution, train, 2, agent.horizon, 7)
        obs, actions, mask = (x.flatten(0, 1) for x in (demo.obs, demo.actions, demo.mask))
        leaf = {k: v.clone().requires_grad_() for k, v in start.items()}
        optimizer = torch.optim.Adam(list(leaf.values()), lr=0.01)
        for _ in range(4):
            optimizer.zero_grad()
            nll = -(agent.policy.log_prob(leaf, obs, actions) * mask).sum() / mask.sum()
            nll.backward()
            optimizer.step()
        for k in start:
            torch.testing.assert_close(agent.params[k], leaf[k].detach())
        assert agent.state_dict()["bc_initialised"]
    finally:
        agent.close()


def test_adaptation_starts_from_a_bc_fit_to_each_tasks_demonstrations():
    from metarl.imitation_baselines import bc_loss, demo_data

    agent = _tiny_imitation(adapt_bc_steps=20, bc_lr=0.01, bc_init_steps=3)
    try:
        tasks = agent.distribution.test_tasks()[:3]
        demo = agent.demonstrations(tasks, 1)
        theta = {k: v.detach() for k, v in agent.params.items()}
        start, shared = agent.bc_start(theta, demo)
        assert not shared and start["log_std"].shape[0] == 3
        data = demo_data(demo)
        for i in range(3):
            own = tuple(x[i] for x in data)
            fitted = {k: v[i] for k, v in start.items()}
            assert float(bc_loss(agent.policy, fitted, own)) < float(bc_loss(agent.policy, theta, own))
        metrics = agent.step(agent.distribution.sample(3, np.random.default_rng(1)))
        assert np.isfinite(metrics["train/surrogate"])
        result = agent.evaluate(tasks, np.random.default_rng(2))
        assert result["return"].shape == (3, 3) and np.isfinite(result["return"]).all()
    finally:
        agent.close()
    with pytest.raises(ValueError, match="adapt_bc_steps > 0 needs first_order"):
        MetaImitationConfig(adapt_bc_steps=5, first_order=False)
    with pytest.raises(ValueError, match="bc_init_steps must be >= 0"):
        MetaImitationConfig(bc_init_steps=-1)


# ---------------------------------------------------------------- adversarial task generator

TINY_META = {
    "meta_batch_size": 8,
    "episodes_per_task": 4,
    "hidden_sizes": (16,),
    "horizon": 20,
    "eval_adapt_steps": 1,
    "eval_episodes_per_task": 2,
}


def _generator(**overrides):
    from agents.task_generator import TaskGenerator, TaskGeneratorConfig

    config = TaskGeneratorConfig(meta=dict(TINY_META), **overrides)
    return TaskGenerator(config, envs.make("navigation-2d-wind", horizon=20), seed=0)


def test_generator_samples_stay_inside_the_declared_bounds():
    agent = _generator(bounds_scale=1.5)
    try:
        with torch.no_grad():
            agent.g_params["mean"].copy_(torch.tensor([40.0, -40.0, 0.0, 25.0]))
            agent.g_params["log_std"].fill_(3.0)
        c, _ = agent.sample(2000)
        # nominal: goal U[-0.5, 0.5]^2, wind U[-0.05, 0.05]^2; G's box is 1.5 times as wide
        high = torch.tensor([0.75, 0.75, 0.075, 0.075], dtype=torch.float64) + 1e-12
        assert bool((c >= -high).all() and (c <= high).all())
        assert float(c[:, 0].max()) > 0.74 and float(c[:, 1].min()) < -0.74  # pushed to the edge
        tasks = agent.box.tasks(agent.distribution, c[:3])
        assert [t["goal"] for t in tasks] == [tuple(row[:2]) for row in c[:3].tolist()]
        assert [t["wind"] for t in tasks] == [tuple(row[2:]) for row in c[:3].tolist()]
    finally:
        agent.close()


def test_generator_log_density_is_the_change_of_variables_by_hand():
    agent = _generator(bounds_scale=1.0)
    try:
        mean, log_std = np.array([0.3, -0.2, 0.0, 1.0]), np.array([0.1, -0.5, 0.2, 0.0])
        with torch.no_grad():
            agent.g_params["mean"].copy_(torch.from_numpy(mean))
            agent.g_params["log_std"].copy_(torch.from_numpy(log_std))
        u = np.array([[0.5, 0.1, -1.0, 2.0]])
        width = np.array([1.0, 1.0, 0.1, 0.1])
        s = 1 / (1 + np.exp(-u))
        std = np.exp(log_std)
        log_normal = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
        expected = (log_normal - np.log(width * s * (1 - s))).sum()
        assert float(agent.log_density(torch.from_numpy(u))[0]) == pytest.approx(
            expected, rel=1e-10
        )
    finally:
        agent.close()
    from agents.task_generator import TaskGeneratorConfig

    with pytest.raises(ValueError, match="needs bounds_scale=1"):
        TaskGeneratorConfig(plausibility="kl", bounds_scale=1.5)


def test_generator_mixes_its_tasks_into_the_meta_batch():
    agent = _generator(generated_fraction=0.25)
    try:
        nominal = agent.distribution.sample(8, np.random.default_rng(0))
        seen = []
        original = agent.meta.step
        agent.meta.step = lambda tasks: (seen.append(list(tasks)), original(tasks))[1]
        metrics = agent.step(nominal)
        assert seen[0][:6] == nominal[:6] and len(seen[0]) == 8
        assert all(t not in nominal for t in seen[0][6:])  # the last 2 are G's
        assert "train/generated_post_return" in metrics and "train/disc_loss" in metrics
    finally:
        agent.close()


def test_uniform_proposal_is_wide_domain_randomisation_and_trains_neither_g_nor_d():
    agent = _generator(proposal="uniform", generated_fraction=1.0, bounds_scale=1.5)
    try:
        g_before = {k: v.detach().clone() for k, v in agent.g_params.items()}
        d_before = {k: v.detach().clone() for k, v in agent.disc_params.items()}
        seen = []
        original = agent.meta.step
        agent.meta.step = lambda tasks: (seen.append(list(tasks)), original(tasks))[1]
        nominal = agent.distribution.sample(8, np.random.default_rng(0))
        metrics = agent.step(nominal)
        assert all(t not in nominal for t in seen[0])  # every task drawn from the wide box
        c = torch.tensor([[*t["goal"], *t["wind"]] for t in seen[0]], dtype=torch.float64)
        z = agent.box.standardise(c).abs()
        assert bool((z <= 1.5 + 1e-9).all())
        assert "train/disc_loss" not in metrics and "train/generated_post_return" in metrics
        for k, v in agent.g_params.items():
            assert torch.equal(v.detach(), g_before[k])
        for k, v in agent.disc_params.items():
            assert torch.equal(v.detach(), d_before[k])
        # uniform over the 1.5x box: about 1 - (1/1.5)^4 = 80% of draws leave the nominal box
        wide = agent.box.standardise(agent.box.uniform(4000, np.random.default_rng(1), 1.5))
        assert float((wide.abs() > 1).any(-1).double().mean()) == pytest.approx(1 - 1.5**-4, abs=0.03)
    finally:
        agent.close()
    from agents.task_generator import TaskGeneratorConfig

    with pytest.raises(ValueError, match="proposal must be"):
        TaskGeneratorConfig(proposal="gaussian")


def _outside_fraction(agent, n: int = 2000) -> float:
    c, _ = agent.sample(n)
    return float((agent.box.standardise(c).abs() > 1).any(-1).double().mean())


@pytest.mark.slow
def test_without_d_the_generator_drifts_further_from_the_nominal_distribution():
    drift = {}
    for plausibility in ("discriminator", "none"):
        agent = _generator(plausibility=plausibility, plausibility_weight=2.0, generator_lr=0.1)
        rng = np.random.default_rng(0)
        try:
            for _ in range(20):
                agent.step(agent.distribution.sample(8, rng))
            drift[plausibility] = _outside_fraction(agent)
        finally:
            agent.close()
    assert drift["none"] > drift["discriminator"] + 0.05, drift


