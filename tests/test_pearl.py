"""PEARL: the posterior and KL against hand arithmetic and closed forms, the tanh-Gaussian density
against a change of variables, the SAC target by hand, replay determinism, resume, evaluation
against a reference loop, and the encoder's posteriors on 2D navigation."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Normal, TanhTransform, TransformedDistribution, kl_divergence

import envs
from agents.latent_sac import (
    TaskReplay,
    kl_to_standard_normal,
    product_of_gaussians,
    sac_q_target,
    tanh_gaussian_log_prob,
    transitions,
)
from agents.pearl import PEARL, PEARLConfig
from metarl import meta_pg
from metarl.cli import main
from metarl.config import ConfigError, build, load_toml
from metarl.errors import NonFiniteLossError
from metarl.registry import make_distribution

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(
    meta_batch_size=4,
    num_collect_tasks=2,
    num_prior_episodes=1,
    num_posterior_episodes=1,
    num_train_steps=3,
    batch_size=16,
    context_batch_size=8,
    hidden_sizes=(16, 16),
    encoder_hidden_sizes=(16,),
    eval_adapt_steps=2,
)


@pytest.fixture(scope="module")
def nav() -> envs.TaskDistribution:
    return envs.make("navigation-2d", horizon=20, num_test=4)


def tiny_agent(nav, seed: int = 0, **overrides) -> PEARL:
    torch.set_num_threads(1)
    return PEARL(PEARLConfig(**{**TINY, **overrides}), nav, seed)


# ---------------------------------------------------------------- posterior, KL, densities


def test_product_of_gaussians_matches_hand_arithmetic():
    # 1-D factors N(1, 1) and N(3, 0.5) with the prior N(0, 1): precision 1 + 1 + 2 = 4,
    # variance 1/4, mean (0·1 + 1·1 + 3·2)/4 = 7/4.
    mean, var = product_of_gaussians(torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0], [0.5]]))
    torch.testing.assert_close(mean, torch.tensor([1.75]))
    torch.testing.assert_close(var, torch.tensor([0.25]))
    # Three 2-D factors; dim 0: means 2, -1, 4 with variances 2, 0.25, 1 -> precision
    # 1 + 0.5 + 4 + 1 = 6.5, mean (1 - 4 + 4)/6.5; dim 1: means 0, 1, 1, variances 1, 1, 0.5
    # -> precision 1 + 1 + 1 + 2 = 5, mean (0 + 1 + 2)/5.
    means = torch.tensor([[2.0, 0.0], [-1.0, 1.0], [4.0, 1.0]])
    variances = torch.tensor([[2.0, 1.0], [0.25, 1.0], [1.0, 0.5]])
    mean, var = product_of_gaussians(means, variances)
    torch.testing.assert_close(mean, torch.tensor([1.0 / 6.5, 3.0 / 5.0]))
    torch.testing.assert_close(var, torch.tensor([1.0 / 6.5, 1.0 / 5.0]))
    # A masked factor counts for nothing; an empty context gives the prior.
    masked, masked_var = product_of_gaussians(means, variances, torch.tensor([1.0, 1.0, 0.0]))
    first_two, first_two_var = product_of_gaussians(means[:2], variances[:2])
    torch.testing.assert_close(masked, first_two)
    torch.testing.assert_close(masked_var, first_two_var)
    prior, prior_var = product_of_gaussians(means, variances, torch.zeros(3))
    torch.testing.assert_close(prior, torch.zeros(2))
    torch.testing.assert_close(prior_var, torch.ones(2))


def test_kl_to_the_unit_gaussian_matches_the_closed_form():
    # By hand: KL(N(1, 1) || N(0, 1)) = 1/2; KL(N(0, 4) || N(0, 1)) = (4 - 1 - log 4)/2.
    kl = kl_to_standard_normal(torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0], [4.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.5, (3.0 - math.log(4.0)) / 2.0]))
    gen = torch.Generator().manual_seed(0)
    mean, var = torch.randn(6, 5, generator=gen), torch.rand(6, 5, generator=gen) + 0.05
    reference = kl_divergence(Normal(mean, var.sqrt()), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl_to_standard_normal(mean, var), reference)


def test_tanh_gaussian_log_prob_matches_change_of_variables():
    gen = torch.Generator().manual_seed(1)
    mean, log_std = torch.randn(50, 3, generator=gen), torch.randn(50, 3, generator=gen) * 0.5
    pre_tanh = mean + log_std.exp() * torch.randn(50, 3, generator=gen) * 2.0
    ours = tanh_gaussian_log_prob(pre_tanh, mean, log_std)
    ours64 = tanh_gaussian_log_prob(pre_tanh.double(), mean.double(), log_std.double())
    # Reference 1: p_A(tanh u) = p_U(u) / |d tanh/du|, with d tanh/du = 1/cosh²u in float64,
    # and the same Jacobian by central differences where tanh is far from saturation.
    u = pre_tanh.double()
    normal = Normal(mean.double(), log_std.double().exp()).log_prob(u)
    torch.testing.assert_close(ours64, (normal + 2.0 * torch.cosh(u).log()).sum(-1))
    h, moderate = 1e-5, u.abs().max(-1).values < 3.0
    finite_diff = (torch.tanh(u + h) - torch.tanh(u - h)) / (2 * h)
    reference = (normal - finite_diff.log()).sum(-1)
    torch.testing.assert_close(ours64[moderate], reference[moderate], rtol=1e-7, atol=1e-7)
    # Reference 2: torch.distributions' tanh transform, away from saturation.
    inside = pre_tanh.abs().max(-1).values < 3.0
    dist = TransformedDistribution(Normal(mean, log_std.exp()), [TanhTransform()])
    reference = dist.log_prob(torch.tanh(pre_tanh)).sum(-1)
    torch.testing.assert_close(ours[inside], reference[inside], rtol=1e-4, atol=1e-4)
    # Saturated actions keep a finite log-probability.
    assert torch.isfinite(
        tanh_gaussian_log_prob(torch.full((1, 2), 30.0), torch.zeros(1, 2), torch.zeros(1, 2))
    ).all()


# ---------------------------------------------------------------- SAC target


def test_sac_target_on_a_hand_made_batch():
    rewards, terminated = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])
    next_q = torch.tensor([[3.0, 4.0], [5.0, 1.0]])  # [critic, row]: minima 3 and 1
    next_log_prob = torch.tensor([-0.5, 0.2])
    target = sac_q_target(rewards, terminated, next_q, next_log_prob, 0.9, 0.1, 2.0)
    # 2·1 + 0.9·(3 − 0.1·(−0.5)) = 4.745; the terminated row keeps only 2·(−2).
    torch.testing.assert_close(target, torch.tensor([4.745, -4.0]))


def test_agent_critic_loss_uses_the_min_of_the_target_critics(nav):
    agent = tiny_agent(nav, alpha=0.0, reward_scale=3.0, gamma=0.5)
    with torch.no_grad():  # target critic i outputs the constant c_i whatever its input
        for v in agent.q_target.values():
            v.zero_()
        agent.q_target["out.bias"].copy_(torch.tensor([[2.0], [-1.0]]))
    obs_dim, act_dim = 2, 2
    rows = torch.zeros(1, 3, 2 * obs_dim + act_dim + 2)
    rows[0, :, obs_dim + act_dim] = torch.tensor([1.0, 0.5, -1.0])  # rewards
    rows[0, :, -1] = torch.tensor([0.0, 1.0, 0.0])  # terminated
    context = torch.randn(1, 4, 2 * obs_dim + act_dim + 1)
    agent.generator.manual_seed(12)
    losses = agent.losses(context, rows)
    # y = 3r + 0.5(1 − d)·min(2, −1) = [3 − 0.5, 1.5, −3 − 0.5]
    target = torch.tensor([2.5, 1.5, -3.5])
    agent.generator.manual_seed(12)  # the same z draw, for the online critics' values
    with torch.no_grad():
        mean, var = agent.posterior(context)
        z = mean + var.sqrt() * torch.randn(mean.shape, generator=agent.generator)
        q = agent.q_values(agent.nets["q"], rows[0, :, :2], rows[0, :, 2:4], z.expand(3, -1))
    torch.testing.assert_close(losses["q"].detach(), (q - target).pow(2).mean(1).sum())


# ---------------------------------------------------------------- replay, sampler protocol


def test_replay_ring_buffer_keeps_the_latest_rows_and_samples_deterministically():
    buffer, reference = TaskReplay(width=2, capacity=5), []
    for start in (0, 3, 4, 11):
        rows = np.arange(start, start + 3, dtype=np.float32)[:, None].repeat(2, 1)
        buffer.add(rows)
        reference = (reference + rows[:, 0].tolist())[-5:]
    assert sorted(buffer.data[: buffer.size, 0].tolist()) == sorted(reference)
    draws = [buffer.sample(np.random.default_rng(3), 7) for _ in range(2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    copy = TaskReplay(width=2, capacity=5)
    copy.load_state_dict(buffer.state_dict())
    buffer.add(np.full((2, 2), 99.0, np.float32))
    copy.add(np.full((2, 2), 99.0, np.float32))
    np.testing.assert_array_equal(copy.data[: copy.size], buffer.data[: buffer.size])


def test_z_is_drawn_once_per_episode_and_actions_stay_in_the_box(nav):
    agent = tiny_agent(nav)
    noise = agent.policy.sample_noise(np.random.default_rng(0), 20)
    assert noise.shape == (20, 2 + agent.config.latent_dim)
    assert (noise[:, 2:] == noise[0, 2:]).all() and len(np.unique(noise[:, 0])) == 20
    traj = agent.sampler.sample(
        agent.policy, agent._prior(), nav.sample(3, np.random.default_rng(0)), 2
    )
    assert traj.actions.abs().max() <= 0.1 + 1e-6
    # Identical parameters, different z per episode: the first actions of a task's episodes differ.
    assert not torch.allclose(traj.actions[0, 0, 0], traj.actions[0, 1, 0])


# ---------------------------------------------------------------- training, failure, resume


def test_step_metrics_and_nan_loss_raises_before_parameters_change(nav):
    agent = tiny_agent(nav)
    metrics = agent.step(nav.sample(4, np.random.default_rng(0)))
    for key in ("train/q_loss", "train/kl", "train/policy_loss", "train/prior_return",
                "train/posterior_return", "time/env_steps_per_s"):  # fmt: skip
        assert math.isfinite(metrics[key]), key
    assert metrics["train/env_steps"] == 2 * 2 * 20 and metrics["train/replay_tasks"] == 2
    before = agent.state_dict()
    task = next(iter(agent.replay))
    agent.replay[task].data[:, 4] = np.nan  # rewards
    for t in agent.replay:
        agent.replay[t] = agent.replay[task]
    with pytest.raises(NonFiniteLossError, match="not finite.*parameters unchanged"):
        agent._gradient_step(agent._sample_batch())
    for name, params in agent.nets.items():
        for k, v in params.items():
            torch.testing.assert_close(v.detach(), before["nets"][name][k], rtol=0, atol=0)
    assert str(agent.optimizers["q"].state_dict()) == str(before["optimizers"]["q"])


def test_posterior_effect_against_torch_distributions_and_a_policy_blind_to_z(nav):
    agent = tiny_agent(nav)
    metrics = agent.step(nav.sample(4, np.random.default_rng(0)))
    assert metrics["adapt/policy_kl"] >= 0 and metrics["adapt/mean_shift"] >= 0
    context, rows = agent._sample_batch()
    params, obs_dim = agent.nets["policy"], agent.policy.obs_dim
    with torch.no_grad():  # a policy that reads z (a fresh one barely does: output scale 0.01)
        params["fc0.weight"][:, obs_dim:] += torch.randn(params["fc0.weight"][:, obs_dim:].shape)
        params["out.weight"].mul_(30.0)
    effect = agent.posterior_effect(context, rows)
    # Reference: task by task, torch's Normal KL between the policy at z = 0 and at the posterior mean.
    kls, shifts = [], []
    with torch.no_grad():
        double = {k: v.double() for k, v in params.items()}
        for task_context, task_rows in zip(context, rows, strict=True):
            z = agent.posterior(task_context)[0].double()
            obs = task_rows[:, :obs_dim].double()
            zero = torch.zeros(len(obs), len(z), dtype=torch.float64)
            before = agent.policy.distribution_params(double, obs, zero)
            after = agent.policy.distribution_params(double, obs, z.expand(len(obs), -1))
            p, q = Normal(before[0], before[1].exp()), Normal(after[0], after[1].exp())
            kls.append(kl_divergence(p, q).sum(-1))
            shifts.append((after[0].tanh() - before[0].tanh()).norm(dim=-1))
    assert effect["adapt/policy_kl"] == pytest.approx(float(torch.cat(kls).mean()), rel=1e-9)
    assert effect["adapt/mean_shift"] == pytest.approx(float(torch.cat(shifts).mean()), rel=1e-9)
    assert effect["adapt/policy_kl"] > 1e-5
    # A policy whose first layer gives z no weight acts the same under any posterior.
    with torch.no_grad():
        agent.nets["policy"]["fc0.weight"][:, obs_dim:] = 0.0
    blind = agent.posterior_effect(context, rows)
    assert blind == {"adapt/policy_kl": 0.0, "adapt/mean_shift": 0.0}


@pytest.mark.parametrize("initial", [0, 1])
def test_resume_from_a_checkpoint_gives_identical_metrics(nav, initial):
    tasks = [nav.sample(4, np.random.default_rng(i)) for i in range(3)]

    def seeded(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith("time/")}

    full = tiny_agent(nav, seed=5, num_initial_episodes=initial)
    expected = [seeded(full.step(t)) for t in tasks]
    first = tiny_agent(nav, seed=5, num_initial_episodes=initial)
    first.step(tasks[0])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.step(tasks[1])  # moves on; the checkpoint must not share its tensors
    resumed = tiny_agent(nav, seed=5, num_initial_episodes=initial)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    # A resumed run does not collect the initial episodes again.
    assert [seeded(resumed.step(t)) for t in tasks[1:]] == expected[1:]


def test_portable_state_drops_the_buffers_and_refills_them_to_their_size():
    """The portable state (``checkpoint.portable.pt``) holds everything but the replay and encoder
    buffers, and how many transitions each task's replay held. Loaded, the next step first
    collects on every one of those tasks until it holds at least that many again (less than one
    episode more), in the replay's task order, then goes on as the full state would: against it,
    every task ends the step with the same transitions plus the refill's overshoot."""
    dist = envs.make("navigation-2d", horizon=20, num_train=6, num_test=4)
    config = PEARLConfig(**{**TINY, "num_initial_episodes": 1})
    tasks = [dist.sample(4, np.random.default_rng(100 + i)) for i in range(3)]
    trained = PEARL(config, dist, 3)
    for batch in tasks[:2]:
        trained.step(batch)
    sizes = {t: b.size for t, b in trained.replay.items()}
    full, portable = io.BytesIO(), io.BytesIO()
    torch.save(trained.state_dict(), full)
    torch.save(trained.portable_state_dict(), portable)
    assert set(trained.state_dict()) - set(trained.portable_state_dict()) == {"replay", "context"}
    assert len(portable.getvalue()) < len(full.getvalue())
    resumed, exact = PEARL(config, dist, 3), PEARL(config, dist, 3)
    portable.seek(0)
    resumed.load_state_dict(torch.load(portable, weights_only=False))
    assert not resumed.replay and not resumed.context
    full.seek(0)
    exact.load_state_dict(torch.load(full, weights_only=False))
    calls = []  # whether each sampler call ran posterior z's (one parameter set per task)
    sample = resumed.sampler.sample
    resumed.sampler.sample = lambda policy, params, *a, **k: calls.append(isinstance(params, list)) or sample(
        policy, params, *a, **k
    )
    got, reference = resumed.step(tasks[2]), exact.step(tasks[2])
    rounds = max(sizes.values()) // dist.horizon  # navigation-2d episodes run to the horizon
    assert rounds >= 2 and calls == [i % 2 == 1 for i in range(rounds)] + [False, True]
    assert reference["train/initial_env_steps"] == reference["train/recollected_env_steps"] == 0.0
    assert list(resumed.replay) == list(exact.replay)
    overshoot = {t: resumed.replay[t].size - exact.replay[t].size for t in exact.replay}
    assert all(0 <= n < dist.horizon for n in overshoot.values()), overshoot
    # The refill collected the recorded sizes plus the overshoot, and this step's episodes as the
    # full state's; it is logged apart from a new run's initial episodes, and counted in env_steps.
    assert got["train/recollected_env_steps"] == sum(sizes.values()) + sum(overshoot.values()) > 0
    assert got["train/initial_env_steps"] == 0.0
    assert got["train/env_steps"] == reference["train/env_steps"] + got["train/recollected_env_steps"]
    assert set(resumed.context) == set(exact.context)
    for agent in (trained, resumed, exact):
        agent.close()


def test_a_portable_state_without_the_replay_sizes_collects_the_initial_episodes_again():
    """A portable state saved before it recorded the replay's sizes: the next step collects as a
    new run's first step (the initial episodes on every training task), then goes on exactly as the
    reference: the full state loaded, its buffers emptied by hand."""
    dist = envs.make("navigation-2d", horizon=20, num_train=6, num_test=4)
    config = PEARLConfig(**{**TINY, "num_initial_episodes": 1})
    tasks = [dist.sample(4, np.random.default_rng(100 + i)) for i in range(2)]

    def seeded(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if not k.startswith("time/")}

    trained = PEARL(config, dist, 3)
    trained.step(tasks[0])
    full = io.BytesIO()
    torch.save(trained.state_dict(), full)
    old = {k: v for k, v in trained.portable_state_dict().items() if k != "replay_sizes"}
    resumed, reference = PEARL(config, dist, 3), PEARL(config, dist, 3)
    resumed.load_state_dict(copy.deepcopy(old))
    full.seek(0)
    reference.load_state_dict(torch.load(full, weights_only=False))
    reference.replay.clear()
    reference.context.clear()
    got, expected = resumed.step(tasks[1]), reference.step(tasks[1])
    # The same data, logged as collected again (the reference's emptied buffers look like a new run's).
    swapped = {"train/initial_env_steps": "train/recollected_env_steps",
               "train/recollected_env_steps": "train/initial_env_steps"}
    assert seeded(got) == {swapped.get(k, k): v for k, v in seeded(expected).items()}
    assert got["train/recollected_env_steps"] == sum(resumed.replay[t].size for t in dist.train_tasks()) > 0
    for agent in (trained, resumed, reference):
        agent.close()


def test_initial_episodes_fill_every_training_task_once():
    dist = envs.make("navigation-2d", horizon=20, num_train=6, num_test=4)
    agent = PEARL(PEARLConfig(**{**TINY, "num_initial_episodes": 2}), dist, 0)
    train = dist.train_tasks()
    # (default_rng(0) would draw the training goals themselves: the split is seeded with 0)
    first = agent.step(dist.sample(4, np.random.default_rng(100)))
    # Every training task holds its two prior episodes in both buffers; the two collecting tasks
    # of the meta-batch hold one prior and one posterior episode, so every stored row is a step.
    for task in train:
        assert 20 <= agent.replay[task].size <= 2 * 20
        np.testing.assert_array_equal(agent.context[task], agent.replay[task].data[: agent.replay[task].size])
    initial = sum(agent.replay[t].size for t in train)
    assert first["train/initial_env_steps"] == initial
    assert first["train/env_steps"] == sum(b.size for b in agent.replay.values())
    assert len(agent.replay) == 6 + 2
    sizes = {t: agent.replay[t].size for t in train}
    second = agent.step(dist.sample(4, np.random.default_rng(101)))
    assert second["train/initial_env_steps"] == 0.0
    assert {t: agent.replay[t].size for t in train} == sizes
    # A portable state saved before the first step holds no data: loaded, the first step is a new
    # run's, initial episodes and all, not a re-collection.
    config = PEARLConfig(**{**TINY, "num_initial_episodes": 2})
    unsaved, loaded = PEARL(config, dist, 0), PEARL(config, dist, 0)
    loaded.load_state_dict(unsaved.portable_state_dict())
    again = loaded.step(dist.sample(4, np.random.default_rng(100)))
    assert again["train/initial_env_steps"] == initial and again["train/recollected_env_steps"] == 0.0
    for other in (agent, unsaved, loaded):
        other.close()
    with pytest.raises(ValueError, match="raise max_replay_tasks to 6"):
        PEARL(PEARLConfig(**{**TINY, "num_initial_episodes": 1, "max_replay_tasks": 5}), dist, 0)


def test_encoder_reads_next_observations_only_when_told(nav):
    obs_dim, act_dim = 2, 2
    context = torch.randn(3, 8, 2 * obs_dim + act_dim + 1)
    moved = context.clone()
    moved[..., obs_dim + act_dim + 1 :] += 1.0  # the next observations s'
    for use_next, width in ((False, obs_dim + act_dim + 1), (True, 2 * obs_dim + act_dim + 1)):
        agent = tiny_agent(nav, use_next_obs_in_context=use_next)
        assert agent.encoder.sizes[0] == width
        with torch.no_grad():
            same = torch.equal(agent.posterior(context)[0], agent.posterior(moved)[0])
        assert same is not use_next
    with pytest.raises(ValueError, match="use_next_obs_in_context = true as the run was trained"):
        tiny_agent(nav).load_state_dict(agent.state_dict())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_asking_for_cuda_without_one_says_to_use_the_cpu():
    with pytest.raises(ValueError, match="no CUDA device; use device='cpu'"):
        PEARLConfig(**{**TINY, "device": "cuda"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gradient_steps_on_cuda_match_the_cpu_ones(nav):
    """Same data and random draws (from the CPU generator) on either device: same parameters up
    to float rounding after collection and a few gradient steps, and CPU actor parameters."""
    tasks = nav.sample(4, np.random.default_rng(0))
    states, metrics = {}, {}
    for device in ("cpu", "cuda"):
        agent = tiny_agent(nav, seed=3, device=device)
        try:
            metrics[device] = agent.step(tasks)
            states[device] = agent.state_dict()["nets"]
            assert all(v.device.type == "cpu" for v in agent._prior().values())
        finally:
            agent.close()
    for name, params in states["cpu"].items():
        for k, v in params.items():
            torch.testing.assert_close(states["cuda"][name][k], v, rtol=1e-4, atol=1e-5)
    assert metrics["cuda"]["train/q_loss"] == pytest.approx(metrics["cpu"]["train/q_loss"], rel=1e-4)


# ---------------------------------------------------------------- evaluation


def test_evaluate_matches_a_reference_posterior_loop(nav):
    agent = tiny_agent(nav, eval_episodes_per_task=1, eval_deterministic=False)
    agent.step(nav.sample(4, np.random.default_rng(0)))
    tasks = nav.test_tasks()
    result = agent.evaluate(tasks, np.random.default_rng(7))
    assert result["adaptation_steps"] == [0, 1, 2] and result["success"] is None
    assert result["return"].shape == (4, 3)
    # Reference: one sampler call per episode; episode k's z from agent.adapt on episodes 0..k-1.
    seed = meta_pg.eval_seed(np.random.default_rng(7))
    with meta_pg.make_agent_sampler(agent.config, nav, seed) as sampler:
        episodes, returns = [[] for _ in tasks], []
        for k in range(3):
            params = [
                agent._prior() if k == 0 else agent.adapt(t, _concat(e))
                for t, e in zip(tasks, episodes, strict=True)
            ]
            traj = sampler.sample(agent.policy, params, tasks, 1)
            for i, e in enumerate(episodes):
                e.append(traj.task_slice(i))
            returns.append(traj.episode_returns()[:, 0].double().numpy())
    np.testing.assert_allclose(result["return"], np.stack(returns, 1), rtol=1e-6)


def _episodes(traj, task: int, start: int, stop: int):
    """Episodes ``start:stop`` of task ``task`` as trajectories ``[1, stop - start, T, ...]``."""
    one = traj.task_slice(task)
    return one._replace(**{f: getattr(one, f)[:, start:stop] for f in one._fields if f != "task"})


def _concat(parts):
    return type(parts[0])(*(torch.cat(fields, 1) for fields in zip(*parts, strict=True)))


def test_posterior_narrows_as_context_grows(nav):
    agent = tiny_agent(nav)
    traj = agent.sampler.sample(
        agent.policy, agent._prior(), nav.sample(1, np.random.default_rng(0)), 1
    )
    rows, mask = transitions(agent.policy, traj)
    assert mask[0, :20].sum() == 20
    with torch.no_grad():
        variances = [agent.posterior(rows[0, :n, :-1])[1] for n in (1, 5, 20)]
    assert (variances[0] < 1.0).all()
    assert (variances[1] < variances[0]).all() and (variances[2] < variances[1]).all()


@pytest.mark.slow
def test_trained_encoder_tells_goals_apart():
    """After 25 short iterations (~30 s on a quiet core), posteriors on two-episode contexts of
    two goals lie further apart than posteriors of one goal (ratio 1.75 measured; above 1 from
    iteration 15 on, with 1-, 2- and 3-episode contexts)."""
    torch.set_num_threads(1)
    dist = envs.make("navigation-2d", horizon=50)
    config = PEARLConfig(
        meta_batch_size=16,
        num_collect_tasks=4,
        num_prior_episodes=2,
        num_posterior_episodes=1,
        num_train_steps=60,
        batch_size=64,
        context_batch_size=50,
        hidden_sizes=(64, 64),
        encoder_hidden_sizes=(64, 64),
    )
    agent = PEARL(config, dist, 0)
    rng = np.random.default_rng(0)
    for _ in range(25):
        agent.step(dist.sample(16, rng))
    goals = [dist.make_task(goal=(0.4, 0.4)), dist.make_task(goal=(-0.4, -0.4))]
    traj = agent.sampler.sample(agent.policy, agent._prior(), goals, 12)
    means = torch.stack(
        [
            agent.adapt(goal, _episodes(traj, i, 2 * k, 2 * k + 2))["z_mean"]
            for i, goal in enumerate(goals)
            for k in range(4)
        ]
    ).reshape(2, 4, -1)
    within = (torch.cdist(means[0], means[0]).sum() + torch.cdist(means[1], means[1]).sum()) / 24
    between = torch.cdist(means[0], means[1]).mean()
    assert between > within, (between, within)


# ---------------------------------------------------------------- config, runner


def test_bad_settings_fail_early_with_the_value(nav):
    for bad, match in [
        (dict(latent_dim=0), "latent_dim must be >= 1, got 0"),
        (dict(num_collect_tasks=5, meta_batch_size=4), "num_collect_tasks=5 exceeds"),
        (dict(kl_weight=-1.0), "kl_weight must be finite and >= 0"),
        (dict(reward_scale=0.0), "reward_scale must be finite and > 0"),
        (dict(tau=0.0), "tau in \\(0, 1\\]"),
        (dict(hidden_sizes=()), "hidden_sizes must be positive widths"),
        (dict(auto_entropy=True, alpha=0.0), "alpha .* must be > 0"),
        (dict(device="tpu"), "device='tpu' is not"),
    ]:
        with pytest.raises(ValueError, match=match):
            PEARLConfig(**bad)
    with pytest.raises(ConfigError, match="unknown key.*latent_size"):
        build(PEARLConfig, {"latent_size": 3}, "agent")
    with pytest.raises(TypeError, match="bounded Box action space"):
        PEARL(PEARLConfig(**TINY), envs.make("bandit"), 0)


def test_every_pearl_config_builds_its_agent():
    """Each shipped config on its own task family (serial rollouts): the initial episodes' tasks
    fit max_replay_tasks, and the encoder reads (s, a, r) as oyster and garage."""
    for path in sorted((ROOT / "experiments").glob("pearl_*.toml")):
        document = load_toml(path)
        settings = dict(document["agent"], backend="serial", num_workers=1)
        cfg = build(PEARLConfig, settings, "agent")
        tasks = dict(document["tasks"])
        dist = make_distribution(tasks.pop("name"), **tasks)  # as the runner builds it
        agent = PEARL(cfg, dist, 0)
        try:
            obs_dim = int(np.prod(dist.observation_space.shape))
            act_dim = int(np.prod(dist.action_space.shape))
            assert agent.encoder.sizes[0] == obs_dim + act_dim + 1, path.name
        finally:
            agent.close()


def tiny_run_args(run: Path, *extra: str) -> list[str]:
    """``metarl run`` of the navigation-2d PEARL config with :data:`TINY`'s settings, 2 iterations."""
    settings = [
        f"agent.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in TINY.items()
    ]
    settings += ["run.num_iterations=2", "run.eval_at_end=false", "tasks.horizon=20", "tasks.num_test=3",
                 "agent.backend='serial'", "agent.num_workers=1", *extra]  # fmt: skip
    args = ["run", "experiments/pearl_nav2d.toml", "--out", str(run), "--no-progress"]
    for s in settings:
        args += ["--set", s]
    return args


def test_runs_and_evaluates_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    args = tiny_run_args(run)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(args) == 0, err.getvalue()
        assert main(["eval", str(run)]) == 0, err.getvalue()
    document = json.loads((run / "eval.json").read_text())
    assert document["summary"]["adaptation_steps"] == [0, 1, 2]
    assert np.array(document["per_task"]["return"]).shape == (3, 3)


def test_a_run_without_its_checkpoint_resumes_from_the_portable_one_and_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    args = tiny_run_args(run, "run.checkpoint_every=1", "tasks.num_train=5", "agent.num_initial_episodes=1")

    def cli(*argv: str) -> str:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            assert main(list(argv)) == 0, err.getvalue()
        return err.getvalue()

    def logged(iteration: int) -> dict:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return next(x for x in lines if x["iteration"] == iteration)

    cli(*args)
    assert (run / "checkpoint.portable.pt").stat().st_size < (run / "checkpoint.pt").stat().st_size
    # A clone that kept only the portable checkpoint (PEARL's full ones stay out of the repository).
    (run / "checkpoint.pt").unlink()
    (run / "checkpoint.prev.pt").unlink()
    err = cli("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=3")
    assert "resumes at iteration 2 from checkpoint.portable.pt" in err
    machines = [json.loads(x) for x in (run / "machines.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in machines] == [0, 2]
    assert "resumed_from" in machines[1] and "resumed_from" not in machines[0]
    assert logged(1)["train/initial_env_steps"] > 0 and logged(2)["train/initial_env_steps"] == 0
    assert logged(3)["train/recollected_env_steps"] > 0 and logged(3)["train/initial_env_steps"] == 0
    # With checkpoint.pt back (written at iteration 3), a resume uses it and warns of nothing.
    err = cli("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=4")
    assert "portable" not in err and logged(4)["train/initial_env_steps"] == 0
    assert "resumed_from" not in json.loads((run / "machines.jsonl").read_text().splitlines()[-1])
