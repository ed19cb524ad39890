"""The MAML-RL and sinusoid tables (experiments/tables/maml_rl.py, sinusoid.py) and metarl bench trpo."""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl.cli import main

ROOT = Path(__file__).resolve().parents[2]
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


def test_rl_table_reads_a_sweep_and_its_timing(tmp_path, monkeypatch):
    from experiments.tables.maml_rl import main as rl_table

    monkeypatch.chdir(ROOT)
    args = ["sweep", "experiments/maml_trpo_nav2d.toml", "--seeds", "2", "--workers", "1", "--out", str(tmp_path / "s")]
    for s in TINY:
        args += ["--set", s]
    metarl(*args)
    with contextlib.redirect_stdout(io.StringIO()):
        assert rl_table([str(tmp_path / "s"), "--out", str(tmp_path / "table"),
                         "--note", "first note", "--note", "the paper's second note"]) == 0
    table = json.loads((tmp_path / "table.json").read_text())
    assert table["notes"] == ["first note", "the paper's second note"]
    # the written command runs again as it stands: the shell gives back the same arguments
    assert shlex.split(table["command"])[3:] == [str(tmp_path / "s"), "--out", str(tmp_path / "table"),
                                                "--note", "first note", "--note", "the paper's second note"]
    assert "## Notes\n\n- first note\n- the paper's second note\n" in (tmp_path / "table.md").read_text()
    (row,) = table["rows"]
    cell = json.loads((tmp_path / "s" / "sweep.json").read_text())["cells"]["base"]
    assert row["return"] == cell["return"] and row["num_seeds"] == 2 and row["num_tasks"] == 3
    timings = [json.loads(line) for s in (0, 1) for line in (tmp_path / "s" / f"base-s{s}" / "timing.jsonl").read_text().splitlines()]
    sampling = np.mean([t["time/sampling_s"] for t in timings])
    optimisation = np.mean([t["time/optimization_s"] for t in timings])
    assert row["timing"]["optimization_over_sampling"] == pytest.approx(optimisation / sampling)
    assert "| return |" in (tmp_path / "table.md").read_text()
    # The adaptation gain: mean over tasks × seeds of (after one step - before), from each eval.json.
    scores = np.concatenate([np.asarray(json.loads((tmp_path / "s" / f"base-s{s}" / "eval.json").read_text())
                                        ["per_task"]["return"]) for s in (0, 1)])
    g = row["gain"]["return"]
    assert g["num"] == 6 and g["mean"] == pytest.approx(float(np.mean(scores[:, 1] - scores[:, 0])))
    assert g["lo"] <= g["mean"] <= g["hi"] and row["gain"]["success"] is None
    # The row names the whole sweep command, baseline options included, so it can be re-run as is.
    assert row["command"].startswith("metarl sweep experiments/maml_trpo_nav2d.toml --seeds 2 --workers 1")


def test_bench_trpo_ratio_and_parts_come_from_the_timed_iterations(tmp_path, monkeypatch):
    from experiments.tables.maml_rl import main as rl_table

    monkeypatch.chdir(ROOT)
    out = tmp_path / "trpo_timing"
    last = metarl("bench", "trpo", "--task", "navigation-2d", "--iterations", "3", "--meta-batch-size", "2",
                  "--episodes-per-task", "2", "--workers", "1", "--fisher", "gauss-newton", "hessian",
                  "--hvp-subsample", "0.5", "--products", "closed-form", "autograd",
                  "--out", str(out)).strip().splitlines()[-1]
    document = json.loads(out.with_suffix(".json").read_text())
    assert [(s["fisher"], s["hvp_subsample"], s["products"]) for s in document["settings"]] == [
        ("gauss-newton", 0.5, "closed-form"), ("gauss-newton", 0.5, "autograd"),
        ("hessian", 0.5, "closed-form"), ("hessian", 0.5, "autograd")]
    assert [s["config"]["products"] for s in document["settings"]] == ["closed-form", "autograd"] * 2
    assert [s["config"]["products_used"] for s in document["settings"]] == ["closed-form", "autograd"] * 2
    for setting in document["settings"]:
        timed = setting["per_iteration"][1:]  # the first builds workers and is left out
        assert setting["iterations_timed"] == 2 == len(timed)
        sampling = np.mean([r["sampling_s"] for r in timed])
        optimisation = np.mean([r["optimization_s"] for r in timed])
        assert setting["optimization_over_sampling"] == pytest.approx(optimisation / sampling)
        # The parts are disjoint pieces of the optimisation time (each rounded to 1 ms).
        assert 0 < sum(setting["parts_s"].values()) <= optimisation + 0.003
        key = f"{setting['fisher']}/{setting['hvp_subsample']}/{setting['products']}"
        assert json.loads(last)["ratios"][key] == pytest.approx(setting["optimization_over_sampling"], abs=1e-4)
        assert json.loads(last)["accepted"][key] == setting["accepted_fraction"]
        accepted = [r["accepted"] for r in setting["per_iteration"]]
        assert setting["accepted_fraction"] == pytest.approx(np.mean(accepted))
    assert f"**{document['settings'][0]['optimization_over_sampling']:.3f}**" in out.with_suffix(".md").read_text()
    # The reference: the policy's log-likelihood gradient on all post-update observations (2 tasks ×
    # 2 episodes × horizon 100) through [2, 100, 100, 2]; by hand, 2 FLOPs per multiply-add in the
    # forward, the weight gradients, and the input gradients of every layer but the first.
    reference = document["reference"]
    samples = 2 * 2 * 100
    assert reference["samples"] == samples
    assert reference["gflop"] * 1e9 == pytest.approx(2 * samples * (2 * (200 + 10_000 + 200) + 10_000 + 200))
    for setting in document["settings"]:
        assert setting["optimization_gflop"] * 1e9 == setting["per_iteration"][0]["flops"] > reference["gflop"] * 1e9
        floor = setting["optimization_gflop"] / reference["gflop_per_s"]
        assert setting["floor"]["s"] == pytest.approx(floor)
        assert setting["floor"]["over_sampling"] == pytest.approx(floor / setting["sampling_s"])
        assert json.loads(last)["floors"][f"{setting['fisher']}/{setting['hvp_subsample']}/{setting['products']}"] \
            == pytest.approx(setting["floor"]["over_sampling"], abs=1e-4)
    assert f"**{document['settings'][0]['floor']['over_sampling']:.3f}**" in out.with_suffix(".md").read_text()
    for setting in document["settings"]:
        parts, counted = setting["gflop_parts"], setting["per_iteration"][0]
        # at most conjugate gradient's cg_iters products, plus the one that scales the step
        assert 2 <= parts["num_products"] == counted["products"] <= 10 + 1
        assert parts["products"] > 0
        assert parts["per_product"] * parts["num_products"] == pytest.approx(parts["products"])
        assert parts["gradient"] > 0 and parts["line_search"] > 0 and parts["inner"] >= 0
        total = parts["inner"] + parts["gradient"] + parts["products"] + parts["line_search"]
        assert total == pytest.approx(setting["optimization_gflop"])
    # One forward pass of [2, 100, 100, 2] over the 400 post-update observations, by hand.
    from experiments.bench.trpo import forward_gflop

    assert forward_gflop(document["settings"][0]) * 1e9 == pytest.approx(2 * 400 * (200 + 10_000 + 200))
    # rl_table carries the measurement into the MAML-RL table.
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"title": "t", "cells": {}, "commands": {}}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert rl_table([str(tmp_path / "s"), "--out", str(tmp_path / "table"), "--timing",
                         str(out.with_suffix(".json"))]) == 0
    assert json.loads((tmp_path / "table.json").read_text())["trpo_timing"][0]["settings"] == document["settings"]
    assert f"{document['settings'][1]['optimization_over_sampling']:.3f}" in (tmp_path / "table.md").read_text()


def test_rl_table_keeps_earlier_rows_with_their_machine(tmp_path, monkeypatch):
    from experiments.tables.maml_rl import main as rl_table

    monkeypatch.chdir(ROOT)
    metric = {"iqm": [-40.0, -20.0], "lo": [-45.0, -25.0], "hi": [-35.0, -15.0]}
    old_row = {"sweep": "old_sweep", "cell": "base", "num_seeds": 3, "adaptation_steps": [0, 1],
               "return": metric, "success": None, "baselines": {}, "timing": {}, "num_tasks": 40,
               "command": "metarl run old.toml"}
    replaced = {**old_row, "sweep": "t"}  # the sweep given again below replaces this one
    (tmp_path / "old.json").write_text(json.dumps({"machine": "machine A", "rows": [old_row, replaced]}))
    (tmp_path / "s").mkdir()
    cell = {"num_seeds": 2, "adaptation_steps": [0, 1], "return": metric}
    (tmp_path / "s" / "sweep.json").write_text(
        json.dumps({"title": "t", "cells": {"base": cell}, "commands": {"base": "metarl run new.toml"}}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert rl_table([str(tmp_path / "s"), "--out", str(tmp_path / "table"), "--keep", str(tmp_path / "old.json")]) == 0
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert [(r["sweep"], r["command"]) for r in rows] == [("old_sweep", "metarl run old.toml"),
                                                          ("t", "metarl run new.toml")]
    assert rows[0]["machine"] == "machine A" and rows[1]["machine"] != "machine A"
    assert "| machine A | `metarl run old.toml` |" in (tmp_path / "table.md").read_text()


def test_sweep_and_sinusoid_table_threads_reach_each_run_and_bad_counts_are_refused(tmp_path, monkeypatch):
    """``--threads`` is the torch thread count of every run (1 by default, one run per core);
    a count below 1 is refused before anything trains."""
    import torch

    from experiments.tables import sinusoid as sinusoid_table
    from metarl.sweep import run_one

    monkeypatch.chdir(ROOT)
    calls: list[int] = []

    def record(count: int) -> None:  # the run's own setting; the serial sampler's are its own
        if sys._getframe(1).f_globals["__name__"] == "metarl.sweep":
            calls.append(count)

    monkeypatch.setattr(torch, "set_num_threads", record)
    document = run_one("experiments/maml_trpo_nav2d.toml", TINY, str(tmp_path / "run"), None, 2)
    assert calls == [2] and document["summary"]["iteration"] == 2
    run_one("experiments/maml_trpo_nav2d.toml", TINY, str(tmp_path / "run"), None)  # reused, default 1
    assert calls == [2, 1]
    before = sorted(p.name for p in tmp_path.iterdir())
    for bad in (["--threads", "0"], ["--workers", "-1"]):
        with pytest.raises(AssertionError, match="threads must be at least 1"):
            metarl("sweep", "experiments/maml_trpo_nav2d.toml", "--out", str(tmp_path / "bad"), *bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing trained or written
    for bad in (["--threads", "0"], ["--workers", "0"]):
        with pytest.raises(SystemExit):
            sinusoid_table.main([*bad, "--root", str(tmp_path / "sin"), "--out", str(tmp_path / "sin")])
    assert not (tmp_path / "sin").exists()


def test_rl_table_says_how_far_the_mean_after_one_step_is_from_the_published_range():
    from experiments.tables.maml_rl import _fmt_published

    ref = {"return_post": -75.0, "range": [-80.0, -70.0], "iterations": 500}
    row = {"published": ref, "return": {"mean": [-200.0, -150.0], "iqm": [0.0, 0.0]}}
    assert _fmt_published(row, "return") == "-75 (500); ours -70 from its range [-80, -70]"
    row["return"]["mean"][1] = -72.0
    assert _fmt_published(row, "return").endswith("ours within its range")
    row["return"]["mean"][1] = -60.0
    assert "+10 from its range" in _fmt_published(row, "return")
    assert _fmt_published(row, "success") == "–" and _fmt_published({**row, "published": None}, "return") == "–"
    # A success logged at a step count (no iterations): 0 at 5M steps, ours 0.25 above it.
    row = {"published": {"success_post": 0.0, "env_steps": 5.0e6}, "success": {"mean": [0.1, 0.25]}}
    assert _fmt_published(row, "success") == "0 (5M steps); ours +0.25 from its range [0, 0]"
    assert _fmt_published({**row, "return": {"mean": [1.0, 2.0]}}, "return") == "–"


def test_a_row_names_every_machine_its_runs_trained_on_and_times_the_main_one(tmp_path):
    """Iterations 1-3 on machine A, 4-5 on B (machines.jsonl: each line holds from the iteration
    after the one it names): B's timing is left out of the means, and both machines are counted."""
    from experiments.tables.common import machines_of
    from experiments.tables.maml_rl import _timing

    run = tmp_path / "base-s0"
    run.mkdir()
    (run / "machines.jsonl").write_text(
        '{"iteration": 0, "machine": "A"}\n{"iteration": 3, "machine": "B"}\n')
    sampling = [2.0, 4.0, 6.0, 100.0, 100.0]
    (run / "timing.jsonl").write_text("".join(
        json.dumps({"iteration": i + 1, "time/sampling_s": s, "time/optimization_s": s / 2}) + "\n"
        for i, s in enumerate(sampling)))
    assert machines_of([run]) == {"A": 3, "B": 2}
    timing = _timing([run], next(iter(machines_of([run]))))
    assert timing["machine"] == "A" and timing["iterations"] == 5
    assert timing["sampling_s"] == pytest.approx(4.0) and timing["optimization_over_sampling"] == pytest.approx(0.5)
