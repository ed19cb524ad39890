"""metarl sweep (seeds pooled, IQM by hand) and the stable-baselines3 baselines (budget, task switching)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import envs
from metarl.cli import main
from metarl.evaluation import baseline_budget
from metarl.sb3_baselines import TaskCycler, default_algo
from metarl.sweep import aggregate, grid_cells

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "run.num_iterations=2",
    "run.log_every=1",
    "run.checkpoint_every=1",
    "tasks.horizon=10",
    "tasks.num_test=3",
    "agent.meta_batch_size=2",
    "agent.episodes_per_task=2",
    "agent.hidden_sizes=[8, 8]",
    "agent.backend='serial'",
    "agent.eval_episodes_per_task=2",
    "agent.eval_adapt_steps=1",
]


def metarl(*args: str) -> str:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    assert code == 0, err.getvalue()
    return out.getvalue()


def test_grid_cells_are_the_product_of_the_axes():
    cells = grid_cells(["agent.inner_lr=0.05,0.1", "agent.adapt_steps=1,2"])
    assert cells == [
        ["agent.inner_lr=0.05", "agent.adapt_steps=1"],
        ["agent.inner_lr=0.05", "agent.adapt_steps=2"],
        ["agent.inner_lr=0.1", "agent.adapt_steps=1"],
        ["agent.inner_lr=0.1", "agent.adapt_steps=2"],
    ]
    assert grid_cells([]) == [[]]


def test_aggregate_pools_tasks_over_seeds_with_the_interquartile_mean():
    # Seed A's tasks score 1..4 at step 0, seed B's 5..8. Pooled 1..8: the IQM drops the lowest
    # and highest quarter (1, 2 and 7, 8) and averages 3..6 = 4.5. Step 1 is step 0 plus 10.
    docs = []
    for values in ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]):
        per_task = np.stack([values, np.add(values, 10.0)], axis=1).tolist()
        docs.append({"summary": {"adaptation_steps": [0, 1]}, "per_task": {"return": per_task}})
    agg = aggregate(docs)
    assert agg["num_seeds"] == 2 and agg["adaptation_steps"] == [0, 1]
    assert agg["return"]["iqm"] == pytest.approx([4.5, 14.5])
    assert agg["return"]["mean"] == pytest.approx([4.5, 14.5])
    assert agg["return"]["num"] == [8, 8]
    lo, hi = agg["return"]["lo"][0], agg["return"]["hi"][0]
    assert 1.0 <= lo <= 4.5 <= hi <= 8.0
    assert "success" not in agg


def test_aggregate_keeps_variant_curves_the_lower_tail_and_agent_baselines():
    # 20 pooled tasks scoring -1..-20 on shifted tasks: the worst is -20 and CVaR 0.1 the mean of
    # the lowest ceil(0.1 * 20) = 2, i.e. -19.5.
    docs = []
    for seed in range(2):
        values = -np.arange(1.0, 11.0) - 10 * seed
        per_task = {
            "return": np.stack([values, values], axis=1).tolist(),
            "return_shifted": np.stack([values, values + 1], axis=1).tolist(),
            "baselines": {"bc_scratch": {"return": (values / 2).tolist()}},
        }
        docs.append({"summary": {"adaptation_steps": [0, 1]}, "per_task": per_task})
    agg = aggregate(docs)
    assert agg["return_shifted"]["worst"] == pytest.approx([-20.0, -19.0])
    assert agg["return_shifted"]["cvar10"] == pytest.approx([-19.5, -18.5])
    assert agg["agent_baselines"]["bc_scratch/return"]["mean"] == pytest.approx(-5.25)
    assert agg["agent_baselines"]["bc_scratch/return"]["cvar10"] == pytest.approx(-9.75)


def test_baseline_budget_is_the_meta_learners_adaptation_steps():
    # 3 inner steps, each on 20 episodes of 100 steps: 6,000 environment steps per task.
    cfg = SimpleNamespace(eval_adapt_steps=3, eval_episodes_per_task=20, horizon=0)
    experiment = SimpleNamespace(agent=SimpleNamespace(config=cfg), distribution=SimpleNamespace(horizon=100))
    assert baseline_budget(experiment) == 3 * 20 * 100
    cfg.horizon = 50
    assert baseline_budget(experiment) == 3 * 20 * 50


def test_task_cycler_switches_task_on_reset_through_set_task():
    dist = envs.make("navigation-2d")
    tasks = dist.train_tasks()[:3]
    env = TaskCycler(dist, tasks, seed=0)
    goals = set()
    for _ in range(12):
        env.reset(seed=0)
        goals.add(tuple(np.round(env.unwrapped._goal, 6)))
    assert goals == {tuple(np.round(np.asarray(t["goal"]), 6)) for t in tasks}
    assert default_algo(dist, "navigation-2d") == "ppo"
    assert default_algo(envs.make("halfcheetah-vel"), "halfcheetah-vel") == "sac"


def test_sweep_runs_seeds_and_writes_the_aggregate(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["sweep", "experiments/maml_trpo_nav2d.toml", "--seeds", "2", "--workers", "2", "--out", str(tmp_path)]
    for s in TINY:
        args += ["--set", s]
    last = metarl(*args).strip().splitlines()[-1]
    document = json.loads((tmp_path / "sweep.json").read_text())
    cell = document["cells"]["base"]
    assert cell["num_seeds"] == 2 and cell["adaptation_steps"] == [0, 1]
    assert cell["return"]["num"] == [6, 6]  # 3 held-out tasks x 2 seeds
    per_seed = [json.loads((tmp_path / f"base-s{s}" / "eval.json").read_text()) for s in (0, 1)]
    pooled = np.concatenate([np.asarray(d["per_task"]["return"]) for d in per_seed])
    assert cell["return"]["mean"] == pytest.approx(pooled.mean(0).tolist())
    assert json.loads(last)["cells"]["base"]["return"] == cell["return"]["iqm"]
    assert (tmp_path / "sweep.md").exists() and (tmp_path / "sweep_return.png").exists()


def test_eval_with_baselines_reports_them_beside_the_meta_learner(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["run", "experiments/maml_trpo_nav2d.toml", "--out", str(tmp_path / "run"), "--no-progress",
            "--set", "run.eval_at_end=false"]
    for s in TINY:
        args += ["--set", s]
    metarl(*args)
    out = metarl("eval", str(tmp_path / "run"), "--baselines", "--pretrain-steps", "128", "--baseline-episodes", "1")
    summary = json.loads(out.strip().splitlines()[-1])
    baselines = summary["baselines"]
    assert baselines["budget_steps"] == 1 * 2 * 10
    assert baselines["scratch"]["algo"] == "ppo" and "return_mean" in baselines["scratch"]
    assert {"return_mean", "return_pre_mean"} <= set(baselines["multitask"])
    document = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert len(document["baselines_per_task"]["scratch"]["return"]) == 3


def test_a_failed_run_does_not_lose_the_others(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["sweep", "experiments/maml_trpo_nav2d.toml", "--seeds", "1", "--workers", "2", "--out", str(tmp_path),
            "--grid", "agent.inner_lr=0.1,-1.0"]
    for s in TINY:
        args += ["--set", s]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    assert code == 2
    assert "1 of 2 runs failed (inner_lr--1.0-s0: " in err.getvalue() and "inner_lr must be > 0" in err.getvalue()
    assert "run the same command again" in err.getvalue()
    document = json.loads((tmp_path / "sweep.json").read_text())
    assert list(document["cells"]) == ["inner_lr-0.1"]


