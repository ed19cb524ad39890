"""Functional policies against torch.distributions and hand-written forward passes."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from metarl.policies import CategoricalMLPPolicy, GaussianMLPPolicy, make_policy


def _forward_by_hand(params, obs, activation):
    """The MLP written out layer by layer, independent of the policy's own code."""
    act = torch.relu if activation == "relu" else torch.tanh
    h = act(obs @ params["fc0.weight"].T + params["fc0.bias"])
    h = act(h @ params["fc1.weight"].T + params["fc1.bias"])
    return h @ params["out.weight"].T + params["out.bias"]


def _perturbed(params, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in params.items()}


@pytest.fixture
def gaussian():
    policy = GaussianMLPPolicy(5, 3, hidden_sizes=(16, 8), activation="tanh", init_log_std=-0.5)
    params = _perturbed(policy.init_params(0), seed=1)
    obs = torch.randn(7, 4, 5, generator=torch.Generator().manual_seed(11))
    return policy, params, obs


@pytest.fixture
def categorical():
    policy = CategoricalMLPPolicy(5, 4, hidden_sizes=(16, 8), activation="relu")
    params = _perturbed(policy.init_params(0), seed=1, scale=1.0)
    obs = torch.randn(7, 4, 5, generator=torch.Generator().manual_seed(12))
    return policy, params, obs


def test_gaussian_log_prob_entropy_match_torch_normal(gaussian):
    policy, params, obs = gaussian
    mean = _forward_by_hand(params, obs, "tanh")
    dist = Normal(mean, params["log_std"].exp())
    actions = dist.sample()
    torch.testing.assert_close(
        policy.log_prob(params, obs, actions), dist.log_prob(actions).sum(-1)
    )
    torch.testing.assert_close(policy.entropy(params, obs), dist.entropy().sum(-1))
    assert policy.log_prob(params, obs, actions).shape == (7, 4)


def test_gaussian_kl_matches_closed_form_and_monte_carlo(gaussian):
    policy, params_p, obs = gaussian
    params_q = _perturbed(params_p, seed=2)
    p = Normal(_forward_by_hand(params_p, obs, "tanh"), params_p["log_std"].exp())
    q = Normal(_forward_by_hand(params_q, obs, "tanh"), params_q["log_std"].exp())
    kl = policy.kl(params_p, params_q, obs)
    torch.testing.assert_close(kl, kl_divergence(p, q).sum(-1))
    torch.manual_seed(0)
    draws = p.sample((20000,))
    monte_carlo = (p.log_prob(draws) - q.log_prob(draws)).sum(-1).mean(0)
    torch.testing.assert_close(kl, monte_carlo, atol=0.05, rtol=0.05)
    torch.testing.assert_close(policy.kl(params_p, params_p, obs), torch.zeros(7, 4))


def test_gaussian_act_zero_noise_is_mean_and_log_prob_consistent(gaussian):
    policy, params, obs = gaussian
    obs = obs.reshape(-1, 5)
    actions, log_probs = policy.act(params, obs, torch.zeros(obs.shape[0], 3))
    torch.testing.assert_close(actions, _forward_by_hand(params, obs, "tanh"))
    noise = torch.randn(obs.shape[0], 3)
    actions, log_probs = policy.act(params, obs, noise)
    torch.testing.assert_close(
        actions, _forward_by_hand(params, obs, "tanh") + params["log_std"].exp() * noise
    )
    torch.testing.assert_close(log_probs, policy.log_prob(params, obs, actions))


def test_categorical_matches_torch_categorical(categorical):
    policy, params, obs = categorical
    dist = Categorical(logits=_forward_by_hand(params, obs, "relu"))
    actions = dist.sample()
    torch.testing.assert_close(policy.log_prob(params, obs, actions), dist.log_prob(actions))
    torch.testing.assert_close(policy.entropy(params, obs), dist.entropy())
    params_q = _perturbed(params, seed=3, scale=0.3)
    logits_q = _forward_by_hand(params_q, obs, "relu")
    # KL by its definition, Σ p (log p − log q), in log space: torch's kl_divergence returns inf
    # where q's probability underflows to 0 in float32 although the KL is finite.
    log_p, log_q = dist.logits.log_softmax(-1), logits_q.log_softmax(-1)
    by_hand = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(policy.kl(params, params_q, obs), by_hand)
    q = Categorical(logits=logits_q)
    finite = kl_divergence(dist, q).isfinite()
    torch.testing.assert_close(policy.kl(params, params_q, obs)[finite], kl_divergence(dist, q)[finite])
    far = 30 * obs  # logit gaps past float32's range: torch says inf, the KL stays finite
    assert not kl_divergence(Categorical(logits=_forward_by_hand(params, far, "relu")),
                             Categorical(logits=_forward_by_hand(params_q, far, "relu"))).isfinite().all()
    assert policy.kl(params, params_q, far).isfinite().all()


def test_categorical_act_constant_noise_is_mode_and_gumbel_frequencies(categorical):
    policy, params, obs = categorical
    logits = _forward_by_hand(params, obs[0, :1], "relu")
    mode, _ = policy.act(params, obs[0, :1], torch.full((1, 4), 0.5))
    assert mode.item() == logits.argmax(-1).item()
    num_draws = 40000
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(num_draws, 4, generator=gen)
    actions, log_probs = policy.act(params, obs[0, :1].expand(num_draws, 5), noise)
    freq = torch.bincount(actions, minlength=4).float() / num_draws
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.01, rtol=0.0)
    torch.testing.assert_close(log_probs, torch.log_softmax(logits[0], -1)[actions])


@pytest.mark.parametrize(
    "make",
    [lambda: GaussianMLPPolicy(6, 2, (64, 64)), lambda: CategoricalMLPPolicy(6, 3, (64, 64))],
)
def test_act_rows_do_not_depend_on_the_rest_of_the_batch(make):
    """Sampling must give the same action whether an env is stepped alone or with many others."""
    policy = make()
    params = _perturbed(policy.init_params(3), seed=4)
    gen = torch.Generator().manual_seed(5)
    obs = torch.randn(101, 6, generator=gen)
    noise = torch.rand(101, *policy.noise_shape, generator=gen)
    full_actions, full_log_probs = policy.act(params, obs, noise)
    for chunk in (1, 3, 5, 13, 64):
        parts = [
            policy.act(params, obs[i : i + chunk], noise[i : i + chunk])
            for i in range(0, 101, chunk)
        ]
        assert torch.equal(torch.cat([a for a, _ in parts]), full_actions), chunk
        assert torch.equal(torch.cat([lp for _, lp in parts]), full_log_probs), chunk


def test_vmap_over_parameter_sets_matches_a_loop(gaussian):
    policy, params, obs = gaussian
    stacked = {k: torch.stack([v, v * 1.1, v - 0.2]) for k, v in params.items()}
    actions = torch.randn(3, 4, 3)
    vmapped = torch.func.vmap(policy.log_prob, in_dims=(0, 0, 0))(stacked, obs[:3], actions)
    looped = torch.stack(
        [
            policy.log_prob({k: v[i] for k, v in stacked.items()}, obs[i], actions[i])
            for i in range(3)
        ]
    )
    torch.testing.assert_close(vmapped, looped)
    grads = torch.func.grad(lambda p: policy.log_prob(p, obs[0], actions[0]).sum())(params)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())


def test_init_params_seeded_and_policies_pickle():
    policy = GaussianMLPPolicy(4, 2, hidden_sizes=(8,), init_log_std=-1.0)
    a, b, c = policy.init_params(0), policy.init_params(0), policy.init_params(1)
    assert sorted(a) == ["fc0.bias", "fc0.weight", "log_std", "out.bias", "out.weight"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc0.weight"], c["fc0.weight"])
    torch.testing.assert_close(a["log_std"], torch.full((2,), -1.0))
    clone = pickle.loads(pickle.dumps(policy))
    obs = torch.randn(3, 4)
    torch.testing.assert_close(
        clone.log_prob(a, obs, torch.zeros(3, 2)), policy.log_prob(a, obs, torch.zeros(3, 2))
    )
    assert len(pickle.dumps(policy)) < 2000


@pytest.mark.parametrize("make", [GaussianMLPPolicy, CategoricalMLPPolicy])
def test_output_init_scale_scales_only_the_output_layer(make):
    # Glorot-uniform: |w| <= sqrt(6 / (fan_in + fan_out)); 1.0 fills that range, 0.01 a hundredth.
    small, plain = make(4, 3, hidden_sizes=(50,)), make(4, 3, hidden_sizes=(50,), output_init_scale=1.0)
    a, b = small.init_params(0), plain.init_params(0)
    torch.testing.assert_close(a["fc0.weight"], b["fc0.weight"])
    torch.testing.assert_close(100.0 * a["out.weight"], b["out.weight"])
    bound = (6.0 / (50 + 3)) ** 0.5
    assert 0.8 * bound < b["out.weight"].abs().max() <= bound


def test_make_policy_chooses_by_space():
    obs_space = gym.spaces.Box(-1, 1, (3, 2), np.float32)
    gaussian = make_policy(obs_space, gym.spaces.Box(-1, 1, (2,), np.float32), hidden_sizes=(8,))
    assert (
        isinstance(gaussian, GaussianMLPPolicy) and gaussian.obs_dim == 6 and gaussian.act_dim == 2
    )
    categorical = make_policy(obs_space, gym.spaces.Discrete(5))
    assert isinstance(categorical, CategoricalMLPPolicy) and categorical.num_actions == 5
    with pytest.raises(TypeError, match="MultiBinary"):
        make_policy(obs_space, gym.spaces.MultiBinary(3))
    with pytest.raises(ValueError, match="activation"):
        GaussianMLPPolicy(2, 2, activation="gelu")
