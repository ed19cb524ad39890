"""Task distributions for meta-RL: ``envs.make(name, **params)`` and ``envs.names()``.

Importing this package is cheap: a family's module (and MuJoCo or Meta-World) is imported only
when that family is made.

Example:
    >>> import envs, numpy as np
    >>> dist = envs.make("navigation-2d")
    >>> task = dist.sample(1, np.random.default_rng(0))[0]
    >>> env = dist.make_env(task)
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from envs.base import EpisodeClock, Task, TaskDistribution, seeded_split

__all__ = [
    "EpisodeClock",
    "Task",
    "TaskDistribution",
    "UnknownParameterError",
    "make",
    "names",
    "parameters",
    "seeded_split",
]

# name -> "module:factory"; a factory takes the family's keyword parameters.
_REGISTRY: dict[str, str] = {
    "navigation-2d": "envs.navigation:Navigation2D",
    "navigation-2d-wind": "envs.navigation:navigation_2d_wind",
    "halfcheetah-vel": "envs.mujoco_tasks:halfcheetah_vel",
    "halfcheetah-dir": "envs.mujoco_tasks:halfcheetah_dir",
    "halfcheetah-vel-mass": "envs.mujoco_tasks:halfcheetah_vel_mass",
    "ant-dir": "envs.mujoco_tasks:ant_dir",
    "ant-dir-2d": "envs.mujoco_tasks:ant_dir_2d",
    "ant-goal": "envs.mujoco_tasks:ant_goal",
    "hopper-params": "envs.rand_params:hopper_params",
    "walker-params": "envs.rand_params:walker_params",
    "bandit": "envs.tabular:Bandit",
    "tabular-mdp": "envs.tabular:TabularMDP",
    "ml1": "envs.metaworld:ml1",
    "ml10": "envs.metaworld:ml10",
    "ml45": "envs.metaworld:ml45",
}


class UnknownParameterError(TypeError, ValueError):
    """A keyword parameter the family does not take (both a TypeError and a ValueError)."""


def names() -> list[str]:
    """The registered family names, sorted."""
    return sorted(_REGISTRY)


def _factory(name: str) -> Callable[..., TaskDistribution]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown env family {name!r}; known families: {', '.join(names())}")
    module_name, attr = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def parameters(name: str) -> dict[str, Any]:
    """The keyword parameters of family ``name`` and their defaults."""
    signature = inspect.signature(_factory(name))
    return {k: p.default for k, p in signature.parameters.items()}


def make(name: str, **params: Any) -> TaskDistribution:
    """Builds the task distribution registered as ``name``.

    Args:
        name: one of :func:`names`.
        **params: the family's keyword parameters (see :func:`parameters`).

    Raises:
        ValueError: ``name`` is not registered.
        UnknownParameterError: a keyword is not one of the family's parameters.
    """
    factory = _factory(name)
    valid = parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise UnknownParameterError(
            f"env family {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or '(none)'}"
        )
    return factory(**params)
