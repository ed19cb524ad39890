"""Every classic family against gymnasium's checker, SB3, its split and determinism rules."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs

CLASSIC = [n for n in envs.names() if not n.startswith("ml")]


def _first_observations(name: str, seed: int, num_steps: int = 100) -> tuple[list, np.ndarray]:
    dist = envs.make(name)
    tasks = dist.sample(4, np.random.default_rng(seed))
    env = dist.make_env(tasks[0])
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    out = [obs]
    while len(out) < num_steps:
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        out.append(obs)
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(obs)
    return tasks, np.stack(out[:num_steps])


@pytest.mark.parametrize("name", CLASSIC)
def test_check_env(name):
    dist = envs.make(name)
    env = dist.make_env(dist.train_tasks()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unbounded Box warnings
        check_env(env, skip_render_check=True)
    assert env.observation_space == dist.observation_space
    assert env.action_space.shape == dist.action_space.shape


@pytest.mark.parametrize("name", CLASSIC)
def test_same_seed_same_tasks_and_observations(name):
    tasks_a, obs_a = _first_observations(name, seed=3)
    tasks_b, obs_b = _first_observations(name, seed=3)
    assert tasks_a == tasks_b
    np.testing.assert_array_equal(obs_a, obs_b)
    tasks_c, _ = _first_observations(name, seed=4)
    assert tasks_c != tasks_a or name in ("halfcheetah-dir", "ant-dir")


@pytest.mark.parametrize("name", CLASSIC)
def test_splits_are_fixed_and_disjoint(name):
    a, b = envs.make(name), envs.make(name)
    assert a.train_tasks() == b.train_tasks() and a.test_tasks() == b.test_tasks()
    if name in (
        "halfcheetah-dir",
        "ant-dir",
    ):  # only two tasks exist: both sets are both directions
        assert sorted(t["direction"] for t in a.test_tasks()) == [-1.0, 1.0]
        return
    assert len(a.train_tasks()) == 100 and len(a.test_tasks()) == 40
    assert not set(a.train_tasks()) & set(a.test_tasks())
    assert envs.make(name, split_seed=1).train_tasks() != a.train_tasks()


@pytest.mark.parametrize("name", CLASSIC)
def test_reset_keeps_the_task_and_set_task_changes_it(name):
    dist = envs.make(name)
    first, second = dist.train_tasks()[0], dist.test_tasks()[-1]
    env = dist.make_env(first)
    for seed in (0, 1, None):
        env.reset(seed=seed)
        assert env.unwrapped.task == first
    dist.set_task(env, second)
    env.reset()
    assert env.unwrapped.task == second


@pytest.mark.parametrize("name", ["navigation-2d", "bandit", "halfcheetah-vel"])
def test_stepping_past_the_horizon_is_refused(name):
    dist = envs.make(name, horizon=5)
    env = dist.make_env(dist.train_tasks()[0])
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.action_space.sample())
    env.reset(seed=0)
    for _ in range(5):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
    assert truncated and not terminated
    with pytest.raises(RuntimeError, match="after the episode ended at step 5"):
        env.step(env.action_space.sample())


def test_set_task_rejects_other_families():
    nav, bandit = envs.make("navigation-2d"), envs.make("bandit")
    env = nav.make_env(nav.train_tasks()[0])
    with pytest.raises(ValueError, match="family 'bandit'"):
        nav.set_task(env, bandit.train_tasks()[0])


@pytest.mark.parametrize("name", ["navigation-2d", "halfcheetah-vel"])
def test_sb3_ppo_trains_on_one_task(name):
    from stable_baselines3 import PPO

    dist = envs.make(name)
    env = dist.make_env(dist.train_tasks()[0])
    model = PPO("MlpPolicy", env, n_steps=128, batch_size=64, n_epochs=2, seed=0, device="cpu")
    model.learn(total_timesteps=256)
    action, _ = model.predict(env.reset(seed=0)[0], deterministic=True)
    assert env.action_space.contains(action.astype(np.float32))


OWN_REWARD = [
    ("halfcheetah-vel", {"frame_skip": 1, "observation": "maml"}),
    ("halfcheetah-vel", {}),
    ("halfcheetah-dir", {"frame_skip": 1, "observation": "maml-oracle", "reset_noise": "rllab"}),
    ("halfcheetah-vel-mass", {}),
    ("ant-dir", {}),
    ("ant-dir-2d", {}),
    ("ant-goal", {}),
]


@pytest.mark.parametrize("name, params", OWN_REWARD)
def test_own_reward_step_matches_gymnasium_step(name, params):
    """A family whose reward is its own skips gymnasium's reward code; the reference is the same
    family stepped through gymnasium's full ``step``: every observation, reward, termination and
    info entry must be identical, across episode boundaries and with actions out of bounds."""
    from dataclasses import replace

    from envs.mujoco_family import MujocoTaskEnv

    dist = envs.make(name, horizon=40, **params)
    assert dist.spec.own_reward
    task = dist.sample(1, np.random.default_rng(3))[0]
    lean = dist.make_env(task)
    full = MujocoTaskEnv(replace(dist.spec, own_reward=False), task, 40)
    actions = np.random.default_rng(4).uniform(-1.5, 1.5, size=(100, lean.action_space.shape[0]))
    for env in (lean, full):
        env.reset(seed=5)
    for i, action in enumerate(actions):
        a, b = lean.step(action), full.step(action)
        np.testing.assert_array_equal(a[0], b[0])
        assert a[1:4] == b[1:4]
        assert a[4].keys() == b[4].keys()
        for key in a[4]:
            np.testing.assert_array_equal(a[4][key], b[4][key])
        if a[2] or a[3]:
            for env in (lean, full):
                env.reset(seed=i)
