"""Robustness wrappers: gymnasium's checker, what they record, and their seeding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.wrappers import (
    ActionNoise,
    DynamicsShift,
    ExternalForce,
    NonStationary,
    ObservationNoise,
    interpolate_tasks,
)

WRAPPERS = {
    "nonstationary-episodes": lambda env, dist: NonStationary(env, dist, "episodes", 2),
    "nonstationary-steps": lambda env, dist: NonStationary(env, dist, "steps", 7),
    "nonstationary-drift": lambda env, dist: NonStationary(env, dist, "drift", 10),
    "obs-noise": lambda env, dist: ObservationNoise(env, 0.05),
    "action-noise": lambda env, dist: ActionNoise(env, 0.1, 0.2),
    "external-force": lambda env, dist: ExternalForce(env, 0.5, 0.2, 3),
    "dynamics-shift": lambda env, dist: DynamicsShift(env),
}
MUJOCO_ONLY = {"external-force", "dynamics-shift"}
CASES = [
    (w, f)
    for w in WRAPPERS
    for f in (
        ["hopper-params", "ant-goal"]
        if w in MUJOCO_ONLY
        else ["navigation-2d", "tabular-mdp", "hopper-params"]
    )
]


def _wrapped(wrapper: str, family: str):
    dist = envs.make(family)
    return WRAPPERS[wrapper](dist.make_env(dist.train_tasks()[0]), dist), dist


def _run(env, seed: int, num_steps: int = 60) -> tuple[np.ndarray, list[dict]]:
    env.action_space.seed(seed)
    obs, info = env.reset(seed=seed)
    observations, infos = [obs], [info]
    for _ in range(num_steps):
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        observations.append(obs)
        infos.append(info)
        if terminated or truncated:
            obs, info = env.reset()
            infos.append(info)
    return np.stack(observations), infos


@pytest.mark.parametrize("wrapper,family", CASES)
def test_check_env_and_seeded_determinism(wrapper, family):
    env, _ = _wrapped(wrapper, family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    obs_a, infos_a = _run(env, seed=5)
    obs_b, infos_b = _run(env, seed=5)  # same env, reseeded: the same stream again
    np.testing.assert_array_equal(obs_a, obs_b)
    keys = {k for info in infos_a for k in info if k.startswith("wrapper/")}
    assert keys, f"{wrapper} recorded nothing in info"


def test_nonstationary_episodes_switches_every_period():
    env, dist = _wrapped("nonstationary-episodes", "navigation-2d")
    start = env.unwrapped.task
    _, info = env.reset(seed=0)
    assert env.unwrapped.task == start and info["wrapper/task_switched"] == 0.0
    switched = [env.reset()[1]["wrapper/task_switched"] for _ in range(4)]
    assert switched == [0.0, 1.0, 0.0, 1.0]
    assert env.unwrapped.task != start
    env.reset(seed=0)  # a seeded reset restores the starting task
    assert env.unwrapped.task == start


def test_nonstationary_steps_switches_mid_episode_and_changes_reward():
    env, _ = _wrapped("nonstationary-steps", "navigation-2d")
    env.reset(seed=1)
    goals, flags = [], []
    for _ in range(15):
        _, _, _, _, info = env.step(np.zeros(2, dtype=np.float32))
        goals.append(env.unwrapped.task["goal"])
        flags.append(info["wrapper/task_switched"])
    assert flags.index(1.0) == 7 and flags[14] == 1.0 and sum(flags) == 2
    assert len(set(goals)) == 3


def test_nonstationary_drift_moves_linearly_to_the_next_task():
    env, dist = _wrapped("nonstationary-drift", "navigation-2d")
    env.reset(seed=2)
    start = np.array(env.unwrapped.task["goal"])
    goals = []
    for _ in range(10):
        env.step(np.zeros(2, dtype=np.float32))
        goals.append(np.array(env.unwrapped.task["goal"]))
    steps = np.diff(np.stack([start] + goals), axis=0)
    np.testing.assert_allclose(steps, np.broadcast_to(steps[0], steps.shape), atol=1e-12)
    assert np.linalg.norm(steps[0]) > 0


def test_drift_refuses_non_float_parameters():
    a = envs.Task.make("ml1", env_name="reach-v3", goal_index=1, split="train", seed=0)
    b = envs.Task.make("ml1", env_name="reach-v3", goal_index=2, split="train", seed=0)
    with pytest.raises(ValueError, match="goal_index"):
        interpolate_tasks(a, b, 0.5)


def test_observation_noise_has_the_stated_std():
    env, _ = _wrapped("obs-noise", "navigation-2d")
    observations = np.stack([env.reset(seed=s)[0] for s in range(2000)])  # the clean reset obs is 0
    assert observations.std() == pytest.approx(0.05, rel=0.05)


def test_external_force_pushes_through_xfrc_applied():
    env, _ = _wrapped("external-force", "hopper-params")
    env.reset(seed=0)
    data = env.unwrapped.mujoco_data
    seen = []
    for _ in range(50):
        _, _, terminated, truncated, info = env.step(np.zeros(3, dtype=np.float32))
        seen.append(np.linalg.norm(info["wrapper/force"]))
        if terminated or truncated:
            break
    assert max(seen) > 0
    model = env.unwrapped.mujoco_model
    expected = 0.5 * model.body_mass.sum() * np.linalg.norm(model.opt.gravity)
    assert max(seen) == pytest.approx(expected)
    env.reset()
    assert not data.xfrc_applied.any()


def test_dynamics_shift_does_not_compound():
    env, dist = _wrapped("dynamics-shift", "hopper-params")
    model = env.unwrapped.mujoco_model
    dist.set_task(env, dist.train_tasks()[0])
    base_mass, base_friction = model.body_mass.copy(), model.geom_friction.copy()
    for seed in range(3):
        _, info = env.reset(seed=seed)
        np.testing.assert_allclose(model.body_mass, base_mass * info["wrapper/mass_scale"])
        np.testing.assert_allclose(
            model.geom_friction, base_friction * info["wrapper/friction_scale"]
        )
    dist.set_task(env, dist.train_tasks()[1])  # a task rewrite becomes the new base
    new_base = model.body_mass.copy()
    _, info = env.reset(seed=9)
    np.testing.assert_allclose(model.body_mass, new_base * info["wrapper/mass_scale"])


def test_mujoco_wrappers_refuse_other_families():
    dist = envs.make("navigation-2d")
    with pytest.raises(TypeError, match="MuJoCo family"):
        ExternalForce(dist.make_env(dist.train_tasks()[0]))


def test_wrappers_compose():
    dist = envs.make("halfcheetah-vel")
    env = dist.make_env(dist.train_tasks()[0])
    env = ObservationNoise(
        ActionNoise(DynamicsShift(ExternalForce(NonStationary(env, dist, "steps", 20)))), 0.01
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    _, infos = _run(env, seed=0, num_steps=50)
    keys = set().union(*infos)
    assert {
        "wrapper/task_switched",
        "wrapper/force",
        "wrapper/mass_scale",
        "wrapper/action_noise_std",
        "wrapper/obs_noise_std",
    } <= keys


def test_perturbed_family_wraps_every_env_and_keeps_tasks_and_splits():
    from gymnasium.utils.env_checker import check_env

    from envs.wrappers import ObservationNoise, Perturbed

    base = envs.make("navigation-2d", horizon=10)
    family = Perturbed(base, [("observation_noise", {"std": 0.5})])
    assert family.test_tasks() == base.test_tasks() and family.horizon == 10
    task, other = base.test_tasks()[:2]
    env, plain = family.make_env(task), base.make_env(task)
    assert isinstance(env, ObservationNoise)
    check_env(env, skip_render_check=True)
    noisy, _ = env.reset(seed=0)
    clean, _ = plain.reset(seed=0)
    assert not np.allclose(noisy, clean)  # the origin plus noise of std 0.5
    family.set_task(env, other)
    assert env.unwrapped.task == other
    with pytest.raises(ValueError, match="unknown wrapper"):
        Perturbed(base, [("gravity", {})])
