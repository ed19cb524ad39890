"""Adaptation diagnostics: the inner-step KL and action-mean shift against hand arithmetic, the
no-op warning on a run whose inner step does nothing, and its silence on the shipped configs."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

from metarl import meta_pg
from metarl.cli import main
from metarl.diagnostics import InnerStepWatch
from metarl.experiment import Experiment
from metarl.policies import GaussianMLPPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_inner_kl_and_mean_shift_match_hand_arithmetic_for_a_shifted_bias():
    policy = GaussianMLPPolicy(obs_dim=3, act_dim=2, hidden_sizes=(4,))
    params = policy.init_params(0)
    shift = torch.tensor([0.3, -0.4])  # |shift| = 0.5
    adapted = {k: v.unsqueeze(0).clone() for k, v in params.items()}
    adapted["out.bias"] = adapted["out.bias"] + shift
    adapted["log_std"] = adapted["log_std"] + math.log(2.0)  # std 1 -> 2
    obs = torch.randn(1, 2, 5, 3)
    mask = torch.ones(1, 2, 5)
    batch = meta_pg.PGBatch(obs, torch.zeros(1, 2, 5, 2), torch.zeros(1, 2, 5), mask)
    trajectories = [_returns_only(1.0), _returns_only(4.0)]
    metrics = meta_pg.adaptation_metrics(
        policy, params, meta_pg.MetaBatch([batch], batch, trajectories, 0.0, adapted)
    )
    # KL(N(m, 1) || N(m + d, 4)) per dimension: log 2 + (1 + d^2) / 8 - 1/2.
    expected = sum(math.log(2.0) + (1.0 + d * d) / 8.0 - 0.5 for d in (0.3, -0.4))
    assert metrics["adapt/inner_kl"] == pytest.approx(expected, rel=1e-5)
    assert metrics["adapt/mean_shift"] == pytest.approx(0.5, rel=1e-5)
    assert metrics["adapt/return_gain"] == pytest.approx(3.0)


class _returns_only:
    """A stand-in for Trajectories with a fixed mean episode return."""

    def __init__(self, value: float) -> None:
        self.value = value

    def episode_returns(self) -> torch.Tensor:
        return torch.full((1, 2), self.value)


def test_watch_fires_once_after_the_streak_and_resets_on_a_real_step():
    watch = InnerStepWatch(threshold=1e-6, patience=3)
    kls = [1e-8, 1e-8, 1e-3, 1e-8, 1e-8]  # the real step at 3 breaks the first streak
    assert [watch.update(i, {"adapt/inner_kl": k}) for i, k in enumerate(kls)] == [None] * 5
    message = watch.update(5, {"adapt/inner_kl": 1e-9})
    assert message is not None and "agent.inner_lr" in message
    assert watch.update(6, {"adapt/inner_kl": 1e-9}) is None  # once
    assert InnerStepWatch().update(0, {"train/return": 1.0}) is None  # agents without inner step


TINY = [
    "run.log_every=1",
    "run.checkpoint_every=20",
    "run.eval_at_end=false",
    "tasks.horizon=10",
    "agent.meta_batch_size=2",
    "agent.episodes_per_task=2",
    "agent.hidden_sizes=[8, 8]",
    "agent.backend='serial'",
]


def _run(out: Path, *overrides: str) -> str:
    args = ["run", "experiments/maml_trpo_nav2d.toml", "--out", str(out), "--no-progress"]
    for s in [*TINY, *overrides]:
        args += ["--set", s]
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(args) == 0, err.getvalue()
    return err.getvalue()


def test_a_run_with_a_no_op_inner_step_warns_once_and_a_working_one_does_not(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(ROOT)
    stderr = _run(tmp_path / "noop", "agent.inner_lr=1e-9", "run.num_iterations=12")
    assert stderr.count("warning: the inner step") == 1, stderr
    assert "agent.inner_lr" in stderr
    lines = (tmp_path / "noop" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["adapt/inner_kl"] < 1e-6 for line in lines)
    stderr = _run(tmp_path / "ok", "run.num_iterations=12")
    assert "warning" not in stderr, stderr


def test_the_no_op_streak_survives_a_resume_so_a_run_stopped_often_still_warns(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "noop"
    # 6 iterations, then 6 more after a resume: 12 in a row, though no stretch alone reaches 10
    assert "warning" not in _run(run, "agent.inner_lr=1e-9", "run.num_iterations=6")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["run", "--resume", str(run), "--no-progress", "--set", "run.num_iterations=12"]) == 0
    assert err.getvalue().count("warning: the inner step") == 1, err.getvalue()
    assert "iteration 10:" in err.getvalue()


MAML_CONFIGS = sorted(
    str(p.relative_to(ROOT))
    for p in (ROOT / "experiments").glob("maml_*.toml")
    if "demo" not in p.name
)


def _first_inner_kl(config: str) -> float:
    """``adapt/inner_kl`` of a shipped config's first iteration, on a few tasks and episodes."""
    from metarl.config import apply_overrides, load_toml

    small = [
        "agent.meta_batch_size=2",
        "agent.episodes_per_task=4",
        "agent.backend='serial'",
        "agent.num_workers=1",
        "agent.envs_per_worker=0",
    ]
    document = apply_overrides(load_toml(ROOT / config), small)
    experiment = Experiment(document, Path("unused"))
    try:
        tasks = experiment.distribution.sample(2, experiment.rng)
        return experiment.agent.step(tasks)["adapt/inner_kl"]
    finally:
        experiment.close()


@pytest.mark.parametrize("config", [c for c in MAML_CONFIGS if "_ml" not in c])
def test_shipped_locomotion_and_navigation_configs_take_a_real_inner_step(config):
    assert _first_inner_kl(config) > InnerStepWatch().threshold * 10


@pytest.mark.slow
@pytest.mark.parametrize("config", [c for c in MAML_CONFIGS if "_ml" in c])
def test_shipped_metaworld_configs_take_a_real_inner_step(config):
    assert _first_inner_kl(config) > InnerStepWatch().threshold * 10


def test_held_out_curves_are_logged_every_n_iterations_and_survive_a_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    curve = ["run.eval_every=2", "eval.num_tasks=3", "agent.eval_adapt_steps=1",
             "agent.eval_episodes_per_task=2"]
    _run(tmp_path / "full", "run.num_iterations=4", *curve)
    _run(tmp_path / "split", "run.num_iterations=2", *curve)
    config = tmp_path / "split" / "config.toml"  # a longer budget is a free change on resume
    config.write_text(config.read_text().replace("num_iterations = 2", "num_iterations = 4"))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["run", "--resume", str(tmp_path / "split"), "--no-progress"])
    assert code == 0, err.getvalue()
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "split" / "metrics.jsonl").read_text() == full
    rows = [json.loads(line) for line in full.splitlines()]
    assert [("eval/return_step1" in r) for r in rows] == [False, True, False, True]
    assert "eval/return_step0" in rows[1] and math.isfinite(rows[1]["eval/return_step0"])
