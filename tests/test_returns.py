"""Discounted returns, GAE and the linear feature baseline against hand arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl.baselines import LinearFeatureBaseline, linear_features
from metarl.returns import discount_cumsum, discounted_returns, gae, normalize

GAMMA, LAM = 0.9, 0.5


def _three_episodes() -> dict[str, torch.Tensor]:
    """Episode 0 terminates at t=2; episode 1 is truncated by the horizon (T=4); episode 2 is
    truncated at t=1 by a time limit. Entries after an episode ended hold junk the code must ignore."""
    return {
        "rewards": torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0], [2.0, 4.0, 0.0, 0.0]]),
        "values": torch.tensor([[0.5, 1.0, 1.5, 9.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 5.0, 5.0]]),
        "next_values": torch.tensor(
            [[7.0, 7.0, 7.0, 7.0], [0.0, 0.0, 0.0, 10.0], [0.0, 3.0, 8.0, 8.0]]
        ),
        "mask": torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]),
        "terminated": torch.tensor(
            [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
        ),
    }


def test_gae_by_hand_with_termination_and_truncation():
    d = _three_episodes()
    adv = gae(d["rewards"], d["values"], d["mask"], d["terminated"], GAMMA, LAM, d["next_values"])
    # Terminated: deltas 1 + .9*1 - .5 = 1.4, 2 + .9*1.5 - 1 = 2.35, 3 + 0 - 1.5 = 1.5; gamma*lam = .45.
    a2 = 1.5
    a1 = 2.35 + 0.45 * a2
    a0 = 1.4 + 0.45 * a1
    # Horizon-truncated: bootstraps next_values[3] = 10: deltas 1.8, 1.7, 1.6, 1 + 9 - 4 = 6.
    b3 = 6.0
    b2 = 1.6 + 0.45 * b3
    b1 = 1.7 + 0.45 * b2
    b0 = 1.8 + 0.45 * b1
    # Time-limit truncated at t=1: deltas 2 + .9*1 - 1 = 1.9, 4 + .9*3 - 1 = 5.7.
    c1 = 5.7
    c0 = 1.9 + 0.45 * c1
    expected = torch.tensor([[a0, a1, a2, 0.0], [b0, b1, b2, b3], [c0, c1, 0.0, 0.0]])
    torch.testing.assert_close(adv, expected)


def test_returns_by_hand_with_and_without_bootstrap():
    d = _three_episodes()
    with_bootstrap = discounted_returns(
        d["rewards"], d["mask"], d["terminated"], GAMMA, d["next_values"]
    )
    expected = torch.tensor(
        [
            [1 + 0.9 * (2 + 0.9 * 3), 2 + 0.9 * 3, 3.0, 0.0],  # terminated: next_values ignored
            [10.0, 10.0, 10.0, 10.0],  # 1 + .9 * 10 = 10 at every step
            [2 + 0.9 * (4 + 0.9 * 3), 4 + 0.9 * 3, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(with_bootstrap, expected)
    monte_carlo = discounted_returns(d["rewards"], d["mask"], d["terminated"], GAMMA)
    torch.testing.assert_close(
        monte_carlo[1], torch.tensor([1 + 0.9 + 0.81 + 0.729, 1 + 0.9 + 0.81, 1.9, 1.0])
    )
    torch.testing.assert_close(monte_carlo[2], torch.tensor([2 + 0.9 * 4, 4.0, 0.0, 0.0]))


def test_gae_with_lambda_one_and_zero_values_is_the_return():
    d = _three_episodes()
    zeros = torch.zeros_like(d["values"])
    adv = gae(d["rewards"], zeros, d["mask"], d["terminated"], GAMMA, 1.0, d["next_values"])
    torch.testing.assert_close(
        adv, discounted_returns(d["rewards"], d["mask"], d["terminated"], GAMMA, d["next_values"])
    )


def test_discount_cumsum_leading_axes_and_bad_discount():
    x = torch.arange(6.0).reshape(1, 2, 3)
    torch.testing.assert_close(
        discount_cumsum(x, 0.5),
        torch.tensor([[[0 + 0.5 + 0.5, 1 + 1.0, 2.0], [3 + 2 + 1.25, 4 + 2.5, 5.0]]]),
    )
    with pytest.raises(ValueError, match="discount=1.5"):
        discount_cumsum(x, 1.5)


def test_normalize_ignores_masked_entries():
    out = normalize(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))
    std = float(np.sqrt(2.0 / 3.0))
    torch.testing.assert_close(
        out, torch.tensor([-1 / std, 0.0, 1 / std, 0.0]), atol=1e-6, rtol=1e-6
    )


def test_linear_features_by_hand():
    obs = torch.tensor(
        [[[0.5], [-20.0]]]
    )  # one episode, two steps, obs_dim 1; -20 is clipped to -10
    f = linear_features(obs)
    expected = torch.tensor(
        [[[0.5, 0.25, 0.0, 0.0, 0.0, 1.0], [-10.0, 100.0, 0.01, 1e-4, 1e-6, 1.0]]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(f, expected)
    torch.testing.assert_close(
        linear_features(obs, offset=1)[0, 0, 2], torch.tensor(0.01, dtype=torch.float64)
    )


def test_linear_baseline_recovers_known_weights_per_task_and_ignores_masked_steps():
    # Task 0's returns are 3 + 2 o - 50 t, task 1's are -1 + o² + 20 t² (t = step / 100), exactly
    # representable in the features; masked steps hold junk returns that must not enter the fit.
    gen = torch.Generator().manual_seed(0)
    obs = torch.rand(2, 3, 100, 1, generator=gen) * 4 - 2
    t = torch.arange(100.0) / 100
    returns = torch.stack([3 + 2 * obs[0, ..., 0] - 50 * t, -1 + obs[1, ..., 0] ** 2 + 20 * t**2])
    mask = torch.ones(2, 3, 100)
    mask[:, 0, 60:] = 0.0
    junk = returns.clone()
    junk[:, 0, 60:] = 1e4
    weights = LinearFeatureBaseline(reg_coeff=1e-9).fit(obs, junk, mask)
    torch.testing.assert_close(
        weights[0],
        torch.tensor([2.0, 0.0, -50.0, 0.0, 0.0, 3.0], dtype=torch.float64),
        atol=1e-3,
        rtol=0,
    )
    torch.testing.assert_close(
        weights[1],
        torch.tensor([0.0, 1.0, 0.0, 20.0, 0.0, -1.0], dtype=torch.float64),
        atol=1e-3,
        rtol=0,
    )
    values = LinearFeatureBaseline.predict(weights, obs)
    torch.testing.assert_close(values * mask, returns * mask, atol=1e-4, rtol=0)


def test_linear_baseline_matches_numpy_ridge_solution():
    gen = torch.Generator().manual_seed(1)
    obs = torch.randn(1, 2, 5, 2, generator=gen)
    returns = torch.randn(1, 2, 5, generator=gen)
    mask = torch.ones(1, 2, 5)
    weights = LinearFeatureBaseline(reg_coeff=1e-2).fit(obs, returns, mask)[0].numpy()
    rows = []
    for e in range(2):
        for step in range(5):
            o = obs[0, e, step].double().numpy()
            t = step / 100
            rows.append(np.concatenate([o, o**2, [t, t**2, t**3, 1.0]]))
    x, y = np.array(rows), returns[0].double().numpy().reshape(-1)
    expected = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ y)
    np.testing.assert_allclose(weights, expected, rtol=1e-8, atol=1e-10)


def test_linear_baseline_fits_observations_with_constant_zero_entries_as_a_ridge_solve():
    """Ant-like observations: most entries always 0 (contact forces), the rest clipped at 10, so
    X^T X is singular and badly conditioned; the fit is still the ridge solution
    (X^T X + 1e-5 I) w = X^T y, computed here with numpy."""
    rng = np.random.default_rng(0)
    obs = np.zeros((2, 4, 50, 30))
    obs[..., :6] = np.clip(rng.normal(0, 8, size=(2, 4, 50, 6)), -10, 10)
    mask = np.ones((2, 4, 50))
    mask[1, :, 35:] = 0.0  # episodes of the second task end early
    returns = rng.normal(size=(2, 4, 50))
    weights = LinearFeatureBaseline().fit(torch.tensor(obs, dtype=torch.float32),
                                          torch.tensor(returns), torch.tensor(mask))
    features = linear_features(torch.tensor(obs, dtype=torch.float32)).numpy()
    for task in range(2):
        x = (features[task] * mask[task][..., None]).reshape(-1, features.shape[-1])
        y = (returns[task] * mask[task]).reshape(-1)
        expected = np.linalg.solve(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ y)
        assert np.isfinite(weights[task].numpy()).all()
        np.testing.assert_allclose(x @ weights[task].numpy(), x @ expected, rtol=1e-6, atol=1e-6)


class _ConstantBaseline:
    """Values 0 at every step and 5 after it, whatever the data."""

    def fit_values(self, obs, next_obs, returns, mask):
        return torch.zeros_like(returns), torch.full_like(returns, 5.0)


def test_pg_batch_bootstraps_the_horizon_only_when_asked():
    from metarl.meta_pg import pg_batch
    from metarl.types import Trajectories

    shape = (1, 1, 3)  # one task, one episode of three steps, truncated at the horizon
    zeros = torch.zeros(shape)
    t = Trajectories(
        torch.zeros(*shape, 2), torch.zeros(*shape, 1), torch.ones(shape), zeros,
        torch.ones(shape), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(*shape, 2), zeros,
    )  # fmt: skip
    # gamma 0.5, lambda 1, values 0: the Monte-Carlo return, plus 0.5^(3 - t) * 5 with bootstrap.
    plain = pg_batch(t, _ConstantBaseline(), 0.5, 1.0, normalized=False, bootstrap=False)
    torch.testing.assert_close(plain.advantages[0, 0], torch.tensor([1.75, 1.5, 1.0]))
    boot = pg_batch(t, _ConstantBaseline(), 0.5, 1.0, normalized=False)
    torch.testing.assert_close(boot.advantages[0, 0], torch.tensor([2.375, 2.75, 3.5]))
