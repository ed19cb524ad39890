"""Hopper and Walker2d with randomised dynamics ("rand-params"), ProMP / PEARL.

Source: Rothfuss et al., ProMP (arXiv 1810.06784), HopperRandParams and WalkerRandParams, and
Rakelly et al., PEARL (arXiv 1903.08254), both from the ``rand_param_envs`` package
(``rand_param_envs/base.py``, ``RandomEnv.sample_tasks``). Each element of four model arrays is
multiplied by ``base ** U[-3, 3]`` (``log_scale_limit = 3``), independently per element:
``body_mass`` (base 1.5), ``body_inertia`` (1.5), ``dof_damping`` (1.3 in that code) and
``geom_friction`` (1.5). The reward is gymnasium's Hopper-v5 / Walker2d-v5 reward, the same as the
published one: ``(x' - x) / dt + 1 (healthy) - 1e-3 * ||a||^2``; episodes terminate when unhealthy.

A task holds the multipliers, flattened, as ``body_mass_scale``, ``body_inertia_scale``,
``dof_damping_scale`` and ``geom_friction_scale``. ``set_task`` rewrites the model arrays from the
nominal values the env stored when it was built, so tasks never compound.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import numpy as np

from envs.base import Task
from envs.mujoco_family import FamilySpec, MujocoFamily

BASES = {"body_mass": 1.5, "body_inertia": 1.5, "dof_damping": 1.3, "geom_friction": 1.5}
FIELDS = tuple(BASES)
# Sizes of the arrays in gymnasium's v5 models (checked against the built model in set_task).
HOPPER_SHAPES = {
    "body_mass": (5,),
    "body_inertia": (5, 3),
    "dof_damping": (6,),
    "geom_friction": (5, 3),
}
WALKER_SHAPES = {
    "body_mass": (8,),
    "body_inertia": (8, 3),
    "dof_damping": (9,),
    "geom_friction": (8, 3),
}


def _hopper() -> Any:
    from gymnasium.envs.mujoco.hopper_v5 import HopperEnv

    return HopperEnv()


def _walker() -> Any:
    from gymnasium.envs.mujoco.walker2d_v5 import Walker2dEnv

    return Walker2dEnv()


def _x(sim: Any) -> np.ndarray:
    return np.array([sim.data.qpos[0]])


def _gymnasium_reward(
    sim: Any, before: np.ndarray, action: np.ndarray, task: Task, inner: tuple
) -> tuple[float, bool, dict]:
    reward, terminated, info = inner
    return reward, terminated, dict(info)


def _apply(model: Any, task: Task, nominal: dict[str, np.ndarray]) -> None:
    for name in FIELDS:
        scale = np.asarray(task[f"{name}_scale"], dtype=np.float64)
        if scale.size != nominal[name].size:
            raise ValueError(
                f"{task.family}: {name}_scale has {scale.size} values, the model has {nominal[name].size}; "
                "sample the task from this family"
            )
        getattr(model, name)[:] = nominal[name] * scale.reshape(nominal[name].shape)


def _sample(
    shapes: dict[str, tuple[int, ...]], log_scale_limit: float, n: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    tasks = []
    for _ in range(n):
        size = {name: math.prod(shapes[name]) for name in FIELDS}
        exponents = {
            name: rng.uniform(-log_scale_limit, log_scale_limit, size=size[name]) for name in FIELDS
        }
        tasks.append({f"{name}_scale": BASES[name] ** exponents[name] for name in FIELDS})
    return tasks


def _spec(
    name: str, make_sim: Any, obs_dim: int, act_dim: int, shapes: dict, log_scale_limit: float
) -> FamilySpec:
    if log_scale_limit < 0:
        raise ValueError(f"log_scale_limit={log_scale_limit} must be >= 0 (3.0 as published)")
    doc = {
        f"{k}_scale": f"{BASES[k]}^U[-{log_scale_limit}, {log_scale_limit}] per element, {math.prod(s)} values"
        for k, s in shapes.items()
    }
    doc["reward"] = "gymnasium v5: forward velocity + healthy 1 - 1e-3 ||a||^2"
    return FamilySpec(
        name,
        "ProMP (arXiv 1810.06784), PEARL (arXiv 1903.08254); rand_param_envs/base.py",
        make_sim,
        obs_dim,
        act_dim,
        partial(_sample, shapes, log_scale_limit),
        _gymnasium_reward,
        _x,
        doc,
        apply_task=_apply,
        model_fields=FIELDS,
    )


def hopper_params(
    horizon: int = 200,
    log_scale_limit: float = 3.0,
    num_train: int = 100,
    num_test: int = 40,
    split_seed: int = 0,
) -> MujocoFamily:
    """Hopper-v5 with randomised mass, inertia, damping and friction."""
    spec = _spec("hopper-params", _hopper, 11, 3, HOPPER_SHAPES, log_scale_limit)
    return MujocoFamily(spec, horizon, num_train, num_test, split_seed)


def walker_params(
    horizon: int = 200,
    log_scale_limit: float = 3.0,
    num_train: int = 100,
    num_test: int = 40,
    split_seed: int = 0,
) -> MujocoFamily:
    """Walker2d-v5 with randomised mass, inertia, damping and friction."""
    spec = _spec("walker-params", _walker, 17, 6, WALKER_SHAPES, log_scale_limit)
    return MujocoFamily(spec, horizon, num_train, num_test, split_seed)
