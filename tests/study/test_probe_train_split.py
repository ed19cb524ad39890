"""experiments/probe_train_split.py: its held-out row is the run's own eval.json, its training row
scores the number of training tasks asked for, and a directory without a checkpoint is refused."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.probe_train_split import main
from metarl.cli import main as metarl_main

ROOT = Path(__file__).resolve().parents[2]


def _train(config: str, run: Path, settings: list[str]) -> None:
    args = ["run", config, "--out", str(run), "--no-progress"]
    for s in settings:
        args += ["--set", s]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert metarl_main(args) == 0


@pytest.mark.parametrize("config, settings", [
    ("experiments/rl2_nav2d.toml", ["agent.meta_batch_size=2", "agent.num_minibatches=1",
                                    "agent.num_epochs=1", "agent.hidden_size=8"]),
    ("experiments/maml_trpo_nav2d.toml", ["agent.meta_batch_size=2", "agent.episodes_per_task=2"]),
])
def test_held_out_row_is_eval_json_and_train_row_has_the_tasks_asked(tmp_path, monkeypatch, config, settings):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "r"
    _train(config, run, ["run.num_iterations=1", "tasks.horizon=10", "eval.num_tasks=3", *settings])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(run), "--tasks", "4"]) == 0
    result = json.loads(out.getvalue().strip().splitlines()[-1])["runs"][str(run)]
    summary = json.loads((run / "eval.json").read_text())["summary"]
    held_out, train = result["held_out"], result["train"]
    assert held_out["num_tasks"] == summary["num_tasks"] == 3 and train["num_tasks"] == 4
    assert held_out["steps"] == train["steps"] == summary["adaptation_steps"]
    np.testing.assert_allclose(held_out["return"], summary["return_mean"], rtol=1e-12)
    assert len(train["return"]) == len(held_out["return"]) and np.isfinite(train["return"]).all()
    assert train["return"] != held_out["return"]  # other tasks, so other scores
    assert held_out["seed"] == train["seed"] == 1234  # the config's eval.seed


def test_a_directory_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as err:
        main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no checkpoint.pt" in err.getvalue()
