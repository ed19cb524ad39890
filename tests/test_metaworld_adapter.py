"""The MetaLearningAgent adapter: episodes it builds from vector steps, by hand; Meta-World's own loop runs it."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from metarl.metaworld_eval import MetaLearningAdapter
from metarl.policies import GaussianMLPPolicy


class RecordingAgent:
    def __init__(self) -> None:
        self.policy = GaussianMLPPolicy(3, 2, hidden_sizes=(4,))
        self.params = self.policy.init_params(0)
        self.seen: list = []

    def adapt(self, task, trajectories, params):
        self.seen.append(trajectories)
        return {k: v + 1.0 for k, v in params.items()}


def _timestep(obs, reward, terminated, truncated):
    return SimpleNamespace(
        observation=np.asarray(obs, dtype=np.float64), action=np.ones((2, 2)) * np.asarray(reward)[:, None],
        reward=np.asarray(reward, dtype=np.float64), terminated=np.asarray(terminated),
        truncated=np.asarray(truncated), aux_policy_outputs={"log_probs": -np.asarray(reward, dtype=np.float64)},
    )


def test_adapter_builds_masked_episodes_by_hand_and_adapts_each_env():
    agent = RecordingAgent()
    adapter = MetaLearningAdapter(agent, num_envs=2)
    # env 0: an episode of 2 steps that terminates, then one of 3 steps that is truncated;
    # env 1: one episode of 5 steps, truncated.
    rewards = [[1, 10], [2, 20], [3, 30], [4, 40], [5, 50]]
    terminated = [[0, 0], [1, 0], [0, 0], [0, 0], [0, 0]]
    truncated = [[0, 0], [0, 0], [0, 0], [0, 0], [1, 1]]
    for t in range(5):
        obs = [[t, 0, 0], [t, 1, 1]]
        adapter.step(_timestep(obs, rewards[t], terminated[t], truncated[t]))
    traj0 = adapter.trajectories(0)
    assert traj0.obs.shape == (1, 2, 3, 3)
    assert traj0.mask[0].tolist() == [[1, 1, 0], [1, 1, 1]]
    assert traj0.episode_returns()[0].tolist() == [1 + 2, 3 + 4 + 5]
    assert traj0.terminated[0].tolist() == [[0, 1, 0], [0, 0, 0]]
    assert traj0.log_probs[0, 1].tolist() == [-3, -4, -5]
    assert traj0.obs[0, 1, :, 0].tolist() == [2, 3, 4]
    assert traj0.next_obs[0, 1, :, 0].tolist() == [3, 4, 4]  # the last step repeats its own obs
    traj1 = adapter.trajectories(1)
    assert traj1.obs.shape == (1, 1, 5, 3) and traj1.episode_returns()[0].tolist() == [150]
    adapter.adapt()
    assert len(agent.seen) == 2
    for params in adapter.params:
        assert torch.equal(params["log_std"], agent.params["log_std"] + 1.0)
    adapter.init()
    assert torch.equal(adapter.params[0]["log_std"], agent.params["log_std"])


def test_adapter_actions_explore_in_adaptation_and_take_the_mean_in_evaluation():
    agent = RecordingAgent()
    adapter = MetaLearningAdapter(agent, num_envs=2, seed=0)
    obs = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    mean = agent.policy.distribution_params(agent.params, torch.as_tensor(obs, dtype=torch.float32))[0]
    assert np.allclose(adapter.eval_action(obs), mean.numpy(), atol=1e-6)
    actions, aux = adapter.adapt_action(obs)
    assert actions.shape == (2, 2) and aux["log_probs"].shape == (2,)
    assert not np.allclose(actions, mean.numpy())
    with pytest.raises(ValueError, match="finished no episode"):
        adapter.adapt()


@pytest.mark.slow
def test_metaworlds_own_meta_evaluation_runs_a_metarl_agent():
    import envs
    from agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig
    from metarl.metaworld_eval import crosscheck

    dist = envs.make("ml1", env_name="reach-v3")
    agent = MAMLTRPO(MAMLTRPOConfig(hidden_sizes=(16, 16), meta_batch_size=2), dist, seed=0)
    try:
        result = crosscheck(agent, "reach-v3", meta_batch_size=2, num_evals=1, adaptation_episodes=1,
                            evaluation_episodes=1)
    finally:
        agent.close()
    assert 0.0 <= result["success_rate"] <= 1.0 and np.isfinite(result["mean_return"])
    assert set(result["success_per_task"]) == {"reach-v3"}
