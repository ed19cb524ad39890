"""Evaluation over many held-out tasks keeps no more environments per worker than the agent's
per-iteration training call, where the config keeps one environment per episode
(``envs_per_worker = 0``): 50 Meta-World tasks × 10 episodes at once held 500 environments,
about 12 GB. The episodes run in turns and, seeded one by one, score as when all are held."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import envs
from agents.maml_trpo import MAMLTRPO, MAMLTRPOConfig
from agents.meta_imitation import MetaImitation, MetaImitationConfig
from agents.pearl import PEARL, PEARLConfig
from metarl import meta_pg
from metarl.rollout import worker as rollout_worker

# Each agent with its training call's environments per worker (the cap, worked out by hand) and,
# on 6 held-out tasks, the environments an evaluation holding all its episodes at once builds.
CASES = {
    # a call is 2 tasks × 2 episodes = 4; evaluation 6 tasks × 3 episodes = 18
    "maml-trpo": (MAMLTRPO, MAMLTRPOConfig(meta_batch_size=2, episodes_per_task=2, hidden_sizes=(8,),
                                           eval_adapt_steps=1, eval_episodes_per_task=3), 4, 18),
    # 2 of the 4 tasks collect, the larger of 1 prior and 2 posterior episodes each: 2 × 2 = 4
    # (a sum would give 6, a product or the prior alone 2); 6 tasks × 3 runs = 18
    "pearl": (PEARL, PEARLConfig(meta_batch_size=4, num_collect_tasks=2, num_prior_episodes=1,
                                 num_posterior_episodes=2, num_train_steps=1, batch_size=8,
                                 context_batch_size=4, hidden_sizes=(8,), encoder_hidden_sizes=(8,),
                                 eval_adapt_steps=2, eval_episodes_per_task=3,
                                 eval_deterministic=False), 4, 18),
    # a call is 3 tasks × 2 episodes = 6 (the 3 evaluation episodes would give 9); 6 tasks × 3 = 18
    "meta-imitation": (MetaImitation, MetaImitationConfig(meta_batch_size=3, episodes_per_task=2,
                                                          hidden_sizes=(8,), eval_adapt_steps=1,
                                                          eval_episodes_per_task=3, eval_ablations=False,
                                                          eval_bc_baselines=False, num_pretrain_tasks=4),
                       6, 18),
}


@pytest.fixture
def built(monkeypatch) -> list[int]:
    """The environment count of every rollout worker closed while the test runs."""
    counts: list[int] = []
    real_close = rollout_worker.RolloutWorker.close

    def recording_close(self):
        counts.append(self.num_envs)
        real_close(self)

    monkeypatch.setattr(rollout_worker.RolloutWorker, "close", recording_close)
    return counts


def _evaluate(cls, config, distribution, built: list[int]) -> tuple[np.ndarray, list[int]]:
    agent = cls(config, distribution, 0)
    try:
        built.clear()
        scores = agent.evaluate(distribution.test_tasks(), np.random.default_rng(0))["return"]
        return scores, list(built)
    finally:
        agent.close()


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluation_keeps_a_training_calls_environments_and_scores_the_same(name, built, monkeypatch):
    cls, config, cap, everything = CASES[name]
    assert config.envs_per_worker == 0 and config.backend == "serial"
    distribution = envs.make("navigation-2d", horizon=10, num_test=6)
    capped, capped_built = _evaluate(cls, config, distribution, built)
    # the evaluation as it was: one environment per episode, all at once
    real = meta_pg.make_agent_sampler
    monkeypatch.setattr(meta_pg, "make_agent_sampler",
                        lambda cfg, family, seed, call_episodes=None: real(cfg, family, seed))
    uncapped, uncapped_built = _evaluate(cls, config, distribution, built)
    assert (capped_built, uncapped_built) == ([cap], [everything])
    np.testing.assert_allclose(capped, uncapped, rtol=1e-5)


def test_the_serial_backend_is_one_worker_whatever_num_workers_says(built):
    # a training call of 2 tasks × 2 episodes runs in one process: its share is all 4
    cls, config, cap, _ = CASES["maml-trpo"]
    config = dataclasses.replace(config, num_workers=2)
    distribution = envs.make("navigation-2d", horizon=10, num_test=6)
    assert _evaluate(cls, config, distribution, built)[1] == [cap]


@pytest.mark.parametrize(
    ("backend", "workers", "envs_per_worker", "kept"),
    [
        ("process", 2, 0, 4),  # 7 episodes over 2 workers: at most ceil(7 / 2) = 4 each
        ("process", 3, 0, 3),  # ceil(7 / 3) = 3
        ("serial", 3, 0, 7),  # one worker holds the whole call
        ("process", 2, 5, 5),  # a config's own envs_per_worker is kept as it is
    ],
)
def test_each_worker_keeps_its_share_of_the_call(monkeypatch, backend, workers, envs_per_worker, kept):
    import metarl.rollout

    asked: dict = {}
    monkeypatch.setattr(metarl.rollout, "make_sampler", lambda family, **kw: asked.update(kw))
    config = MAMLTRPOConfig(backend=backend, num_workers=workers, envs_per_worker=envs_per_worker)
    meta_pg.make_agent_sampler(config, None, 0, call_episodes=7)
    assert asked["envs_per_worker"] == kept
    meta_pg.make_agent_sampler(config, None, 0)  # no call given: one environment per episode
    assert asked["envs_per_worker"] == (envs_per_worker or None)
