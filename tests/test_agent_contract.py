"""Every registered agent and few-shot learner meets the written contract of ``metarl.agent``,
built from its default config on a distribution it serves."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metarl.agent import FAMILIES, UNITS, Agent, check_agent
from metarl.config import field_docs
from metarl.registry import discover_agents, make_distribution

AGENTS = discover_agents()
# a small distribution each agent serves: few-shot learners on sinusoid or Omniglot, RL on 2D navigation
OMNIGLOT = {"name": "omniglot", "num_ways": 5, "subset": "minimal", "channels": 4, "num_test_tasks": 2}
SINUSOID = {"name": "sinusoid", "num_test_tasks": 2}
NAV = {"name": "navigation-2d", "horizon": 5, "num_test": 2}
TASKS = {
    "metarl.fewshot.maml:GradientLearner": SINUSOID,
    "metarl.fewshot.learned_opt:LearnedOptimizerLearner": SINUSOID,
    "metarl.fewshot.prob_maml:ProbabilisticMAML": SINUSOID,
    "metarl.fewshot.mann:MemoryAugmentedNetwork": SINUSOID,
    "metarl.fewshot.protonet:PrototypicalNetwork": OMNIGLOT,
    "metarl.fewshot.matchingnet:MatchingNetwork": OMNIGLOT,
}


def test_every_registered_agent_is_known_here():
    assert set(TASKS) <= set(AGENTS)
    assert {p for p in AGENTS if p.startswith("agents.")} == {
        "agents.maml_ppo:MAMLPPO", "agents.maml_trpo:MAMLTRPO", "agents.meta_imitation:MetaImitation",
        "agents.pearl:PEARL", "agents.rl2:RL2", "agents.task_generator:TaskGenerator",
    }


@pytest.mark.parametrize("path", sorted(AGENTS))
def test_agent_class_meets_the_contract(path):
    cls = AGENTS[path]
    check_agent(cls)
    assert cls.family in FAMILIES and cls.adaptation_unit in UNITS
    assert isinstance(cls.scores_tasks_independently, bool)
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    cls.Config()  # every field has a default that passes __post_init__
    docs = field_docs(cls.Config)
    assert [f.name for f in dataclasses.fields(cls.Config) if not docs.get(f.name)] == []


@pytest.mark.parametrize("path", sorted(AGENTS))
def test_agent_built_from_its_default_config_is_an_agent(path, shared_data_dir):
    cls = AGENTS[path]
    if path == "agents.task_generator:TaskGenerator":
        params = {"name": "navigation-2d-wind", "horizon": 5, "num_test": 2}
    else:
        params = dict(TASKS.get(path, NAV))
    if params["name"] == "omniglot":
        params["data_dir"] = str(shared_data_dir)
    name = params.pop("name")
    try:
        distribution = make_distribution(name, **params)
    except Exception as e:  # noqa: BLE001 - the test names which distribution it could not build
        pytest.fail(f"{name} {params}: {e}")
    agent = cls(cls.Config(), distribution, 0)
    try:
        assert isinstance(agent, Agent)
        assert agent.meta_batch_size >= 1
        state = agent.state_dict()
        agent.load_state_dict(state)
    finally:
        agent.close()
        agent.close()  # idempotent


def test_rl2_adapts_in_the_gru_state_it_reaches_step_by_step():
    """RL²'s adapt is the hidden state after its live steps, equal to stepping the GRU by hand."""
    import envs
    from agents.rl2 import RL2, RL2Config

    dist = envs.make("navigation-2d", horizon=5)
    agent = RL2(RL2Config(meta_batch_size=1, num_minibatches=1, episodes_per_trial=2, hidden_size=8), dist, seed=0)
    task = dist.sample(1, np.random.default_rng(0))[0]
    trials = agent.runner.run(agent.policy, [task], 2, seed=0)
    hidden = agent.adapt(task, trials)
    h = agent.policy.initial_state(1)
    with torch.no_grad():
        for e in range(trials.mask.shape[1]):
            for t in range(trials.mask.shape[2]):
                if trials.mask[0, e, t]:
                    _, h = agent.policy.step(trials.inputs[0, e, t][None], h)
    agent.close()
    assert hidden.shape == (8,)
    torch.testing.assert_close(hidden, h[0])


def test_metric_learner_adapts_by_keeping_its_support_set(shared_data_dir):
    from metarl.fewshot.protonet import PrototypicalNetwork

    params = {k: v for k, v in OMNIGLOT.items() if k != "name"}
    dist = make_distribution("omniglot", data_dir=str(shared_data_dir), **params)
    learner = PrototypicalNetwork(PrototypicalNetwork.Config(), dist, 0)
    x, y = torch.rand(10, 1, 28, 28), torch.arange(5).repeat_interleave(2)
    kept = learner.adapt(None, (x, y))
    query = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(
        learner.class_scores(kept["support_x"], kept["support_y"], query), learner.class_scores(x, y, query)
    )
