"""metarl bench rl2_update: RL²'s PPO minibatch step with metarl's GRU against nn.GRU."""

from __future__ import annotations

import json

import pytest


def test_rl2_update_bench_writes_agreeing_gradients(tmp_path):
    from experiments.bench import rl2_update

    out = tmp_path / "rl2_update"
    argv = ["--trials", "2", "--length", "30", "--hidden", "16", "--repeats", "2", "--out", str(out)]
    assert rl2_update.main(argv) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    row = doc["row"]
    assert row["max_relative_grad_diff"] < 1e-4 and row["ratio"] > 0 and row["length"] == 30
    assert doc["command"].startswith("metarl bench rl2_update") and "| **" in out.with_suffix(".md").read_text()


def test_rl2_update_reference_runs_nn_gru_and_ours_does_not(monkeypatch):
    """The bench compares two paths: the reference's forward goes through nn.GRU's call, ours not."""
    import torch
    from torch import nn

    from experiments.bench import rl2_update

    calls = []
    original = nn.GRU.forward
    monkeypatch.setattr(nn.GRU, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    space = rl2_update.gym.spaces.Box(-1.0, 1.0, (2,))
    ours, reference = rl2_update.RecurrentPolicy(3, space, 4), rl2_update._NNGRUPolicy(3, space, 4)
    x = torch.randn(1, 5, ours.input_dim)
    ours(x)[1].sum().backward()
    assert calls == []
    reference(x)[1].sum().backward()
    assert calls == [1]


def test_rl2_update_bench_refuses_bad_arguments(tmp_path):
    from experiments.bench import rl2_update

    with pytest.raises(SystemExit):
        rl2_update.main(["--length", "0", "--out", str(tmp_path / "x")])
