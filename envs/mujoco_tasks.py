"""MAML / ProMP locomotion families on gymnasium's HalfCheetah-v5 and Ant-v5 models.

Rewards, each computed from the MuJoCo state (``dt = frame_skip * timestep = 0.05``):

- ``halfcheetah-vel`` (MAML, arXiv 1703.03400 section 5.3; pytorch-maml-rl
  ``HalfCheetahVelEnv``): ``v = (qpos[0]' - qpos[0]) / dt``,
  ``r = -|v - v_goal| - 0.05 * ||a||^2``, ``v_goal ~ U[0, 2]``.
- ``halfcheetah-dir`` (same sources, ``HalfCheetahDirEnv``): ``r = d * v - 0.05 * ||a||^2``,
  ``d in {-1, +1}``.
- ``ant-dir`` (ProMP, arXiv 1810.06784, ``AntRandDirecEnv``): with the torso centre of mass
  ``p``, ``r = d * (p_x' - p_x) / dt - 0.5 * ||a||^2 - 5e-4 * ||clip(cfrc_ext, -1, 1)||^2 + 1``,
  ``d in {-1, +1}``; terminates when the state is not finite or the torso height leaves [0, 1].
- ``ant-dir-2d`` (ProMP ``AntRandDirec2DEnv``): as ``ant-dir`` with a unit direction
  ``u`` (a normalised standard normal draw) and ``r = u . (p_xy' - p_xy) / dt - ...``.
- ``ant-goal`` (ProMP ``AntRandGoalEnv``): goal uniform in the disc of radius 3,
  ``r = -||p_xy' - g||_1 - 0.1 * ||a||^2 - 5e-4 * ||clip(cfrc_ext, -1, 1)||^2``, never terminates;
  the observation includes the torso x, y (as ProMP's does).

Observations are gymnasium's v5 ones (HalfCheetah 17, Ant 105, Ant with x, y 107). Horizon 200
by default (the MAML paper's); ProMP's scripts use 100 for HalfCheetah and Ant (``horizon``).

The MAML paper's HalfCheetah (rllab's, in cbfinn/maml_rl) differs from gymnasium's v5 in two
ways that matter: it takes one MuJoCo step of 0.01 s per action (gymnasium: 5, ``dt = 0.05``),
so its 200-step episodes last 2 s against 10 s here; and its observation ends with the torso's
centre of mass (x, y, z), whose x is the distance run. ``frame_skip = 1`` and
``observation = "maml"`` give both (the ``[tasks]`` keys of ``halfcheetah-vel`` and
``halfcheetah-dir``). Left as they are: rllab reads the velocity as the torso's centre-of-mass
velocity, here the root's displacement over the step (as pytorch-maml-rl and garage). rllab
resets with N(0, 0.01²) noise on the joint positions where gymnasium draws U(-0.1, 0.1);
``reset_noise = "rllab"`` resets as rllab.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from envs.base import Task
from envs.mujoco_family import FamilySpec, MujocoFamily

CHEETAH_CTRL = 0.05  # 0.5 * 1e-1
ANT_DIR_CTRL = 0.5
ANT_GOAL_CTRL = 0.1
ANT_CONTACT = 0.5e-3
ANT_DIR_SURVIVE = 1.0
ANT_GOAL_RADIUS = 3.0


def _halfcheetah(frame_skip: int = 5, reset_noise: str = "gymnasium") -> Any:
    from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv

    if reset_noise == "gymnasium":
        return HalfCheetahEnv(frame_skip=frame_skip)

    class RllabResetHalfCheetah(HalfCheetahEnv):
        """Resets as rllab's MujocoEnv: joint positions plus N(0, 0.01²) noise (gymnasium:
        U(-0.1, 0.1)), velocities plus N(0, 0.1²) (as gymnasium)."""

        def reset_model(self) -> np.ndarray:
            qpos = self.init_qpos + 0.01 * self.np_random.standard_normal(self.model.nq)
            qvel = self.init_qvel + 0.1 * self.np_random.standard_normal(self.model.nv)
            self.set_state(qpos, qvel)
            return self._get_obs()

    return RllabResetHalfCheetah(frame_skip=frame_skip)


def _torso_com(sim: Any, task: Task) -> np.ndarray:
    """The centre of mass of the torso's subtree (the whole cheetah), x, y, z: the last three
    observation entries of the MAML paper's HalfCheetah (rllab ``get_body_com("torso")``).

    Read after gymnasium's step, which does not recompute it: it is the value at the start of
    the last MuJoCo step (one action old with ``frame_skip = 1``), as pytorch-maml-rl and garage
    observe it; rllab recomputed it after the step."""
    return sim.data.subtree_com[sim.model.body("torso").id].copy()


def _torso_com_and_task(sim: Any, task: Task) -> np.ndarray:
    """:func:`_torso_com`, then the task's parameters: what the MAML paper's oracle is told."""
    return np.concatenate([_torso_com(sim, task), task.vector()])


def _ant(with_xy: bool) -> Any:
    from gymnasium.envs.mujoco.ant_v5 import AntEnv

    return AntEnv(
        exclude_current_positions_from_observation=not with_xy, terminate_when_unhealthy=False
    )


def _cheetah_x(sim: Any) -> np.ndarray:
    return np.array([sim.data.qpos[0]])


def _torso_xy(sim: Any) -> np.ndarray:
    return sim.data.body("torso").xpos[:2].copy()


def _cheetah_reward(
    sim: Any, before: np.ndarray, action: np.ndarray, task: Task, inner: tuple
) -> tuple[float, bool, dict]:
    velocity = (sim.data.qpos[0] - before[0]) / sim.dt
    ctrl_cost = CHEETAH_CTRL * float(np.add.reduce(action * action))  # np.sum(action**2), less overhead
    if "velocity" in task.keys():
        forward = -abs(velocity - task["velocity"])
    else:
        forward = task["direction"] * velocity
    info = {
        "x_velocity": float(velocity),
        "reward_forward": float(forward),
        "reward_ctrl": -ctrl_cost,
    }
    return forward - ctrl_cost, False, info


def _contact_cost(sim: Any) -> float:
    return ANT_CONTACT * float(np.sum(np.clip(sim.data.cfrc_ext, -1.0, 1.0) ** 2))


def _ant_dir_reward(
    sim: Any, before: np.ndarray, action: np.ndarray, task: Task, inner: tuple
) -> tuple[float, bool, dict]:
    velocity = (sim.data.body("torso").xpos[:2] - before) / sim.dt
    direction = np.asarray(task["direction"], dtype=np.float64)
    forward = float(direction * velocity[0]) if direction.ndim == 0 else float(direction @ velocity)
    ctrl_cost = ANT_DIR_CTRL * float(np.sum(action**2))
    contact_cost = _contact_cost(sim)
    state = np.concatenate([sim.data.qpos, sim.data.qvel])
    terminated = not (np.all(np.isfinite(state)) and 0.0 <= sim.data.qpos[2] <= 1.0)
    info = {
        "xy_velocity": velocity,
        "reward_forward": forward,
        "reward_ctrl": -ctrl_cost,
        "reward_contact": -contact_cost,
        "reward_survive": ANT_DIR_SURVIVE,
    }
    return forward - ctrl_cost - contact_cost + ANT_DIR_SURVIVE, bool(terminated), info


def _ant_goal_reward(
    sim: Any, before: np.ndarray, action: np.ndarray, task: Task, inner: tuple
) -> tuple[float, bool, dict]:
    position = sim.data.body("torso").xpos[:2]
    goal_reward = -float(np.sum(np.abs(position - np.asarray(task["goal"]))))
    ctrl_cost = ANT_GOAL_CTRL * float(np.sum(action**2))
    contact_cost = _contact_cost(sim)
    info = {
        "xy_position": position.copy(),
        "reward_goal": goal_reward,
        "reward_ctrl": -ctrl_cost,
        "reward_contact": -contact_cost,
    }
    return goal_reward - ctrl_cost - contact_cost, False, info


def _sample_velocity(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    return [{"velocity": v} for v in rng.uniform(0.0, 2.0, size=n)]


def _sample_velocity_mass(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    velocity, mass = rng.uniform(0.0, 2.0, size=n), rng.uniform(0.75, 1.25, size=n)
    return [{"velocity": v, "mass_scale": m} for v, m in zip(velocity, mass, strict=True)]


def _apply_mass(model: Any, task: Task, nominal: dict[str, np.ndarray]) -> None:
    """Scales every body's mass and inertia by the task's ``mass_scale`` (from nominal values)."""
    scale = float(task["mass_scale"])
    if not scale > 0:
        raise ValueError(f"mass_scale must be > 0, got {scale}")
    model.body_mass[:] = nominal["body_mass"] * scale
    model.body_inertia[:] = nominal["body_inertia"] * scale


def _sample_sign(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    return [{"direction": d} for d in rng.choice([-1.0, 1.0], size=n)]


def _sample_unit_2d(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    directions = rng.normal(size=(n, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return [{"direction": d} for d in directions]


def _sample_disc(n: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    angle = rng.uniform(0.0, 2 * np.pi, size=n)
    radius = ANT_GOAL_RADIUS * np.sqrt(rng.uniform(0.0, 1.0, size=n))
    return [{"goal": (r * np.cos(a), r * np.sin(a))} for r, a in zip(radius, angle, strict=True)]


_SIGNS = ({"direction": -1.0}, {"direction": 1.0})
_MAML = "MAML (arXiv 1703.03400) section 5.3; pytorch-maml-rl maml_rl/envs/mujoco/half_cheetah.py"
_PROMP = "ProMP (arXiv 1810.06784); meta_policy_search/envs/mujoco_envs/"

HALFCHEETAH_VEL = FamilySpec(
    "halfcheetah-vel",
    _MAML,
    _halfcheetah,
    17,
    6,
    _sample_velocity,
    _cheetah_reward,
    _cheetah_x,
    {"velocity": "U[0, 2]", "reward": "-|v_x - velocity| - 0.05 ||a||^2"},
    own_reward=True,
)
HALFCHEETAH_VEL_MASS = FamilySpec(
    "halfcheetah-vel-mass",
    _MAML + "; a body-mass shift per task",
    _halfcheetah,
    17,
    6,
    _sample_velocity_mass,
    _cheetah_reward,
    _cheetah_x,
    {
        "velocity": "U[0, 2]",
        "mass_scale": "U[0.75, 1.25], multiplies every body's mass and inertia",
        "reward": "-|v_x - velocity| - 0.05 ||a||^2",
    },
    apply_task=_apply_mass,
    model_fields=("body_mass", "body_inertia"),
    box={"velocity": ([0.0], [2.0]), "mass_scale": ([0.75], [1.25])},
    own_reward=True,
)
HALFCHEETAH_DIR = FamilySpec(
    "halfcheetah-dir",
    _MAML,
    _halfcheetah,
    17,
    6,
    _sample_sign,
    _cheetah_reward,
    _cheetah_x,
    {"direction": "-1 or +1", "reward": "direction * v_x - 0.05 ||a||^2"},
    fixed_tasks=_SIGNS,
    own_reward=True,
)
ANT_DIR = FamilySpec(
    "ant-dir",
    _PROMP + "ant_rand_direc.py",
    partial(_ant, False),
    105,
    8,
    _sample_sign,
    _ant_dir_reward,
    _torso_xy,
    {"direction": "-1 or +1", "reward": "direction * v_x - 0.5 ||a||^2 - contact + 1"},
    fixed_tasks=_SIGNS,
    own_reward=True,
)
ANT_DIR_2D = FamilySpec(
    "ant-dir-2d",
    _PROMP + "ant_rand_direc_2d.py",
    partial(_ant, False),
    105,
    8,
    _sample_unit_2d,
    _ant_dir_reward,
    _torso_xy,
    {
        "direction": "unit vector, normalised N(0, I_2)",
        "reward": "direction . v_xy - 0.5 ||a||^2 - contact + 1",
    },
    own_reward=True,
)
ANT_GOAL = FamilySpec(
    "ant-goal",
    _PROMP + "ant_rand_goal.py",
    partial(_ant, True),
    107,
    8,
    _sample_disc,
    _ant_goal_reward,
    _torso_xy,
    {
        "goal": "uniform in the disc of radius 3",
        "reward": "-||p_xy - goal||_1 - 0.1 ||a||^2 - contact",
    },
    own_reward=True,
)


RESET_NOISE = ("gymnasium", "rllab")


def _cheetah_variant(spec: FamilySpec, frame_skip: int, observation: str, reset_noise: str) -> FamilySpec:
    """``spec`` simulated ``frame_skip`` MuJoCo steps of 0.01 s per env step, observing
    gymnasium's v5 vector (``"gymnasium"``), the MAML paper's (``"maml"``: with the torso's
    centre of mass appended, whose x grows with the distance run), or the MAML paper's followed by
    the task's parameters (``"maml-oracle"``: the paper's oracle, a policy told the task); reset
    with gymnasium's noise on the joint positions, U(-0.1, 0.1), or rllab's, N(0, 0.01²)."""
    if isinstance(frame_skip, bool) or not isinstance(frame_skip, int) or frame_skip < 1:
        raise ValueError(f"{spec.name}: frame_skip must be a whole number >= 1, got {frame_skip!r}")
    if reset_noise not in RESET_NOISE:
        raise ValueError(
            f"{spec.name}: reset_noise must be one of {', '.join(map(repr, RESET_NOISE))}, got {reset_noise!r}"
        )
    extras = {"gymnasium": (None, 0), "maml": (_torso_com, 3), "maml-oracle": (_torso_com_and_task, 4)}
    if observation not in extras:
        raise ValueError(
            f"{spec.name}: observation must be one of {', '.join(map(repr, extras))}, got {observation!r}"
        )
    extra, dim = extras[observation]
    return replace(spec, make_sim=partial(_halfcheetah, frame_skip, reset_noise), obs_dim=spec.obs_dim + dim,
                   extra_obs=extra, extra_obs_dim=dim)


def halfcheetah_vel(
    horizon: int = 200,
    num_train: int = 100,
    num_test: int = 40,
    split_seed: int = 0,
    frame_skip: int = 5,
    observation: str = "gymnasium",
    reset_noise: str = "gymnasium",
) -> MujocoFamily:
    """HalfCheetah target velocity; task field ``velocity`` (float).

    ``frame_skip = 1, observation = "maml"`` is the MAML paper's environment (rllab's
    HalfCheetah: one 0.01 s MuJoCo step per action, so 200 steps are 2 s; the torso's centre of
    mass observed); the defaults are gymnasium's HalfCheetah-v5 (0.05 s per action, 10 s).
    ``reset_noise = "rllab"`` draws the initial joint positions as rllab does, N(0, 0.01²) about
    the nominal pose, where gymnasium draws U(-0.1, 0.1).
    """
    spec = _cheetah_variant(HALFCHEETAH_VEL, frame_skip, observation, reset_noise)
    return MujocoFamily(spec, horizon, num_train, num_test, split_seed)


def halfcheetah_vel_mass(
    horizon: int = 200, num_train: int = 100, num_test: int = 40, split_seed: int = 0
) -> MujocoFamily:
    """HalfCheetah target velocity with a body-mass shift; fields ``velocity``, ``mass_scale``."""
    return MujocoFamily(HALFCHEETAH_VEL_MASS, horizon, num_train, num_test, split_seed)


def halfcheetah_dir(
    horizon: int = 200, frame_skip: int = 5, observation: str = "gymnasium", reset_noise: str = "gymnasium"
) -> MujocoFamily:
    """HalfCheetah forward/backward; task field ``direction`` (-1.0 or 1.0); train = test = both.
    ``frame_skip``, ``observation`` and ``reset_noise`` as in :func:`halfcheetah_vel`."""
    return MujocoFamily(_cheetah_variant(HALFCHEETAH_DIR, frame_skip, observation, reset_noise), horizon)


def ant_dir(horizon: int = 200) -> MujocoFamily:
    """Ant forward/backward; task field ``direction`` (-1.0 or 1.0); train = test = both."""
    return MujocoFamily(ANT_DIR, horizon)


def ant_dir_2d(
    horizon: int = 200, num_train: int = 100, num_test: int = 40, split_seed: int = 0
) -> MujocoFamily:
    """Ant running in a 2D direction; task field ``direction`` (unit 2-tuple)."""
    return MujocoFamily(ANT_DIR_2D, horizon, num_train, num_test, split_seed)


def ant_goal(
    horizon: int = 200, num_train: int = 100, num_test: int = 40, split_seed: int = 0
) -> MujocoFamily:
    """Ant reaching a goal position; task field ``goal`` (2-tuple in the disc of radius 3)."""
    return MujocoFamily(ANT_GOAL, horizon, num_train, num_test, split_seed)
