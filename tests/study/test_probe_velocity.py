"""experiments/probe_velocity.py reads a velocity-task policy's speed from its observations."""

from __future__ import annotations

import numpy as np

import envs
from experiments.probe_velocity import VELOCITY_INDEX


def test_the_observation_index_it_reads_is_the_forward_velocity_the_reward_uses():
    dist = envs.make("halfcheetah-vel")
    task = dist.test_tasks()[0]
    env = dist.make_env(task)
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        obs, _, _, _, info = env.step(rng.uniform(-1, 1, size=env.action_space.shape))
        assert obs[VELOCITY_INDEX["halfcheetah-vel"]] == np.float32(env.sim.data.qvel[0])
    env.close()
