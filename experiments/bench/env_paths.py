"""The faster env step paths against the packages' own code, in one process: time per step and
whether every observation, reward, termination and info entry matches.

    metarl bench env_paths --out experiments/results/env_paths [--steps 2000] [--repeats 5]

- Locomotion families with ``own_reward`` (gymnasium's physics and observation, the family's own
  reward) against the same family stepped through gymnasium's whole ``step``.
- Meta-World, whose Sawyer classes run the grasp test on the contact arrays and convert
  orientations with ``assume_valid``, against metaworld's loop over contacts and scipy's checked
  conversion (put back for the reference's steps).

Both envs step the same seeded random actions from the same reset, in alternating repeats, so
whatever else the machine does falls on both alike; the ratio is ours over the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np

import envs
from experiments.bench import save_results

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "halfcheetah-vel (frame_skip 1, observation maml)": (
        "halfcheetah-vel", {"frame_skip": 1, "observation": "maml"}),
    "ant-dir": ("ant-dir", {}),
    "ml1 reach-v3": ("ml1", {"env_name": "reach-v3"}),
    "ml1 push-v3": ("ml1", {"env_name": "push-v3"}),
}


@contextlib.contextmanager
def _metaworld_own_code(env: Any) -> Iterator[None]:
    """Metaworld's own grasp test and scipy's checked conversion, for the reference's steps."""
    from metaworld.sawyer_xyz_env import SawyerXYZEnv
    from scipy.spatial.transform import Rotation

    sim = env.unwrapped._sim
    cls, module = type(sim), sys.modules[type(sim).__module__]
    fast_touching, fast_rotation = cls.__dict__.get("touching_object"), getattr(module, "Rotation", None)
    cls.touching_object, module.Rotation = SawyerXYZEnv.touching_object, Rotation
    try:
        yield
    finally:
        if fast_touching is not None:
            cls.touching_object = fast_touching
        module.Rotation = fast_rotation


def _pair(name: str, params: dict[str, Any]) -> tuple[Any, Any, Callable[[], Any]]:
    """(ours, reference, a context manager factory the reference steps inside)."""
    dist = envs.make(name, **params)
    task = dist.train_tasks()[0]
    ours = dist.make_env(task)
    if name in ("ml1", "ml10", "ml45"):
        reference = dist.make_env(task)
        return ours, reference, lambda: _metaworld_own_code(reference)
    from envs.mujoco_family import MujocoTaskEnv

    reference = MujocoTaskEnv(replace(dist.spec, own_reward=False), task, dist.horizon)
    return ours, reference, contextlib.nullcontext


def _episode(env: Any, actions: np.ndarray, seed: int) -> tuple[float, list[tuple]]:
    env.reset(seed=seed)
    out = []
    start = time.perf_counter()
    for i, action in enumerate(actions):
        obs, reward, terminated, truncated, info = env.step(action)
        out.append((obs, reward, terminated, info))
        if terminated or truncated:
            env.reset(seed=seed + i + 1)
    return time.perf_counter() - start, out


def _same(a: list[tuple], b: list[tuple]) -> bool:
    for (obs_a, r_a, t_a, info_a), (obs_b, r_b, t_b, info_b) in zip(a, b, strict=True):
        if not (np.array_equal(obs_a, obs_b) and r_a == r_b and t_a == t_b and info_a.keys() == info_b.keys()):
            return False
        if not all(np.array_equal(info_a[k], info_b[k]) for k in info_a):
            return False
    return True


def measure(label: str, steps: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Seconds per step of ours and of the reference over ``repeats`` alternating runs."""
    name, params = CASES[label]
    ours, reference, own_code = _pair(name, params)
    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(steps, ours.action_space.shape[0]))
    totals, identical = {"ours": 0.0, "reference": 0.0}, True
    for repeat in range(repeats):
        elapsed, a = _episode(ours, actions, seed + repeat)
        totals["ours"] += elapsed
        with own_code():
            elapsed, b = _episode(reference, actions, seed + repeat)
        totals["reference"] += elapsed
        identical = identical and _same(a, b)
    n = steps * repeats
    return {"case": label, "steps": n, "ours_us": 1e6 * totals["ours"] / n,
            "reference_us": 1e6 * totals["reference"] / n,
            "ratio": totals["ours"] / totals["reference"], "identical": identical}


def _markdown(doc: dict[str, Any]) -> str:
    lines = ["# Env step paths against the packages' own code", "",
             f"Command: `{doc['command']}`. Machine: {doc['machine']}.", "",
             "Microseconds per `step()` of one env with seeded random actions, ours and the reference "
             "stepping the same actions from the same resets in alternating repeats; identical: every "
             "observation, reward, termination and info entry equal.", "",
             "| env | steps | ours µs/step | reference µs/step | ratio | identical |",
             "|---|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['case']} | {r['steps']} | {r['ours_us']:.0f} | {r['reference_us']:.0f} | "
                     f"**{r['ratio']:.2f}** | {'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES), metavar="CASE")
    parser.add_argument("--out", default="experiments/results/env_paths")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    rows = []
    for label in args.cases:
        rows.append(measure(label, args.steps, args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    save_results(args.out, "metarl bench env_paths", argv, {"rows": rows}, _markdown)
    print(json.dumps({"rows": len(rows), "identical": all(r["identical"] for r in rows), "out": args.out}))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
