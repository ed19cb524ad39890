"""The meta-adversarial table (experiments/tables/meta_adversarial.py and its report)."""

from __future__ import annotations

import json

import pytest


def _generator_sweep(root, name, role_toml, held, shifted, per_task=None):
    run = root / name / "base-s0"
    run.mkdir(parents=True)
    run.joinpath("config.toml").write_text(
        '[run]\nagent = "agents.task_generator:TaskGenerator"\nnum_iterations = 4\n'
        f'[tasks]\nname = "halfcheetah-vel-mass"\n[agent]\n{role_toml}\n')

    def curve(mean, cvar):
        return {"iqm": [0.0, mean], "lo": [0.0, mean - 1], "hi": [0.0, mean + 1], "mean": [0.0, mean],
                "worst": [0.0, cvar - 10], "cvar10": [0.0, cvar]}

    cell = {"num_seeds": 5, "adaptation_steps": [0, 3], "return": curve(*held),
            "return_shifted": curve(*shifted)}
    if per_task is not None:  # [task] last-step returns; step 0 is ignored by the goal check
        run.joinpath("eval.json").write_text(json.dumps({"per_task": {
            k: [[0.0, v] for v in per_task] for k in ("return", "return_shifted")}}))
    (root / name / "sweep.json").write_text(json.dumps(
        {"title": name, "cells": {"base": cell}, "sweep_command": f"metarl sweep {name}"}))
    return root / name


def test_adv_table_reads_learners_baselines_and_the_lower_tail(tmp_path):
    from experiments.tables.meta_adversarial import main as adv_table

    curve = {"iqm": [-40.0, -30.0, -20.0], "lo": [-41.0, -31.0, -21.0], "hi": [-39.0, -29.0, -19.0],
             "mean": [-40.0, -30.0, -20.0], "worst": [-60.0, -50.0, -45.0], "cvar10": [-58.0, -49.0, -44.0]}
    bc = {"iqm": -35.0, "lo": -36.0, "hi": -34.0, "mean": -35.0}
    cell = {"num_seeds": 5, "adaptation_steps": [0, 1, 5], "return": curve, "return_gail_scratch": curve,
            "agent_baselines": {"maml_bc/return": bc}}
    for name in ("imitation", "generator"):
        (tmp_path / name / "base-s0").mkdir(parents=True)
        (tmp_path / name / "base-s0" / "config.toml").write_text(
            '[run]\nagent = "agents.task_generator:TaskGenerator"\nnum_iterations = 3\n'
            '[tasks]\nname = "navigation-2d-wind"\n[agent]\nplausibility = "none"\n')
        (tmp_path / name / "sweep.json").write_text(json.dumps(
            {"title": name, "cells": {"base": {**cell, "return_shifted": curve}}, "commands": {"base": "cmd"},
             "sweep_command": f"metarl sweep {name}"}))
    adv_table(["--imitation", str(tmp_path / "imitation"), "--generator", str(tmp_path / "generator"),
               "--out", str(tmp_path / "table")])
    document = json.loads((tmp_path / "table.json").read_text())
    learners = {r["learner"]: r for r in document["imitation"]}
    assert set(learners) == {"meta-adversarial (meta G + meta D)", "GAIL from scratch (fresh G + fresh D)", "MAML-BC"}
    assert learners["meta-adversarial (meta G + meta D)"]["values"] == [
        "-40 [-41, -39]", "-30 [-31, -29]", "-20 [-21, -19]"]
    assert {r["sweep"] for r in document["imitation"]} == {"imitation"}  # named by directory
    (row,) = document["generator"]
    assert row["return_shifted"]["worst"] == -45.0 and row["return"]["cvar10"] == -44.0
    assert row["command"] == "metarl sweep generator"
    table = (tmp_path / "table.md").read_text()
    assert "| -20 | -45 | -44 |" in table
    header = next(line for line in table.splitlines() if line.startswith("| benchmark | sweep | role"))
    generator_row = next(line for line in table.splitlines() if line.startswith("| navigation-2d-wind | generator"))
    assert "| G without D | 5 | 3 | -20 [-21, -19] |" in generator_row
    assert header.count("|") == generator_row.count("|")


def test_generator_goal_check_against_plain_maml_by_hand(tmp_path):
    from experiments.tables.meta_adversarial import main as adv_table

    plain = _generator_sweep(tmp_path, "plain", "generated_fraction = 0.0", (-100.0, -200.0), (-150.0, -300.0))
    ours = _generator_sweep(tmp_path, "ours", 'plausibility = "discriminator"', (-104.0, -190.0), (-160.0, -280.0))
    dr = _generator_sweep(tmp_path, "dr", 'proposal = "uniform"\ngenerated_fraction = 1.0', (-90.0, -150.0), (-1.0, -2.0))
    adv_table(["--generator", str(plain), str(ours), str(dr), "--out", str(tmp_path / "t")])
    document = json.loads((tmp_path / "t.json").read_text())
    roles = {r["sweep"]: r["role"] for r in document["generator"]}
    assert roles == {"plain": "plain MAML (no generated tasks)", "ours": "G + D (meta-adversarial)",
                     "dr": "wide domain randomisation (uniform over G's box)"}
    checks = {c["tasks"]: c for c in document["generator_goal"]}
    # held-out: mean -104 vs -100 is 4% below (within 5%), CVaR -190 > -200: met
    held = checks["held-out"]
    assert held["mean_delta"] == -4.0 and held["mean_delta_pct"] == -4.0 and held["cvar10_delta"] == 10.0
    assert held["cvar_above"] and held["mean_within"] and held["met"]
    # shifted: mean -160 vs -150 is 6.7% below: CVaR above but the goal is missed
    shifted = checks["shifted"]
    assert shifted["cvar_above"] and not shifted["mean_within"] and not shifted["met"]
    assert "| halfcheetah-vel-mass | held-out | -104 (-4, -4.0%) | – | -190 (+10) | – | yes | yes | **yes** | – |" in (
        tmp_path / "t.md").read_text()
    # with per-task scores, paired intervals: G + D = plain + 3 on every task -> both intervals [3, 3]
    scores = [-300.0, -120.0, -80.0, -60.0, -40.0, -20.0, -10.0, -5.0, -2.0, -1.0]
    plain = _generator_sweep(tmp_path / "b", "plain", "generated_fraction = 0.0", (-100.0, -200.0),
                             (-150.0, -300.0), per_task=scores)
    ours = _generator_sweep(tmp_path / "b", "ours", 'plausibility = "discriminator"', (-104.0, -190.0),
                            (-160.0, -280.0), per_task=[v + 3.0 for v in scores])
    adv_table(["--generator", str(plain), str(ours), "--out", str(tmp_path / "u")])
    held = next(c for c in json.loads((tmp_path / "u.json").read_text())["generator_goal"] if c["tasks"] == "held-out")
    assert held["cvar10_delta_ci"] == pytest.approx([3.0, 3.0]) and held["mean_delta_ci"] == pytest.approx([3.0, 3.0])
    assert held["cvar_above_clearly"] is True


def test_kept_generator_rows_recover_their_role_from_the_command(tmp_path):
    from experiments.tables.meta_adversarial import command_config, generator_role
    from experiments.tables.meta_adversarial import main as adv_table

    command = ("metarl sweep experiments/task_generator_nav2d.toml --seeds 5 --workers 1 "
               "--set run.num_iterations=40 --grid agent.plausibility=discriminator,none --out runs/x")
    config = command_config(command, "plausibility-none")
    assert config["run"]["num_iterations"] == 40 and config["tasks"]["name"] == "navigation-2d-wind"
    assert generator_role(config["agent"]) == "G without D"
    assert generator_role(command_config(command, "plausibility-discriminator")["agent"]) == "G + D (meta-adversarial)"
    with pytest.raises(ValueError, match="not one of the grid cells"):
        command_config(command, "base")
    old = {"machine": "old box", "imitation": [], "generator": [
        {"sweep": "generator-nav2d", "cell": "plausibility-none", "num_seeds": 5, "command": command,
         "return": {"mean": -1.0, "worst": -2.0, "cvar10": -2.0, "iqm": -1.0, "lo": -1.5, "hi": -0.5}}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    fresh = _generator_sweep(tmp_path, "plain", "generated_fraction = 0.0", (-3.0, -4.0), (-5.0, -6.0))
    adv_table(["--generator", str(fresh), "--keep", str(tmp_path / "old.json"), "--out", str(tmp_path / "t")])
    rows = json.loads((tmp_path / "t.json").read_text())["generator"]
    assert [(r["sweep"], r["role"], r["machine"] == "old box") for r in rows] == [
        ("generator-nav2d", "G without D", True), ("plain", "plain MAML (no generated tasks)", False)]
    text = (tmp_path / "t.md").read_text()
    assert "| old box | `metarl sweep experiments" in text  # rows from two machines name theirs


def test_bc_hybrid_label_follows_the_agent_table():
    from experiments.tables.meta_adversarial import bc_hybrid

    assert bc_hybrid({}) == "" and bc_hybrid({"bc_init_steps": 0, "adapt_bc_steps": 0}) == ""
    assert bc_hybrid({"bc_init_steps": 1000, "adapt_bc_steps": 200}) == (
        "G initialised by multi-task BC (1000 steps); "
        "BC fit to the demos (200 steps) before the adversarial steps"
    )


def test_imitation_goal_check_against_the_best_bc_baseline_by_hand():
    from experiments.tables.meta_adversarial_report import imitation_checks

    def row(learner, iqm):
        return {"sweep": "push", "cell": "base", "metric": "success", "learner": learner,
                "steps": [0, 1, 5] if isinstance(iqm, list) else ["–"], "stats": {"iqm": iqm}}

    rows = [row("meta-adversarial (meta G + meta D)", [0.1, 0.3, 0.45]),
            row("GAIL from scratch (fresh G + fresh D)", [0.0, 0.0, 0.9]),  # adversarial: not a baseline
            row("BC from scratch", 0.2), row("multi-task BC fine-tuned", 0.36), row("MAML-BC", 0.3)]
    (check,) = imitation_checks(rows)
    # best non-adversarial baseline: multi-task BC at 0.36; 0.45 - 0.36 = 0.09 < 0.10: not met
    assert check["best_baseline"] == "multi-task BC fine-tuned" and check["steps"] == 5
    assert check["delta"] == pytest.approx(0.09) and check["met"] is False
    rows[0]["stats"]["iqm"][-1] = 0.47
    assert imitation_checks(rows)[0]["met"] is True
    # a BC hybrid's row is found by its "ours" flag, whatever its learner label says
    rows[0] |= {"learner": "meta-adversarial (meta G + meta D) + BC: ...", "ours": True}
    assert imitation_checks(rows)[0]["value"] == 0.47
    for r in rows:
        r["metric"] = "return"
    assert imitation_checks(rows)[0]["met"] is None  # the goal is defined on success only
