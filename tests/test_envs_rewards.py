"""Rewards against the published formulas, computed here by hand from the MuJoCo state."""

from __future__ import annotations

import numpy as np
import pytest

import envs
from envs.base import Task

DT = 0.05  # frame_skip 5 x timestep 0.01 for HalfCheetah and Ant


def _rollout_checks(name: str, task: Task, expected, num_steps: int = 30, seed: int = 0):
    """Steps random actions; ``expected(sim, before, action, task)`` is the published reward."""
    dist = envs.make(name)
    env = dist.make_env(task)
    env.reset(seed=seed)
    rng = np.random.default_rng(seed)
    sim = env.unwrapped.sim
    for _ in range(num_steps):
        action = rng.uniform(-1, 1, size=env.action_space.shape)
        before = {"qpos": sim.data.qpos.copy(), "torso": sim.data.body("torso").xpos.copy()}
        _, reward, terminated, truncated, info = env.step(action)
        assert reward == pytest.approx(expected(sim, before, action, task), rel=1e-9, abs=1e-9)
        if terminated or truncated:
            break
    return info


def _contact(sim) -> float:
    return 0.5e-3 * float(np.sum(np.clip(sim.data.cfrc_ext, -1, 1) ** 2))


def test_navigation_reward_by_hand():
    dist = envs.make("navigation-2d")
    task = Task.make("navigation-2d", goal=(0.3, -0.2))
    env = dist.make_env(task)
    env.reset(seed=0)
    position = np.zeros(2)
    for action in ([0.05, 0.0], [0.5, -0.5], [-0.3, 0.02]):  # the second is clipped to 0.1
        position = position + np.clip(action, -0.1, 0.1)
        obs, reward, *_ = env.step(np.array(action, dtype=np.float32))
        np.testing.assert_allclose(obs, position, atol=1e-6)
        assert reward == pytest.approx(-np.hypot(position[0] - 0.3, position[1] + 0.2), abs=1e-6)


def test_navigation_wind_adds_drift_and_goal_terminates():
    task = Task.make("navigation-2d-wind", goal=(0.15, 0.0), wind=(0.05, 0.0))
    env = envs.make("navigation-2d-wind").make_env(task)
    env.reset(seed=0)
    obs, _, terminated, *_ = env.step(np.array([0.05, 0.0]))
    np.testing.assert_allclose(obs, [0.1, 0.0], atol=1e-6)
    assert not terminated
    obs, reward, terminated, *_ = env.step(np.array([0.0, 0.0]))
    assert terminated and reward == pytest.approx(0.0, abs=1e-9)  # 0.1 + 0 + wind 0.05 = goal


def test_halfcheetah_vel_reward():
    def expected(sim, before, action, task):
        v = (sim.data.qpos[0] - before["qpos"][0]) / DT
        return -abs(v - task["velocity"]) - 0.05 * np.sum(action**2)

    info = _rollout_checks("halfcheetah-vel", Task.make("halfcheetah-vel", velocity=1.3), expected)
    assert {"x_velocity", "reward_forward", "reward_ctrl"} <= set(info)


@pytest.mark.parametrize("direction", [-1.0, 1.0])
def test_halfcheetah_dir_reward(direction):
    def expected(sim, before, action, task):
        return task["direction"] * (sim.data.qpos[0] - before["qpos"][0]) / DT - 0.05 * np.sum(
            action**2
        )

    _rollout_checks("halfcheetah-dir", Task.make("halfcheetah-dir", direction=direction), expected)


def test_ant_dir_reward():
    def expected(sim, before, action, task):
        v = (sim.data.body("torso").xpos[0] - before["torso"][0]) / DT
        return task["direction"] * v - 0.5 * np.sum(action**2) - _contact(sim) + 1.0

    _rollout_checks("ant-dir", Task.make("ant-dir", direction=-1.0), expected)


def test_ant_dir_2d_reward():
    u = np.array([0.6, -0.8])

    def expected(sim, before, action, task):
        v = (sim.data.body("torso").xpos[:2] - before["torso"][:2]) / DT
        return float(u @ v) - 0.5 * np.sum(action**2) - _contact(sim) + 1.0

    _rollout_checks("ant-dir-2d", Task.make("ant-dir-2d", direction=tuple(u)), expected)


def test_ant_goal_reward_and_observation_has_position():
    goal = np.array([1.0, -2.0])

    def expected(sim, before, action, task):
        distance = np.sum(np.abs(sim.data.body("torso").xpos[:2] - goal))
        return -distance - 0.1 * np.sum(action**2) - _contact(sim)

    _rollout_checks("ant-goal", Task.make("ant-goal", goal=tuple(goal)), expected)
    dist = envs.make("ant-goal")
    env = dist.make_env(dist.train_tasks()[0])
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs[:2], env.unwrapped.sim.data.qpos[:2], atol=1e-6)
    radii = [np.hypot(*t["goal"]) for t in dist.sample(500, np.random.default_rng(0))]
    assert max(radii) <= 3.0 and np.mean(np.array(radii) < 1.5) == pytest.approx(0.25, abs=0.06)


@pytest.mark.parametrize("name", ["hopper-params", "walker-params"])
def test_rand_params_reward_is_gymnasium_v5(name):
    def expected(sim, before, action, task):
        v = (sim.data.qpos[0] - before["qpos"][0]) / sim.dt
        return v + 1.0 - 1e-3 * np.sum(action**2)  # healthy reward 1 while alive

    dist = envs.make(name)
    _rollout_checks(name, dist.train_tasks()[0], expected, num_steps=10)


@pytest.mark.parametrize("name", ["hopper-params", "walker-params"])
def test_rand_params_set_task_rewrites_from_nominal(name):
    dist = envs.make(name)
    tasks = dist.train_tasks()
    env = dist.make_env(tasks[0])
    model = env.unwrapped.sim.model
    from gymnasium.envs.mujoco.hopper_v5 import HopperEnv
    from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

    fresh = (HopperEnv if name == "hopper-params" else Walker2dEnv)().model
    for task in (
        tasks[1],
        tasks[2],
        tasks[1],
    ):  # going back must give the same arrays: no compounding
        dist.set_task(env, task)
        for field, base in (
            ("body_mass", 1.5),
            ("body_inertia", 1.5),
            ("dof_damping", 1.3),
            ("geom_friction", 1.5),
        ):
            scale = np.asarray(task[f"{field}_scale"]).reshape(getattr(fresh, field).shape)
            np.testing.assert_allclose(getattr(model, field), getattr(fresh, field) * scale)
            exponents = np.log(scale) / np.log(base)
            assert np.all(np.abs(exponents) <= 3.0 + 1e-9)


def test_bandit_rewards_follow_arm_means():
    task = Task.make("bandit", arm_means=(0.1, 0.9, 0.5))
    env = envs.make("bandit", num_arms=3, horizon=1000).make_env(task)
    env.reset(seed=0)
    rewards = [env.step(1)[1] for _ in range(1000)]
    assert set(rewards) <= {0.0, 1.0}
    assert np.mean(rewards) == pytest.approx(0.9, abs=0.04)


def test_tabular_mdp_follows_its_tables():
    transitions = np.zeros((2, 2, 2))
    transitions[0, 0] = [0.25, 0.75]
    transitions[0, 1] = [1.0, 0.0]
    transitions[1, :] = [1.0, 0.0]
    task = Task.make("tabular-mdp", transitions=transitions, reward_means=[[2.0, -1.0], [0.0, 0.0]])
    env = envs.make("tabular-mdp", num_states=2, num_actions=2, horizon=1).make_env(task)
    next_states, rewards = [], []
    for seed in range(2000):
        obs, _ = env.reset(seed=seed)
        np.testing.assert_array_equal(obs, [1.0, 0.0])  # every episode starts in state 0
        obs, reward, *_ = env.step(0)
        next_states.append(int(np.argmax(obs)))
        rewards.append(reward)
    assert np.mean(next_states) == pytest.approx(0.75, abs=0.03)
    assert np.mean(rewards) == pytest.approx(2.0, abs=0.07) and np.std(rewards) == pytest.approx(
        1.0, abs=0.07
    )


def test_tabular_mdp_task_distribution():
    dist = envs.make("tabular-mdp")
    task = dist.sample(1, np.random.default_rng(0))[0]
    p = np.asarray(task["transitions"])
    assert p.shape == (10, 5, 10) and np.allclose(p.sum(-1), 1.0) and np.all(p >= 0)
    means = np.concatenate(
        [np.ravel(t["reward_means"]) for t in dist.sample(40, np.random.default_rng(1))]
    )
    assert np.mean(means) == pytest.approx(1.0, abs=0.1) and np.std(means) == pytest.approx(
        1.0, abs=0.1
    )


def test_halfcheetah_vel_mass_scales_every_body_from_nominal_values():
    family = envs.make("halfcheetah-vel-mass")
    light = family.make_task(velocity=[1.0], mass_scale=[0.8])
    heavy = family.make_task(velocity=[1.0], mass_scale=[1.2])
    env = family.make_env(light)
    core = env.unwrapped
    nominal_mass = core.nominal["body_mass"].copy()
    np.testing.assert_allclose(core.mujoco_model.body_mass, 0.8 * nominal_mass)
    family.set_task(env, heavy)  # from nominal values again, never compounded
    np.testing.assert_allclose(core.mujoco_model.body_mass, 1.2 * nominal_mass)
    np.testing.assert_allclose(core.mujoco_model.body_inertia, 1.2 * core.nominal["body_inertia"])
    assert heavy["velocity"] == 1.0 and family.parameter_box()["mass_scale"] == ([0.75], [1.25])
    with pytest.raises(ValueError, match="declares no parameter box"):
        envs.make("halfcheetah-vel").parameter_box()


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_halfcheetah_in_the_maml_papers_setting_steps_0_01_s_and_observes_the_torso_centre_of_mass(name):
    """frame_skip=1, observation="maml": one 0.01 s MuJoCo step per action (rllab's
    half_cheetah.xml has timestep 0.01 and no frame_skip), the reward's velocity over that step,
    and 20 observed values: gymnasium's 17 then the torso subtree's centre of mass, which, the
    torso being the root body, moves with qpos[0] along x."""
    dist = envs.make(name, frame_skip=1, observation="maml")
    task = dist.test_tasks()[0]
    env = dist.make_env(task)
    obs, _ = env.reset(seed=0)
    sim = env.unwrapped.sim
    assert dist.observation_space.shape == obs.shape == (20,) and env.unwrapped.dt == pytest.approx(0.01)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x_before, com_before = sim.data.qpos[0], obs[17:].astype(np.float64)
        action = rng.uniform(-1, 1, size=6)
        obs, reward, *_ = env.step(action)
        v = (sim.data.qpos[0] - x_before) / 0.01
        forward = -abs(v - task["velocity"]) if name == "halfcheetah-vel" else task["direction"] * v
        assert reward == pytest.approx(forward - 0.05 * np.sum(action**2), rel=1e-9, abs=1e-9)
        assert np.allclose(obs[:17], np.concatenate([sim.data.qpos[1:], sim.data.qvel]).astype(np.float32))
        mass = sim.model.body_mass[1:]  # every body but the world: the torso's subtree
        com = (mass[:, None] * sim.data.xipos[1:]).sum(0) / mass.sum()
        assert np.allclose(obs[17:], com.astype(np.float32), atol=1e-6)
    assert obs[17] - com_before[0] != 0.0


@pytest.mark.parametrize("name", ["halfcheetah-vel", "halfcheetah-dir"])
def test_halfcheetah_oracle_observation_appends_the_task_to_the_maml_one(name):
    maml, oracle = (envs.make(name, frame_skip=1, observation=o) for o in ("maml", "maml-oracle"))
    assert oracle.observation_space.shape == (21,)
    for task in oracle.test_tasks()[:2]:
        value = task["velocity"] if name == "halfcheetah-vel" else task["direction"]
        seen, told = maml.make_env(task), oracle.make_env(task)
        a, _ = seen.reset(seed=3)
        b, _ = told.reset(seed=3)
        for action in np.random.default_rng(0).uniform(-1, 1, size=(5, 6)):
            np.testing.assert_array_equal(b, np.append(a, np.float32(value)))
            a, b = seen.step(action)[0], told.step(action)[0]


@pytest.mark.parametrize("noise, qpos_std", [("gymnasium", 0.1 / np.sqrt(3)), ("rllab", 0.01)])
def test_halfcheetah_reset_noise_draws_the_initial_pose_as_named(noise, qpos_std):
    """Joint positions about the nominal pose: gymnasium U(-0.1, 0.1) (std 0.1/sqrt(3)), rllab's
    MujocoEnv N(0, 0.01²); velocities N(0, 0.1²) in both. The observation is the drawn state."""
    env = envs.make("halfcheetah-dir", frame_skip=1, observation="maml", reset_noise=noise)
    env = env.make_env(env.test_tasks()[0])
    sim = env.unwrapped.sim
    qpos, qvel = [], []
    for seed in range(300):
        obs, _ = env.reset(seed=seed)
        qpos.append(sim.data.qpos - sim.init_qpos)
        qvel.append(sim.data.qvel - sim.init_qvel)
        np.testing.assert_allclose(obs[:17], np.concatenate([sim.data.qpos[1:], sim.data.qvel]), atol=1e-6)
    qpos, qvel = np.array(qpos), np.array(qvel)
    assert qpos.std() == pytest.approx(qpos_std, rel=0.1)
    assert qvel.std() == pytest.approx(0.1, rel=0.1)
    if noise == "gymnasium":
        assert np.abs(qpos).max() <= 0.1
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    np.testing.assert_array_equal(a, b)


def test_halfcheetah_options_are_refused_with_what_to_give():
    with pytest.raises(ValueError, match="frame_skip must be a whole number >= 1"):
        envs.make("halfcheetah-vel", frame_skip=0)
    with pytest.raises(ValueError, match="observation must be one of 'gymnasium', 'maml', 'maml-oracle'"):
        envs.make("halfcheetah-dir", observation="rllab")
    with pytest.raises(ValueError, match="reset_noise must be one of 'gymnasium', 'rllab'"):
        envs.make("halfcheetah-vel", reset_noise="rllab-ish")
