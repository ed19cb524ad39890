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


def _check_counts(name: str, params: dict[str, Any]) -> None:
    """Horizons and counts (``horizon``, ``num_*``, ``*_ways``) must be whole numbers >= 1 and
    seeds whole numbers >= 0, whatever the family (a float horizon would silently round down)."""
    for key, value in params.items():
        if key == "horizon" or key.startswith("num_") or key.endswith("_ways"):
            minimum = 1
        elif key.endswith("seed"):
            minimum = 0
        else:
            continue
        if value is None:  # "the default" where a family allows it (e.g. train_ways)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"[tasks] {key} = {value!r} for {name!r}: expected a whole number >= {minimum}")


def make_distribution(name: str, **params: Any) -> Any:
    """Builds a few-shot or RL task distribution by name; unknown names list the known ones."""
    _check_counts(name, params)
    if name in FEWSHOT:
        try:
            return FEWSHOT[name](**params)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"[tasks] bad parameter for {name!r}: {e}") from None
        except FileNotFoundError as e:  # its data is missing
            raise ConfigError(f"[tasks] {name!r}: {e}") from None
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
    from metarl.agent import check_agent

    try:
        check_agent(cls)
    except TypeError as e:
        raise ConfigError(f"{e}; see metarl/agent.py") from None
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
