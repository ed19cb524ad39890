"""The sampler table's account of the process backend's remaining share
(experiments/bench/sampler_table.py), checked against hand arithmetic."""

from __future__ import annotations

import torch

from experiments.bench.sampler_table import _remaining_share

PROFILE = {"env_step_share": 0.9, "policy_share": 0.05, "act_rest_share": 0.01, "record_share": 0.02,
           "step_loop_share": 0.01, "episode_starts_share": 0.005, "assembly_share": 0.002, "other_share": 0.003}


def _doc(raw_parallel: float) -> dict:
    row = {"env": "toy", "backend": "process", "num_workers": 2, "cores": 2, "efficiency": 0.72,
           "raw_steps_per_s": 100.0, "raw_parallel_steps_per_s": raw_parallel, "efficiency_vs_parallel": 0.8}
    serial = dict(row, backend="serial")
    return {"rows": [serial, row], "serial_profile": {"toy": PROFILE}}


def test_a_machine_whose_cores_scale_below_the_target_is_out_of_reach():
    # 180 steps/s side by side against 2 × 100 alone: scaling 0.90 < 0.95
    (line,) = _remaining_share(_doc(180.0))[2:]
    assert "2 raw processes side by side reach 0.90 of 2 times one alone" in line
    assert "the sampler reaches 0.80" in line
    # the itemised shares add up to the other 10%: 5 + 1 + 2 + 1 + 0.5 + (0.2 + 0.3)
    assert "env.step takes 90.0%" in line and "the other 10.0%" in line and "the rest (0.5%)" in line
    # the serial profile explains 0.90 of the 0.80: 0.10 left to the process backend
    assert "The remaining 0.10 is not in the serial profile" in line
    assert "out of reach on this machine: a sampler doing no work beside env.step would reach 0.90" in line


def test_the_share_the_sampler_would_need_follows_from_the_cores_scaling():
    # scaling 196 / 200 = 0.98: the sampler needs 0.95 / 0.98 = 0.969 of the side-by-side rate,
    # per-step work within 1 / 0.969 - 1 = 3.2% of env.step's time; policy 0.05 / 0.9 = 5.6% of it
    (line,) = _remaining_share(_doc(196.0))[2:]
    assert "needs the sampler at 0.97 of the side-by-side rate" in line
    assert "within 3.2% of the environment's time" in line and "takes 5.6% of it" in line


def test_the_backends_own_cost_is_measured_against_its_worker_code_side_by_side():
    # raw side by side 180; the worker code side by side 162 = 0.90 of it; the backend 144 = 0.80
    # of raw side by side and 144 / 162 = 0.89 of the workers: its own cost 0.11
    doc = _doc(180.0)
    doc["rows"][1] |= {"worker_parallel_steps_per_s": 162.0, "efficiency_vs_workers": 144.0 / 162.0,
                       "parent_cpu_share": 0.038}
    (line,) = _remaining_share(doc)[2:]
    assert "reaches 0.90 of the raw side-by-side rate" in line
    assert "the process backend 0.89 of that" in line and "the parent's 3.8% of a core" in line
    assert "is 0.11 of the sampling time" in line
    assert "not in the serial profile" not in line


def test_worker_code_side_by_side_counts_every_step_of_its_episodes():
    # One child in this process: each call runs 3 half-cheetah episodes of 10 steps (no episode
    # ends early), so the steps it reports are a whole number of 30-step calls.
    import queue
    import threading

    import numpy as np

    import envs
    from experiments.bench.sampler import _worker_rate_child
    from metarl.policies import make_policy

    dist = envs.make("halfcheetah-vel")
    policy = make_policy(dist.observation_space, dist.action_space, hidden_sizes=(8,))
    task = dist.sample(1, np.random.default_rng(0))[0]
    results: queue.Queue = queue.Queue()
    threads = torch.get_num_threads()
    try:
        _worker_rate_child(dist, task, 10, 0.05, 3, policy, policy.init_params(0), threading.Barrier(1), results)
    finally:
        torch.set_num_threads(threads)  # the child sets 1, as a process worker does
    steps, elapsed = results.get_nowait()
    assert steps >= 30 and steps % 30 == 0 and elapsed >= 0.05
