"""Meta-World ML1 / ML10 / ML45: splits, hidden goal, task switching, success counting, experts.

The unmarked tests use ML1 on reach-v3 only (one benchmark build of about 3 s); building ML10 and
ML45 and running the experts on 20 held-out goals are marked slow.
"""

from __future__ import annotations

import collections
import pickle
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from envs.metaworld import expert_policy

# Held-out classes as listed in metaworld's env_dict (ML10_V3 / ML45_V3) and the Meta-World paper.
ML10_TEST = {"drawer-open-v3", "door-close-v3", "shelf-place-v3", "sweep-into-v3", "lever-pull-v3"}
ML45_TEST = {"bin-picking-v3", "box-close-v3", "hand-insert-v3", "door-lock-v3", "door-unlock-v3"}


@pytest.fixture(scope="module")
def reach():
    return envs.make("ml1", env_name="reach-v3", horizon=100)


def _goal(env) -> np.ndarray:
    return np.array(env.unwrapped._sim._target_pos)


def _rand_vecs(dist, tasks) -> np.ndarray:
    return np.stack([pickle.loads(dist.task_data(t))["rand_vec"] for t in tasks])


def _run_expert(dist, task, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    env = dist.make_env(task)
    policy = expert_policy(task)
    obs, _ = env.reset(seed=seed)
    infos, observations = [], [obs]
    while True:
        obs, _, terminated, truncated, info = env.step(policy(obs[None])[0])
        infos.append(info)
        observations.append(obs)
        if terminated or truncated:
            return infos, np.stack(observations)


def test_ml1_check_env(reach):
    env = reach.make_env(reach.train_tasks()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_env(env, skip_render_check=True)
    assert env.observation_space.shape == (39,) and env.action_space.shape == (4,)


def test_ml1_split_sizes_and_disjoint_goals(reach):
    train, test = reach.train_tasks(), reach.test_tasks()
    assert len(train) == 50 and len(test) == 50
    assert {t["split"] for t in train} == {"train"} and {t["split"] for t in test} == {"test"}
    train_goals, test_goals = _rand_vecs(reach, train), _rand_vecs(reach, test)
    assert len(np.unique(train_goals, axis=0)) == 50 and len(np.unique(test_goals, axis=0)) == 50
    distances = np.linalg.norm(train_goals[:, None] - test_goals[None], axis=-1)
    assert distances.min() > 1e-6


def test_goal_is_hidden_set_task_changes_it_and_reset_does_not(reach):
    tasks = reach.test_tasks()
    env = reach.make_env(tasks[0])
    obs, _ = env.reset(seed=0)
    goal = _goal(env)
    for _ in range(3):
        obs, *_ = env.step(env.action_space.sample())
        assert not obs[-3:].any()
    for seed in (1, None):
        env.reset(seed=seed)
        np.testing.assert_array_equal(_goal(env), goal)
    reach.set_task(env, tasks[1])
    obs, _ = env.reset()
    assert not np.allclose(_goal(env), goal) and not obs[-3:].any()
    assert env.unwrapped.task == tasks[1]


def test_same_seed_same_tasks_and_observations(reach):
    def first(seed):
        tasks = reach.sample(3, np.random.default_rng(seed))
        env = reach.make_env(tasks[0])
        env.action_space.seed(seed)
        obs = [env.reset(seed=seed)[0]]
        obs += [env.step(env.action_space.sample())[0] for _ in range(99)]
        return tasks, np.stack(obs)

    (tasks_a, obs_a), (tasks_b, obs_b) = first(7), first(7)
    assert tasks_a == tasks_b
    np.testing.assert_array_equal(obs_a, obs_b)


def test_stepping_past_the_horizon_is_refused():
    dist = envs.make("ml1", env_name="reach-v3", horizon=5)
    env = dist.make_env(dist.train_tasks()[0])
    env.reset(seed=0)
    for _ in range(5):
        _, _, terminated, truncated, info = env.step(np.zeros(4, dtype=np.float32))
    assert truncated and not terminated and "episode_success" in info
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(np.zeros(4, dtype=np.float32))


def test_success_is_counted_once_per_episode(reach):
    infos, observations = _run_expert(reach, reach.test_tasks()[0])
    steps = np.array([i["step_success"] for i in infos])
    running = np.array([i["success"] for i in infos])
    assert steps.any(), "the expert should reach this goal within 100 steps"
    np.testing.assert_array_equal(running, np.maximum.accumulate(steps))  # any success so far
    assert [("episode_success" in i) for i in infos] == [False] * (len(infos) - 1) + [True]
    assert infos[-1]["episode_success"] == 1.0
    assert not observations[:, -3:].any()


def test_expert_policy_takes_a_batch(reach):
    task = reach.test_tasks()[2]
    policy = expert_policy(task)
    env = reach.make_env(task)
    obs, _ = env.reset(seed=0)
    actions = policy(np.stack([obs, obs, obs]))
    assert actions.shape == (3, 4) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions[0], policy(obs))
    assert not obs[-3:].any()  # the learner's copy is left hidden


def test_pickled_distribution_carries_task_data(reach):
    reach.task_data(reach.train_tasks()[0])
    back = pickle.loads(pickle.dumps(reach))
    assert back._data is not None
    assert back.task_data(reach.test_tasks()[3]) == reach.task_data(reach.test_tasks()[3])


def test_tasks_from_elsewhere_are_refused(reach):
    other = envs.make("ml1", env_name="push-v3").train_tasks()[0]
    env = reach.make_env(reach.train_tasks()[0])
    with pytest.raises(ValueError, match="does not belong"):
        reach.set_task(env, other)


@pytest.mark.slow
@pytest.mark.parametrize(
    "env_name", ["push-v3", "pick-place-v3", "door-open-v3", "window-close-v3"]
)
def test_ml1_goals_disjoint_for_several_envs(env_name):
    dist = envs.make("ml1", env_name=env_name)
    train, test = _rand_vecs(dist, dist.train_tasks()), _rand_vecs(dist, dist.test_tasks())
    assert np.linalg.norm(train[:, None] - test[None], axis=-1).min() > 1e-6


def test_ml1_batches_draw_goals_uniformly_and_ml10_batches_cover_every_type():
    # ML1: the goal indices of one numpy draw over the 50 goals, as before.
    reach = envs.make("ml1", env_name="reach-v3")
    wanted = np.random.default_rng(5).choice(50, size=20, replace=False)
    assert [t["goal_index"] for t in reach.sample(20, np.random.default_rng(5))] == wanted.tolist()
    # ML10: n // 10 goals of every type, the rest on distinct types; no pair twice while n allows.
    ml10 = envs.make("ml10")
    for n, rng in ((20, 0), (10, 1), (15, 2), (3, 3)):
        tasks = ml10.sample(n, np.random.default_rng(rng))
        per_type = collections.Counter(t["env_name"] for t in tasks)
        assert len(tasks) == n and set(per_type) <= set(ml10.train_names)
        counts = [n // 10 + 1] * (n % 10) + [n // 10] * (10 - n % 10)
        assert sorted(per_type.values()) == sorted(c for c in counts if c)
        assert len({(t["env_name"], t["goal_index"]) for t in tasks}) == n
        assert all(t["split"] == "train" for t in tasks)
    big = ml10.sample(1000, np.random.default_rng(4))
    assert set(collections.Counter(t["env_name"] for t in big).values()) == {100}


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,num_train,test_names", [("ml10", 10, ML10_TEST), ("ml45", 45, ML45_TEST)]
)
def test_ml10_ml45_split(name, num_train, test_names):
    dist = envs.make(name, horizon=20)
    assert set(dist.test_names) == test_names and len(dist.train_names) == num_train
    assert not set(dist.train_names) & test_names
    assert {t["env_name"] for t in dist.test_tasks()} == test_names
    env = dist.make_env(dist.train_tasks()[0])  # builds the benchmark
    for task in (
        dist.test_tasks()[0],
        dist.test_tasks()[60],
        dist.sample(1, np.random.default_rng(0))[0],
    ):
        dist.set_task(env, task)
        obs, _ = env.reset(seed=0)
        for _ in range(3):
            obs, *_ = env.step(env.action_space.sample())
        assert not obs[-3:].any()
        assert type(env.unwrapped._sim).__name__.lower().startswith("sawyer")


@pytest.mark.slow
@pytest.mark.parametrize("env_name", ["reach-v3", "push-v3"])
def test_expert_solves_held_out_goals_with_hidden_goal(env_name):
    dist = envs.make("ml1", env_name=env_name)
    successes = [
        _run_expert(dist, task)[0][-1]["episode_success"] for task in dist.test_tasks()[:10]
    ]
    assert sum(successes) >= 9, successes


@pytest.mark.parametrize("env_name", ["push-v3", "pick-place-v3"])
def test_touching_object_matches_metaworlds_own(env_name):
    """The array version of the grasp test installed on every Sawyer env answers as
    Meta-World's own loop over contacts, on the states of an expert episode (which grasps)."""
    from metaworld.sawyer_xyz_env import SawyerXYZEnv

    dist = envs.make("ml1", env_name=env_name, horizon=150)
    task = dist.train_tasks()[0]
    env = dist.make_env(task)
    act = expert_policy(task)
    obs, _ = env.reset(seed=0)
    sim = env.unwrapped._sim
    assert type(sim).touching_object is not SawyerXYZEnv.touching_object
    answers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expert's "constants may be too high"
        for _ in range(150):
            obs, *_ = env.step(act(obs))
            for geom in (sim._get_id_main_object(), sim.data.geom("leftpad_geom").id):
                ours = sim.touching_object(geom)
                assert ours == bool(SawyerXYZEnv.touching_object(sim, geom))
                answers.append(ours)
    assert any(answers) and not all(answers)


@pytest.mark.parametrize("env_name", ["push-v3", "reach-v3", "door-open-v3"])
def test_object_quaternions_match_scipys_checked_conversion(env_name):
    """The env modules built here convert MuJoCo's orientation matrices with assume_valid=True;
    the reference is scipy's default (checked) conversion of the same states of an expert episode."""
    import sys

    from scipy.spatial.transform import Rotation

    from envs.metaworld import _RotationOfValidMatrix

    if _RotationOfValidMatrix.scipy_rotation() is None:
        pytest.skip("scipy before 1.17 has no assume_valid; nothing is replaced")
    dist = envs.make("ml1", env_name=env_name, horizon=100)
    task = dist.train_tasks()[0]
    env = dist.make_env(task)
    act = expert_policy(task)
    sim = env.unwrapped._sim
    module = sys.modules[type(sim).__module__]
    fast = module.Rotation
    assert fast is not Rotation
    obs, _ = env.reset(seed=0)
    quats = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the expert's "constants may be too high"
        for _ in range(100):
            obs, *_ = env.step(act(obs))
            ours = sim._get_quat_objects()
            module.Rotation = Rotation
            try:
                reference = sim._get_quat_objects()
            finally:
                module.Rotation = fast
            np.testing.assert_array_equal(ours, reference)
            quats.append(ours)
    assert np.ptp(np.array(quats), axis=0).max() > 1e-3  # the objects turned: not one matrix


def test_a_blown_up_orientation_still_raises():
    """assume_valid is used on finite matrices only: a NaN state raises as scipy's checked
    conversion does, rather than passing a NaN quaternion on."""
    from envs.metaworld import _RotationOfValidMatrix

    if _RotationOfValidMatrix.scipy_rotation() is None:
        pytest.skip("scipy before 1.17 has no assume_valid; nothing is replaced")
    np.testing.assert_array_equal(_RotationOfValidMatrix.from_matrix(np.eye(3)).as_quat(), [0, 0, 0, 1])
    with pytest.raises(np.linalg.LinAlgError), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's det of NaN, on the way
        _RotationOfValidMatrix.from_matrix(np.full((3, 3), np.nan))
