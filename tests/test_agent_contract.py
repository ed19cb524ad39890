"""Every registered agent and few-shot learner meets the written contract of ``metarl.agent``,
built from its default config on a distribution it serves."""

from __future__ import annotations

import dataclasses

import pytest

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
