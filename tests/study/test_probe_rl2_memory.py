"""experiments/probe_rl2_memory.py: the variants act as they say, and the probe reads a run."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from experiments.probe_rl2_memory import VARIANTS, main, variant
from metarl.cli import main as metarl_main
from metarl.recurrent import RecurrentPolicy

ROOT = Path(__file__).resolve().parents[2]


def test_no_memory_forgets_the_state_and_no_rewards_hides_the_reward():
    torch.manual_seed(0)
    policy = RecurrentPolicy(3, gym.spaces.Box(-1.0, 1.0, (2,)), 8)
    obs, act, rew, done = torch.randn(4, 3), torch.randn(4, 2), torch.randn(4), torch.zeros(4)
    hidden = torch.randn(4, 8)
    inputs = policy.encode(obs, act, rew, done)
    assert variant(policy, "trained") is policy
    forgetful = variant(policy, "no memory")
    fresh = policy.step(inputs, policy.initial_state(4))
    for a, b in zip(forgetful.step(inputs, hidden), fresh, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(policy.step(inputs, hidden)[0], fresh[0])  # the policy itself remembers
    blind = variant(policy, "no rewards")
    torch.testing.assert_close(blind.encode(obs, act, rew, done), policy.encode(obs, act, 0 * rew, done))
    assert not torch.equal(policy.encode(obs, act, rew, done), blind.encode(obs, act, rew, done))
    with pytest.raises(ValueError, match="unknown variant"):
        variant(policy, "no eyes")


def test_probe_reads_an_rl2_run_and_reports_each_variant(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    settings = ["run.num_iterations=1", "tasks.horizon=10", "agent.meta_batch_size=2",
                "agent.num_minibatches=1", "agent.num_epochs=1", "agent.hidden_size=8"]
    args = ["run", "experiments/rl2_nav2d.toml", "--out", str(run), "--no-progress"]
    for s in settings:
        args += ["--set", s]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert metarl_main(args) == 0
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(run), "--tasks", "3", "--episodes", "2", "--out", str(tmp_path / "memory")]) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert json.loads((tmp_path / "memory.json").read_text())["runs"] == [result]
    table = (tmp_path / "memory.md").read_text()
    assert table.count(f"| {run} | 1 | 3 | return |") == 2  # one row per episode
    assert result["tasks"] == 3 and result["iteration"] == 1 and "success" not in result  # no success in nav2d
    returns = result["return"]
    assert set(returns) == set(VARIANTS) and all(len(v) == 2 for v in returns.values())
    for name in VARIANTS[1:]:
        for e, (difference, lo, hi) in enumerate(result["return_difference"][name]):
            assert difference == pytest.approx(returns["trained"][e] - returns[name][e])
            assert lo <= hi
    # navigation-2d rewards are negative distances: hiding them changes what the policy does
    assert not np.allclose(returns["trained"], returns["no rewards"])
