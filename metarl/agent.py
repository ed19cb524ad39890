"""The agent contract: what the runner, the evaluation and the results tables may rely on.

Every meta-RL agent in ``agents/`` and every few-shot learner in :mod:`metarl.fewshot` meets
:class:`Agent`; ``tests/test_agent_contract.py`` builds each registered one from its default
config and checks it. The runner calls only these members, never ``getattr`` guesses.

An agent is built as ``cls(config, distribution, seed)`` and then driven by the runner::

    metrics = agent.step(distribution.sample(agent.meta_batch_size, rng))   # one meta-iteration
    result = agent.evaluate(held_out_tasks, rng)                            # adaptation curves
    state = agent.state_dict(); agent.load_state_dict(state)                # checkpoint / resume
    state = agent.portable_state_dict()  # optional (PortableState): the state without its data
    agent.close()                                                           # workers, files

Class attributes say what the reports need to know about an agent without knowing its name:

* ``family``: the meta-learning family, one of :data:`FAMILIES`.
* ``adaptation_unit``: what one step of adaptation on a new task is, one of :data:`UNITS`.
  Step ``k`` of :meth:`Agent.evaluate`'s curves is ``k`` of these units.
* ``scores_tasks_independently``: whether ``evaluate`` on a list of tasks equals ``evaluate`` on
  each part of it concatenated (so a long scoring may be saved and resumed in chunks).
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from metarl.types import Params

__all__ = ["FAMILIES", "UNITS", "Agent", "EvalResult", "Params", "PortableState", "check_agent"]

EvalResult = dict[str, Any]
"""What :meth:`Agent.evaluate` returns: ``adaptation_steps`` (a list of ints, step 0 being before
any adaptation) and, for each metric (``return``, ``success``, ``loss``, ``accuracy``, ...), an
array ``[num_tasks, len(adaptation_steps)]`` of per-task scores; optional extra keys (e.g.
``baselines``) are reported as they are."""

FAMILIES = ("gradient", "metric", "model-based", "Bayesian", "optimization")
UNITS = (
    "gradient step",  # one inner gradient step on the support set
    "policy-gradient step",  # one inner policy-gradient step on a batch of episodes
    "episode",  # one episode of experience of the task (RL², PEARL)
    "support set",  # the whole support set at once, no steps (metric learners)
    "memory read",  # the support set read into an external memory (MANN)
)


@runtime_checkable
class Agent(Protocol):
    """A meta-learner the runner can train, evaluate, checkpoint and close."""

    Config: ClassVar[type]
    """Its settings: a frozen dataclass, every field documented, checked in ``__post_init__``."""
    family: ClassVar[str]
    adaptation_unit: ClassVar[str]
    scores_tasks_independently: ClassVar[bool]

    config: Any

    @property
    def meta_batch_size(self) -> int:
        """Tasks the runner samples for each :meth:`step`."""
        ...

    def step(self, tasks: list[Any]) -> dict[str, float]:
        """One meta-iteration on ``tasks``; returns namespaced metrics and logs nothing itself."""
        ...

    def evaluate(self, tasks: list[Any], rng: np.random.Generator) -> EvalResult:
        """Adaptation on held-out ``tasks``, scored after each step of :data:`EvalResult`."""
        ...

    def adapt(self, task: Any, data: Any) -> Any:
        """What the agent adapts to ``task`` from ``data`` (its own kind of experience: a support
        set, trajectories or trials): adapted parameters, a context, a memory or a state."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly (parameters, optimisers, RNGs)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Releases what the agent holds (worker processes, environments); idempotent."""
        ...


@runtime_checkable
class PortableState(Protocol):
    """An agent whose state holds data it can collect again (PEARL's replay buffers, hundreds of
    MB on Meta-World): besides ``checkpoint.pt`` the runner then saves ``checkpoint.portable.pt``,
    the state without that data, small enough to keep in a repository. A run directory without
    ``checkpoint.pt`` resumes from it, and says so (:class:`metarl.experiment.Experiment`)."""

    def portable_state_dict(self) -> dict[str, Any]:
        """:meth:`Agent.state_dict` without the collected data. :meth:`Agent.load_state_dict`
        takes it and the agent collects data again with its current policy (PEARL: as many
        transitions per task as its replay held); the run then goes on from where it was, but not
        exactly as it would have."""
        ...


def check_agent(cls: type) -> None:
    """Raises ``TypeError`` naming what ``cls`` lacks of the contract (its class attributes and
    methods); the values of ``family`` and ``adaptation_unit`` must be among the known ones."""
    missing = [
        name
        for name in ("Config", "family", "adaptation_unit", "scores_tasks_independently", "meta_batch_size",
                     "step", "evaluate", "adapt", "state_dict", "load_state_dict", "close")
        if not hasattr(cls, name)
    ]
    if missing:
        raise TypeError(f"{cls.__module__}.{cls.__name__} does not meet metarl.agent.Agent: lacks {missing}")
    if cls.family not in FAMILIES:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__}.family = {cls.family!r}; expected one of {FAMILIES}")  # type: ignore[attr-defined]
    if cls.adaptation_unit not in UNITS:  # type: ignore[attr-defined]
        raise TypeError(
            f"{cls.__name__}.adaptation_unit = {cls.adaptation_unit!r}; expected one of {UNITS}"  # type: ignore[attr-defined]
        )
