"""experiments/pearl_replay_sizes.py: the sizes it reconstructs from the runner's meta-batch draws
are those of the replay a full checkpoint holds, task for task and in order; it adds them to a
portable checkpoint that lacks them, once, and the resume from it then refills the replay."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

from experiments.pearl_replay_sizes import main, replay_sizes
from metarl.cli import main as metarl_main

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    "run.num_iterations=3", "run.eval_at_end=false", "run.checkpoint_every=1", "tasks.horizon=10",
    "tasks.num_train=5", "tasks.num_test=3", "agent.backend='serial'", "agent.num_workers=1",
    "agent.meta_batch_size=4", "agent.num_collect_tasks=2", "agent.num_train_steps=2",
    "agent.batch_size=8", "agent.context_batch_size=4", "agent.hidden_sizes=[8, 8]",
    "agent.encoder_hidden_sizes=[8]", "agent.num_initial_episodes=1", "agent.max_replay_tasks=6",
]  # fmt: skip


def _cli(*argv: str) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return metarl_main(list(argv))


def test_reconstructed_sizes_match_the_replay_and_a_resume_refills_it(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    args = ["run", "experiments/pearl_nav2d.toml", "--out", str(run), "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    assert _cli(*args) == 0
    full = torch.load(run / "checkpoint.pt", weights_only=False)
    actual = [(task, len(buffer["data"])) for task, buffer in full["agent"]["replay"]]
    # 5 training tasks and up to 6 collected ones, at most 6 kept: the oldest were dropped.
    assert len(actual) == 6 and replay_sizes(run, 3) == actual
    # A portable checkpoint as written before it recorded the sizes.
    portable = torch.load(run / "checkpoint.portable.pt", weights_only=False)
    del portable["agent"]["replay_sizes"]
    torch.save(portable, run / "checkpoint.portable.pt")
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(run)]) == 0
    assert torch.load(run / "checkpoint.portable.pt", weights_only=False)["agent"]["replay_sizes"] == actual
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert main([str(run)]) == 2
    assert "already records" in err.getvalue()
    assert _cli("run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=4") == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    refilled = lines[-1]["train/recollected_env_steps"]
    assert lines[-1]["iteration"] == 4 and refilled >= sum(n for _, n in actual)
