"""Registry, Task values, describe() and the cost of importing the package."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import pytest

import envs
from envs.base import Task

CLASSIC = [n for n in envs.names() if not n.startswith("ml")]


def test_names_lists_every_family():
    expected = {
        "navigation-2d",
        "navigation-2d-wind",
        "halfcheetah-vel",
        "halfcheetah-dir",
        "halfcheetah-vel-mass",
        "ant-dir",
        "ant-dir-2d",
        "ant-goal",
        "hopper-params",
        "walker-params",
        "bandit",
        "tabular-mdp",
        "ml1",
        "ml10",
        "ml45",
    }
    assert set(envs.names()) == expected
    assert envs.names() == sorted(envs.names())


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown env family 'nope'.*navigation-2d"):
        envs.make("nope")


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"no parameter\(s\) 'speed'.*valid parameters: horizon"):
        envs.make("navigation-2d", speed=3)
    with pytest.raises(TypeError):  # also a TypeError, as Python raises for bad keywords
        envs.make("bandit", arms=3)


def test_bad_parameter_values_are_refused():
    with pytest.raises(ValueError, match="wind_scale"):
        envs.make("navigation-2d-wind", wind_scale=0.0)
    with pytest.raises(ValueError, match="horizon"):
        envs.make("ml1", env_name="reach-v3", horizon=501)
    with pytest.raises(ValueError, match="unknown env_name 'reach-v2'"):
        envs.make("ml1", env_name="reach-v2")


@pytest.mark.parametrize("name", CLASSIC)
def test_task_json_round_trip(name):
    dist = envs.make(name)
    for task in dist.sample(3, np.random.default_rng(0)) + dist.test_tasks()[:2]:
        text = task.to_json()
        back = Task.from_json(text)
        assert back == task and hash(back) == hash(task)
        assert json.loads(text)["family"] == name
        np.testing.assert_array_equal(back.vector(), task.vector())


def test_metaworld_task_json_round_trip_without_building():
    dist = envs.make("ml10")
    (task,) = [
        t for t in dist.test_tasks() if t["env_name"] == "drawer-open-v3" and t["goal_index"] == 7
    ]
    assert Task.from_json(task.to_json()) == task
    assert task.to_dict()["params"] == {
        "env_name": "drawer-open-v3",
        "goal_index": 7,
        "seed": 0,
        "split": "test",
    }


@pytest.mark.parametrize("name", ["ml10", "ml45"])
def test_metaworld_task_prefixes_cover_every_type(name):
    # eval.num_tasks keeps a prefix of test_tasks(): a prefix as long as the type list must hold
    # every type once, and the whole list every (type, goal) pair once.
    dist = envs.make(name)
    for tasks, names in ((dist.test_tasks(), dist.test_names), (dist.train_tasks(), dist.train_names)):
        k = len(names)
        assert sorted(t["env_name"] for t in tasks[:k]) == sorted(names)
        assert sorted(t["env_name"] for t in tasks[k : 2 * k]) == sorted(names)
        pairs = {(t["env_name"], t["goal_index"]) for t in tasks}
        assert len(pairs) == len(tasks) == 50 * k


@pytest.mark.parametrize("name", envs.names())
def test_describe_gives_split_sizes_and_params(name):
    info = envs.make(name).describe()
    assert info["name"] == name
    assert info["num_train"] > 0 and info["num_test"] > 0
    assert "params" in info and "source" in info
    json.dumps(info, default=str)


def test_describe_of_ml45_does_not_build_the_benchmark():
    from envs import metaworld as mw

    built_before = set(mw._TASK_DATA)  # another test in the same process may have built ML45
    dist = envs.make("ml45")
    info = dist.describe()
    assert info["num_train"] == 45 * 50 and info["num_test"] == 5 * 50
    assert dist._data is None and set(mw._TASK_DATA) == built_before


@pytest.mark.parametrize("name", CLASSIC)
def test_distribution_pickles(name):
    dist = envs.make(name)
    back = pickle.loads(pickle.dumps(dist))
    assert back.train_tasks() == dist.train_tasks()


def test_import_is_cheap_and_lazy():
    code = "import sys, envs; envs.names(); print(sorted(m for m in ('mujoco', 'metaworld') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_envs_imports_nothing_from_upper_layers():
    code = "import sys, envs, envs.wrappers; print([m for m in sys.modules if m.split('.')[0] in ('metarl', 'agents')])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
