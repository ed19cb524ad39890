"""The sampler table's account of the process backend's remaining share
(experiments/bench/sampler_table.py), checked against hand arithmetic."""

from __future__ import annotations

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
