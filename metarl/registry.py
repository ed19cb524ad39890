"""Finding task distributions and agents by name.

Few-shot distributions live in :mod:`metarl.fewshot`; RL task families in the ``envs`` package.
Agents are named by import path (``"agents.maml_trpo:MAMLTRPO"``) so ``metarl`` never imports
``agents`` itself; :func:`discover_agents` scans the package at run time for ``metarl list``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Any

from metarl.config import ConfigError


def _sinusoid(**params: Any) -> Any:
    from metarl.fewshot.sinusoid import SinusoidDistribution

    return SinusoidDistribution(**params)


def _omniglot(**params: Any) -> Any:
    from metarl.fewshot.omniglot_tasks import OmniglotDistribution

    return OmniglotDistribution(**params)


FEWSHOT: dict[str, Callable[..., Any]] = {"sinusoid": _sinusoid, "omniglot": _omniglot}


def distribution_names() -> list[str]:
    import envs

    return sorted(FEWSHOT) + sorted(envs.names())


def make_distribution(name: str, **params: Any) -> Any:
    """Builds a few-shot or RL task distribution by name; unknown names list the known ones."""
    if name in FEWSHOT:
        try:
            return FEWSHOT[name](**params)
        except TypeError as e:
            raise ConfigError(f"[tasks] bad parameter for {name!r}: {e}") from None
    import envs

    if name not in envs.names():
        raise ConfigError(f"unknown task distribution {name!r}; known: {distribution_names()}")
    try:
        return envs.make(name, **params)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[tasks] bad parameter for {name!r}: {e}") from None


def resolve_agent(path: str) -> type[Any]:
    """Imports ``"module:Class"``; the class must carry a ``Config`` dataclass."""
    if ":" not in path:
        raise ConfigError(f"agent must be an import path 'module:Class' (see `metarl list`), got {path!r}")
    module_name, cls_name = path.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"cannot import agent module {module_name!r}: {e}; see `metarl list`") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not hasattr(cls, "Config"):
        raise ConfigError(f"{module_name} has no agent class {cls_name!r} with a Config; see `metarl list`")
    return cls


def discover_agents() -> dict[str, type[Any]]:
    """Every class with a ``Config`` in the ``agents`` package and in :mod:`metarl.fewshot`."""
    found: dict[str, type[Any]] = {}
    for package_name in ("metarl.fewshot", "agents"):
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError:
            continue
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package_name}.{info.name}")
            for name, obj in vars(module).items():
                if isinstance(obj, type) and hasattr(obj, "Config") and obj.__module__ == module.__name__:
                    found[f"{module.__name__}:{name}"] = obj
    return found
