"""The task contract every family implements.

A :class:`Task` is an immutable, JSON-serialisable value: a family name plus its
parameters. A :class:`TaskDistribution` samples tasks, gives the benchmark's
train/test split where one is defined, builds environments for tasks and
re-points a built environment to another task without rebuilding it.

A task never changes on ``reset()``: only an explicit ``set_task`` changes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np


def _freeze(value: Any) -> Any:
    """Turns lists and arrays into tuples so that a task stays hashable."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise TypeError(
        f"task parameter {value!r} of type {type(value).__name__} is not JSON-serialisable; "
        "use numbers, strings, or (nested) tuples of them"
    )


def _flatten_numbers(value: Any) -> list[float]:
    if isinstance(value, bool):
        return [float(value)]
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, tuple):
        out: list[float] = []
        for v in value:
            out.extend(_flatten_numbers(v))
        return out
    return []


@dataclass(frozen=True)
class Task:
    """One task: a family name and sorted ``(name, value)`` parameter pairs.

    Build it with :meth:`Task.make` (``Task.make("navigation-2d", goal=(0.3, -0.1))``),
    read a parameter with ``task["goal"]``.
    """

    family: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, family: str, **params: Any) -> Task:
        return cls(family, tuple(sorted((k, _freeze(v)) for k, v in params.items())))

    def __getitem__(self, key: str) -> Any:
        for k, v in self.params:
            if k == key:
                return v
        raise KeyError(f"task of family {self.family!r} has no parameter {key!r}; it has {self.keys()}")

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def keys(self) -> list[str]:
        return [k for k, _ in self.params]

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "params": {k: v for k, v in self.params}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Task:
        return cls.make(data["family"], **data.get("params", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Task:
        return cls.from_dict(json.loads(text))

    def vector(self) -> np.ndarray:
        """All numeric parameters, flattened in key order: the task's values in Trajectories."""
        out: list[float] = []
        for _, v in self.params:
            out.extend(_flatten_numbers(v))
        return np.asarray(out, dtype=np.float32)


class TaskDistribution:
    """Base of every task family. Subclasses set the class attributes and the methods.

    Attributes:
        name: registry name of the family (``"navigation-2d"``).
        horizon: the fixed episode length used by samplers.
        observation_space, action_space: identical for every task of the family.
    """

    name: str = ""
    horizon: int = 0
    observation_space: gym.Space
    action_space: gym.Space

    def sample(self, n: int, rng: np.random.Generator) -> list[Task]:
        """Draws ``n`` tasks from the training distribution."""
        raise NotImplementedError

    def train_tasks(self) -> list[Task]:
        """The benchmark's training tasks (a fixed, seeded set where the paper defines none)."""
        raise NotImplementedError

    def test_tasks(self) -> list[Task]:
        """The benchmark's held-out tasks, disjoint from :meth:`train_tasks`."""
        raise NotImplementedError

    def make_env(self, task: Task) -> gym.Env:
        """Builds an environment fixed on ``task``."""
        raise NotImplementedError

    def set_task(self, env: gym.Env, task: Task) -> None:
        """Re-points an environment built by :meth:`make_env` at ``task`` without rebuilding it."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """A summary for ``metarl list envs``."""
        return {
            "name": self.name,
            "horizon": self.horizon,
            "observation_space": str(self.observation_space),
            "action_space": str(self.action_space),
        }


def check_whole(family: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is a whole number >= ``minimum`` (a horizon, a count, a seed); else a
    ``ValueError`` naming the family, the parameter and the value."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{family}: {name}={value!r} must be a whole number >= {minimum}")
    return int(value)


def seeded_split(
    sample: Callable[[int, np.random.Generator], list[Task]],
    num_train: int,
    num_test: int,
    seed: int,
) -> tuple[list[Task], list[Task]]:
    """Draws a fixed train set and a fixed, disjoint test set from two seeded streams.

    Args:
        sample: the family's ``sample(n, rng)``.
        num_train: number of training tasks.
        num_test: number of held-out tasks.
        seed: the split seed; train uses stream ``(seed, 0)``, test stream ``(seed, 1)``.

    Returns:
        ``(train, test)`` lists of tasks with no task in both.

    Raises:
        ValueError: if a size is not positive, or the two sets share a task (a family with
            finitely many tasks must define its split itself).
    """
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1 for n in (num_train, num_test)):
        raise ValueError(f"num_train={num_train!r} and num_test={num_test!r} must both be whole numbers >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"split seed={seed!r} must be a whole number >= 0")
    train = sample(num_train, np.random.default_rng([seed, 0]))
    test = sample(num_test, np.random.default_rng([seed, 1]))
    shared = set(train) & set(test)
    if shared:
        raise ValueError(
            f"{len(shared)} task(s) drawn for both train and test (e.g. {next(iter(shared))}); "
            "this family has too few distinct tasks for a random split: define the split explicitly"
        )
    return train, test


class EpisodeClock:
    """Counts the steps of one episode, truncates at the horizon and refuses to step past the end.

    Used by composition in every environment of the package, so that all families share one
    rule: after ``terminated`` or ``truncated`` the next call must be ``reset()``.
    """

    def __init__(self, horizon: int, family: str) -> None:
        self.horizon = check_whole(family, "horizon", horizon)
        self.family = family
        self.t = 0
        self._ended = True

    def start(self) -> None:
        """Marks the start of an episode (called by ``reset``)."""
        self.t = 0
        self._ended = False

    def check(self) -> None:
        """Raises before a step that would go past the end of the episode.

        Raises:
            RuntimeError: if the episode has not been reset or has already ended.
        """
        if self._ended:
            where = "before the first reset()" if self.t == 0 else f"after the episode ended at step {self.t}"
            raise RuntimeError(
                f"{self.family}: step() called {where} (horizon {self.horizon}); call reset() first"
            )

    def tick(self, terminated: bool) -> bool:
        """Advances one step and returns ``truncated`` (horizon reached and not terminated)."""
        self.t += 1
        truncated = self.t >= self.horizon and not terminated
        self._ended = terminated or truncated
        return truncated
