"""experiments/probe_pearl_context.py: its evaluated variants reproduce the agent's own evaluation
episode for episode, the others infer z from the contexts they name, and it reads a committed run
(portable checkpoint only)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.checkpoint_run import checkpoint_experiment
from experiments.probe_pearl_context import main
from metarl import meta_pg
from metarl.cli import main as metarl_main
from metarl.config import load_toml

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [
    "run.num_iterations=2", "run.eval_at_end=false", "tasks.horizon=10", "tasks.num_train=5",
    "tasks.num_test=4", "agent.meta_batch_size=4", "agent.num_collect_tasks=2",
    "agent.num_train_steps=2", "agent.batch_size=8", "agent.context_batch_size=4",
    "agent.hidden_sizes=[8, 8]", "agent.encoder_hidden_sizes=[8]", "agent.num_initial_episodes=1",
    "agent.eval_episodes_per_task=2",
]  # fmt: skip


def test_probe_matches_evaluate_and_infers_z_from_the_named_contexts(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    args = ["run", "experiments/pearl_nav2d.toml", "--out", str(run), "--no-progress"]
    for s in SETTINGS:
        args += ["--set", s]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert metarl_main(args) == 0
    seed = meta_pg.eval_seed(np.random.default_rng(5))  # the sampler seed evaluate draws first
    with checkpoint_experiment(run, load_toml(run / "config.toml")) as experiment:
        agent = experiment.agent
        reference = agent.evaluate(experiment.distribution.test_tasks()[:3], np.random.default_rng(5))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink(missing_ok=True)  # as committed: only checkpoint.portable.pt
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        argv = [str(run), "--tasks", "3", "--repeats", "2", "--seed", str(seed), "--out", str(tmp_path / "p")]
        assert main(argv) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])
    assert json.loads((tmp_path / "p.json").read_text())["runs"] == [result]
    assert result["iteration"] == 2 and result["tasks"] == 3 and result["context_batch_size"] == 4
    rows = {(r["episode"], r["z_from"]): r for r in result["episodes"]}
    assert list(rows) == [(0, "prior"), (1, "episode 0"), (1, "4 rows of episode 0"),
                          (1, "episode 0, posterior mean"), (2, "episodes 0-1"), (2, "episode 0"),
                          (2, "episode 1")]  # fmt: skip
    # The evaluated variants are the agent's evaluation (same seeds, same contexts).
    evaluated = [rows[0, "prior"], rows[1, "episode 0"], rows[2, "episodes 0-1"]]
    for k, r in enumerate(evaluated):
        assert r["return"] == pytest.approx(reference["return"][:, k].mean(), rel=1e-6)  # float32 sums
        assert "return_difference" not in r and "success" not in r  # navigation-2d: no success
    # Contexts: 10 transitions an episode, 4 drawn as training draws them; more transitions, a
    # narrower posterior (each adds precision); the posterior mean has no spread.
    assert [r["context_rows"] for r in result["episodes"]] == [0, 10, 4, 10, 20, 10, 10]
    assert rows[0, "prior"]["z_std"] == 1.0 and rows[1, "episode 0, posterior mean"]["z_std"] == 0.0
    assert rows[2, "episodes 0-1"]["z_std"] < min(rows[1, "episode 0"]["z_std"], rows[2, "episode 1"]["z_std"])
    assert rows[2, "episode 0"]["z_std"] == rows[1, "episode 0"]["z_std"]
    # Episode 2 from episode 0 again: the same posterior, another seed than episode 1's.
    assert rows[2, "episode 0"]["return"] != rows[1, "episode 0"]["return"]
    for key in [(1, "4 rows of episode 0"), (1, "episode 0, posterior mean"), (2, "episode 0"), (2, "episode 1")]:
        difference, lo, hi = rows[key]["return_difference"]
        base = rows[key[0], "episode 0" if key[0] == 1 else "episodes 0-1"]["return"]
        assert difference == pytest.approx(rows[key]["return"] - base) and lo <= hi
    table = (tmp_path / "p.md").read_text()
    assert table.count(f"| {run} | 2 |") == 7
    (tmp_path / "empty").mkdir()
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit) as exit_info:
        main([str(run), str(tmp_path / "empty")])  # refused before any run is probed
    assert exit_info.value.code == 2 and "empty has no checkpoint" in err.getvalue()
